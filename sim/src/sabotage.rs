//! Deliberately broken hosts and guests, to show that every invariant check can fail.
//!
//! A sabotage runs on vCPU 0 after the scenario's work and before the final checks; it breaks
//! the TD the way a buggy or hostile host (or a buggy guest) would, through the same interfaces
//! they have. A run with a sabotage must report the matching [`ViolationKind`].

use accept::abi::{Gpa, GpaRange, PageLevel};
use accept::tdcall::Tdcall;

use super::vcpu::SimVcpu;
use super::{SimTd, ViolationKind};
use hostvmm::gmem::{NoopHook, Shareability};
use hostvmm::module::{Access, SeptState};

/// A deliberate breakage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sabotage {
    /// The host removes an accepted private page behind the guest's back (BLOCK, TRACK,
    /// REMOVE outside any conversion).
    RemoveAccepted,
    /// The host marks accepted private memory shared in its guest_memfd without zapping the
    /// Secure-EPT.
    SharedButMapped,
    /// The host overwrites a private page's content.
    CorruptContent,
    /// The host removes an accepted page and adds a fresh PENDING one; a guest that does not
    /// track acceptance accepts it again (silently zeroing it).
    DoubleAccept,
    /// The host records an accepted, mapped page as an error page but leaves it mapped.
    PoisonMapped,
    /// The host ignores the guest's request to split (fault-path split ignored) while the guest
    /// accepts 4K inside a 2M PENDING mapping: the ACCEPT exits forever.
    IgnoreSplit,
    /// Not a breakage of the TD: vCPU 1's thread panics at the end of the boot, before the
    /// boot's barrier. The run must end with that vCPU's error, the others not waiting for it
    /// forever. Not in [`Sabotage::ALL`]: no invariant check is involved.
    VcpuPanic,
}

impl Sabotage {
    /// Every sabotage with the violation it must produce.
    pub const ALL: [(Sabotage, ViolationKind); 6] = [
        (Sabotage::RemoveAccepted, ViolationKind::AcceptedNotMapped),
        (Sabotage::SharedButMapped, ViolationKind::PrivateAndShared),
        (Sabotage::CorruptContent, ViolationKind::ContentLost),
        (Sabotage::DoubleAccept, ViolationKind::DoubleAccept),
        (Sabotage::PoisonMapped, ViolationKind::PoisonReused),
        (Sabotage::IgnoreSplit, ViolationKind::Livelock),
    ];
}

/// A private page the guest wrote (the first one of its shadow), or any accepted page.
fn victim(td: &SimTd<'_>) -> Option<u64> {
    let accepted = td.accepted.to_set();
    let b = super::lock(&td.belief);
    b.shadow
        .keys()
        .copied()
        .find(|&g| accepted.gaps(&(g..g + 4096)).next().is_none())
        .or_else(|| accepted.iter().next().map(|r| r.start))
}

/// Carries out `sabotage` on vCPU `v`. Returns what it did, for the log.
pub(crate) fn apply(td: &SimTd<'_>, v: &mut SimVcpu<'_>, sabotage: Sabotage) -> String {
    let host = td.host();
    let module = host.module();
    match sabotage {
        Sabotage::RemoveAccepted | Sabotage::DoubleAccept => {
            let Some(gpa) = victim(td) else {
                return "no accepted page".into();
            };
            let leaf = module.leaf(Gpa::new_truncate(gpa));
            let level = PageLevel::from_index(u64::from(leaf.level)).unwrap_or(PageLevel::Size4K);
            let base = Gpa::new_truncate(gpa).align_down(level);
            let hpa = leaf.hpa;
            module.range_block(base, level);
            module.mem_track();
            let r = module.page_remove(base, level);
            if sabotage == Sabotage::DoubleAccept && r.status.is_success() {
                module.page_aug(base, level, hpa);
                // A guest that does not track what it accepted.
                let status = v.accept(base, level);
                return format!("re-added {base} {level}; guest re-accepted: {status:?}");
            }
            format!("removed {base} {level}: {:?}", r.status)
        }
        Sabotage::SharedButMapped => {
            let Some(gpa) = victim(td) else {
                return "no accepted page".into();
            };
            let Ok(range) = GpaRange::from_len(gpa & !0xFFF, 4096) else {
                return "bad range".into();
            };
            let r = host.gmem().convert(
                range,
                Shareability::Shared,
                Default::default(),
                &mut NoopHook,
            );
            format!("marked {range} shared without zapping: {:?}", r.map(|_| ()))
        }
        Sabotage::CorruptContent => {
            let Some(gpa) = victim(td) else {
                return "no written page".into();
            };
            let leaf = module.leaf(Gpa::new_truncate(gpa));
            if leaf.state == SeptState::Mapped {
                module.write_content(leaf.page_hpa(gpa), 0xBAD0_BAD0);
            }
            format!("overwrote {gpa:#x}")
        }
        Sabotage::PoisonMapped => {
            let Some(gpa) = victim(td) else {
                return "no accepted page".into();
            };
            let r = host.gmem().poison(Gpa::new_truncate(gpa));
            format!("poisoned {gpa:#x} and left it mapped: {r:?}")
        }
        Sabotage::VcpuPanic => "vCPU 1 panicked in the boot".into(),
        Sabotage::IgnoreSplit => {
            // The host maps 2M PENDING on a plain access ...
            let Some(base) = (td.guest().eager_end..td.config().memory)
                .step_by(2 << 20)
                .find(|&b| module.leaf(Gpa::new_truncate(b)).state == SeptState::Free)
            else {
                return "no free memory".into();
            };
            let _ = v.touch(base, Access::Read);
            // ... and the guest accepts 4K inside it; this host never splits.
            let status = v.accept(Gpa::new_truncate(base), PageLevel::Size4K);
            format!("4K ACCEPT in a 2M PENDING mapping: {status:?}")
        }
    }
}
