//! The engine's self-test suite as firmware runs it at boot: TDG.VP.INFO, a boot plan, eager
//! acceptance through a [`BootJob`], the unaccepted table written into accepted memory, lazy
//! acceptance through the [`LazyTracker`], a #VE on a pending page handled by
//! [`accept::ve::handle_ve`] and a private -> shared -> private conversion.
//!
//! It is written once and run in two places with the same requests in the same order:
//!
//! - the bare-metal test image under QEMU, whose [`Channel`] is a serial port to `tdhost` and
//!   whose [`Platform::raise_ve`] raises vector 20 through the IDT;
//! - `tdhost --in-process`, whose channel calls the same host code directly.
//!
//! Both end with the same [`Summary`], so the counts of the two runs can be compared exactly.
//!
//! [`WireTdcall`] is the [`Tdcall`] implementation over a [`Channel`]: each call becomes a
//! [`Request`]; an [`Answer::Reexecute`] makes it send the same request again, as a vCPU
//! re-executes a TDCALL after a TD exit.

use core::fmt;
use core::sync::atomic::AtomicU64;

use accept::abi::{
    page_info, GhciStatus, Gpa, GpaRange, Gpaw, MapGpaOutcome, PageLevel, TdxStatus, VeInfo, VpInfo,
};
use accept::acceptor::{AcceptPolicy, Acceptor};
use accept::convert::{ConvertHooks, ConvertPolicy, Converter, HookError, Visibility};
use accept::parallel::{BootJob, WorkerProgress};
use accept::tracker::{words_needed, LazyTracker, NoInterrupts, TrackerConfig, UnitState};
use accept::unaccepted::UnacceptedTable;
use accept::ve::{handle_ve, VeCpuState, VeVerdict};
use accept::Tdcall;

use crate::wire::{Answer, Regs, Request, MAX_ARGS};
use td_shim_ext::plan::{BootPlan, PlanConfig};

/// Guest memory of the QEMU scenario: `[0, MEMORY)` (QEMU `-m 512M`, the host's guest_memfd
/// size).
pub const MEMORY: u64 = 512 << 20;
/// `[0, IMAGE_END)` holds the image, its stacks and page tables: private and accepted before
/// the self-test starts (the host's stand-in for the TD build).
pub const IMAGE_END: u64 = 8 << 20;
/// Unaccepted memory below this is accepted eagerly.
pub const EAGER_BELOW: u64 = 64 << 20;
/// The page the lazy-accept test asks for.
pub const LAZY_GPA: u64 = 100 << 20;
/// The pending page the #VE test touches (a unit of the table never accepted before).
pub const VE_GPA: u64 = (200 << 20) + 0x3000;
/// The range converted private -> shared -> private (eagerly accepted memory).
pub const CONVERT: (u64, u64) = (32 << 20, 36 << 20);
/// A page of eagerly accepted memory the eager test touches.
pub const EAGER_PROBE: u64 = 56 << 20;

/// Where the self-test works: the memory map and the GPAs each test uses.
#[derive(Debug, Clone, Copy)]
pub struct Scenario<'r> {
    /// Unaccepted memory (a HOB's `EFI_RESOURCE_MEMORY_UNACCEPTED`).
    pub unaccepted: &'r [GpaRange],
    /// Accepted memory (`EFI_RESOURCE_SYSTEM_MEMORY`), may hold the table.
    pub accepted: &'r [GpaRange],
    /// Memory the table must avoid.
    pub reserved: &'r [GpaRange],
    /// Unaccepted memory below this is accepted eagerly.
    pub eager_below: u64,
    /// Eagerly accepted page the eager test touches.
    pub eager_probe: u64,
    /// Page the lazy test accepts through the tracker.
    pub lazy_gpa: u64,
    /// Pending page the #VE test touches.
    pub ve_gpa: u64,
    /// Range converted private -> shared -> private.
    pub convert: (u64, u64),
}

