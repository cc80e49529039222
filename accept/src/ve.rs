//! The #VE handler for EPT violations on private GPAs (spec section 6): lazy acceptance of the
//! unit a vCPU touched before anybody accepted it.
//!
//! [`handle_ve`] reads VE_INFO first (TDG.VP.VEINFO.GET), before anything that could fault:
//! VE_INFO stays valid until it is read, and a second #VE while it is valid is a double fault.
//! Reading it clears the valid flag, so a #VE taken later in the handler is an ordinary nested
//! #VE. Then it decides:
//!
//! - exit reason 48 (EPT violation) on a private GPA inside an unaccepted unit: accept that unit
//!   through the [`LazyTracker`] (largest level first; waiting, bounded, if another vCPU is
//!   accepting it) and answer [`VeVerdict::Handled`]: return from the exception and the access
//!   is retried;
//! - the same on a GPA that is already accepted, or that the tracker never had as unaccepted:
//!   the page was accepted once, so the host removed it and made it pending again. Accepting it
//!   again would silently replace the guest's data with zeros: [`VeFatal::ReAdded`] /
//!   [`VeFatal::Untracked`], and no ACCEPT is made. One window needs care: two vCPUs touch the
//!   same pending unit, the second's #VE is raised while the first is accepting it, and the
//!   first finishes before the second's handler looks. So the first #VE on an accepted unit
//!   answers [`VeVerdict::AcceptedMeanwhile`] (retry the access, no ACCEPT) and remembers the
//!   page in the vCPU's [`VeCpuState`]; a repeat #VE on that page is the fatal verdict;
//! - a shared GPA, or any other exit reason: [`VeVerdict::NotMine`], with the VE info already
//!   read, for the embedder's MMIO / CPUID / port handling;
//! - no valid VE info: [`VeVerdict::NoVeInfo`].
//!
//! It is callable from the exception context: no allocation, no lock. The only waiting is the
//! tracker's bounded wait for a unit *another* vCPU is accepting; if the interrupted code on this
//! vCPU is accepting the unit itself, the verdict is [`VeFatal::Reentrant`] at once instead of a
//! wait that could never end. It does not emulate instructions or decode MMIO.

use core::fmt;

use crate::abi::{Gpa, TdxStatus, VeInfo, EXIT_REASON_EPT_VIOLATION};
use crate::tdcall::Tdcall;
use crate::tracker::{CpuHooks, LazyTracker, StateWord, TrackerError, UnitState};

/// Why a #VE cannot be survived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VeFatal {
    /// The GPA lies in a unit that was already accepted: the host removed and re-added the
    /// private page. It is not accepted again.
    ReAdded {
        /// The VE info.
        info: VeInfo,
        /// The tracker's unit.
        unit: u64,
    },
    /// A pending private GPA outside the tracked unaccepted memory (accepted at boot, or not
    /// memory the guest ever left unaccepted): the host made it pending. Not accepted.
    Untracked {
        /// The VE info.
        info: VeInfo,
    },
    /// The #VE interrupted this vCPU's own acceptance of the same unit: the access came from a
    /// context (NMI, nested exception) that touched memory being accepted under it.
    Reentrant {
        /// The VE info.
        info: VeInfo,
        /// The tracker's unit.
        unit: u64,
    },
    /// The unit could not be accepted (acceptor error, earlier partial failure, wait timeout).
    Accept {
        /// The VE info.
        info: VeInfo,
        /// What the tracker said.
        error: TrackerError,
    },
}

impl fmt::Display for VeFatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VeFatal::ReAdded { info, unit } => write!(
                f,
                "#VE on GPA {:#x} in unit {unit}, already accepted: the host re-added a private page",
                info.gpa
            ),
            VeFatal::Untracked { info } => write!(
                f,
                "#VE on private GPA {:#x} outside unaccepted memory: the host made it pending",
                info.gpa
            ),
            VeFatal::Reentrant { info, unit } => write!(
                f,
                "#VE on GPA {:#x} while this vCPU is accepting its unit {unit}",
                info.gpa
            ),
            VeFatal::Accept { info, error } => {
                write!(f, "#VE on GPA {:#x}: {error}", info.gpa)
            }
        }
    }
}

