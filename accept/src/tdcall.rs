//! The module seam: every TDCALL the engine makes goes through [`Tdcall`].
//!
//! The trait is shaped like the ABI: raw statuses come back and the engine decodes them. Three
//! implementations exist: the `hw` module (feature `hw`) (the real TDCALL instruction), the host half's simulated
//! vCPU, and scripted fakes in tests. An implementation that needs the host to act before a call
//! can complete (an ACCEPT-type EPT-violation exit, a MapGPA hypercall) does so inside the call and
//! returns only what a real guest would see after the instruction retires.
//!
//! The trait does not retry, interpret or log: that is the engine's work. [`OnCpu`] gives any
//! implementation a CPU number ([`Tdcall::cpu`]).

use crate::abi::{Gpa, MapGpaOutcome, PageLevel, TdxStatus, VeInfo, VpInfo};

/// One vCPU's view of the TDX module. Each vCPU owns its own implementation value.
pub trait Tdcall {
    /// TDG.MEM.PAGE.ACCEPT of the page at `gpa` (aligned to `level`, shared bit clear).
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus;

    /// `TDG.VP.VMCALL<MapGPA>`(`start`, `len`). `start` carries the shared bit when the guest asks
    /// for shared, exactly as R12 does.
    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome;

    /// TDG.VP.VEINFO.GET. Clears the module's "VE info valid" flag.
    ///
    /// # Errors
    /// The module's status, normally `NO_VALID_VE_INFO`.
    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus>;

    /// TDG.VP.INFO.
    ///
    /// # Errors
    /// The module's status when the call fails or returns a GPA width the engine cannot use.
    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus>;

    /// The number of the CPU this vCPU is (the kernel's CPU number, the firmware's processor
    /// index), or 0 when it is not known. Engines shared by all vCPUs use it only to pick a
    /// stripe of their counters, so that vCPUs working at once do not write one cache line:
    /// every value is correct, and distinct values on concurrent vCPUs are faster.
    fn cpu(&self) -> usize {
        0
    }
}

impl<T: Tdcall + ?Sized> Tdcall for &mut T {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        (**self).accept(gpa, level)
    }
    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        (**self).map_gpa(start, len)
    }
    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        (**self).ve_info()
    }
    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        (**self).vp_info()
    }
    fn cpu(&self) -> usize {
        (**self).cpu()
    }
}

/// A [`Tdcall`] that answers [`Tdcall::cpu`] with a given CPU number and forwards every call to
/// the one it wraps: for an implementation that does not know its CPU (the zero-sized
/// `hw::HwTdcall`, a test fake), made where the CPU number is known (a kernel's
/// `smp_processor_id()`, firmware's processor index).
///
/// ```
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::tdcall::{OnCpu, Tdcall};
/// use tdmem_accept::testing::FakeModule;
/// use tdmem_accept::{GpaRange, Gpaw, PageLevel};
///
/// let mut vcpu3 = OnCpu::new(FakeModule::new(), 3);
/// assert_eq!(vcpu3.cpu(), 3);
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
/// acceptor.accept_range(&mut vcpu3, GpaRange::new(0, 2 << 20)?)?;
/// assert_eq!(acceptor.stats().level(PageLevel::Size2M).accepted, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct OnCpu<T> {
    inner: T,
    cpu: usize,
}

impl<T> OnCpu<T> {
    /// `inner`, on CPU `cpu`.
    pub const fn new(inner: T, cpu: usize) -> OnCpu<T> {
        OnCpu { inner, cpu }
    }

    /// The wrapped implementation.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped implementation, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The wrapped implementation, unwrapped.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Tdcall> Tdcall for OnCpu<T> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        self.inner.accept(gpa, level)
    }
    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        self.inner.map_gpa(start, len)
    }
    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        self.inner.ve_info()
    }
    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        self.inner.vp_info()
    }
    fn cpu(&self) -> usize {
        self.cpu
    }
}
