//! MapGPA behaviours: hostile RETRY resume GPAs, success answers that lie, failures midway, and
//! conversions the host cannot serve.

use accept::abi::{GhciStatus, MapGpaOutcome, PageLevel, StatusCode};
use accept::convert::Visibility;
use accept::tdcall::Tdcall;

use super::lab::{answer, g, range, retry, Lab, MapHook, PageTables};
use super::verdict::{Stop, Verdict};
use super::{
    Behaviour, CONV, CONV_SHARED, CONV_TAIL_TOKENS, K4, LAB_MEMORY, M2, NO_PROGRESS, PRIV, SHARED,
};

/// A to-shared conversion of [`CONV`] whose first MapGPA converts the first 2 MiB chunk and
/// answers RETRY with `resume(start)`; later calls are honest.
fn first_retry_lies(lab: &mut Lab<'_>, resume: fn(u64) -> u64) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED != 0 {
            first = false;
            let _ = h.map_gpa(start, len.min(M2));
            return retry(resume(start));
        }
        h.map_gpa(start, len)
    }));
    lab.convert(CONV, Visibility::Shared)
}

/// Makes [`PRIV`] shared through the honest host (the guest's own earlier conversion).
fn share_priv(lab: &mut Lab<'_>) -> Result<(), Verdict> {
    match lab.convert(PRIV, Visibility::Shared) {
        Verdict::Completes => Ok(()),
        other => Err(other),
    }
}

fn write_tail_tokens(lab: &mut Lab<'_>) -> Result<(), Verdict> {
    for gpa in CONV_TAIL_TOKENS {
        lab.write(gpa).map_err(Verdict::Stops)?;
    }
    Ok(())
}

pub(super) fn run_retry_before_start(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| start - K4)
}

fn run_retry_past_end(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |_| CONV.1 | SHARED)
}

fn run_retry_without_shared_bit(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| (start & !SHARED) + M2)
}

fn run_retry_other_high_bit(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| (start + M2) | (1 << 46))
}

fn run_retry_misaligned(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| start + M2 + 8)
}

pub(super) fn run_retry_at_start_forever(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_map_gpa(Box::new(|_, start, _| retry(start)));
    lab.convert(CONV, Visibility::Shared)
}

fn run_retry_shared_bit_on_private(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = share_priv(lab) {
        return v;
    }
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED == 0 {
            first = false;
            let _ = h.map_gpa(start, len.min(M2));
            return retry((start + M2) | SHARED);
        }
        h.map_gpa(start, len)
    }));
    lab.convert(PRIV, Visibility::Private)
}

fn run_retry_backwards(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = write_tail_tokens(lab) {
        return v;
    }
    let mut calls = 0u32;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if start & SHARED == 0 {
            return h.map_gpa(start, len);
        }
        calls += 1;
        match calls {
            1 => {
                let _ = h.map_gpa(start, M2);
                retry(start + M2)
            }
            2 => retry((CONV.0 + K4) | SHARED),
            _ => h.map_gpa(start, len),
        }
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_retry_one_page_at_a_time(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_map_gpa(Box::new(|h, start, len| {
        let out = h.map_gpa(start, K4);
        if out.status != GhciStatus::Success || len == K4 {
            return out;
        }
        retry(start + K4)
    }));
    lab.convert((CONV.0, CONV.0 + 64 * K4), Visibility::Shared)
}

fn run_retry_stall_within_bound(lab: &mut Lab<'_>) -> Verdict {
    let mut stalls = 0u32;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if stalls < accept::convert::DEFAULT_NO_PROGRESS_RETRIES {
            stalls += 1;
            return retry(start);
        }
        stalls = 0;
        let out = h.map_gpa(start, len.min(M2));
        if out.status != GhciStatus::Success || len <= M2 {
            return out;
        }
        retry(start + M2)
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_success_not_shared(lab: &mut Lab<'_>) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED != 0 {
            first = false;
            return answer(GhciStatus::Success);
        }
        h.map_gpa(start, len)
    }));
    let r = range(CONV.0, CONV.1);
    let (converter, acceptor) = (lab.converter, lab.acceptor);
    let shared = crate::convert::convert_simulated(
        converter,
        &mut lab.cpu,
        acceptor,
        r,
        Visibility::Shared,
        &mut PageTables,
    );
    if let Err(f) = shared {
        lab.note(format!("{f}"));
        return Verdict::Stops(Stop::Inconsistent);
    }
    // The host did nothing: no GPA is both shared and private on the host side.
    if let Err(e) = lab.check_side(r, Visibility::Private) {
        lab.note(format!("after the fake conversion: {e}"));
        return Verdict::Stops(Stop::Inconsistent);
    }
    lab.note("the fake to-shared conversion left the range private and accepted".into());
    // The guest takes the range back: its strict ACCEPT finds the pages accepted.
    lab.convert(CONV, Visibility::Private)
}