/// Per-vCPU memory of the #VE handler, kept by the embedder with its other per-CPU data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VeCpuState {
    /// 4K page of the last #VE answered with [`VeVerdict::AcceptedMeanwhile`].
    retried_page: Option<u64>,
}

impl VeCpuState {
    /// A fresh state.
    pub const fn new() -> VeCpuState {
        VeCpuState { retried_page: None }
    }
}

/// What the embedder's #VE entry should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VeVerdict {
    /// The unit holding the GPA is accepted: return from the exception; the access is retried.
    Handled {
        /// The faulting GPA.
        gpa: Gpa,
        /// The tracker's unit that holds it.
        unit: u64,
    },
    /// The unit was found accepted (by another vCPU after this #VE was raised): return from the
    /// exception and retry the access; no ACCEPT was made. A second #VE on the same page is
    /// [`VeFatal::ReAdded`].
    AcceptedMeanwhile {
        /// The faulting GPA.
        gpa: Gpa,
        /// The tracker's unit that holds it.
        unit: u64,
    },
    /// Not an EPT violation on a private GPA: the embedder handles it (MMIO on a shared GPA,
    /// CPUID, port I/O, ...). VE info was read and cannot be read again: it is here.
    NotMine(VeInfo),
    /// TDG.VP.VEINFO.GET found nothing valid (a spurious #VE, or VE info already consumed).
    NoVeInfo(TdxStatus),
    /// The TD cannot continue safely.
    Fatal(VeFatal),
}

/// Handles one #VE: reads VE info, then decides (see the module documentation).
///
/// # Examples
///
/// The host mapped a page PENDING and the guest touched it before accepting: the module raises
/// #VE, and the handler accepts the unit the access needs.
///
/// ```
/// use core::sync::atomic::AtomicU64;
/// use tdmem_accept::abi::VeInfo;
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::testing::FakeModule;
/// use tdmem_accept::tracker::{words_needed, LazyTracker, NoInterrupts, TrackerConfig};
/// use tdmem_accept::ve::{handle_ve, VeCpuState, VeVerdict};
/// use tdmem_accept::Gpaw;
///
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
/// let words: Vec<AtomicU64> = (0..words_needed(8)).map(|_| AtomicU64::new(0)).collect();
/// let slots = [AtomicU64::new(0)];
/// let tracker =
///     LazyTracker::new(&acceptor, 0, 2 << 20, 8, &words, &slots, TrackerConfig::default())?;
/// tracker.mark_unaccepted(3);
///
/// let mut module = FakeModule::new();
/// module.inject_ve(VeInfo {
///     exit_reason: 48, // EPT violation
///     exit_qualification: 0,
///     gla: 0,
///     gpa: 3 * (2 << 20) + 0x5008,
///     instruction_length: 0,
///     instruction_info: 0,
/// });
/// // In the #VE entry, with interrupts masked: this vCPU's slot 0 and its #VE memory.
/// let mut cpu = VeCpuState::new();
/// match handle_ve(0, &mut cpu, &mut module, &mut NoInterrupts, &tracker) {
///     VeVerdict::Handled { unit, .. } => assert_eq!(unit, 3), // return; the access retries
///     other => panic!("{other:?}"),
/// }
/// assert_eq!(tracker.remaining_bytes(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// `vcpu` is this vCPU's in-flight slot index in `tracker` and `cpu` its #VE memory; `hooks` are
/// usually [`crate::tracker::NoInterrupts`], as exception entry runs with interrupts masked.
pub fn handle_ve<T, H, W>(
    vcpu: usize,
    cpu: &mut VeCpuState,
    tdcall: &mut T,
    hooks: &mut H,
    tracker: &LazyTracker<'_, W>,
) -> VeVerdict
where
    T: Tdcall + ?Sized,
    H: CpuHooks + ?Sized,
    W: StateWord,
{
    // First, before anything that could fault again.
    let info = match tdcall.ve_info() {
        Ok(info) => info,
        Err(status) => return VeVerdict::NoVeInfo(status),
    };
    handle_ve_info(vcpu, cpu, tdcall, hooks, tracker, info)
}