const IMAGE: [GpaRange; 1] = [range(0, IMAGE_END)];
const QEMU_UNACCEPTED: [GpaRange; 1] = [range(IMAGE_END, MEMORY)];

impl Scenario<'static> {
    /// The scenario `cargo xtask e2e` runs (QEMU TCG + `tdhost`, or `tdhost --in-process`).
    pub const QEMU_E2E: Scenario<'static> = Scenario {
        unaccepted: &QEMU_UNACCEPTED,
        accepted: &IMAGE,
        reserved: &IMAGE,
        eager_below: EAGER_BELOW,
        eager_probe: EAGER_PROBE,
        lazy_gpa: LAZY_GPA,
        ve_gpa: VE_GPA,
        convert: CONVERT,
    };
}

/// What the self-test needs from the machine it runs on.
pub trait Machine {
    /// The vCPU's TDCALL backend.
    type Td: Tdcall;
    /// A TDCALL handle for this vCPU (also used from the #VE handler).
    fn tdcall(&mut self) -> Self::Td;
    /// A memory access to the 4K page of `gpa` (`Some(v)`: write `v`), returning the value
    /// there afterwards. A #VE it raises must reach `ve.handle()` through the exception path
    /// and the access must then be retried.
    ///
    /// # Errors
    /// [`TouchError`].
    fn touch(
        &mut self,
        gpa: u64,
        write: Option<u64>,
        ve: &mut dyn VeHandler,
    ) -> Result<u64, TouchError>;
    /// The bytes at `[gpa, gpa + len)` (accepted memory) for the unaccepted table.
    fn memory(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]>;
    /// A log line.
    fn log(&mut self, args: fmt::Arguments<'_>);
}

/// Re-executions of one instruction before the transport gives up (a livelocked host).
pub const MAX_REEXEC: u32 = 10_000;
/// Status the transport returns when the host killed the TD or the link failed (error, fatal,
/// class 0xFF: no module status looks like it).
pub const TRANSPORT_FAILED: u64 = 0xE000_FF00_0000_0000;

/// The image's end of the link to the host: one request, one answer.
pub trait Channel {
    /// Sends `req` and waits for the answer.
    fn call(&mut self, req: Request) -> Answer;
}

impl<C: Channel + ?Sized> Channel for &mut C {
    fn call(&mut self, req: Request) -> Answer {
        (**self).call(req)
    }
}

/// [`Tdcall`] over a [`Channel`].
#[derive(Debug, Clone)]
pub struct WireTdcall<C> {
    chan: C,
}

impl<C: Channel> WireTdcall<C> {
    /// Wraps a channel.
    pub const fn new(chan: C) -> WireTdcall<C> {
        WireTdcall { chan }
    }

    /// The channel.
    pub fn channel(&mut self) -> &mut C {
        &mut self.chan
    }

    /// Sends `req` until it retires (re-executing on [`Answer::Reexecute`]).
    fn retire(&mut self, req: Request) -> Regs {
        for _ in 0..MAX_REEXEC {
            match self.chan.call(req) {
                Answer::Regs(r) => return r,
                Answer::Reexecute => continue,
                Answer::Fatal(code) => {
                    return Regs {
                        rax: TRANSPORT_FAILED | (code & 0xFFFF_FFFF),
                        ..Regs::default()
                    }
                }
                Answer::InjectVe | Answer::InjectDf | Answer::Ack => break,
            }
        }
        Regs {
            rax: TRANSPORT_FAILED,
            ..Regs::default()
        }
    }
}

impl<C: Channel> Tdcall for WireTdcall<C> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let r = self.retire(Request::Accept {
            page_info: page_info(gpa, level),
        });
        TdxStatus::from_raw(r.rax)
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let r = self.retire(Request::MapGpa { start, len });
        MapGpaOutcome {
            tdcall: TdxStatus::from_raw(r.rax),
            status: GhciStatus::from_raw(r.r10),
            resume_gpa: r.r11,
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        let r = self.retire(Request::VeInfo);
        let status = TdxStatus::from_raw(r.rax);
        if !status.is_success() {
            return Err(status);
        }
        Ok(VeInfo {
            exit_reason: r.rcx as u32,
            exit_qualification: r.rdx,
            gla: r.r8,
            gpa: r.r9,
            instruction_length: r.r10 as u32,
            instruction_info: (r.r10 >> 32) as u32,
        })
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        let r = self.retire(Request::VpInfo);
        let status = TdxStatus::from_raw(r.rax);
        if !status.is_success() {
            return Err(status);
        }
        let gpaw = Gpaw::from_width(r.rcx & 0x3F).ok_or(TdxStatus::from_raw(TRANSPORT_FAILED))?;
        Ok(VpInfo {
            gpaw,
            attributes: r.rdx,
            num_vcpus: r.r8 as u32,
            max_vcpus: (r.r8 >> 32) as u32,
            vcpu_index: r.r9 as u32,
        })
    }
}