fn run_map_success_not_private(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = share_priv(lab) {
        return v;
    }
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED == 0 {
            first = false;
            return answer(GhciStatus::Success);
        }
        h.map_gpa(start, len)
    }));
    let v = lab.convert(PRIV, Visibility::Private);
    if let Some(why) = &lab.cpu.honest.hooks().killed {
        let why = why.clone();
        lab.note(why);
    }
    v
}

fn midway<'g>(status: GhciStatus, private: bool) -> MapHook<'g> {
    let mut calls = 0u32;
    Box::new(move |h, start, len| {
        if (start & SHARED == 0) != private {
            return h.map_gpa(start, len);
        }
        calls += 1;
        match calls {
            1 => {
                let _ = h.map_gpa(start, M2);
                retry(start + M2)
            }
            2 => answer(status),
            _ => h.map_gpa(start, len),
        }
    })
}

fn run_map_gpa_inuse_midway(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = write_tail_tokens(lab) {
        return v;
    }
    lab.cpu.on_map_gpa(midway(GhciStatus::GpaInUse, false));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_invalid_operand_midway(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = share_priv(lab) {
        return v;
    }
    lab.cpu.on_map_gpa(midway(GhciStatus::InvalidOperand, true));
    lab.convert(PRIV, Visibility::Private)
}

fn run_map_unknown_status(lab: &mut Lab<'_>) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first {
            first = false;
            return answer(GhciStatus::Unknown(0x42));
        }
        h.map_gpa(start, len)
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_vmcall_fails(lab: &mut Lab<'_>) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first {
            first = false;
            return MapGpaOutcome {
                tdcall: StatusCode::OperandInvalid.with_operand(1),
                status: GhciStatus::Success,
                resume_gpa: 0,
            };
        }
        h.map_gpa(start, len)
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_converts_all_then_fails(lab: &mut Lab<'_>) -> Verdict {
    // Tokens in the range being given up: not the guest's any more, but the report says
    // what happened to them.
    let mut given_up = Vec::new();
    for gpa in CONV_TAIL_TOKENS {
        match lab.write(gpa) {
            Ok(token) => given_up.push((gpa, token)),
            Err(s) => return Verdict::Stops(s),
        }
        lab.shadow.remove(&gpa);
    }
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED != 0 {
            first = false;
            let _ = h.map_gpa(start, len);
            return answer(GhciStatus::GpaInUse);
        }
        h.map_gpa(start, len)
    }));
    let v = lab.convert(CONV, Visibility::Shared);
    let module = lab.host.module();
    let zeroed = given_up
        .iter()
        .filter(|&&(gpa, token)| {
            let leaf = module.leaf(g(gpa));
            module.read_content(leaf.page_hpa(gpa)) != token
        })
        .count();
    lab.note(format!(
        "{zeroed} of {} tokens written in the range before the conversion read differently after \
         the rollback (the host converted those pages; the engine reports them Restored: content gone)",
        given_up.len()
    ));
    v
}

fn run_convert_past_top_of_memory(lab: &mut Lab<'_>) -> Verdict {
    lab.convert((LAB_MEMORY - M2, LAB_MEMORY + M2), Visibility::Shared)
}

/// The memory hole of the hole row: no guest memory the host can convert.
const HOLE: (u64, u64) = (20 * M2, 21 * M2);

fn run_convert_across_memory_hole(lab: &mut Lab<'_>) -> Verdict {
    // The host converts chunk by chunk up to the hole, reports that progress with RETRY, then
    // refuses at the hole (its memslot lookup fails).
    lab.cpu.on_map_gpa(Box::new(|h, start, len| {
        let bit = start & SHARED;
        let addr = start & !SHARED;
        let end = addr + len;
        if end <= HOLE.0 || addr >= HOLE.1 {
            return h.map_gpa(start, len);
        }
        if addr < HOLE.0 {
            let out = h.map_gpa(start, HOLE.0 - addr);
            if out.status != GhciStatus::Success {
                return out;
            }
            return retry(HOLE.0 | bit);
        }
        answer(GhciStatus::InvalidOperand)
    }));
    lab.convert((HOLE.0 - M2, HOLE.1 + M2), Visibility::Shared)
}

