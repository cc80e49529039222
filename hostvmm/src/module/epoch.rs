//! TLB epoch tracking (the TDCS `epoch_tracking` fields): TD_EPOCH, the two REFCOUNTs of vCPUs
//! inside the TD by epoch parity, and the epoch lock.
//!
//! What the module does (TDX module 1.5):
//!
//! - TD entry (`helpers.c` adjust_tlb_tracking_state): epoch lock shared (a failed try makes
//!   the entry fail BUSY), sample TD_EPOCH, add one to REFCOUNT[epoch & 1], release;
//! - TD exit (`td_exit.c`, `helpers.h` revert_tlb_tracking_state): subtract one from the
//!   REFCOUNT of the vCPU's epoch, without the lock;
//! - TDH.MEM.TRACK (`tdh_mem_track.c`): epoch lock exclusive (OPERAND_BUSY|TD_EPOCH when
//!   held), PREVIOUS_TLB_EPOCH_BUSY while REFCOUNT of the previous parity is not zero, else
//!   TD_EPOCH + 1;
//! - `is_tlb_tracked` (`helpers.h`): one 128-bit read of TD_EPOCH and the REFCOUNTs, no lock.
//!
//! Here the REFCOUNTs are kept per vCPU (each on its own cache line) and summed where the module
//! reads them, so that vCPU threads entering and leaving the TD in parallel do not share a line;
//! the epoch lock is a striped [`SharexLock`]. Entry and TRACK have the module's outcomes: a
//! conflict between them leaves exactly one holding the lock. Reads of a sum are consistent: new
//! entries only count in the current parity, which the sums the module compares never read, and
//! TD_EPOCH is read before and after a sum so that a TRACK in between makes it read again.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use super::sharex::{LockMode, SharexLock};

/// Spins of an entry waiting for a TRACK to release the epoch lock before it yields.
const ENTRY_SPINS: u32 = 64;

/// Why TDH.MEM.TRACK did not move the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrackRefused {
    /// The epoch lock is held (OPERAND_BUSY|TD_EPOCH).
    Busy,
    /// A vCPU is still counted in the previous epoch (PREVIOUS_TLB_EPOCH_BUSY).
    PreviousEpochBusy,
}

/// TD_EPOCH, the per-vCPU REFCOUNTs and the epoch lock; see the module docs.
#[derive(Debug)]
pub(crate) struct EpochTracking {
    td_epoch: CachePadded<AtomicU64>,
    lock: SharexLock,
    /// Per vCPU: 1 in the parity of the epoch it entered in while it is inside, else 0.
    refcount: Box<[CachePadded<[AtomicU64; 2]>]>,
}

impl EpochTracking {
    /// TD_EPOCH 1, no vCPU inside (`helpers.c` init_tdcs: epoch 1, REFCOUNTs 0).
    pub(crate) fn new(vcpus: usize) -> Self {
        EpochTracking {
            td_epoch: CachePadded::new(AtomicU64::new(1)),
            lock: SharexLock::default(),
            refcount: (0..vcpus)
                .map(|_| CachePadded::new([AtomicU64::new(0), AtomicU64::new(0)]))
                .collect(),
        }
    }

