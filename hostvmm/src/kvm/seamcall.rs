//! The SEAMCALL wrapper every flow of the private MMU goes through, and the single calls the
//! flows share (TRACK, BLOCK, UNBLOCK).
//!
//! [`PrivateMmu::call`] retries BUSY and INTERRUPTED_RESTARTABLE answers (bounded by
//! [`SEAMCALL_RETRIES`]), holds the vCPUs out of the TD and kicks them after
//! [`BUSY_BEFORE_HOLD_OUT`] BUSY answers in a row, and kicks while TLB tracking is not done
//! (bounded by [`TRACKING_KICKS`]). The TD exit for a host-priority timeout is handled here
//! too, being the guest's side of the same contention.
//!
//! Not here: which calls a flow makes and in what order (fault, zap, split, merge files), and
//! what a failure means for the mapping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::PoisonError;

use accept::abi::{Gpa, PageLevel, StatusCode, TdxStatus};

use super::stats::Ev;
use super::{FaultError, PrivateMmu};
use crate::module::SeamcallResult;

/// Bound on BUSY / INTERRUPTED answers to one SEAMCALL before the MMU gives up on it.
pub const SEAMCALL_RETRIES: u32 = 10_000;

/// Bound on kicks while waiting for TLB tracking (every vCPU to leave the TD once).
pub const TRACKING_KICKS: u32 = 10_000;

/// BUSY answers in a row to one SEAMCALL before the MMU holds the vCPUs out of the TD and
/// kicks them (KVM retries once, then does it; a few plain retries first keep host-against-host
/// contention, which holding vCPUs out cannot help, from stopping the guest).
pub const BUSY_BEFORE_HOLD_OUT: u32 = 8;

/// Name of TDH.MEM.TRACK in the MMU's retry loop (its refusals are counted on their own).
const TRACK_CALL: &str = "TRACK";

/// True for the answers [`PrivateMmu::call`] retries: OPERAND_BUSY and INTERRUPTED_RESTARTABLE.
fn busy_like(status: TdxStatus) -> bool {
    status.is(StatusCode::OperandBusy) || status.is(StatusCode::InterruptedRestartable)
}

/// Releases a hold on the vCPUs ([`PrivateMmu::vcpus_held_out`]) when dropped.
struct HoldOut<'m>(&'m AtomicU64);

impl Drop for HoldOut<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PrivateMmu {
    /// Runs a SEAMCALL, retrying BUSY and INTERRUPTED_RESTARTABLE (bounded), and kicking vCPUs
    /// while TLB tracking is not done.
    ///
    /// After [`BUSY_BEFORE_HOLD_OUT`] BUSY answers in a row it does what KVM's
    /// `tdh_do_no_vcpus()` does: it holds every vCPU out of the TD (they may not start a guest
    /// call while [`PrivateMmu::vcpus_held_out`] is true), kicks them out (waiting for guest
    /// calls in progress to end), and retries; guest TDCALLs can then no longer win the lock.
    pub(super) fn call(
        &self,
        name: &'static str,
        f: impl Fn() -> SeamcallResult,
    ) -> SeamcallResult {
        let mut busy = 0u32;
        let mut kicks = 0u32;
        let mut hold: Option<HoldOut<'_>> = None;
        loop {
            let r = f();
            if busy_like(r.status) && busy < SEAMCALL_RETRIES {
                busy += 1;
                if busy == BUSY_BEFORE_HOLD_OUT && hold.is_none() {
                    hold = Some(self.hold_out());
                }
                self.counters.inc(Ev::BusyRetries);
                // A TRACK refused for the previous epoch comes back from `track` as a bare
                // BUSY (operand 0) and is counted as a refusal; a real BUSY names its operand.
                if name != TRACK_CALL || r.status.operand() != 0 {
                    *self
                        .counters
                        .busy_by
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry((name, r.status.operand()))
                        .or_insert(0) += 1;
                }
                std::thread::yield_now();
                continue;
            }
            if r.status.is(StatusCode::TlbTrackingNotDone) && kicks < TRACKING_KICKS {
                kicks += 1;
                self.counters.inc(Ev::TrackingNotDone);
                self.counters.inc(Ev::Kicks);
                self.kicker.kick_all();
                continue;
            }
            if r.status.is_error() {
                log::debug!("{name}: {:?}", r.status);
            }
            return r;
        }
    }

    /// Holds the vCPUs out of the TD until the guard drops, and kicks them out.
    fn hold_out(&self) -> HoldOut<'_> {
        self.held_out.fetch_add(1, Ordering::AcqRel);
        self.counters.inc(Ev::HoldOuts);
        self.counters.inc(Ev::Kicks);
        self.kicker.kick_all();
        HoldOut(&self.held_out)
    }

    /// True while a SEAMCALL that kept getting BUSY holds the vCPUs out of the TD (KVM's
    /// `wait_for_sept_zap`): a vCPU must not start a guest call (it leaves the TD and waits).
    pub fn vcpus_held_out(&self) -> bool {
        self.held_out.load(Ordering::Acquire) > 0
    }

    /// TDH.MEM.TRACK, kicking vCPUs while the previous epoch is still busy.
    pub(super) fn track(&self) -> Result<(), FaultError> {
        let r = self.call(TRACK_CALL, || {
            let r = self.module.mem_track();
            if r.status.is(StatusCode::PreviousTlbEpochBusy) {
                self.counters.inc(Ev::TrackRefusals);
                self.kicker.kick_all();
                self.counters.inc(Ev::Kicks);
                // Reported as BUSY-like so that `call` retries it.
                return SeamcallResult::status(StatusCode::OperandBusy.status());
            }
            r
        });
        if r.status.is_error() {
            return Err(FaultError::Seamcall {
                call: "TDH.MEM.TRACK",
                status: r.status,
            });
        }
        self.counters.inc(Ev::Tracks);
        Ok(())
    }

    pub(super) fn block(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.call("BLOCK", || self.module.range_block(gpa, level))
    }

    pub(super) fn unblock(&self, base: Gpa, level: PageLevel) {
        let r = self.call("UNBLOCK", || self.module.range_unblock(base, level));
        if r.status.is_error() {
            log::warn!("UNBLOCK {base} {level}: {:?}", r.status);
        }
    }

    /// UNBLOCKs a leaf (or non-leaf) blocked by a step that then failed, tracking first so
    /// that the UNBLOCK can succeed even when the failed step was the TRACK itself. If it
    /// still cannot be unblocked, the MMU is bugged: the range would stay unreachable.
    pub(super) fn restore(&self, base: Gpa, level: PageLevel) {
        let ok = self.track().is_ok()
            && !self
                .call("UNBLOCK", || self.module.range_unblock(base, level))
                .status
                .is_error();
        if !ok {
            self.bug("a blocked range could not be unblocked after a failed split or merge");
        }
    }

    /// Handles a TD exit with TDX_HOST_PRIORITY_BUSY_TIMEOUT: the guest's TDCALL was refused
    /// for too long because a host SEAMCALL has priority on an S-EPT entry. The module leaves
    /// the vCPU ready to be re-entered with the TDCALL completed (`td_exit.c`
    /// async_tdexit_internal: VCPU_READY, LAST_EXIT_ASYNC_TRAP), so nothing needs mapping:
    /// the host yields to let its SEAMCALL through and re-enters the guest.
    pub fn handle_host_priority_timeout(&self) {
        self.counters.inc(Ev::HpTimeouts);
        std::thread::yield_now();
    }
}