/// The MapGPA behaviours, in catalogue order.
pub(super) const BEHAVIOURS: [Behaviour; 19] = [

    Behaviour {
        name: "retry-before-start",
        description: "To-shared MapGPA: the host converts the first 2 MiB, then answers RETRY with R11 one page before the start of the request.",
        why: "R11 outside [current, end) is refused (BadResume) before anything is trusted; the rollback maps the whole range private again and re-accepts it, tolerating pages the host never converted.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV_SHARED - K4 }),
        bound: 12,
        run: run_retry_before_start,
    },
    Behaviour {
        name: "retry-past-end",
        description: "To-shared MapGPA: the host converts the first 2 MiB, then answers RETRY with R11 = the end of the range.",
        why: "A resume GPA at or past the end is outside [current, end): BadResume, then a complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV.1 | SHARED }),
        bound: 12,
        run: run_retry_past_end,
    },
    Behaviour {
        name: "retry-at-start-forever",
        description: "Every MapGPA (both directions) is answered RETRY with R11 = the GPA it was asked for; nothing is ever converted.",
        why: "RETRY without progress is bounded (DEFAULT_NO_PROGRESS_RETRIES + 1 answers); the rollback MapGPA meets the same host and stops the same way, so the range is reported unknown, in 34 TDCALLs in all.",
        expected: Verdict::RollbackFailed {
            cause: Stop::NoProgress { at: CONV.0, tries: NO_PROGRESS },
            rollback: Stop::NoProgress { at: CONV.0, tries: NO_PROGRESS },
        },
        bound: 2 * NO_PROGRESS as u64,
        run: run_retry_at_start_forever,
    },
    Behaviour {
        name: "retry-without-shared-bit",
        description: "To-shared MapGPA: after the first 2 MiB the host answers RETRY with the next GPA but without the shared bit.",
        why: "R11 must carry the shared bit exactly as sent, or the loop would move to the other alias: BadResume, complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV.0 + M2 }),
        bound: 12,
        run: run_retry_without_shared_bit,
    },
    Behaviour {
        name: "retry-other-high-bit",
        description: "To-shared MapGPA: after the first 2 MiB the host answers RETRY with the next GPA, the shared bit and bit 46 set.",
        why: "An R11 beyond the request (another high bit) is outside [current, end): BadResume, complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: (CONV_SHARED + M2) | (1 << 46) }),
        bound: 12,
        run: run_retry_other_high_bit,
    },
    Behaviour {
        name: "retry-shared-bit-on-private",
        description: "To-private MapGPA: after the first 2 MiB the host answers RETRY with the next GPA carrying the shared bit.",
        why: "The resume GPA of a private request must not carry the shared bit: BadResume; the rollback maps the range shared again.",
        expected: Verdict::RolledBack(Stop::BadResume { at: PRIV.0, resume: (PRIV.0 + M2) | SHARED }),
        bound: 8,
        run: run_retry_shared_bit_on_private,
    },
    Behaviour {
        name: "retry-misaligned",
        description: "To-shared MapGPA: after the first 2 MiB the host answers RETRY with an R11 that is not 4K aligned.",
        why: "A misaligned resume GPA is refused: BadResume, complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV_SHARED + M2 + 8 }),
        bound: 12,
        run: run_retry_misaligned,
    },
    Behaviour {
        name: "retry-backwards",
        description: "To-shared MapGPA: the host converts 2 MiB and reports it (RETRY at start + 2M), then answers RETRY with a GPA before that progress.",
        why: "Going backwards is outside [current, end): BadResume at the reported progress. The rollback re-accepts the converted first half strictly and the second half tolerantly: the tokens in the second half, never converted, survive.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0 + M2, resume: CONV_SHARED + K4 }),
        bound: 12,
        run: run_retry_backwards,
    },
    Behaviour {
        name: "retry-one-page-at-a-time",
        description: "To-shared MapGPA of 256 KiB: the host converts one 4K page per call and answers RETRY with the next page.",
        why: "Slow but honest: each answer makes progress, which resets the no-progress count; the conversion completes in one call per page.",
        expected: Verdict::Completes,
        bound: 64,
        run: run_retry_one_page_at_a_time,
    },
    Behaviour {
        name: "retry-stall-within-bound",
        description: "To-shared MapGPA: before each 2 MiB chunk the host answers RETRY without progress as often as the bound allows, then converts the chunk.",
        why: "Stalls up to the bound are tolerated and progress resets the count: the conversion completes.",
        expected: Verdict::Completes,
        bound: 2 * NO_PROGRESS as u64,
        run: run_retry_stall_within_bound,
    },
    Behaviour {
        name: "map-success-not-shared",
        description: "To-shared MapGPA answered SUCCESS without converting anything; later the guest converts the range back to private.",
        why: "The guest cannot see the lie through MapGPA, and nothing leaks: the host did nothing, so no GPA is both shared and private and the private pages stay accepted. Converting back, the guest's ACCEPT gets PAGE_ALREADY_ACCEPTED, which only a guest acceptance can cause: the pages are private already, so the conversion completes and gives nothing to the host.",
        expected: Verdict::Completes,
        bound: 8,
        run: run_map_success_not_shared,
    },
    Behaviour {
        name: "map-success-not-private",
        description: "To-private MapGPA answered SUCCESS without converting; the memory stays shared on the host.",
        why: "The guest's ACCEPT exits to a host that cannot map private memory it keeps shared: the VMM stops the TD (KVM returns the fault to userspace). The engine reports the ACCEPT failure; what the host holds is not known, so the rollback gives nothing back (it could destroy a private page) and says so.",
        expected: Verdict::RollbackFailed {
            cause: Stop::Module { gpa: PRIV.0, level: PageLevel::Size2M, code: StatusCode::NonRecoverableTd },
            rollback: Stop::Module { gpa: PRIV.0, level: PageLevel::Size2M, code: StatusCode::NonRecoverableTd },
        },
        bound: 8,
        run: run_map_success_not_private,
    },
    Behaviour {
        name: "map-gpa-inuse-midway",
        description: "To-shared MapGPA: the host converts 2 MiB, reports it with RETRY, then answers GPA_INUSE.",
        why: "GHCI errors stop the loop with the converted prefix known. The rollback re-accepts the prefix strictly and the rest tolerantly; the tokens in the part the host never converted survive.",
        expected: Verdict::RolledBack(Stop::Host { at: CONV.0 + M2, status: GhciStatus::GpaInUse }),
        bound: 12,
        run: run_map_gpa_inuse_midway,
    },
    Behaviour {
        name: "map-invalid-operand-midway",
        description: "To-private MapGPA: the host converts 2 MiB, reports it with RETRY, then answers INVALID_OPERAND.",
        why: "The loop stops at the reported progress; the to-private rollback accepts the converted prefix to learn what it held, gives back exactly what it made private, and maps the part the host never converted shared again.",
        expected: Verdict::RolledBack(Stop::Host { at: PRIV.0 + M2, status: GhciStatus::InvalidOperand }),
        bound: 8,
        run: run_map_invalid_operand_midway,
    },
    Behaviour {
        name: "map-unknown-status",
        description: "To-shared MapGPA answered with R10 = 0x42, a status the GHCI does not define.",
        why: "Unknown statuses are errors kept raw, never success or retry: Host(Unknown), complete rollback.",
        expected: Verdict::RolledBack(Stop::Host { at: CONV.0, status: GhciStatus::Unknown(0x42) }),
        bound: 8,
        run: run_map_unknown_status,
    },
    Behaviour {
        name: "map-vmcall-fails",
        description: "The MapGPA TDG.VP.VMCALL itself fails (RAX = OPERAND_INVALID) once.",
        why: "A failed TDCALL is its own error (Tdcall), not a GHCI status; the rollback then succeeds.",
        expected: Verdict::RolledBack(Stop::Tdcall { at: CONV.0, code: StatusCode::OperandInvalid }),
        bound: 8,
        run: run_map_vmcall_fails,
    },
    Behaviour {
        name: "map-converts-all-then-fails",
        description: "To-shared MapGPA: the host converts the whole range, then answers GPA_INUSE as if it had done nothing.",
        why: "The guest cannot know which pages were converted; the rollback maps the range private and accepts it tolerating ALREADY_ACCEPTED, which fresh-accepts what the host converted. The range comes back private and accepted (its content was being given up by the conversion anyway); nothing outside it changes.",
        expected: Verdict::RolledBack(Stop::Host { at: CONV.0, status: GhciStatus::GpaInUse }),
        bound: 8,
        run: run_map_converts_all_then_fails,
    },
    Behaviour {
        name: "convert-past-top-of-memory",
        description: "The guest converts a range crossing the top of guest memory to shared; the host refuses it (INVALID_OPERAND).",
        why: "The host validates the whole request, so nothing is converted; the engine cannot know that from a GHCI error, reports the cause, and its rollback MapGPA is refused the same way: the range is reported unknown, and no memory outside it is touched.",
        expected: Verdict::RollbackFailed {
            cause: Stop::Host { at: LAB_MEMORY - M2, status: GhciStatus::InvalidOperand },
            rollback: Stop::Host { at: LAB_MEMORY - M2, status: GhciStatus::InvalidOperand },
        },
        bound: 4,
        run: run_convert_past_top_of_memory,
    },
    Behaviour {
        name: "convert-across-memory-hole",
        description: "The guest converts a range crossing a 2 MiB hole in guest memory to shared: the host converts up to the hole, reports it with RETRY, then answers INVALID_OPERAND.",
        why: "The loop stops at the hole with the prefix known; the rollback meets the same hole and stops there, so the states are reported unknown rather than guessed.",
        expected: Verdict::RollbackFailed {
            cause: Stop::Host { at: HOLE.0, status: GhciStatus::InvalidOperand },
            rollback: Stop::Host { at: HOLE.0, status: GhciStatus::InvalidOperand },
        },
        bound: 6,
        run: run_convert_across_memory_hole,
    },
];
