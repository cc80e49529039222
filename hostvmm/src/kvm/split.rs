//! DEMOTE of one huge leaf (BLOCK, TRACK, kick, DEMOTE), shared by the fault path's split for
//! a smaller ACCEPT and the zap path's split of leaves that straddle a zapped range.
//!
//! The caller says what a failure leaves behind ([`AfterFailure`]): the fault path restores the
//! leaf, the zap path keeps it blocked so that its pages can become error pages.
//!
//! Not here: deciding whether to split (`fault.rs`, `zap.rs`) or merging back (`merge.rs`).

use accept::abi::{Gpa, PageLevel, StatusCode};

use super::{FaultError, PrivateMmu, BLOCK_CALL};
use crate::module::SeamcallResult;

/// What a failed split leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterFailure {
    /// UNBLOCK again (fault path, merge): the range stays usable.
    Restore,
    /// Keep it blocked (zap path): its pages become error pages, out of the guest's reach.
    KeepBlocked,
}

impl PrivateMmu {
    /// BLOCK, TRACK, kick, DEMOTE one leaf.
    ///
    /// On failure the leaf is left as `on_failure` says: the fault path restores it (a PENDING
    /// leaf the guest will ask for again), the zap path keeps it blocked (its pages become
    /// error pages, and a blocked leaf is out of the guest's reach).
    pub(super) fn demote(
        &self,
        base: Gpa,
        level: PageLevel,
        on_failure: AfterFailure,
    ) -> Result<(), FaultError> {
        let page = self.pool.alloc().ok_or(FaultError::NoSeptPage)?;
        let b = self.block(base, level);
        if b.status.is_error() {
            self.pool.free(page);
            return Err(FaultError::Seamcall {
                call: BLOCK_CALL,
                status: b.status,
            });
        }
        let r = match self.track() {
            Ok(()) => self.call("DEMOTE", || self.module.page_demote(base, level, page)),
            Err(FaultError::Seamcall { status, .. }) => SeamcallResult::status(status),
            Err(_) => SeamcallResult::status(StatusCode::TlbTrackingNotDone.status()),
        };
        if r.status.is_success() {
            return Ok(());
        }
        self.pool.free(page);
        if on_failure == AfterFailure::Restore {
            self.restore(base, level);
        }
        Err(FaultError::Seamcall {
            call: "TDH.MEM.PAGE.DEMOTE",
            status: r.status,
        })
    }
}
