//! The guest engine's own overhead, with the TDX module taken out: a no-op [`Tdcall`] that
//! answers like a 2M-capped module (1G ACCEPT is OPERAND_INVALID, everything else succeeds at
//! once), so what is timed is the engine's bookkeeping, not acceptance.
//!
//! - `unaccepted_table`: building and parsing a Linux-format table for 64 GiB at 2M units, and
//!   queries on it (`range_contains_unaccepted`, walking `unaccepted_ranges`).
//! - `planner`: `Acceptor::accept_range` over 1 GiB and 64 GiB (ours, 2M), and 64 MiB at 4K
//!   (the asterinas-like policy), counting calls per iteration.
//! - `tracker`: `LazyTracker::accept_range` over a 4 GiB span of 2M units by 1, 2 and 4 threads
//!   racing for the same units (setup of a fresh tracker included in each iteration).
//!
//! Run with `cargo bench -p tdmem-accept --bench engine`.

use std::sync::atomic::AtomicU64;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tdmem_accept::abi::{operand, GhciStatus, MapGpaOutcome, VeInfo, VpInfo};
use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
use tdmem_accept::tracker::{words_needed, LazyTracker, NoInterrupts, TrackerConfig};
use tdmem_accept::unaccepted::{build_table, UnacceptedTable};
use tdmem_accept::{Gpa, GpaRange, Gpaw, PageLevel, StatusCode, Tdcall, TdxStatus};

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// A module that does nothing and caps ACCEPT at 2M.
struct Nop;

impl Tdcall for Nop {
    fn accept(&mut self, _gpa: Gpa, level: PageLevel) -> TdxStatus {
        if level == PageLevel::Size1G {
            StatusCode::OperandInvalid.with_operand(operand::RCX)
        } else {
            TdxStatus::SUCCESS
        }
    }
    fn map_gpa(&mut self, _start: u64, _len: u64) -> MapGpaOutcome {
        MapGpaOutcome {
            tdcall: StatusCode::OperandInvalid.status(),
            status: GhciStatus::InvalidOperand,
            resume_gpa: 0,
        }
    }
    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        Err(StatusCode::NoValidVeInfo.status())
    }
    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Err(StatusCode::OperandInvalid.status())
    }
}

fn range(start: u64, end: u64) -> GpaRange {
    GpaRange::new(start, end).expect("valid range")
}

/// A table of `[lazy_start, end)` unaccepted, at 2M units.
fn table_bytes(lazy_start: u64, end: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 64 + (end / M2 / 8) as usize + 8];
    let len =
        build_table(&mut buf, &[range(lazy_start, end)], M2 as u32, |_| {}).expect("table builds");
    buf.truncate(len);
    buf
}

fn unaccepted_table(c: &mut Criterion) {
    let mut g = c.benchmark_group("unaccepted_table");
    let end = 64 * G1;
    g.bench_function("build_64GiB", |b| {
        let mut buf = vec![0u8; 64 + (end / M2 / 8) as usize + 8];
        b.iter(|| build_table(&mut buf, &[range(4 * G1, end)], M2 as u32, |_| {}));
    });
    let bytes = table_bytes(4 * G1, end);
    g.bench_function("parse_64GiB", |b| {
        b.iter(|| UnacceptedTable::parse(black_box(&bytes)).map(|t| t.units()));
    });
    let t = UnacceptedTable::parse(&bytes).expect("parses");
    g.bench_function("range_contains_unaccepted_1000", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for i in 0..1000u64 {
                // Spread over the whole table, 2M to 64M long.
                let s = (i * 7919 % 32768) * M2;
                if t.range_contains_unaccepted(s, s + (1 + i % 32) * M2) {
                    n += 1;
                }
            }
            n
        });
    });
    g.bench_function("unaccepted_ranges_walk", |b| {
        b.iter(|| black_box(&t).unaccepted_ranges().count());
    });
    g.finish();
}

fn planner(c: &mut Criterion) {
    let mut g = c.benchmark_group("planner");
    for (name, policy, bytes) in [
        ("ours_1GiB", AcceptPolicy::OURS, G1),
        ("ours_64GiB", AcceptPolicy::OURS, 64 * G1),
        ("asterinas_64MiB", AcceptPolicy::ASTERINAS, 64 << 20),
    ] {
        let a = Acceptor::new(Gpaw::Bits48, policy);
        let r = range(0, bytes);
        // The first pass learns the module's cap (one 1G probe); count the calls of the next.
        a.accept_range(&mut Nop, r).expect("accepts");
        let calls_before = a.stats().total_calls();
        a.accept_range(&mut Nop, r).expect("accepts");
        let calls = a.stats().total_calls() - calls_before;
        g.throughput(Throughput::Elements(calls));
        g.bench_function(BenchmarkId::new(name, format!("{calls}_calls")), |b| {
            b.iter(|| a.accept_range(&mut Nop, black_box(r)));
        });
    }
    g.finish();
}

fn tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker");
    g.sample_size(20);
    let span = 4 * G1;
    let units = span / M2;
    let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS);
    let words: Vec<AtomicU64> = (0..words_needed(units))
        .map(|_| AtomicU64::new(0))
        .collect();
    g.throughput(Throughput::Elements(units));
    for threads in [1usize, 2, 4] {
        let inflight: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
        g.bench_function(BenchmarkId::new("accept_range_4GiB", threads), |b| {
            b.iter(|| {
                let t = LazyTracker::new(
                    &acceptor,
                    0,
                    M2,
                    units,
                    &words,
                    &inflight,
                    TrackerConfig::default(),
                )
                .expect("tracker");
                for u in 0..units {
                    t.mark_unaccepted(u);
                }
                std::thread::scope(|s| {
                    for v in 0..threads {
                        let t = &t;
                        s.spawn(move || t.accept_range(v, &mut Nop, &mut NoInterrupts, 0, span));
                    }
                });
                t.accepted_bytes()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, unaccepted_table, planner, tracker);
criterion_main!(benches);