/// The exception path's entry into the engine: what the #VE gate calls.
pub trait VeHandler {
    /// Handles one #VE (reads VE info first).
    fn handle(&mut self) -> VeVerdict;
}

/// The machine under a [`WireMachine`]: what is left once TDCALLs and touches go to the host.
pub trait Platform {
    /// Does the real memory access once the host said it completes (bare metal: a volatile
    /// read or write of the page; in process: nothing).
    fn access(&mut self, gpa: u64, write: Option<u64>);
    /// Raises #VE on this vCPU. The exception entry must call `handler.handle()` and, for a
    /// verdict that lets the access be retried, return here.
    fn raise_ve(&mut self, handler: &mut dyn VeHandler);
    /// The bytes at `[gpa, gpa + len)` (accepted memory) for the unaccepted table.
    fn memory(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]>;
    /// A log line.
    fn log(&mut self, args: fmt::Arguments<'_>);
}

/// A [`Machine`] whose memory touches go to a host over a [`Channel`], and whose TDCALLs go
/// through `T`: by default a request each ([`WireTdcall`]); the bare-metal image's trap path
/// uses the real instruction (`accept::hw`), whose #UD the image serves over the same channel.
#[derive(Debug)]
pub struct WireMachine<C, P, T = WireTdcall<C>> {
    /// The link.
    pub chan: C,
    /// The rest of the machine.
    pub platform: P,
    /// The TDCALL backend handed to the engine.
    pub td: T,
}

impl<C: Channel + Clone, P: Platform> WireMachine<C, P> {
    /// TDCALLs as requests on `chan`.
    pub fn new(chan: C, platform: P) -> Self {
        let td = WireTdcall::new(chan.clone());
        WireMachine { chan, platform, td }
    }
}

impl<C: Channel, P: Platform, T: Tdcall + Clone> Machine for WireMachine<C, P, T> {
    type Td = T;

    fn tdcall(&mut self) -> T {
        self.td.clone()
    }

    fn touch(
        &mut self,
        gpa: u64,
        write: Option<u64>,
        ve: &mut dyn VeHandler,
    ) -> Result<u64, TouchError> {
        touch(&mut self.chan, &mut self.platform, gpa, write, ve)
    }

    fn memory(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        self.platform.memory(gpa, len)
    }

    fn log(&mut self, args: fmt::Arguments<'_>) {
        self.platform.log(args);
    }
}

/// Counters the image reports at the end; the host checks them against its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// ACCEPT calls that accepted a page, by level (4K, 2M, 1G).
    pub accepted: [u64; 3],
    /// ACCEPT calls made, all levels and outcomes.
    pub accept_calls: u64,
    /// #VEs raised.
    pub ves: u64,
    /// MapGPA calls and RETRY answers.
    pub map_gpa: (u64, u64),
    /// Units accepted lazily (tracker).
    pub lazy_units: u64,
    /// Bytes accepted eagerly.
    pub eager_bytes: u64,
}

