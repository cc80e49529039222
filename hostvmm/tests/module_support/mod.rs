//! Fixtures shared by the module conformance and property tests.
#![allow(dead_code)]

use std::cell::Cell;

use accept::abi::{page_info, Gpa, PageLevel, StatusCode, TdxStatus};
use hostvmm::module::{ModuleConfig, SeamcallResult, TdcallOutcome, TdxModule};

pub const K4: PageLevel = PageLevel::Size4K;
pub const M2: PageLevel = PageLevel::Size2M;
pub const G1: PageLevel = PageLevel::Size1G;

/// Bytes covered by an entry at `level`.
pub const fn size(level: u8) -> u64 {
    1 << (12 + 9 * level as u32)
}

pub fn gpa(addr: u64) -> Gpa {
    Gpa::new_truncate(addr)
}

/// `code` with operand `op`.
pub fn st(code: StatusCode, op: u32) -> TdxStatus {
    code.with_operand(op)
}

/// A TD with a counter of fresh S-EPT page HPAs.
pub struct Td {
    pub m: TdxModule,
    next_sept: Cell<u64>,
}

impl Td {
    /// Build phase (op-state INITIALIZED), no vCPU inside.
    pub fn building(cfg: ModuleConfig) -> Td {
        Td {
            m: TdxModule::new(cfg).expect("valid config"),
            next_sept: Cell::new(0x80_0000_0000),
        }
    }

    /// Finalized, with vCPU 0 inside the TD.
    pub fn with(cfg: ModuleConfig) -> Td {
        let td = Td::building(cfg);
        assert!(td.m.finalize().status.is_success());
        td.m.vcpu_enter(0).expect("enter");
        td
    }

    /// Default capabilities, 2 vCPUs, finalized, vCPU 0 inside.
    pub fn runnable() -> Td {
        Td::with(ModuleConfig {
            vcpus: 2,
            ..ModuleConfig::default()
        })
    }

    pub fn top(&self) -> u8 {
        self.m.config().gpaw.sept_levels() - 1
    }

    /// A fresh S-EPT page HPA.
    pub fn sept_page(&self) -> u64 {
        let h = self.next_sept.get();
        self.next_sept.set(h + 0x1000);
        h
    }

    /// Makes sure entries at `level` exist for `addr` (SEPT.ADD from the top down).
    pub fn path(&self, addr: u64, level: u8) {
        for l in (level + 1..=self.top()).rev() {
            let r = self
                .m
                .sept_add(gpa(addr & !(size(l) - 1)), l, self.sept_page());
            assert!(
                r.status.is_success() || r.status.is(StatusCode::EptEntryStateIncorrect),
                "SEPT.ADD level {l}: {:?}",
                r.status
            );
        }
    }

    /// SEPT path + AUG.
    pub fn aug(&self, addr: u64, level: PageLevel, hpa: u64) -> SeamcallResult {
        self.path(addr, level.index());
        self.m.page_aug(gpa(addr), level, hpa)
    }

    /// ACCEPT on `vcpu`.
    pub fn accept(&self, vcpu: usize, addr: u64, level: PageLevel) -> TdcallOutcome {
        self.m
            .tdg_mem_page_accept(vcpu, page_info(gpa(addr), level))
            .expect("vCPU inside")
    }

    /// AUG + ACCEPT (on vCPU 0), asserting success.
    pub fn mapped(&self, addr: u64, level: PageLevel, hpa: u64) {
        assert!(self.aug(addr, level, hpa).status.is_success());
        assert_eq!(
            self.accept(0, addr, level),
            TdcallOutcome::Completed(TdxStatus::SUCCESS)
        );
    }

    /// Exits and re-enters every vCPU that is inside (what KVM's kick achieves).
    pub fn kick_all(&self) {
        for v in 0..self.m.config().vcpus as usize {
            if self.m.vcpu_in_td(v) {
                self.m.vcpu_exit(v).expect("exit");
                self.m.vcpu_enter(v).expect("enter");
            }
        }
    }

    /// BLOCK, TRACK, kick: the sequence before REMOVE/DEMOTE/PROMOTE.
    pub fn block_track(&self, addr: u64, level: PageLevel) {
        let r = self.m.range_block(gpa(addr), level);
        assert!(r.status.is_success(), "BLOCK: {:?}", r.status);
        self.track();
    }

    /// TRACK (asserting success) and kick.
    pub fn track(&self) {
        let r = self.m.mem_track();
        assert!(r.status.is_success(), "TRACK: {:?}", r.status);
        self.kick_all();
    }
}
