//! ACCEPT behaviours: hostile ACCEPT statuses, and EPT-violation storms the host never maps.

use accept::abi::{PageLevel, StatusCode, TdxStatus};
use accept::tdcall::Tdcall;

use super::lab::{g, Lab};
use super::verdict::{Stop, Verdict};
use super::{unit_gpa, Behaviour, BUSY_TRIES, K4};
use hostvmm::module::EntryLockGuard;
use hostvmm::vmm::ExitAction;

fn run_accept_size_mismatch_every_level(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_accept(Box::new(|_, _, level| {
        StatusCode::PageSizeMismatch.with_operand(u32::from(level.index()))
    }));
    let v = lab.accept_lazy(unit_gpa(4), unit_gpa(4) + K4);
    lab.note(format!("unit 4 is {:?}", lab.tracker.unit_state(4)));
    v
}

fn run_accept_busy_forever(lab: &mut Lab<'_>) -> Verdict {
    let gpa = unit_gpa(5);
    if let Err(e) = lab.host_map_2m(gpa) {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    let host = lab.host;
    let Some(guard) = host.module().hold_entry_lock(g(gpa), 1) else {
        lab.note("entry lock not taken".into());
        return Verdict::Stops(Stop::Inconsistent);
    };
    let v = lab.accept_lazy(gpa, gpa + K4);
    drop(guard);
    v
}

fn run_accept_busy_then_free(lab: &mut Lab<'_>) -> Verdict {
    let gpa = unit_gpa(6);
    if let Err(e) = lab.host_map_2m(gpa) {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    let host = lab.host;
    let mut guard: Option<EntryLockGuard<'_>> = host.module().hold_entry_lock(g(gpa), 1);
    if guard.is_none() {
        lab.note("entry lock not taken".into());
        return Verdict::Stops(Stop::Inconsistent);
    }
    let mut calls = 0u32;
    lab.cpu.on_accept(Box::new(move |h, gpa, level| {
        calls += 1;
        if calls == 200 {
            drop(guard.take());
        }
        h.accept(gpa, level)
    }));
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.cpu.honest_again();
    if v != Verdict::Completes {
        return v;
    }
    match lab.write(gpa + 0x4000).and_then(|_| lab.read(gpa + 0x4000)) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    }
}

fn run_accept_already_accepted_lie(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_accept(Box::new(|_, _, level| {
        StatusCode::PageAlreadyAccepted.with_operand(u32::from(level.index()))
    }));
    let gpa = unit_gpa(7);
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.cpu.honest_again();
    let again = lab.accept_lazy(gpa, gpa + K4);
    lab.note(format!("a later request for the unit: {again}"));
    if again != v {
        return Verdict::Stops(Stop::Inconsistent);
    }
    v
}

fn run_accept_unknown_status(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_accept(Box::new(|_, _, _| {
        TdxStatus::from_raw(0xC000_0B99_0000_0000)
    }));
    let gpa = unit_gpa(8);
    lab.accept_lazy(gpa, gpa + K4)
}

fn run_ept_storm_on_accept(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_exit(Box::new(|_, _| ExitAction::Resume));
    let gpa = unit_gpa(9);
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.note(format!("{} exits", lab.cpu.honest.hooks().exits));
    v
}

fn run_ept_storm_on_access(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_exit(Box::new(|_, _| ExitAction::Resume));
    let gpa = unit_gpa(10) + 0x5000;
    let v = match lab.read(gpa) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    };
    lab.note(format!("{} exits", lab.cpu.honest.hooks().exits));
    v
}

/// The ACCEPT behaviours, in catalogue order.
pub(super) const BEHAVIOURS: [Behaviour; 7] = [

    Behaviour {
        name: "accept-size-mismatch-every-level",
        description: "Every ACCEPT, at 2M and at 4K, is answered PAGE_SIZE_MISMATCH (not reachable with a correct module: there is no level below 4K).",
        why: "A 2M mismatch falls back to 4K for that chunk only; a mismatch at 4K is outside the spec and stops at once with the status, after 2 calls. Nothing was accepted, so the unit goes back to unaccepted.",
        expected: Verdict::Stops(Stop::Module { gpa: unit_gpa(4), level: PageLevel::Size4K, code: StatusCode::PageSizeMismatch }),
        bound: 2,
        run: run_accept_size_mismatch_every_level,
    },
    Behaviour {
        name: "accept-busy-forever",
        description: "The host maps a lazy unit 2M PENDING and holds its S-EPT entry lock forever, as a SEAMCALL that never ends would: every ACCEPT gets OPERAND_BUSY.",
        why: "BUSY is retried DEFAULT_BUSY_RETRIES times per call, then the engine stops with Busy instead of spinning; the unit stays unaccepted.",
        expected: Verdict::Stops(Stop::Busy { gpa: unit_gpa(5), level: PageLevel::Size2M, tries: BUSY_TRIES }),
        bound: BUSY_TRIES as u64,
        run: run_accept_busy_forever,
    },
    Behaviour {
        name: "accept-busy-then-free",
        description: "The host holds the entry lock of a 2M PENDING unit through the guest's first 199 ACCEPTs, then releases it.",
        why: "BUSY within the bound is a transient race: the ACCEPT that follows succeeds and the memory is usable.",
        expected: Verdict::Completes,
        bound: 200,
        run: run_accept_busy_then_free,
    },
    Behaviour {
        name: "accept-already-accepted-lie",
        description: "ACCEPT of a never-accepted unit answered PAGE_ALREADY_ACCEPTED (not reachable with a correct module).",
        why: "Only a guest ACCEPT makes a page accepted, so the tracker takes ALREADY_ACCEPTED as the page being private (a conversion may have accepted it behind the tracker) and counts the unit accepted instead of making it unusable; a later request does nothing. A module that lies here is outside the trust model (the TDX module is trusted); a strict tracker (Linux's policy) stops with the GPA and fails the unit.",
        expected: Verdict::Completes,
        bound: 1,
        run: run_accept_already_accepted_lie,
    },
    Behaviour {
        name: "accept-unknown-status",
        description: "ACCEPT answered with a status class the spec does not define (0xC0000B99...).",
        why: "Unknown statuses are kept raw and stop the acceptance at that page; they are never taken as success or retried.",
        expected: Verdict::Stops(Stop::Module { gpa: unit_gpa(8), level: PageLevel::Size2M, code: StatusCode::Unknown(0xC000_0B99) }),
        bound: 1,
        run: run_accept_unknown_status,
    },
    Behaviour {
        name: "ept-storm-on-accept",
        description: "The host answers every ACCEPT EPT-violation exit by resuming the guest without mapping anything.",
        why: "The guest's ACCEPT never retires: the loop is in the host, not the guest (one TDCALL). The simulator, like a VMM that gives up, stops the TD after MAX_EXITS_PER_INSTRUCTION exits; the engine reports the failed ACCEPT precisely and accepted nothing twice.",
        expected: Verdict::Stops(Stop::Module { gpa: unit_gpa(9), level: PageLevel::Size2M, code: StatusCode::NonRecoverableTd }),
        bound: 1,
        run: run_ept_storm_on_accept,
    },
    Behaviour {
        name: "ept-storm-on-access",
        description: "The guest touches lazily accepted memory the host never mapped; the host answers every EPT-violation exit without mapping.",
        why: "No #VE is ever raised, so the engine is never entered (0 TDCALLs); the access is stopped after MAX_EXITS_PER_INSTRUCTION exits and the TD is stopped.",
        expected: Verdict::Stops(Stop::Killed),
        bound: 0,
        run: run_ept_storm_on_access,
    },
];
