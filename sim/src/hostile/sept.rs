//! Secure-EPT behaviours: the host removes, re-adds, demotes and promotes pages between the
//! guest's calls.

use accept::tdcall::Tdcall;
use std::cell::Cell;
use std::rc::Rc;

use accept::abi::PageLevel;

use super::lab::{g, Lab};
use super::verdict::{Stop, Verdict};
use super::{unit_gpa, Behaviour, BYSTANDERS, K4, M2};

fn run_remove_readd_2m(lab: &mut Lab<'_>) -> Verdict {
    let page = BYSTANDERS[3];
    if let Err(e) = lab.host_remove_readd(page & !(M2 - 1), PageLevel::Size2M) {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    match lab.read(page) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    }
}

fn run_remove_readd_4k_boot(lab: &mut Lab<'_>) -> Verdict {
    let page = BYSTANDERS[0];
    let r = lab
        .host_demote(0)
        .and_then(|()| lab.host_remove_readd(page, PageLevel::Size4K));
    if let Err(e) = r {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    match lab.read(page) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    }
}

/// Maps lazy unit `unit` 2M PENDING and DEMOTEs it to 512 PENDING 4K pages.
fn demoted_pending(lab: &mut Lab<'_>, unit: u64) -> Result<u64, Verdict> {
    let gpa = unit_gpa(unit);
    let r = lab.host_map_2m(gpa).and_then(|()| lab.host_demote(gpa));
    if let Err(e) = r {
        lab.note(e);
        return Err(Verdict::Stops(Stop::Inconsistent));
    }
    Ok(gpa)
}

/// Writes and reads back tokens in a few pages of the 2M range at `base`.
fn use_range(lab: &mut Lab<'_>, base: u64) -> Verdict {
    for off in [0, 0x1000, 0x10_0000, M2 - K4] {
        if let Err(s) = lab.write(base + off) {
            return Verdict::Stops(s);
        }
    }
    for off in [0, 0x1000, 0x10_0000, M2 - K4] {
        if let Err(s) = lab.read(base + off) {
            return Verdict::Stops(s);
        }
    }
    Verdict::Completes
}

fn run_demote_pending_before_accept(lab: &mut Lab<'_>) -> Verdict {
    let gpa = match demoted_pending(lab, 11) {
        Ok(g) => g,
        Err(v) => return v,
    };
    let v = lab.accept_lazy(gpa, gpa + K4);
    if v != Verdict::Completes {
        return v;
    }
    use_range(lab, gpa)
}

fn run_promote_during_4k_accepts(lab: &mut Lab<'_>) -> Verdict {
    let gpa = match demoted_pending(lab, 12) {
        Ok(g) => g,
        Err(v) => return v,
    };
    let host = lab.host;
    let promotes = Rc::new(Cell::new((0u32, 0u32)));
    let counts = promotes.clone();
    lab.cpu.on_accept(Box::new(move |h, at, level| {
        if level == PageLevel::Size4K {
            let m = host.module();
            let blocked = m.range_block(g(gpa), PageLevel::Size2M).status;
            if blocked.is_success() && m.mem_track().status.is_success() {
                let r = m.page_promote(g(gpa), PageLevel::Size2M);
                let (ok, refused) = counts.get();
                if r.status.is_success() {
                    host.mmu().sept_pool().free(r.rcx);
                    counts.set((ok + 1, refused));
                } else {
                    counts.set((ok, refused + 1));
                    let _ = m.range_unblock(g(gpa), PageLevel::Size2M);
                }
            }
        }
        h.accept(at, level)
    }));
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.cpu.honest_again();
    let (ok, refused) = promotes.get();
    lab.note(format!(
        "host PROMOTE during the accepts: {ok} merged, {refused} refused"
    ));
    if v != Verdict::Completes {
        return v;
    }
    let v = use_range(lab, gpa);
    if v != Verdict::Completes {
        return v;
    }
    // Everything accepted: the host merges the range back; the data must survive it.
    if let Err(s) = lab.host_promote(gpa) {
        lab.note(format!("final PROMOTE: {s}"));
        return Verdict::Stops(Stop::Inconsistent);
    }
    let leaf = lab.host.module().leaf(g(gpa));
    lab.note(format!("final leaf level {} {:?}", leaf.level, leaf.state));
    Verdict::Completes
}

