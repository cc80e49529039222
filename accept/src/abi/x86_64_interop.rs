//! Conversions between [`Gpa`] and the `x86_64` crate's [`PhysAddr`] (feature `x86_64`).
//!
//! Both are below 2^52 by construction, so each direction is infallible.

use x86_64::PhysAddr;

use super::Gpa;

impl Gpa {
    /// As an `x86_64` physical address (always valid: GPAs are below 2^52).
    pub fn as_phys_addr(self) -> PhysAddr {
        PhysAddr::new_truncate(self.0)
    }
}

impl From<PhysAddr> for Gpa {
    fn from(p: PhysAddr) -> Gpa {
        Gpa(p.as_u64())
    }
}

impl From<Gpa> for PhysAddr {
    fn from(g: Gpa) -> PhysAddr {
        g.as_phys_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_phys_addr() {
        let gpa = Gpa::new_truncate(0x1234_5000);
        let phys: PhysAddr = gpa.into();
        assert_eq!(phys.as_u64(), 0x1234_5000);
        assert_eq!(Gpa::from(phys), gpa);
    }
}