impl Summary {
    /// The counters as sent in [`Request::Done`].
    pub fn counts(&self) -> ([u64; MAX_ARGS - 1], usize) {
        let v = [
            self.passed,
            self.failed,
            self.accepted[0],
            self.accepted[1],
            self.accepted[2],
            self.accept_calls,
            self.ves,
            self.map_gpa.0,
            self.map_gpa.1,
            self.lazy_units,
            self.eager_bytes,
        ];
        let mut out = [0; MAX_ARGS - 1];
        out[..v.len()].copy_from_slice(&v);
        (out, v.len())
    }

    /// Reads counters sent by [`Summary::counts`].
    pub fn from_counts(c: &[u64]) -> Summary {
        let g = |i: usize| c.get(i).copied().unwrap_or(0);
        Summary {
            passed: g(0),
            failed: g(1),
            accepted: [g(2), g(3), g(4)],
            accept_calls: g(5),
            ves: g(6),
            map_gpa: (g(7), g(8)),
            lazy_units: g(9),
            eager_bytes: g(10),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "passed={} failed={} accepted_4k={} accepted_2m={} accepted_1g={} accept_calls={} \
             ve={} map_gpa={} map_gpa_retries={} lazy_units={} eager_bytes={}",
            self.passed,
            self.failed,
            self.accepted[0],
            self.accepted[1],
            self.accepted[2],
            self.accept_calls,
            self.ves,
            self.map_gpa.0,
            self.map_gpa.1,
            self.lazy_units,
            self.eager_bytes
        )
    }
}

/// Why a touch did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchError {
    /// The module answered #DF.
    DoubleFault,
    /// The host killed the TD (or the link failed) with this code.
    Fatal(u64),
    /// More than [`MAX_REEXEC`] re-executions.
    Livelock,
}

/// One vCPU's #VE handler: the engine's [`handle_ve`] with this vCPU's state.
pub(crate) struct Ve<'t, 'a, T: Tdcall> {
    pub(crate) vcpu: usize,
    pub(crate) tdcall: T,
    pub(crate) state: VeCpuState,
    pub(crate) tracker: &'t LazyTracker<'a>,
    pub(crate) last: Option<VeVerdict>,
    pub(crate) count: u64,
    /// #VEs whose unit this handler accepted.
    pub(crate) handled: u64,
    /// #VEs whose unit another vCPU had accepted meanwhile.
    pub(crate) meanwhile: u64,
}

impl<'t, 'a, T: Tdcall> Ve<'t, 'a, T> {
    pub(crate) fn new(vcpu: usize, tdcall: T, tracker: &'t LazyTracker<'a>) -> Self {
        Ve {
            vcpu,
            tdcall,
            state: VeCpuState::new(),
            tracker,
            last: None,
            count: 0,
            handled: 0,
            meanwhile: 0,
        }
    }
}

impl<T: Tdcall> VeHandler for Ve<'_, '_, T> {
    fn handle(&mut self) -> VeVerdict {
        self.count += 1;
        let v = handle_ve(
            self.vcpu,
            &mut self.state,
            &mut self.tdcall,
            &mut NoInterrupts,
            self.tracker,
        );
        match v {
            VeVerdict::Handled { .. } => self.handled += 1,
            VeVerdict::AcceptedMeanwhile { .. } => self.meanwhile += 1,
            _ => {}
        }
        self.last = Some(v);
        v
    }
}

