//! Differential conformance of the guest engine and the firmware glue against unmodified Linux
//! 6.12 code (Debian's `linux-source-6.12`), compiled in user space by `cargo xtask linux`.
//!
//! Linux and the engine run side by side on the same inputs against the same kind of module:
//!
//! - [`model::PageModel`]: a scripted TDX module (page states, the host's mapping level, a 1G
//!   cap, scripted answers) that logs every call, for exact call-sequence comparisons;
//! - [`emu::Emu`]: vCPU 0 of the `hostvmm` emulator, for end-to-end runs;
//! - `linux` (built only when `cargo xtask linux` provides the kernel source): the compiled
//!   Linux functions, whose TDCALLs reach the module through `extern "C"` callbacks.
//!
//! Linux is GPL-2.0 and this project is Apache-2.0 OR MIT: no kernel file or kernel text is in
//! this repository. The build extracts the needed files into `target/` and compiles them
//! unchanged next to this crate's own prelude, shim headers and harness (`c/`).
//!
//! The differences the suite pins on purpose are listed in the workspace README ("Linux
//! conformance") and in the engine's module docs.

pub mod emu;
#[cfg(linux_code)]
pub mod linux;
pub mod model;

/// 4 KiB.
pub const K4: u64 = 4096;
/// 2 MiB (the table unit).
pub const M2: u64 = 2 << 20;
/// 1 GiB.
pub const G1: u64 = 1 << 30;
/// The shared bit of a 48-bit GPA width.
pub const SHARED: u64 = 1 << 47;

/// A small deterministic generator (xorshift64*), so every run checks the same cases.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}
