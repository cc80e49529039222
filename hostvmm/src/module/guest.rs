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
use super::host::{lock_entry, unlock_store};
use super::sept::{level_size, Word};
use super::stats::{AccessKind, CallKind, CallOutcome};
use super::{
    Access, AccessOutcome, ExtExitQual, SeptState, TdExit, TdcallOutcome, TdxModule, VcpuError,
    VcpuState, VmcallRegs, ATTR_SEPT_VE_DISABLE,
};

/// VMX exit qualification bits used for EPT violations.
const QUAL_READ: u64 = 1 << 0;
const QUAL_WRITE: u64 = 1 << 1;
const QUAL_GLA_VALID: u64 = 1 << 7;
const QUAL_GLA_TRANSLATED: u64 = 1 << 8;

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
            None => self.accept_body(vcpu, page_info),
        };
        if let TdcallOutcome::Exit(_) = outcome {
            self.leave(&mut v);
        }
        self.count(CallKind::Accept, Some(page_info), &outcome);
        Ok(outcome)
    }

    fn accept_body(&self, vcpu: usize, page_info: u64) -> TdcallOutcome {
        let max = self.config.max_accept_level.index();
        let (gpa, level) = match self.decode(page_info, 0, max) {
            Ok(v) => v,
            Err(s) => return TdcallOutcome::Completed(s),
        };
        // The module's guest side takes no tree lock, only the entry lock. Here the walk waits
        // for a host call holding the tree exclusively to finish: that is one of the orders
        // the module allows, and it never gives a spurious BUSY for an unrelated entry.
        let tree = self.read_tree();
        let end = tree.walk(gpa, level, false);
        let state = end.word.state();
        let exit = |is_leaf: bool| {
            TdcallOutcome::Exit(TdExit::EptViolation {
                gpa,
                exit_qualification: QUAL_WRITE,
                ext: ExtExitQual::accept(level, end.level, state, is_leaf),
            })
        };
        if !end.reached {
            // The walk stopped above the requested level.
            return match state {
                SeptState::Mapped => TdcallOutcome::Completed(
                    StatusCode::PageAlreadyAccepted.with_operand(u32::from(end.level)),
                ),
                s if s.is_leaf() => exit(true),
                _ => exit(false),
            };
        }
        match state {
            // Any non-free non-leaf at the requested level (NL_BLOCKED too) is a size mismatch.
            SeptState::NlMapped | SeptState::NlBlocked => TdcallOutcome::Completed(
                StatusCode::PageSizeMismatch.with_operand(u32::from(level)),
            ),
            SeptState::Mapped => TdcallOutcome::Completed(
                StatusCode::PageAlreadyAccepted.with_operand(u32::from(level)),
            ),
            SeptState::Free => exit(false),
            SeptState::Blocked | SeptState::PendingBlocked => exit(true),
            SeptState::Pending => {
                let Some(slot) = tree.slot(end.node, end.idx) else {
                    return exit(false);
                };
                let word = match lock_entry(slot) {
                    Ok(w) => w,
                    Err(_) => {
                        return TdcallOutcome::Completed(
                            StatusCode::OperandBusy.with_operand(operand::RCX),
                        )
                    }
                };
                // Re-check under the entry lock: a racing call may have changed it.
                if word.state() != SeptState::Pending {
                    unlock_store(slot, word);
                    return TdcallOutcome::Completed(
                        StatusCode::OperandBusy.with_operand(operand::RCX),
                    );
                }
                let hpa = word.hpa();
                if level == 0 {
                    self.contents.zero(hpa, 1);
                    self.counters.zeroed(1);
                    unlock_store(slot, Word::leaf(SeptState::Mapped, hpa));
                    return TdcallOutcome::Completed(TdxStatus::SUCCESS);
                }
                let chunk_pages = level_size(level - 1) / 4096;
                let chunk_bytes = chunk_pages * 4096;
                let slice = u64::from(self.config.accept_slice_chunks);
                let start = word.progress().min(ACCEPT_CHUNKS);
                // The module looks for a pending interrupt after each slice. Emulated zeroing
                // takes no time, so an interrupt not pending at the first slice boundary is
                // taken as arriving after the ACCEPT: the run is one slice (interrupted) or
                // all the rest, and costs O(1) either way.
                let mut done = start + slice.min(ACCEPT_CHUNKS - start);
                let interrupted = done < ACCEPT_CHUNKS
                    && self.interrupts.get(vcpu).is_some_and(|f| {
                        f.load(Ordering::Acquire) && f.swap(false, Ordering::AcqRel)
                    });
                if !interrupted {
                    done = ACCEPT_CHUNKS;
                }
                let pages = (done - start) * chunk_pages;
                self.contents
                    .zero(hpa.saturating_add(start * chunk_bytes), pages);
                self.counters.zeroed(pages);
                if interrupted {
                    unlock_store(slot, word.with_progress(done));
                    return TdcallOutcome::Interrupted;
                }
                unlock_store(slot, Word::leaf(SeptState::Mapped, hpa));
                TdcallOutcome::Completed(TdxStatus::SUCCESS)
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

    // ---- TDG.VP.INFO -----------------------------------------------------------------------

    /// TDG.VP.INFO: GPA width, attributes (SEPT_VE_DISABLE when #VE on pending is off), vCPU
    /// counts and this vCPU's index.
    ///
    /// # Errors
    /// Outer: [`VcpuError`]. Inner: an injected status.
    pub fn tdg_vp_info(&self, vcpu: usize) -> Result<Result<VpInfo, TdxStatus>, VcpuError> {
        let _v = self.running_vcpu(vcpu)?;
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
                attributes: if self.pending_ve() {
                    0
                } else {
                    ATTR_SEPT_VE_DISABLE
                },
                num_vcpus: self.config.vcpus,
                max_vcpus: self.config.vcpus,
                vcpu_index: u32::try_from(vcpu).unwrap_or(u32::MAX),
            }),
        };
        let status = r.as_ref().map_or_else(|s| *s, |_| TdxStatus::SUCCESS);
        self.counters.status(CallKind::VpInfo, None, status);
        Ok(r)
    }

    // ---- TDG.VP.VMCALL ---------------------------------------------------------------------

    /// TDG.VP.VMCALL: exits to the host with the registers RCX exposes. A mask exposing RAX,
    /// RCX or RSP, or with bits 63:16 set, fails with OPERAND_INVALID|RCX (model of the
    /// module's mask check).
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
                const FORBIDDEN: u64 = !0xFFFF | 1 << 0 | 1 << 1 | 1 << 4;
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
        if let TdcallOutcome::Exit(_) = outcome {
            self.leave(&mut v);
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
                    exit_qualification: qual,
                    ext: ExtExitQual::PENDING,
                }),
            ),
            _ => (
                AccessKind::EptExit,
                AccessOutcome::Exit(TdExit::EptViolation {
                    gpa: page,
                    exit_qualification: qual,
                    ext: ExtExitQual::NONE,
                }),
            ),
        };
        drop(tree);
        if let AccessOutcome::Exit(_) = outcome {
            self.leave(&mut v);
        }
        self.counters.access(kind);
        Ok(outcome)
    }
}