/// A memory access to `gpa` as the CPU would make it: asks the host, raises #VE when told,
/// re-executes, and does the real access when the host says it completes. Returns the page's
/// content token.
///
/// # Errors
/// [`TouchError`].
pub fn touch<C: Channel, P: Platform + ?Sized>(
    chan: &mut C,
    platform: &mut P,
    gpa: u64,
    write: Option<u64>,
    ve: &mut dyn VeHandler,
) -> Result<u64, TouchError> {
    let mut ves = 0u32;
    for _ in 0..MAX_REEXEC {
        match chan.call(Request::Touch { gpa, write }) {
            Answer::Regs(r) if r.rax == 0 => {
                platform.access(gpa, write);
                if ves != 0 {
                    platform.log(format_args!(
                        "touch: access to {gpa:#x} retried after {ves} #VE: completed"
                    ));
                }
                return Ok(r.rcx);
            }
            Answer::Regs(r) => return Err(TouchError::Fatal(r.rax)),
            Answer::Reexecute => {}
            Answer::InjectVe => {
                ves += 1;
                platform.raise_ve(ve);
            }
            Answer::InjectDf => return Err(TouchError::DoubleFault),
            Answer::Fatal(code) => return Err(TouchError::Fatal(code)),
            Answer::Ack => return Err(TouchError::Fatal(0)),
        }
    }
    Err(TouchError::Livelock)
}

/// Conversion hooks of an image with one identity map and no shared alias.
pub(crate) struct NoPageTables<'p, M: Machine + ?Sized> {
    pub(crate) platform: &'p mut M,
}

impl<M: Machine + ?Sized> ConvertHooks for NoPageTables<'_, M> {
    type Error = HookError;
    fn set_visibility(&mut self, range: GpaRange, to: Visibility) -> Result<(), HookError> {
        // The image maps everything through one identity map and never touches the shared
        // alias, so there is no PTE to change; the hook records the step in the log.
        self.platform
            .log(format_args!("convert: page tables of {range} -> {to:?}"));
        Ok(())
    }

    fn flush_tlb(&mut self, range: GpaRange) {
        self.platform
            .log(format_args!("convert: TLB flush {range}"));
    }
}

macro_rules! check {
    ($sum:expr, $p:expr, $name:literal, $cond:expr, $($fmt:tt)*) => {{
        let ok: bool = $cond;
        if ok {
            $sum.passed += 1;
        } else {
            $sum.failed += 1;
        }
        $p.log(format_args!(
            "test {}: {} ({})",
            $name,
            if ok { "ok" } else { "FAILED" },
            format_args!($($fmt)*)
        ));
        ok
    }};
}