/// The decision part of [`handle_ve`], for an embedder whose entry code read VE info itself.
pub fn handle_ve_info<T, H, W>(
    vcpu: usize,
    cpu: &mut VeCpuState,
    tdcall: &mut T,
    hooks: &mut H,
    tracker: &LazyTracker<'_, W>,
    info: VeInfo,
) -> VeVerdict
where
    T: Tdcall + ?Sized,
    H: CpuHooks + ?Sized,
    W: StateWord,
{
    if info.exit_reason != EXIT_REASON_EPT_VIOLATION {
        return VeVerdict::NotMine(info);
    }
    let gpaw = tracker.acceptor().gpaw();
    let Ok(gpa) = Gpa::try_new(info.gpa) else {
        return VeVerdict::NotMine(info);
    };
    if gpa.is_shared(gpaw) || gpa.exceeds(gpaw) {
        return VeVerdict::NotMine(info);
    }
    let Some(unit) = tracker.unit_of(gpa.as_u64()) else {
        return VeVerdict::Fatal(VeFatal::Untracked { info });
    };
    let page = gpa.pfn();
    if tracker.unit_state(unit) == UnitState::Accepted {
        if cpu.retried_page == Some(page) {
            cpu.retried_page = None;
            return VeVerdict::Fatal(VeFatal::ReAdded { info, unit });
        }
        cpu.retried_page = Some(page);
        return VeVerdict::AcceptedMeanwhile { gpa, unit };
    }
    cpu.retried_page = None;
    match tracker.accept_unit(vcpu, tdcall, hooks, unit) {
        Ok(()) => VeVerdict::Handled { gpa, unit },
        Err(TrackerError::Reentrant { unit, .. }) => {
            VeVerdict::Fatal(VeFatal::Reentrant { info, unit })
        }
        Err(error) => VeVerdict::Fatal(VeFatal::Accept { info, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Gpaw, MapGpaOutcome, PageLevel, StatusCode, VpInfo};
    use crate::acceptor::{AcceptPolicy, Acceptor};
    use crate::tracker::{words_needed, NoInterrupts, TrackerConfig};
    use core::sync::atomic::AtomicU64;
    use std::vec::Vec;

    const M2: u64 = 2 << 20;
    const BASE: u64 = 1 << 32;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        VeInfoRead,
        Accept(u64, PageLevel),
        DoubleFault,
    }

    /// A vCPU with a VE_INFO register that can take a #VE in the middle of an ACCEPT.
    struct VeFake<'t> {
        ve: Option<VeInfo>,
        events: Vec<Event>,
        /// A #VE delivered during the next ACCEPT.
        nested: Option<VeInfo>,
        tracker: Option<&'t LazyTracker<'t>>,
        nested_verdict: Option<VeVerdict>,
    }

    impl<'t> VeFake<'t> {
        fn new(ve: Option<VeInfo>) -> Self {
            VeFake {
                ve,
                events: Vec::new(),
                nested: None,
                tracker: None,
                nested_verdict: None,
            }
        }
        fn accepts(&self) -> usize {
            self.events
                .iter()
                .filter(|e| matches!(e, Event::Accept(..)))
                .count()
        }
    }

    impl Tdcall for VeFake<'_> {
        fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
            self.events.push(Event::Accept(gpa.as_u64(), level));
            if let Some(info) = self.nested.take() {
                // The module delivers a #VE: VE info still valid would make it a #DF.
                if self.ve.is_some() {
                    self.events.push(Event::DoubleFault);
                } else {
                    self.ve = Some(info);
                    if let Some(t) = self.tracker {
                        let v = handle_ve(0, &mut VeCpuState::new(), self, &mut NoInterrupts, t);
                        self.nested_verdict = Some(v);
                    }
                }
            }
            TdxStatus::SUCCESS
        }
        fn map_gpa(&mut self, _: u64, _: u64) -> MapGpaOutcome {
            unreachable!("not used")
        }
        fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
            self.events.push(Event::VeInfoRead);
            self.ve.take().ok_or(StatusCode::NoValidVeInfo.status())
        }
        fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
            Err(StatusCode::OperandInvalid.status())
        }
    }

    fn ept(gpa: u64) -> VeInfo {
        VeInfo {
            exit_reason: EXIT_REASON_EPT_VIOLATION,
            exit_qualification: 0x2,
            gla: 0xffff_8880_0000_0000 | gpa,
            gpa,
            ..VeInfo::default()
        }
    }

    struct Fixture {
        acceptor: Acceptor,
        words: Vec<AtomicU64>,
        slots: Vec<AtomicU64>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                acceptor: Acceptor::new(Gpaw::Bits48, AcceptPolicy::default()),
                words: (0..words_needed(8)).map(|_| AtomicU64::new(0)).collect(),
                slots: (0..2).map(|_| AtomicU64::new(0)).collect(),
            }
        }
        /// 8 units of 2M from BASE; units 0..4 unaccepted, 4..8 accepted.
        fn tracker(&self) -> LazyTracker<'_> {
            let t = LazyTracker::new(
                &self.acceptor,
                BASE,
                M2,
                8,
                &self.words,
                &self.slots,
                TrackerConfig::default(),
            )
            .unwrap();
            for u in 0..4 {
                t.mark_unaccepted(u);
            }
            t
        }
    }

    #[test]
    fn pending_in_unaccepted_unit_is_accepted_then_retried() {
        let f = Fixture::new();
        let t = f.tracker();
        let gpa = BASE + 2 * M2 + 0x1234;
        let mut td = VeFake::new(Some(ept(gpa)));
        let v = handle_ve(0, &mut VeCpuState::new(), &mut td, &mut NoInterrupts, &t);
        assert_eq!(
            v,
            VeVerdict::Handled {
                gpa: Gpa::new_truncate(gpa),
                unit: 2
            }
        );
        // VE info first, then one ACCEPT: the whole unit at 2M.
        assert_eq!(
            td.events,
            [
                Event::VeInfoRead,
                Event::Accept(BASE + 2 * M2, PageLevel::Size2M)
            ]
        );
        assert_eq!(t.unit_state(2), UnitState::Accepted);
        assert_eq!(t.remaining_bytes(), 3 * M2);
    }

    #[test]
    fn already_accepted_gpa_is_fatal_and_never_reaccepted() {
        let f = Fixture::new();
        let t = f.tracker();
        let mut cpu = VeCpuState::new();
        // Unit 5 was accepted from the start. The first #VE may be a race with another vCPU's
        // acceptance: retry without ACCEPT. The same page again: the host re-added it.
        let info = ept(BASE + 5 * M2);
        let mut td = VeFake::new(Some(info));
        assert_eq!(
            handle_ve(0, &mut cpu, &mut td, &mut NoInterrupts, &t),
            VeVerdict::AcceptedMeanwhile {
                gpa: Gpa::new_truncate(info.gpa),
                unit: 5
            }
        );
        td.ve = Some(info);
        assert_eq!(
            handle_ve(0, &mut cpu, &mut td, &mut NoInterrupts, &t),
            VeVerdict::Fatal(VeFatal::ReAdded { info, unit: 5 })
        );
        // Unit 1 accepted lazily, then the host re-adds a page of it: retry, then fatal.
        let mut td2 = VeFake::new(Some(ept(BASE + M2)));
        assert!(matches!(
            handle_ve(0, &mut cpu, &mut td2, &mut NoInterrupts, &t),
            VeVerdict::Handled { unit: 1, .. }
        ));
        let info = ept(BASE + M2 + 0x5000);
        td2.ve = Some(info);
        assert!(matches!(
            handle_ve(0, &mut cpu, &mut td2, &mut NoInterrupts, &t),
            VeVerdict::AcceptedMeanwhile { unit: 1, .. }
        ));
        td2.ve = Some(info);
        assert_eq!(
            handle_ve(0, &mut cpu, &mut td2, &mut NoInterrupts, &t),
            VeVerdict::Fatal(VeFatal::ReAdded { info, unit: 1 })
        );
        assert_eq!(td.accepts() + td2.accepts(), 1);
        // Outside the tracked span (accepted at boot).
        let info = ept(0x10_0000);
        let mut td3 = VeFake::new(Some(info));
        assert_eq!(
            handle_ve(0, &mut VeCpuState::new(), &mut td3, &mut NoInterrupts, &t),
            VeVerdict::Fatal(VeFatal::Untracked { info })
        );
        assert_eq!(td3.accepts(), 0);
    }

    #[test]
    fn shared_gpa_and_other_reasons_are_not_mine() {
        let f = Fixture::new();
        let t = f.tracker();
        let shared = ept((BASE + M2) | Gpaw::Bits48.shared_bit());
        let cpuid = VeInfo {
            exit_reason: 10,
            ..VeInfo::default()
        };
        let beyond = ept(1 << 50);
        for info in [shared, cpuid, beyond] {
            let mut td = VeFake::new(Some(info));
            assert_eq!(
                handle_ve(0, &mut VeCpuState::new(), &mut td, &mut NoInterrupts, &t),
                VeVerdict::NotMine(info)
            );
            assert_eq!(td.events, [Event::VeInfoRead]);
        }
        assert_eq!(t.remaining_bytes(), 4 * M2);
    }

    #[test]
    fn no_valid_ve_info() {
        let f = Fixture::new();
        let t = f.tracker();
        let mut td = VeFake::new(None);
        assert_eq!(
            handle_ve(0, &mut VeCpuState::new(), &mut td, &mut NoInterrupts, &t),
            VeVerdict::NoVeInfo(StatusCode::NoValidVeInfo.status())
        );
        assert_eq!(td.events, [Event::VeInfoRead]);
    }

    /// A second #VE taken while the first is being handled (during its ACCEPT) finds VE info
    /// already consumed (no #DF) and is handled on its own.
    #[test]
    fn nested_ve_finds_ve_info_cleared() {
        let f = Fixture::new();
        let t = f.tracker();
        let mut td = VeFake::new(Some(ept(BASE)));
        td.tracker = Some(&t);
        td.nested = Some(ept(BASE + 3 * M2 + 0x10));
        assert!(matches!(
            handle_ve(0, &mut VeCpuState::new(), &mut td, &mut NoInterrupts, &t),
            VeVerdict::Handled { unit: 0, .. }
        ));
        assert!(!td.events.contains(&Event::DoubleFault));
        assert!(matches!(
            td.nested_verdict,
            Some(VeVerdict::Handled { unit: 3, .. })
        ));
        assert_eq!(
            td.events,
            [
                Event::VeInfoRead,
                Event::Accept(BASE, PageLevel::Size2M),
                Event::VeInfoRead,
                Event::Accept(BASE + 3 * M2, PageLevel::Size2M),
            ]
        );
        // Both units accepted once each, and the in-flight slot is clear again.
        assert_eq!(t.remaining_bytes(), 2 * M2);
        assert_eq!(f.slots[0].load(core::sync::atomic::Ordering::Relaxed), 0);
    }

    /// A handler that ignored the rule (ACCEPT before reading VE info) would take the nested
    /// #VE as a double fault: the fake detects it.
    #[test]
    fn reading_ve_info_late_would_double_fault() {
        let f = Fixture::new();
        let t = f.tracker();
        let mut td = VeFake::new(Some(ept(BASE)));
        td.nested = Some(ept(BASE + 3 * M2));
        // Wrong order on purpose: accept first.
        t.accept_unit(0, &mut td, &mut NoInterrupts, 0).unwrap();
        assert!(td.events.contains(&Event::DoubleFault));
    }

    /// A #VE on the unit this vCPU's interrupted context is accepting returns at once with a
    /// distinct fatal verdict instead of waiting for itself.
    #[test]
    fn nested_ve_on_the_unit_being_accepted_is_reentrant_not_a_deadlock() {
        let f = Fixture::new();
        let t = f.tracker();
        let mut td = VeFake::new(Some(ept(BASE + M2)));
        td.tracker = Some(&t);
        let nested = ept(BASE + M2 + 0x2000);
        td.nested = Some(nested);
        assert!(matches!(
            handle_ve(0, &mut VeCpuState::new(), &mut td, &mut NoInterrupts, &t),
            VeVerdict::Handled { unit: 1, .. }
        ));
        assert_eq!(
            td.nested_verdict,
            Some(VeVerdict::Fatal(VeFatal::Reentrant {
                info: nested,
                unit: 1
            }))
        );
        assert_eq!(td.accepts(), 1);
        assert_eq!(t.stats().waits, 0);
    }

    /// Another vCPU is accepting the unit: the handler waits for it and does not accept again.
    #[test]
    fn waits_for_another_vcpu_then_handled() {
        let f = Fixture::new();
        let t = f.tracker();
        let started = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                struct Slow<'b>(&'b std::sync::Barrier, usize);
                impl Tdcall for Slow<'_> {
                    fn accept(&mut self, _: Gpa, _: PageLevel) -> TdxStatus {
                        self.1 += 1;
                        self.0.wait();
                        std::thread::sleep(std::time::Duration::from_millis(30));
                        TdxStatus::SUCCESS
                    }
                    fn map_gpa(&mut self, _: u64, _: u64) -> MapGpaOutcome {
                        unreachable!()
                    }
                    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
                        Err(StatusCode::NoValidVeInfo.status())
                    }
                    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
                        Err(StatusCode::OperandInvalid.status())
                    }
                }
                let mut slow = Slow(&started, 0);
                t.accept_unit(1, &mut slow, &mut NoInterrupts, 0).unwrap();
                assert_eq!(slow.1, 1);
            });
            started.wait();
            let mut td = VeFake::new(Some(ept(BASE + 0x3000)));
            assert!(matches!(
                handle_ve(0, &mut VeCpuState::new(), &mut td, &mut NoInterrupts, &t),
                VeVerdict::Handled { unit: 0, .. }
            ));
            assert_eq!(td.accepts(), 0);
        });
        assert_eq!(t.stats().waits, 1);
        assert_eq!(t.stats().units_accepted, 1);
    }

    #[test]
    fn accept_failure_is_fatal_with_the_error() {
        let f = Fixture::new();
        let t = f.tracker();
        struct Broken;
        impl Tdcall for Broken {
            // The host mapped 4K; the first page is accepted, the second fails: the unit is
            // accepted part way.
            fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
                match level {
                    PageLevel::Size4K if gpa.as_u64() == BASE => TdxStatus::SUCCESS,
                    PageLevel::Size4K => StatusCode::EptWalkFailed.with_operand(1),
                    _ => StatusCode::PageSizeMismatch.with_operand(1),
                }
            }
            fn map_gpa(&mut self, _: u64, _: u64) -> MapGpaOutcome {
                unreachable!()
            }
            fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
                Ok(ept(BASE))
            }
            fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
                Err(StatusCode::OperandInvalid.status())
            }
        }
        let v = handle_ve(
            0,
            &mut VeCpuState::new(),
            &mut Broken,
            &mut NoInterrupts,
            &t,
        );
        assert!(matches!(
            v,
            VeVerdict::Fatal(VeFatal::Accept {
                error: TrackerError::Accept { unit: 0, .. },
                ..
            })
        ));
        // Poisoned: a later #VE there is fatal too, with no new ACCEPT.
        let v = handle_ve(
            0,
            &mut VeCpuState::new(),
            &mut Broken,
            &mut NoInterrupts,
            &t,
        );
        assert!(matches!(
            v,
            VeVerdict::Fatal(VeFatal::Accept {
                error: TrackerError::UnitFailed { unit: 0, .. },
                ..
            })
        ));
        let _ = std::format!("{}", VeFatal::Untracked { info: ept(0) });
    }
}
