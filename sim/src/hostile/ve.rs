//! #VE behaviours: VE info the guest engine must not trust.

use accept::abi::{StatusCode, VeInfo, EXIT_REASON_EPT_VIOLATION};
use accept::tracker::UnitState;
use accept::ve::VeVerdict;

use super::lab::Lab;
use super::verdict::{stop_of_ve, Stop, Verdict};
use super::{unit_gpa, Behaviour, BYSTANDERS, SHARED};

fn ept_ve(gpa: u64) -> VeInfo {
    VeInfo {
        exit_reason: EXIT_REASON_EPT_VIOLATION,
        exit_qualification: 0x182,
        gla: gpa,
        gpa,
        ..VeInfo::default()
    }
}

fn verdict_of_ve(lab: &mut Lab<'_>, v: VeVerdict, gpa: u64) -> Verdict {
    match stop_of_ve(v) {
        Some(s) => Verdict::Stops(s),
        // Return from the #VE: the access is retried.
        None => match lab.read(gpa) {
            Ok(_) => Verdict::Completes,
            Err(s) => Verdict::Stops(s),
        },
    }
}

fn run_ve_never_pending_boot(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[0];
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, gpa)
}

fn run_ve_never_pending_lazy_once(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[3];
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, gpa)
}

fn run_ve_never_pending_lazy_twice(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[3];
    let first = lab.forged_ve(ept_ve(gpa));
    if stop_of_ve(first).is_some() {
        return verdict_of_ve(lab, first, gpa);
    }
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, gpa)
}

fn run_ve_shared_gpa(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[0] | SHARED;
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, BYSTANDERS[0])
}

fn run_ve_info_not_valid(lab: &mut Lab<'_>) -> Verdict {
    // A #VE the module did not raise: VEINFO.GET finds nothing valid.
    let v = lab.run_ve_handler();
    lab.note(format!("#VE handler: {v:?}"));
    match stop_of_ve(v) {
        Some(s) => Verdict::Stops(s),
        None => Verdict::Completes,
    }
}

fn run_ve_beyond_gpa_width(lab: &mut Lab<'_>) -> Verdict {
    let v = lab.forged_ve(ept_ve(1 << 50));
    verdict_of_ve(lab, v, BYSTANDERS[0])
}

fn run_ve_not_ept_violation(lab: &mut Lab<'_>) -> Verdict {
    let info = VeInfo {
        exit_reason: 10,
        ..ept_ve(BYSTANDERS[0])
    };
    let v = lab.forged_ve(info);
    verdict_of_ve(lab, v, BYSTANDERS[0])
}

fn run_ve_forged_on_unaccepted_unit(lab: &mut Lab<'_>) -> Verdict {
    let gpa = unit_gpa(17) + 0x8000;
    let v = lab.forged_ve(ept_ve(gpa));
    let v = verdict_of_ve(lab, v, gpa);
    if v == Verdict::Completes && lab.tracker.unit_state(17) != UnitState::Accepted {
        return Verdict::Stops(Stop::Inconsistent);
    }
    v
}

/// The #VE behaviours, in catalogue order.
pub(super) const BEHAVIOURS: [Behaviour; 8] = [

    Behaviour {
        name: "ve-never-pending-boot",
        description: "A #VE (EPT violation) for a boot-accepted page the guest never left pending (VE info from a module bug or forged).",
        why: "A pending page outside unaccepted memory can only be a re-added page: Untracked, stop; no ACCEPT that could zero data.",
        expected: Verdict::Stops(Stop::Untracked { gpa: BYSTANDERS[0] }),
        bound: 1,
        run: run_ve_never_pending_boot,
    },
    Behaviour {
        name: "ve-never-pending-lazy-once",
        description: "One #VE for a page of a lazily accepted unit that is MAPPED.",
        why: "Indistinguishable from another vCPU finishing the unit's acceptance after the #VE was raised: AcceptedMeanwhile, no ACCEPT, the retried access reads the guest's data.",
        expected: Verdict::Completes,
        bound: 1,
        run: run_ve_never_pending_lazy_once,
    },
    Behaviour {
        name: "ve-never-pending-lazy-twice",
        description: "Two #VEs for the same page of a lazily accepted unit that is MAPPED.",
        why: "The repeat on the page already answered AcceptedMeanwhile is ReAdded: stop rather than accept again.",
        expected: Verdict::Stops(Stop::ReAdded { gpa: BYSTANDERS[3] }),
        bound: 2,
        run: run_ve_never_pending_lazy_twice,
    },
    Behaviour {
        name: "ve-shared-gpa",
        description: "An EPT-violation #VE whose GPA has the shared bit set.",
        why: "Shared GPAs are not the acceptance engine's (MMIO, shared buffers): NotMine with the VE info for the embedder, nothing accepted.",
        expected: Verdict::Stops(Stop::NotMine { gpa: BYSTANDERS[0] | SHARED }),
        bound: 1,
        run: run_ve_shared_gpa,
    },
    Behaviour {
        name: "ve-info-not-valid",
        description: "A #VE whose TDG.VP.VEINFO.GET finds no valid VE info.",
        why: "NoVeInfo with the module's status; the handler decides nothing from stale data.",
        expected: Verdict::Stops(Stop::NoVeInfo { code: StatusCode::NoValidVeInfo }),
        bound: 1,
        run: run_ve_info_not_valid,
    },
    Behaviour {
        name: "ve-beyond-gpa-width",
        description: "An EPT-violation #VE whose GPA lies above the TD's GPA width.",
        why: "Not a private GPA of this TD: NotMine, nothing accepted.",
        expected: Verdict::Stops(Stop::NotMine { gpa: 1 << 50 }),
        bound: 1,
        run: run_ve_beyond_gpa_width,
    },
    Behaviour {
        name: "ve-not-ept-violation",
        description: "A #VE with exit reason 10 (CPUID) and the GPA of a private page.",
        why: "Only exit reason 48 is the engine's: NotMine, whatever the GPA.",
        expected: Verdict::Stops(Stop::NotMine { gpa: BYSTANDERS[0] }),
        bound: 1,
        run: run_ve_not_ept_violation,
    },
    Behaviour {
        name: "ve-forged-on-unaccepted-unit",
        description: "A #VE for a page of a unit that is still unaccepted and that the host never mapped.",
        why: "The handler accepts the unit once, as for a real #VE (the ACCEPT exits and the host maps it): the worst a lying #VE can do there is make the guest accept its own memory early.",
        expected: Verdict::Completes,
        bound: 2,
        run: run_ve_forged_on_unaccepted_unit,
    },
];