/// Runs the whole suite on vCPU 0 and returns its summary. Never panics: each failed step is
/// counted and logged, and the steps that depend on it are skipped.
pub fn run<M: Machine + ?Sized>(platform: &mut M, sc: &Scenario<'_>) -> Summary {
    let mut sum = Summary::default();
    let mut td = platform.tdcall();

    // 1. TDG.VP.INFO.
    let info = td.vp_info();
    let gpaw = match info {
        Ok(i) => i.gpaw,
        Err(_) => Gpaw::Bits48,
    };
    check!(sum, platform, "vp_info", info.is_ok(), "{info:?}");

    // 2. The boot plan.
    let cfg = PlanConfig {
        eager_below: sc.eager_below,
        reserved: sc.reserved,
        ..PlanConfig::default()
    };
    let plan = BootPlan::new(sc.unaccepted, sc.accepted, &cfg);
    let Ok(plan) = plan else {
        check!(sum, platform, "plan", false, "{plan:?}");
        return sum;
    };
    check!(
        sum,
        platform,
        "plan",
        plan.table().is_some(),
        "eager {:?} lazy {:?} table {:?}",
        plan.eager(),
        plan.lazy(),
        plan.table().map(|t| t.gpa)
    );

    // 3. Eager acceptance, largest pages first, through the parallel job (one worker here).
    let acceptor = Acceptor::new(gpaw, AcceptPolicy::default());
    let mut ranges = [WHOLE; td_shim_ext::plan::MAX_RANGES];
    let n = plan.eager().copy_to(&mut ranges);
    let progress = [WorkerProgress::new()];
    let job = BootJob::new(&ranges[..n], &progress);
    let edges = job.run_edges(&mut td, &acceptor);
    let work = job.run(0, &mut td, &acceptor);
    // Before the table exists the #VE handler has an empty tracker: any #VE is fatal.
    let Ok(empty) = LazyTracker::new(&acceptor, 0, 2 << 20, 0, &[], &[], TrackerConfig::default())
    else {
        check!(sum, platform, "eager_accept", false, "no tracker");
        return sum;
    };
    let mut ve0 = Ve::new(0, platform.tdcall(), &empty);
    let first = platform.touch(sc.eager_probe, Some(0xE1), &mut ve0);
    sum.eager_bytes = plan.eager().bytes();
    check!(
        sum,
        platform,
        "eager_accept",
        edges.is_ok() && work.is_ok() && job.is_complete() && first == Ok(0xE1),
        "{} bytes in {} chunks, edges {edges:?}, worker {work:?}, level cap {:?}, touch {first:?}",
        plan.eager().bytes(),
        job.total_chunks(),
        acceptor.level_cap()
    );

    // 4. The unaccepted table, written into accepted memory, read back as the kernel would.
    let Some(t) = plan.table() else {
        return sum;
    };
    let words: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
    let inflight = [AtomicU64::new(0)];
    let tracker = {
        let Some(buf) = platform.memory(t.gpa, t.len as usize) else {
            check!(sum, platform, "table", false, "no memory at {:#x}", t.gpa);
            return sum;
        };
        let written = plan.write_table(buf);
        let tracker = UnacceptedTable::parse(buf)
            .map_err(|_| ())
            .and_then(|table| {
                if words_needed(table.units()) > words.len() {
                    return Err(());
                }
                LazyTracker::from_table(
                    &acceptor,
                    &table,
                    &words,
                    &inflight,
                    TrackerConfig::default(),
                )
                .map_err(|_| ())
            });
        let ok = written.is_ok() && tracker.is_ok();
        let remaining = tracker.as_ref().map_or(0, |t| t.remaining_bytes());
        check!(
            sum,
            platform,
            "table",
            ok && remaining == plan.lazy().bytes(),
            "{written:?} at {:#x}, {remaining} bytes unaccepted",
            t.gpa
        );
        match tracker {
            Ok(t) => t,
            Err(()) => return sum,
        }
    };

    // 5. Lazy acceptance of one page: its 2M unit is accepted, nothing else.
    let lazy_gpa = sc.lazy_gpa;
    let lazy = tracker.accept_range(0, &mut td, &mut NoInterrupts, lazy_gpa, lazy_gpa + 4096);
    let state = tracker.state_of(lazy_gpa);
    let mut ve = Ve::new(0, platform.tdcall(), &tracker);
    let read = platform.touch(lazy_gpa, None, &mut ve);
    check!(
        sum,
        platform,
        "lazy_accept",
        lazy.is_ok() && state == UnitState::Accepted && read == Ok(0) && ve.count == 0,
        "{lazy:?}, unit state {state:?}, read {read:?}"
    );

    // 6. #VE on a pending page: the host maps it PENDING on the first touch, the module
    // injects #VE, the handler accepts the unit, the access is retried.
    let before = tracker.state_of(sc.ve_gpa);
    let wrote = platform.touch(sc.ve_gpa, Some(0x5EED), &mut ve);
    let read = platform.touch(sc.ve_gpa, None, &mut ve);
    sum.ves = ve0.count + ve.count;
    check!(
        sum,
        platform,
        "ve_pending_page",
        before == UnitState::Unaccepted
            && ve.count == 1
            && matches!(ve.last, Some(VeVerdict::Handled { .. }))
            && wrote == Ok(0x5EED)
            && read == Ok(0x5EED)
            && tracker.state_of(sc.ve_gpa) == UnitState::Accepted,
        "verdict {:?}, write {wrote:?}, read back {read:?}",
        ve.last
    );
    sum.lazy_units = tracker.stats().units_accepted;

    // 7. Private -> shared -> private, with the module's ACCEPT on the way back.
    let conv = Converter::new(gpaw, ConvertPolicy::default());
    let range = GpaRange::new(sc.convert.0, sc.convert.1).unwrap_or(WHOLE);
    let mut hooks = NoPageTables {
        platform: &mut *platform,
    };
    let to_shared = convert_owned(
        &conv,
        &mut td,
        &acceptor,
        range,
        Visibility::Shared,
        &mut hooks,
    );
    let to_private = convert_owned(
        &conv,
        &mut td,
        &acceptor,
        range,
        Visibility::Private,
        &mut hooks,
    );
    let read = platform.touch(sc.convert.0 + 4096, None, &mut ve);
    let cs = conv.stats();
    sum.map_gpa = (cs.map_gpa_calls, cs.map_gpa_retries);
    check!(
        sum,
        platform,
        "convert",
        to_shared.is_ok() && to_private.is_ok() && read == Ok(0),
        "to shared {:?}, back {:?}, read {read:?} (content not preserved), {cs:?}",
        to_shared.err().map(|f| f.cause),
        to_private.err().map(|f| f.cause)
    );

    let st = acceptor.stats();
    sum.accept_calls = st.total_calls();
    for (i, l) in PageLevel::LARGEST_FIRST.iter().rev().enumerate() {
        sum.accepted[i] = st.level(*l).accepted;
    }
    sum
}