    /// The epoch lock held shared until the guard drops, as a TD entry in progress on another
    /// logical processor holds it (a test hook).
    #[cfg(feature = "testing")]
    pub(crate) fn hold(&self) -> super::sharex::SharexGuard<'_> {
        self.shared()
    }

    /// TD_EPOCH.
    pub(crate) fn td_epoch(&self) -> u64 {
        self.td_epoch.load(Ordering::SeqCst)
    }

    /// The epoch lock shared. A TD entry that finds it held fails BUSY in the module and the
    /// host enters again; here the entry waits for the TRACK holding it (a few loads).
    fn shared(&self) -> super::sharex::SharexGuard<'_> {
        let mut spins = 0u32;
        loop {
            if let Some(g) = self.lock.try_lock(LockMode::Shared) {
                return g;
            }
            spins += 1;
            if spins < ENTRY_SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// TD entry of `vcpu`: counts it in the current epoch's parity; returns that epoch.
    pub(crate) fn enter(&self, vcpu: usize) -> u64 {
        let _g = self.shared();
        let epoch = self.td_epoch();
        if let Some(c) = self.refcount.get(vcpu) {
            c[(epoch & 1) as usize].fetch_add(1, Ordering::SeqCst);
        }
        epoch
    }

    /// TD exit of `vcpu`, which entered in `epoch`: uncounts it (no lock, as the module).
    pub(crate) fn leave(&self, vcpu: usize, epoch: u64) {
        if let Some(c) = self.refcount.get(vcpu) {
            let _ = c[(epoch & 1) as usize].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            });
        }
    }

    /// An exit and re-entry of `vcpu`, inside since `epoch`: counts it in the current epoch;
    /// returns that epoch.
    pub(crate) fn reenter(&self, vcpu: usize, epoch: u64) -> u64 {
        let _g = self.shared();
        self.leave(vcpu, epoch);
        let now = self.td_epoch();
        if let Some(c) = self.refcount.get(vcpu) {
            c[(now & 1) as usize].fetch_add(1, Ordering::SeqCst);
        }
        now
    }

    /// REFCOUNT[parity]: the vCPUs counted in it.
    fn count(&self, parity: usize) -> u64 {
        self.refcount
            .iter()
            .map(|c| c[parity & 1].load(Ordering::SeqCst))
            .sum()
    }

    /// The REFCOUNTs.
    pub(crate) fn refcounts(&self) -> [u64; 2] {
        loop {
            let e = self.td_epoch();
            let r = [self.count(0), self.count(1)];
            if self.td_epoch() == e {
                return r;
            }
        }
    }

    /// TDH.MEM.TRACK's body: TD_EPOCH + 1 unless refused.
    pub(crate) fn track(&self) -> Result<(), TrackRefused> {
        let Some(_g) = self.lock.try_lock(LockMode::Exclusive) else {
            return Err(TrackRefused::Busy);
        };
        let epoch = self.td_epoch();
        if self.count((epoch.wrapping_sub(1) & 1) as usize) != 0 {
            return Err(TrackRefused::PreviousEpochBusy);
        }
        self.td_epoch
            .store(epoch.saturating_add(1), Ordering::SeqCst);
        Ok(())
    }

    /// `is_tlb_tracked` (spec §4): blocked at `bepoch`, tracked when `bepoch < epoch - 1`, or
    /// `bepoch == epoch - 1` and no vCPU is still counted in that parity.
    pub(crate) fn tracked(&self, bepoch: u64) -> bool {
        loop {
            let epoch = self.td_epoch();
            let Some(prev) = epoch.checked_sub(1) else {
                return false;
            };
            if bepoch != prev {
                return bepoch < prev;
            }
            let idle = self.count((bepoch & 1) as usize) == 0;
            if self.td_epoch() == epoch {
                return idle;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_waits_for_the_previous_epoch_to_empty() {
        let e = EpochTracking::new(2);
        assert_eq!(e.td_epoch(), 1);
        let at = e.enter(0);
        assert_eq!((at, e.refcounts()), (1, [0, 1]));
        // Nobody in epoch 0: the first TRACK moves to 2; vCPU 0 is now in the previous epoch.
        assert_eq!(e.track(), Ok(()));
        assert_eq!(e.track(), Err(TrackRefused::PreviousEpochBusy));
        assert!(!e.tracked(1));
        // vCPU 1 enters in epoch 2; a kick moves vCPU 0 there too.
        let at1 = e.enter(1);
        assert_eq!(at1, 2);
        assert_eq!(e.reenter(0, at), 2);
        assert_eq!(e.refcounts(), [2, 0]);
        assert!(e.tracked(1));
        assert_eq!(e.track(), Ok(()));
        assert_eq!(e.td_epoch(), 3);
        e.leave(0, 2);
        e.leave(1, 2);
        assert_eq!(e.refcounts(), [0, 0]);
        assert!(e.tracked(2) && e.tracked(1));
        assert!(!e.tracked(3));
    }

    #[test]
    fn a_held_epoch_lock_refuses_track_busy() {
        let e = EpochTracking::new(1);
        let g = e.lock.try_lock(LockMode::Shared).expect("shared");
        assert_eq!(e.track(), Err(TrackRefused::Busy));
        drop(g);
        assert_eq!(e.track(), Ok(()));
    }

    /// vCPU threads entering and leaving while another TRACKs: TRACK never succeeds while a
    /// vCPU entered in the epoch before the current one is still inside.
    #[test]
    fn track_never_passes_a_vcpu_inside_the_previous_epoch() {
        const VCPUS: usize = 3;
        let e = EpochTracking::new(VCPUS);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for v in 0..VCPUS {
                let (e, stop) = (&e, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let at = e.enter(v);
                        // Inside: the epoch can have moved at most once past ours.
                        let now = e.td_epoch();
                        assert!(now <= at + 1, "entered at {at}, epoch now {now}");
                        e.leave(v, at);
                    }
                });
            }
            let mut moved = 0;
            for _ in 0..20_000 {
                if e.track().is_ok() {
                    moved += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(moved > 0);
        });
        assert_eq!(e.refcounts(), [0, 0]);
    }
}
