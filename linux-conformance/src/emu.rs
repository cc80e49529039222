//! vCPU 0 of the `hostvmm` emulator as a [`Tdcall`], logging every call like
//! [`crate::model::PageModel`], so Linux and the engine can each run against a fresh emulator
//! and be compared by their calls and by the S-EPT they leave.

use std::sync::Arc;

use accept::abi::{Gpa, MapGpaOutcome, PageLevel, StatusCode, TdxStatus, VeInfo, VpInfo};
use accept::Tdcall;
use hostvmm::kvm::YieldKicker;
use hostvmm::module::SeptState;
use hostvmm::vmm::{Host, HostConfig};
use tdmem_tests::drive;

use crate::model::{self, Call};

/// The emulator, driven from vCPU 0.
pub struct Emu {
    /// The host (module, MMU, guest_memfd).
    pub host: Host,
    /// Every call, in order.
    pub calls: Vec<Call>,
}

impl std::fmt::Debug for Emu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emu")
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

impl Emu {
    /// A TD of `memory` bytes, one vCPU, ACCEPT up to `max_accept_level`, this project's host.
    ///
    /// # Panics
    /// When the emulator refuses the configuration (a test bug).
    pub fn new(memory: u64, max_accept_level: PageLevel) -> Emu {
        let mut config = HostConfig::new(memory, 1);
        config.module.max_accept_level = max_accept_level;
        // Linux runs with SEPT_VE_DISABLE: no #VE on pending pages.
        config.module.pending_ve = false;
        let host = Host::new(config, Arc::new(YieldKicker)).expect("emulator configuration");
        Emu {
            host,
            calls: Vec::new(),
        }
    }

    /// The S-EPT leaf of `gpa` as (level, state).
    pub fn leaf(&self, gpa: u64) -> (u8, SeptState) {
        drive::leaf(&self.host, gpa)
    }

    /// Successful ACCEPTs as `(gpa, level)`.
    pub fn successes(&self) -> Vec<(u64, PageLevel)> {
        model::successes(&self.calls)
    }

    /// Every ACCEPT as `(gpa, level, raw status)`.
    pub fn accepts(&self) -> Vec<(u64, PageLevel, u64)> {
        model::accepts(&self.calls)
    }
}

impl Tdcall for Emu {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let status = drive::accept(&self.host, gpa.as_u64(), level)
            .unwrap_or(StatusCode::OperandBusy.with_operand(0));
        self.calls.push(Call::Accept {
            gpa: gpa.as_u64(),
            level,
            status: status.raw(),
        });
        status
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let (status, resume) = drive::map_gpa_once(&self.host, start, len);
        model::record_map_gpa(&mut self.calls, start, len, status, resume)
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        drive::ve_info(&self.host)
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Err(StatusCode::OperandInvalid.status())
    }
}
