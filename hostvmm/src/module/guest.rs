//! Guest-side TDCALLs (TDG.MEM.PAGE.ACCEPT, TDG.VP.VEINFO.GET, TDG.VP.INFO, TDG.VP.VMCALL) and
//! guest memory accesses, per vCPU (spec §5-§7).
//!
//! A call that ends in a TD exit takes the vCPU out of the TD (uncounting it from its epoch);
//! the host resumes it with [`TdxModule::vcpu_enter`]. Guest calls on a vCPU that is not inside
//! the TD are refused with [`VcpuError::NotInTd`].

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use accept::abi::{
    operand, Gpaw, StatusCode, TdxStatus, VeInfo, VpInfo, EXIT_REASON_EPT_VIOLATION,
};

use super::fault::FaultResult;
use super::host::{lock_entry, release, unlock_store};
use super::sept::{level_size, Word};
use super::stats::{AccessKind, CallKind, CallOutcome};
use super::{
    Access, AccessOutcome, ExtExitQual, SeptState, TdExit, TdcallOutcome, TdcallRegs, TdxModule,
    VcpuError, VcpuState, VmcallRegs,
};

/// VMX exit qualification bits used for EPT violations.
const QUAL_READ: u64 = 1 << 0;
const QUAL_WRITE: u64 = 1 << 1;
const QUAL_GLA_VALID: u64 = 1 << 7;
const QUAL_GLA_TRANSLATED: u64 = 1 << 8;
/// Bits 12:7 of an EPT-violation exit qualification (GLA valid, translation, user, writable,
/// execute-disable, NMI unblocking), which the module clears before a TD exit to the host but
/// which a #VE carries (`td_other_exits.c` tdx_ept_violation_exit_to_vmm).
const QUAL_CLEARED_ON_EXIT: u64 = 0x3F << 7;

/// Chunks of a 2M (or, modelled, 1G) ACCEPT.
const ACCEPT_CHUNKS: u64 = 512;