/// A placeholder range (never used for a call).
const WHOLE: GpaRange = range(0, 4096);

/// A constant range.
#[allow(clippy::panic)] // evaluated at compile time
pub(crate) const fn range(start: u64, end: u64) -> GpaRange {
    match GpaRange::new(start, end) {
        Ok(r) => r,
        Err(_) => panic!("bad constant range"),
    }
}

/// `conv.convert(..)` of a range the self-test owns: [`Converter::convert`]'s contract holds
/// because the self-test keeps its conversion ranges to itself (no Rust reference points into
/// them; the image reaches them only through [`Machine::touch`] and [`Platform::touch`], which
/// read memory afresh), and no other vCPU converts or accepts them at the same time.
#[allow(unsafe_code)]
pub(crate) fn convert_owned<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
    conv: &Converter,
    tdcall: &mut T,
    acceptor: &Acceptor,
    range: GpaRange,
    to: Visibility,
    hooks: &mut H,
) -> Result<(), accept::convert::ConvertFailure<H::Error>> {
    // SAFETY: see above: the range is owned by this self-test step, referenced by nothing.
    unsafe { conv.convert(tdcall, acceptor, range, to, hooks) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accept::abi::decode_page_info;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::rc::Rc;
    use std::vec::Vec;

    /// A scripted module: every first ACCEPT of a page exits once (the host maps it) and is
    /// re-executed; an unaccepted page raises #VE on touch; ACCEPT zeroes; MapGPA succeeds.
    #[derive(Default)]
    struct Fake {
        mapped: BTreeSet<u64>,
        accepted: BTreeSet<u64>,
        tokens: BTreeMap<u64, u64>,
        ve_gpa: Option<u64>,
        reexecs: u64,
    }

    #[derive(Clone, Default)]
    struct FakeChan(Rc<RefCell<Fake>>);

    impl Channel for FakeChan {
        fn call(&mut self, req: Request) -> Answer {
            let mut f = self.0.borrow_mut();
            let ok = |rcx| {
                Answer::Regs(Regs {
                    rcx,
                    ..Regs::default()
                })
            };
            match req {
                Request::VpInfo => ok(48),
                Request::Accept { page_info } => {
                    let Ok((gpa, level)) = decode_page_info(page_info, PageLevel::Size1G) else {
                        return Answer::Fatal(1);
                    };
                    if level == PageLevel::Size1G {
                        return Answer::Regs(Regs {
                            rax: 0xC000_0100_0000_0001,
                            ..Regs::default()
                        });
                    }
                    let g = gpa.as_u64();
                    if f.mapped.insert(g) {
                        f.reexecs += 1;
                        return Answer::Reexecute;
                    }
                    for p in (g..g + level.size()).step_by(4096) {
                        f.accepted.insert(p);
                        f.tokens.remove(&p);
                    }
                    ok(0)
                }
                Request::MapGpa { start, len } => {
                    let s = start & !(1 << 47);
                    for p in (s..s + len).step_by(4096) {
                        f.accepted.remove(&p);
                        f.mapped.remove(&(p & !0x1F_FFFF));
                    }
                    ok(0)
                }
                Request::VeInfo => match f.ve_gpa.take() {
                    Some(gpa) => Answer::Regs(Regs {
                        rcx: 48,
                        r9: gpa,
                        ..Regs::default()
                    }),
                    None => Answer::Regs(Regs {
                        rax: 0xC000_0704_0000_0000,
                        ..Regs::default()
                    }),
                },
                Request::Touch { gpa, write } => {
                    let page = gpa & !0xFFF;
                    if !f.accepted.contains(&page) {
                        f.ve_gpa = Some(gpa);
                        return Answer::InjectVe;
                    }
                    if let Some(v) = write {
                        f.tokens.insert(page, v);
                    }
                    ok(f.tokens.get(&page).copied().unwrap_or(0))
                }
                Request::Hello { .. } | Request::Done { .. } => Answer::Ack,
                // The self-test's wire transport never sends the TCG-TDX requests.
                Request::Attach { .. } | Request::Tdcall { .. } | Request::Access { .. } => {
                    Answer::Fatal(2)
                }
            }
        }
    }

    #[derive(Default)]
    struct Plat {
        table: Vec<u8>,
        ves: u64,
    }

    impl Platform for Plat {
        fn access(&mut self, _gpa: u64, _write: Option<u64>) {}
        fn raise_ve(&mut self, handler: &mut dyn VeHandler) {
            self.ves += 1;
            assert!(matches!(handler.handle(), VeVerdict::Handled { .. }));
        }
        fn memory(&mut self, _gpa: u64, len: usize) -> Option<&mut [u8]> {
            self.table.resize(len, 0);
            Some(&mut self.table)
        }
        fn log(&mut self, _args: fmt::Arguments<'_>) {}
    }

    #[test]
    fn suite_passes_against_a_scripted_module() {
        let chan = FakeChan::default();
        let mut m = WireMachine::new(chan.clone(), Plat::default());
        // The image's own memory is accepted before the run.
        for p in (0..IMAGE_END).step_by(4096) {
            chan.0.borrow_mut().accepted.insert(p);
        }
        let sum = run(&mut m, &Scenario::QEMU_E2E);
        assert_eq!((sum.passed, sum.failed), (7, 0), "{sum}");
        assert_eq!(sum.ves, 1);
        assert_eq!(m.platform.ves, 1);
        // 28 eager + 1 lazy + 1 #VE + 2 after the conversion, all 2M.
        assert_eq!(sum.accepted, [0, 32, 0]);
        assert_eq!(sum.map_gpa, (2, 0));
        // Every first ACCEPT of a 2M page was re-executed once.
        assert_eq!(chan.0.borrow().reexecs, 32);
        let (counts, n) = sum.counts();
        assert_eq!(Summary::from_counts(&counts[..n]), sum);
    }

    #[test]
    fn transport_failure_is_a_status_not_a_hang() {
        #[derive(Clone)]
        struct Dead;
        impl Channel for Dead {
            fn call(&mut self, _req: Request) -> Answer {
                Answer::Fatal(7)
            }
        }
        #[derive(Clone)]
        struct Loop;
        impl Channel for Loop {
            fn call(&mut self, _req: Request) -> Answer {
                Answer::Reexecute
            }
        }
        let gpa = Gpa::new_truncate(0x20_0000);
        let s = WireTdcall::new(Dead).accept(gpa, PageLevel::Size2M);
        assert_eq!(s.raw(), TRANSPORT_FAILED | 7);
        assert!(s.is_error());
        let s = WireTdcall::new(Loop).accept(gpa, PageLevel::Size2M);
        assert_eq!(s.raw(), TRANSPORT_FAILED);
        assert!(WireTdcall::new(Dead).vp_info().is_err());
    }
}