fn run_demote_promote_during_accepts(lab: &mut Lab<'_>) -> Verdict {
    let host = lab.host;
    let victim = BYSTANDERS[4] & !(M2 - 1);
    // Host steps done and failed.
    let counts = Rc::new(Cell::new((0u32, 0u32)));
    let seen = counts.clone();
    lab.cpu.on_accept(Box::new(move |h, at, level| {
        let (step, failures) = seen.get();
        let m = host.module();
        let ok = if step % 2 == 0 {
            let page = host.mmu().sept_pool().alloc();
            m.range_block(g(victim), PageLevel::Size2M)
                .status
                .is_success()
                && m.mem_track().status.is_success()
                && page.is_some_and(|p| {
                    m.page_demote(g(victim), PageLevel::Size2M, p)
                        .status
                        .is_success()
                })
        } else {
            m.range_block(g(victim), PageLevel::Size2M)
                .status
                .is_success()
                && m.mem_track().status.is_success()
                && {
                    let r = m.page_promote(g(victim), PageLevel::Size2M);
                    if r.status.is_success() {
                        host.mmu().sept_pool().free(r.rcx);
                    }
                    r.status.is_success()
                }
        };
        seen.set((step + 1, failures + u32::from(!ok)));
        h.accept(at, level)
    }));
    let v = lab.accept_lazy(unit_gpa(13), unit_gpa(17));
    lab.cpu.honest_again();
    let (steps, failures) = counts.get();
    lab.note(format!(
        "host DEMOTE/PROMOTE steps between the ACCEPTs: {steps}, failed: {failures}"
    ));
    if failures > 0 {
        return Verdict::Stops(Stop::Inconsistent);
    }
    if v != Verdict::Completes {
        return v;
    }
    match lab.read(BYSTANDERS[4]) {
        Ok(_) => use_range(lab, unit_gpa(14)),
        Err(s) => Verdict::Stops(s),
    }
}

/// The Secure-EPT behaviours, in catalogue order.
pub(super) const BEHAVIOURS: [Behaviour; 5] = [

    Behaviour {
        name: "remove-readd-2m",
        description: "The host BLOCKs, TRACKs and REMOVEs an accepted 2M private page holding guest data, then AUGs a fresh PENDING page there; the guest reads it.",
        why: "The first #VE on an accepted unit may be a race with another vCPU (AcceptedMeanwhile, retry the access); the repeat on the same page is ReAdded. The page is never accepted again, so its content is not zeroed behind the guest's back.",
        expected: Verdict::Stops(Stop::ReAdded { gpa: BYSTANDERS[3] }),
        bound: 2,
        run: run_remove_readd_2m,
    },
    Behaviour {
        name: "remove-readd-4k-boot",
        description: "The host DEMOTEs a boot-accepted 2M page, REMOVEs one 4K page holding guest data and AUGs it back PENDING; the guest reads it.",
        why: "A pending page outside the unaccepted memory was accepted at boot: Untracked, no ACCEPT, the data is not zeroed.",
        expected: Verdict::Stops(Stop::Untracked { gpa: BYSTANDERS[0] }),
        bound: 1,
        run: run_remove_readd_4k_boot,
    },
    Behaviour {
        name: "demote-pending-before-accept",
        description: "The host maps a lazy unit 2M PENDING, then DEMOTEs it to 512 PENDING 4K pages just before the guest's 2M ACCEPT.",
        why: "PAGE_SIZE_MISMATCH at 2M makes that unit accept at 4K (512 calls); the memory is then usable.",
        expected: Verdict::Completes,
        bound: 513,
        run: run_demote_pending_before_accept,
    },
    Behaviour {
        name: "promote-during-4k-accepts",
        description: "As demote-pending-before-accept, and before every 4K ACCEPT the host tries to PROMOTE the range (BLOCK, TRACK, PROMOTE, UNBLOCK on failure); the first try merges it back to 2M PENDING under the guest.",
        why: "A 4K ACCEPT inside a 2M PENDING leaf exits and the host's fault path DEMOTEs again; later PROMOTE attempts fail on mixed children. The acceptance completes, and a final PROMOTE of the fully accepted range keeps the guest's data.",
        expected: Verdict::Completes,
        bound: 513,
        run: run_promote_during_4k_accepts,
    },
    Behaviour {
        name: "demote-promote-during-accepts",
        description: "While the guest accepts five lazy units, the host alternately DEMOTEs and PROMOTEs an accepted 2M page holding guest data, between the guest's ACCEPTs.",
        why: "DEMOTE and PROMOTE of MAPPED pages preserve content and acceptance: the guest's ACCEPTs complete and its data reads back.",
        expected: Verdict::Completes,
        bound: 5,
        run: run_demote_promote_during_accepts,
    },
];