impl TdxModule {
    fn running_vcpu(&self, vcpu: usize) -> Result<MutexGuard<'_, VcpuState>, VcpuError> {
        let v = self.vcpu(vcpu)?;
        if !v.inside {
            return Err(VcpuError::NotInTd(vcpu));
        }
        Ok(v)
    }

    fn count(&self, kind: CallKind, page_info: Option<u64>, outcome: &TdcallOutcome) {
        let o = match outcome {
            TdcallOutcome::Completed(s) => CallOutcome::Status(s.code()),
            TdcallOutcome::Exit(_) => CallOutcome::TdExit,
            TdcallOutcome::Interrupted => CallOutcome::Interrupted,
        };
        self.counters.call(kind, page_info, o);
    }

    // ---- TDG.MEM.PAGE.ACCEPT ---------------------------------------------------------------

    /// TDG.MEM.PAGE.ACCEPT on `vcpu` with the raw page-info operand (RCX), following every
    /// walk case of spec §5.
    ///
    /// # Errors
    /// [`VcpuError`] when `vcpu` does not exist or is not inside the TD.
    pub fn tdg_mem_page_accept(
        &self,
        vcpu: usize,
        page_info: u64,
    ) -> Result<TdcallOutcome, VcpuError> {
        let mut v = self.running_vcpu(vcpu)?;
        let outcome = match self.faults.check(CallKind::Accept, Some(page_info)) {
            Some(fault) => {
                self.counters.injected();
                match fault {
                    FaultResult::Busy => {
                        TdcallOutcome::Completed(StatusCode::OperandBusy.with_operand(operand::RCX))
                    }
                    FaultResult::InterruptedRestartable => TdcallOutcome::Interrupted,
                    FaultResult::Status(s) => TdcallOutcome::Completed(s),
                }
            }
            None => {
                let result = self.accept_body(vcpu, page_info);
                self.host_priority(&mut v, result)
            }
        };
        if let TdcallOutcome::Exit(_) = outcome {
            self.leave(vcpu, &mut v);
        }
        self.count(CallKind::Accept, Some(page_info), &outcome);
        Ok(outcome)
    }

    /// `tdg_mem_page_accept.c` tdg_mem_page_accept and check_tdaccept_failure, in the
    /// module's order: page info (levels 0..=max) and GPA; the walk without any tree lock; a
    /// walk that stops above the level gives PAGE_ALREADY_ACCEPTED at a MAPPED leaf, else an
    /// ACCEPT-type EPT-violation exit (no lock taken); otherwise the guest side of the entry
    /// lock is taken before any state check (`tdx_locks.h` sept_lock_acquire_guest: BUSY|RCX
    /// when locked, BUSY|RCX when the host-priority bit is set), the entry is read again under
    /// the lock, and: non-leaf -> PAGE_SIZE_MISMATCH, MAPPED -> PAGE_ALREADY_ACCEPTED, not
    /// PENDING -> the exit, PENDING -> zeroing and MAPPED. `Err` is a host-priority refusal
    /// (counted towards the timeout by the caller).
    fn accept_body(&self, vcpu: usize, page_info: u64) -> Result<TdcallOutcome, TdxStatus> {
        let max = self.config.max_accept_level.index();
        let (gpa, level) = match self.decode(page_info, 0, max) {
            Ok(v) => v,
            Err(s) => return Ok(TdcallOutcome::Completed(s)),
        };
        let tree = self.read_tree();
        let end = tree.walk(gpa, level, false);
        // `td_other_exits.c` async_tdexit_ept_violation: a write, with the R/W/X bits of the
        // entry where the walk stopped (always 0 here: MAPPED entries do not exit).
        let exit = |word: Word, walk_level: u8| {
            TdcallOutcome::Exit(TdExit::EptViolation {
                gpa,
                exit_qualification: QUAL_WRITE,
                ext: ExtExitQual::accept(level, walk_level, word.state(), word.state().is_leaf()),
            })
        };
        if !end.reached {
            return Ok(match end.word.state() {
                SeptState::Mapped => TdcallOutcome::Completed(
                    StatusCode::PageAlreadyAccepted.with_operand(u32::from(end.level)),
                ),
                _ => exit(end.word, end.level),
            });
        }
        let Some(slot) = tree.slot(end.node, end.idx) else {
            return Ok(exit(end.word, end.level));
        };
        let busy = StatusCode::OperandBusy.with_operand(operand::RCX);
        let word = match lock_entry(slot) {
            Ok(w) if w.host_priority() => {
                release(slot);
                return Err(busy);
            }
            Ok(w) => w,
            Err(_) => return Ok(TdcallOutcome::Completed(busy)),
        };
        let done = |status: TdxStatus| {
            release(slot);
            Ok(TdcallOutcome::Completed(status))
        };
        match word.state() {
            SeptState::NlMapped | SeptState::NlBlocked => {
                return done(StatusCode::PageSizeMismatch.with_operand(u32::from(level)))
            }
            SeptState::Mapped => {
                return done(StatusCode::PageAlreadyAccepted.with_operand(u32::from(level)))
            }
            SeptState::Pending => {}
            _ => {
                release(slot);
                return Ok(exit(word, level));
            }
        }
        let hpa = word.hpa();
        if level == 0 {
            self.contents.zero(hpa, 1);
            self.counters.zeroed(1);
            unlock_store(slot, Word::leaf(SeptState::Mapped, hpa));
            return Ok(TdcallOutcome::Completed(TdxStatus::SUCCESS));
        }
        let chunk_pages = level_size(level - 1) / 4096;
        let chunk_bytes = chunk_pages * 4096;
        let slice = u64::from(self.config.accept_slice_chunks);
        let start = word.progress().min(ACCEPT_CHUNKS);
        // The module looks for a pending interrupt after each slice. Emulated zeroing takes no
        // time, so an interrupt not pending at the first slice boundary is taken as arriving
        // after the ACCEPT: the run is one slice (interrupted) or all the rest, and costs O(1)
        // either way.
        let mut done_chunks = start + slice.min(ACCEPT_CHUNKS - start);
        let interrupted = done_chunks < ACCEPT_CHUNKS
            && self
                .interrupts
                .get(vcpu)
                .is_some_and(|f| f.load(Ordering::Acquire) && f.swap(false, Ordering::AcqRel));
        if !interrupted {
            done_chunks = ACCEPT_CHUNKS;
        }
        let pages = (done_chunks - start) * chunk_pages;
        self.contents
            .zero(hpa.saturating_add(start * chunk_bytes), pages);
        self.counters.zeroed(pages);
        if interrupted {
            unlock_store(slot, word.with_progress(done_chunks));
            return Ok(TdcallOutcome::Interrupted);
        }
        unlock_store(slot, Word::leaf(SeptState::Mapped, hpa));
        Ok(TdcallOutcome::Completed(TdxStatus::SUCCESS))
    }

    /// The host-priority bookkeeping of `tdx_td_dispatcher.c` around every TDCALL: a refusal
    /// because of host priority returns OPERAND_BUSY to the guest, and once refusals have gone
    /// on for the timeout the vCPU exits to the host with TDX_HOST_PRIORITY_BUSY_TIMEOUT
    /// instead (the TDCALL still completes with OPERAND_BUSY); any other completion resets the
    /// count.
    fn host_priority(
        &self,
        v: &mut VcpuState,
        result: Result<TdcallOutcome, TdxStatus>,
    ) -> TdcallOutcome {
        match result {
            // A TD exit leaves the dispatcher without its bookkeeping, so the count survives it.
            Ok(outcome @ TdcallOutcome::Exit(_)) => outcome,
            Ok(outcome) => {
                v.hp_refusals = 0;
                outcome
            }
            Err(busy) => {
                let timeout = self.hp_lock_timeout.load(Ordering::Acquire).max(1);
                v.hp_refusals = v.hp_refusals.saturating_add(1);
                if v.hp_refusals > timeout {
                    v.hp_refusals = 0;
                    self.counters.hp_timeout();
                    TdcallOutcome::Exit(TdExit::HostPriorityBusyTimeout { guest_status: busy })
                } else {
                    TdcallOutcome::Completed(busy)
                }
            }
        }
    }

    // ---- TDG.VP.VEINFO.GET -----------------------------------------------------------------

    /// TDG.VP.VEINFO.GET: returns and invalidates the vCPU's VE info; NO_VALID_VE_INFO when
    /// none is valid.
    ///
    /// # Errors
    /// Outer: [`VcpuError`]. Inner: the module's status.
    pub fn tdg_vp_veinfo_get(&self, vcpu: usize) -> Result<Result<VeInfo, TdxStatus>, VcpuError> {
        let mut v = self.running_vcpu(vcpu)?;
        v.hp_refusals = 0;
        let r = match self.faults.check(CallKind::VeInfoGet, None) {
            Some(f) => {
                self.counters.injected();
                Err(match f {
                    FaultResult::Busy => StatusCode::OperandBusy.with_operand(operand::RCX),
                    FaultResult::InterruptedRestartable => {
                        StatusCode::InterruptedRestartable.status()
                    }
                    FaultResult::Status(s) => s,
                })
            }
            None => v.ve.take().ok_or(StatusCode::NoValidVeInfo.status()),
        };
        let status = r.as_ref().map_or_else(|s| *s, |_| TdxStatus::SUCCESS);
        self.counters.status(CallKind::VeInfoGet, None, status);
        Ok(r)
    }

    /// [`TdxModule::tdg_vp_veinfo_get`] as the guest's registers see it
    /// (`tdg_vp_veinfo_get.c` tdg_vp_veinfo_get): RCX exit reason, RDX exit qualification, R8
    /// GLA, R9 GPA, R10 instruction length | information << 32. The outputs are zeroed before
    /// anything is checked, so with nothing valid (NO_VALID_VE_INFO) they are all 0.
    ///
    /// # Errors
    /// [`VcpuError`] when `vcpu` does not exist or is not inside the TD.
    pub fn tdg_vp_veinfo_get_raw(&self, vcpu: usize) -> Result<TdcallRegs, VcpuError> {
        Ok(match self.tdg_vp_veinfo_get(vcpu)? {
            Ok(ve) => TdcallRegs {
                rax: TdxStatus::SUCCESS.raw(),
                rcx: u64::from(ve.exit_reason),
                rdx: ve.exit_qualification,
                r8: ve.gla,
                r9: ve.gpa,
                r10: u64::from(ve.instruction_length) | (u64::from(ve.instruction_info) << 32),
                r11: 0,
            },
            Err(status) => TdcallRegs {
                rax: status.raw(),
                ..TdcallRegs::default()
            },
        })
    }

    // ---- TDG.VP.INFO -----------------------------------------------------------------------

    /// TDG.VP.INFO (`tdg_vp_info.c` tdg_vp_info): GPA width, the TD's attributes as set at
    /// creation (SEPT_VE_DISABLE when the TD was created with #VE on pending pages off; a later
    /// change of the PENDING_VE_DISABLE control by [`TdxModule::set_pending_ve`] does not show
    /// here), vCPU counts and this vCPU's index.
    ///
    /// # Errors
    /// Outer: [`VcpuError`]. Inner: an injected status.
    pub fn tdg_vp_info(&self, vcpu: usize) -> Result<Result<VpInfo, TdxStatus>, VcpuError> {
        let mut v = self.running_vcpu(vcpu)?;
        v.hp_refusals = 0;
        let r = match self.faults.check(CallKind::VpInfo, None) {
            Some(f) => {
                self.counters.injected();
                Err(match f {
                    FaultResult::Busy => StatusCode::OperandBusy.with_operand(operand::RCX),
                    FaultResult::InterruptedRestartable => {
                        StatusCode::InterruptedRestartable.status()
                    }
                    FaultResult::Status(s) => s,
                })
            }
            None => Ok(VpInfo {
                gpaw: self.config.gpaw,
                attributes: self.attributes,
                num_vcpus: self.config.vcpus,
                max_vcpus: self.config.vcpus,
                vcpu_index: u32::try_from(vcpu).unwrap_or(u32::MAX),
            }),
        };
        let status = r.as_ref().map_or_else(|s| *s, |_| TdxStatus::SUCCESS);
        self.counters.status(CallKind::VpInfo, None, status);
        Ok(r)
    }

    /// [`TdxModule::tdg_vp_info`] as the guest's registers see it: RCX the GPA width (48 or
    /// 52), RDX the TD attributes, R8 number of vCPUs | maximum << 32, R9 this vCPU's index,
    /// R10 the TDCALLs available (bit 0, TDG.SYS.RD), R11 0.
    ///
    /// # Errors
    /// [`VcpuError`] when `vcpu` does not exist or is not inside the TD.
    pub fn tdg_vp_info_raw(&self, vcpu: usize) -> Result<TdcallRegs, VcpuError> {
        Ok(match self.tdg_vp_info(vcpu)? {
            Ok(info) => TdcallRegs {
                rax: TdxStatus::SUCCESS.raw(),
                rcx: u64::from(info.gpaw.width()),
                rdx: info.attributes,
                r8: u64::from(info.num_vcpus) | (u64::from(info.max_vcpus) << 32),
                r9: u64::from(info.vcpu_index),
                r10: 1,
                r11: 0,
            },
            Err(status) => TdcallRegs {
                rax: status.raw(),
                ..TdcallRegs::default()
            },
        })
    }

    // ---- TDG.VP.VMCALL ---------------------------------------------------------------------

    /// TDG.VP.VMCALL (`tdg_vp_vmcall.c` tdg_vp_vmcall): exits to the host with the registers
    /// RCX bits 15:0 expose. A mask exposing RAX, RCX or RSP, or with bits 63:32 set, fails with
    /// OPERAND_INVALID|RCX; bits 31:16 select XMM registers, which are allowed (and not
    /// modelled).
    ///
    /// # Errors
    /// [`VcpuError`] when `vcpu` does not exist or is not inside the TD.
    pub fn tdg_vp_vmcall(&self, vcpu: usize, regs: VmcallRegs) -> Result<TdcallOutcome, VcpuError> {
        let mut v = self.running_vcpu(vcpu)?;
        let outcome = match self.faults.check(CallKind::VpVmcall, None) {
            Some(f) => {
                self.counters.injected();
                TdcallOutcome::Completed(match f {
                    FaultResult::Busy => StatusCode::OperandBusy.with_operand(operand::RCX),
                    FaultResult::InterruptedRestartable => {
                        StatusCode::InterruptedRestartable.status()
                    }
                    FaultResult::Status(s) => s,
                })
            }
            None => {
                const FORBIDDEN: u64 = !0xFFFF_FFFF | 1 << 0 | 1 << 1 | 1 << 4;
                if regs.mask & FORBIDDEN != 0 {
                    TdcallOutcome::Completed(StatusCode::OperandInvalid.with_operand(operand::RCX))
                } else {
                    let mut exposed = VmcallRegs {
                        mask: regs.mask,
                        gpr: [0; 16],
                    };
                    for (i, (out, val)) in exposed.gpr.iter_mut().zip(regs.gpr).enumerate() {
                        if regs.mask >> i & 1 != 0 {
                            *out = val;
                        }
                    }
                    TdcallOutcome::Exit(TdExit::Vmcall(exposed))
                }
            }
        };
        match outcome {
            TdcallOutcome::Exit(_) => self.leave(vcpu, &mut v),
            _ => v.hp_refusals = 0,
        }
        self.count(CallKind::VpVmcall, None, &outcome);
        Ok(outcome)
    }

    // ---- guest memory access ---------------------------------------------------------------

    /// A guest access to `gpa` (GLA modelled as equal to the GPA) as the CPU and the module's
    /// EPT-violation handler treat it (spec §6): MAPPED -> the access completes; PENDING -> #VE
    /// (or #DF if VE info is still valid) when #VE on pending is enabled, else a
    /// PENDING_EPT_VIOLATION exit; FREE, BLOCKED, missing -> an EPT-violation exit (type NONE).
    ///
    /// # Errors
    /// [`VcpuError`] when `vcpu` does not exist or is not inside the TD.
    pub fn guest_access(
        &self,
        vcpu: usize,
        gpa: u64,
        access: Access,
    ) -> Result<AccessOutcome, VcpuError> {
        let mut v = self.running_vcpu(vcpu)?;
        let gpaw: Gpaw = self.config.gpaw;
        if gpa >> gpaw.width() != 0 {
            self.counters.access(AccessKind::Invalid);
            return Ok(AccessOutcome::InvalidGpa);
        }
        if gpa & gpaw.shared_bit() != 0 {
            self.counters.access(AccessKind::Shared);
            return Ok(AccessOutcome::Shared { gpa });
        }
        let qual = match access {
            Access::Read => QUAL_READ,
            Access::Write(_) => QUAL_WRITE,
        } | QUAL_GLA_VALID
            | QUAL_GLA_TRANSLATED;
        let page = gpa & !0xFFF;
        // The CPU's walk never fails with BUSY: wait for a host structural call to finish.
        let tree = self.read_tree();
        let end = tree.walk(page, 0, false);
        let state = end.word.state();
        let (kind, outcome) = match state {
            SeptState::Mapped => {
                let hpa = end.word.hpa() + (page & (level_size(end.level) - 1));
                let token = match access {
                    Access::Read => self.contents.read(hpa),
                    Access::Write(t) => {
                        self.contents.write(hpa, t);
                        t
                    }
                };
                (AccessKind::Ok, AccessOutcome::Ok(token))
            }
            SeptState::Pending if self.pending_ve() => {
                if v.ve.is_some() {
                    (AccessKind::DoubleFault, AccessOutcome::DoubleFault)
                } else {
                    let info = VeInfo {
                        exit_reason: EXIT_REASON_EPT_VIOLATION,
                        exit_qualification: qual,
                        gla: gpa,
                        gpa,
                        instruction_length: 0,
                        instruction_info: 0,
                    };
                    v.ve = Some(info);
                    (AccessKind::Ve, AccessOutcome::Ve(info))
                }
            }
            SeptState::Pending => (
                AccessKind::PendingExit,
                AccessOutcome::Exit(TdExit::EptViolation {
                    gpa: page,
                    exit_qualification: qual & !QUAL_CLEARED_ON_EXIT,
                    ext: ExtExitQual::PENDING,
                }),
            ),
            _ => (
                AccessKind::EptExit,
                AccessOutcome::Exit(TdExit::EptViolation {
                    gpa: page,
                    exit_qualification: qual & !QUAL_CLEARED_ON_EXIT,
                    ext: ExtExitQual::NONE,
                }),
            ),
        };
        drop(tree);
        if let AccessOutcome::Exit(_) = outcome {
            self.leave(vcpu, &mut v);
        }
        self.counters.access(kind);
        Ok(outcome)
    }
}
