//! Parallel boot acceptance: one job over a list of ranges that N vCPUs take work from.
//!
//! A [`BootJob`] splits each range the way [`Acceptor::accept_range`] would walk it: a 4K head up
//! to the first 2M boundary, 2M pages up to the first 1G boundary, 1G pages, 2M pages, a 4K tail.
//! The 2M and 1G pages are *chunks*; workers claim work with a compare-and-swap on one shared
//! cursor over the body's 2M units (no lock, no allocation) and accept it with the shared
//! [`Acceptor`] (largest level first, learning a 2M cap, falling back where the host mapped
//! smaller). The unaligned 4K heads and tails are the boot vCPU's, through
//! [`BootJob::run_edges`]. Every unit is claimed by exactly one worker, so every page is
//! accepted exactly once, and the per-level counts do not depend on the number of workers.
//!
//! **Load balance.** A claim is a whole 1G chunk while the module may accept at 1G (the
//! acceptor has not learned a smaller cap): splitting it would cost the 1G mapping. Otherwise a
//! claim is a run of 2M units that shrinks as the work runs out (a 1/(2N) share of what is
//! left, at most 1 GiB, at least one 2M page), so that workers running at different speeds
//! finish within about one 2M ACCEPT of each other. With a 2M-capped module (every public
//! one) a 1G chunk costs the same calls whole or in units, so nothing is lost by splitting it.
//!
//! Progress per worker (bytes, chunks) is readable while the job runs. When a worker fails, it
//! returns the error and the job is marked failed: other workers stop at their next claim.
//!
//! Two ways to run it:
//!
//! ```text
//! firmware (mailbox wake-up)            kernel (threads)
//! BSP: job = BootJob::new(..)          job = BootJob::new(..)
//!      write &job + entry to mailbox   scope: for each CPU/thread i:
//!      wake APs                            spawn(|| job.run(i, &mut tdcall_i, &acceptor))
//!      job.run_edges(..); job.run(0,..)   job.run_edges(..)
//!      spin until job.workers_exited()  join all
//!           == number of workers
//! AP i: job.run(i, &mut tdcall_i, &acceptor); return to the mailbox loop
//! ```
//!
//! The job does not decide which memory to accept eagerly (see [`crate::unaccepted`]) and does
//! not start vCPUs.

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::abi::{Gpa, GpaRange, PageLevel};
use crate::acceptor::{AcceptError, Acceptor};
use crate::tdcall::Tdcall;

/// One worker's progress counters.
#[derive(Debug, Default)]
pub struct WorkerProgress {
    bytes: AtomicU64,
    chunks: AtomicU64,
}

impl WorkerProgress {
    /// Zeroed counters.
    pub const fn new() -> WorkerProgress {
        WorkerProgress {
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
        }
    }

    /// Bytes this worker has accepted.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Chunks this worker has accepted.
    pub fn chunks(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }
}

/// Why a worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootError {
    /// The worker index has no progress slot.
    NoSuchWorker {
        /// The index given.
        worker: usize,
    },
    /// Accepting a chunk (or an edge) failed.
    Accept(AcceptError),
    /// Another worker failed; this one stopped claiming.
    Aborted,
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::NoSuchWorker { worker } => write!(f, "worker {worker} has no slot"),
            BootError::Accept(e) => write!(f, "boot acceptance failed: {e}"),
            BootError::Aborted => f.write_str("stopped: another worker failed"),
        }
    }
}

/// What one worker did in [`BootJob::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerReport {
    /// Chunks accepted.
    pub chunks: u64,
    /// Bytes accepted.
    pub bytes: u64,
}

/// How one range splits: chunk counts and bounds.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// First 2M boundary (start of the chunked body), or the range end when none.
    body_start: u64,
    /// Last 2M boundary (end of the chunked body).
    body_end: u64,
    /// 1G body bounds (equal when there is none).
    g_start: u64,
    g_end: u64,
}

impl Split {
    fn of(r: GpaRange) -> Split {
        let (s, e) = (r.start().as_u64(), r.end().as_u64());
        let m2 = PageLevel::Size2M.mask();
        let g1 = PageLevel::Size1G.mask();
        // Below 2^52: no overflow in these round-ups.
        let a2 = (s + m2) & !m2;
        let b2 = e & !m2;
        if a2 >= b2 {
            return Split {
                body_start: e,
                body_end: e,
                g_start: e,
                g_end: e,
            };
        }
        let a1 = (s + g1) & !g1;
        let b1 = e & !g1;
        let (g_start, g_end) = if a1 < b1 { (a1, b1) } else { (b2, b2) };
        Split {
            body_start: a2,
            body_end: b2,
            g_start,
            g_end,
        }
    }

    fn head_2m(&self) -> u64 {
        (self.g_start - self.body_start) / PageLevel::Size2M.size()
    }

    fn n_1g(&self) -> u64 {
        (self.g_end - self.g_start) / PageLevel::Size1G.size()
    }

    fn tail_2m(&self) -> u64 {
        (self.body_end - self.g_end) / PageLevel::Size2M.size()
    }

    fn chunks(&self) -> u64 {
        self.head_2m() + self.n_1g() + self.tail_2m()
    }

    /// Chunk `i` of this range (`i < chunks()`).
    fn chunk(&self, i: u64) -> (u64, PageLevel) {
        let (h, g) = (self.head_2m(), self.n_1g());
        if i < h {
            (
                self.body_start + i * PageLevel::Size2M.size(),
                PageLevel::Size2M,
            )
        } else if i < h + g {
            (
                self.g_start + (i - h) * PageLevel::Size1G.size(),
                PageLevel::Size1G,
            )
        } else {
            (
                self.g_end + (i - h - g) * PageLevel::Size2M.size(),
                PageLevel::Size2M,
            )
        }
    }
}

/// A boot acceptance job shared by every worker vCPU. `Sync`.
///
/// # Examples
///
/// Four workers accept 3 GiB + 12 KiB: the boot vCPU takes the unaligned edges, then every
/// worker claims chunks from one cursor until none is left. Each worker has its own
/// [`Tdcall`]; here each is a thread with a fake module of its own.
///
/// ```
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::parallel::{BootJob, WorkerProgress};
/// use tdmem_accept::testing::FakeModule;
/// use tdmem_accept::{GpaRange, Gpaw};
///
/// let ranges = [GpaRange::new(0x10_0000 - 0x3000, 0xC010_0000)?];
/// let progress: [WorkerProgress; 4] = Default::default();
/// let job = BootJob::new(&ranges, &progress);
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
///
/// let mut boot_vcpu = FakeModule::new();
/// job.run_edges(&mut boot_vcpu, &acceptor)?;
/// std::thread::scope(|s| {
///     for worker in 0..4 {
///         let (job, acceptor) = (&job, &acceptor);
///         s.spawn(move || job.run(worker, &mut FakeModule::new(), acceptor));
///     }
/// });
///
/// assert!(job.is_complete());
/// assert_eq!(job.workers_exited(), 4);
/// let bytes: u64 = progress.iter().map(|p| p.bytes()).sum();
/// assert_eq!(bytes + job.done_edge_bytes(), ranges[0].len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct BootJob<'a> {
    ranges: &'a [GpaRange],
    progress: &'a [WorkerProgress],
    total_chunks: u64,
    chunk_bytes: u64,
    edge_bytes: u64,
    /// Next 2M unit of the bodies to claim.
    cursor: AtomicU64,
    done_chunks: AtomicU64,
    done_bytes: AtomicU64,
    edges_done: AtomicU64,
    exited: AtomicU64,
    failed: AtomicBool,
}

impl<'a> BootJob<'a> {
    /// A job over `ranges` (which must not overlap) for `progress.len()` workers.
    pub fn new(ranges: &'a [GpaRange], progress: &'a [WorkerProgress]) -> BootJob<'a> {
        let mut total_chunks = 0;
        let mut chunk_bytes = 0;
        let mut all = 0;
        for &r in ranges {
            let s = Split::of(r);
            // Saturating: only overlapping ranges (a caller error) could pass 2^64.
            total_chunks = s.chunks().saturating_add(total_chunks);
            chunk_bytes = (s.body_end - s.body_start).saturating_add(chunk_bytes);
            all = r.len().saturating_add(all);
        }
        BootJob {
            ranges,
            progress,
            total_chunks,
            chunk_bytes,
            edge_bytes: all.saturating_sub(chunk_bytes),
            cursor: AtomicU64::new(0),
            done_chunks: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            edges_done: AtomicU64::new(0),
            exited: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// The ranges.
    pub fn ranges(&self) -> &'a [GpaRange] {
        self.ranges
    }

    /// Number of 2M/1G chunks the workers share.
    pub fn total_chunks(&self) -> u64 {
        self.total_chunks
    }

    /// Bytes in chunks.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Bytes in the unaligned edges (the boot vCPU's part).
    pub fn edge_bytes(&self) -> u64 {
        self.edge_bytes
    }

    /// Progress of worker `worker`, `None` past the slots.
    pub fn progress(&self, worker: usize) -> Option<&WorkerProgress> {
        self.progress.get(worker)
    }

    /// Pages accepted so far by the workers, all of them: 1G chunks claimed whole count one,
    /// 2M units one each (a 1G chunk handed out in 2M units counts 512).
    pub fn done_chunks(&self) -> u64 {
        self.done_chunks.load(Ordering::Acquire)
    }

    /// Edge bytes accepted so far.
    pub fn done_edge_bytes(&self) -> u64 {
        self.edges_done.load(Ordering::Acquire)
    }

    /// Workers that have returned from [`BootJob::run`] (a firmware BSP waits for all of them
    /// before it reuses the job's memory).
    pub fn workers_exited(&self) -> u64 {
        self.exited.load(Ordering::Acquire)
    }

    /// True when a worker or the edge pass failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// True when every chunk and every edge byte is accepted.
    pub fn is_complete(&self) -> bool {
        !self.failed()
            && self.done_bytes.load(Ordering::Acquire) == self.chunk_bytes
            && self.done_edge_bytes() == self.edge_bytes
    }

    /// Chunk `index`'s first GPA and level (claim order), `None` past the last chunk.
    pub fn chunk(&self, index: u64) -> Option<(Gpa, PageLevel)> {
        self.locate(index)
            .map(|(gpa, level)| (Gpa::new_truncate(gpa), level))
    }

    /// Chunk number `index` over all ranges.
    fn locate(&self, mut index: u64) -> Option<(u64, PageLevel)> {
        for &r in self.ranges {
            let s = Split::of(r);
            let n = s.chunks();
            if index < n {
                return Some(s.chunk(index));
            }
            index -= n;
        }
        None
    }

    /// Worker `worker`'s loop: claims chunks and accepts them until none is left.
    ///
    /// # Errors
    /// [`BootError::NoSuchWorker`], [`BootError::Accept`] for the chunk that failed (the job is
    /// then marked failed), [`BootError::Aborted`] when another worker failed first.
    pub fn run<T: Tdcall + ?Sized>(
        &self,
        worker: usize,
        tdcall: &mut T,
        acceptor: &Acceptor,
    ) -> Result<WorkerReport, BootError> {
        let result = self.work(worker, tdcall, acceptor);
        self.exited.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn work<T: Tdcall + ?Sized>(
        &self,
        worker: usize,
        tdcall: &mut T,
        acceptor: &Acceptor,
    ) -> Result<WorkerReport, BootError> {
        let progress = self
            .progress
            .get(worker)
            .ok_or(BootError::NoSuchWorker { worker })?;
        let mut report = WorkerReport::default();
        loop {
            if self.failed() {
                return Err(BootError::Aborted);
            }
            let Some((start, units, level)) = self.claim(acceptor) else {
                return Ok(report);
            };
            let bytes = units * PageLevel::Size2M.size();
            // Runs go through accept_range so that a learned 2M cap costs no 1G call.
            let run = GpaRange::from_len(start, bytes)
                .map_err(|e| BootError::Accept(AcceptError::InvalidRange(e)))?;
            if let Err(e) = acceptor.accept_range(tdcall, run) {
                self.failed.store(true, Ordering::Release);
                return Err(BootError::Accept(e));
            }
            let pieces = if level == PageLevel::Size1G { 1 } else { units };
            progress.bytes.fetch_add(bytes, Ordering::Relaxed);
            progress.chunks.fetch_add(pieces, Ordering::Relaxed);
            self.done_chunks.fetch_add(pieces, Ordering::AcqRel);
            self.done_bytes.fetch_add(bytes, Ordering::AcqRel);
            report.chunks += pieces;
            report.bytes += bytes;
        }
    }

    /// The range split holding body unit `unit` (a 2M page index over all ranges' bodies), and
    /// the unit's index inside that body.
    fn locate_unit(&self, mut unit: u64) -> Option<(Split, u64)> {
        for &r in self.ranges {
            let s = Split::of(r);
            let n = (s.body_end - s.body_start) / PageLevel::Size2M.size();
            if unit < n {
                return Some((s, unit));
            }
            unit -= n;
        }
        None
    }

    /// Claims the next piece of work: its first GPA, its length in 2M units, and the level it
    /// is meant for (1G for a whole 1G chunk, else 2M). `None` when all is claimed.
    fn claim(&self, acceptor: &Acceptor) -> Option<(u64, u64, PageLevel)> {
        let m2 = PageLevel::Size2M.size();
        let per_1g = PageLevel::Size1G.size() / m2;
        let total = self.chunk_bytes / m2;
        let workers = (self.progress.len() as u64).max(1);
        let mut cur = self.cursor.load(Ordering::Acquire);
        loop {
            if cur >= total {
                return None;
            }
            let (split, i) = self.locate_unit(cur)?;
            let gpa = split.body_start + i * m2;
            let body_left = (split.body_end - gpa) / m2;
            let may_1g = acceptor.level_cap() >= PageLevel::Size1G;
            let (units, level) = if may_1g && gpa >= split.g_start && gpa < split.g_end {
                // Claims inside the 1G part start on 1G boundaries while 1G is possible.
                (per_1g, PageLevel::Size1G)
            } else {
                let share = ((total - cur) / (2 * workers)).clamp(1, per_1g);
                let mut n = share.min(body_left);
                if may_1g && gpa < split.g_start {
                    // Do not run into the 1G part: it is claimed a chunk at a time.
                    n = n.min((split.g_start - gpa) / m2).max(1);
                }
                (n, PageLevel::Size2M)
            };
            match self.cursor.compare_exchange_weak(
                cur,
                cur + units,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((gpa, units, level)),
                Err(now) => cur = now,
            }
        }
    }

    /// The boot vCPU's part: accepts the unaligned 4K heads and tails of every range (and ranges
    /// too small for a 2M chunk). Call it once.
    ///
    /// # Errors
    /// [`BootError::Accept`]; the job is then marked failed.
    pub fn run_edges<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        acceptor: &Acceptor,
    ) -> Result<u64, BootError> {
        let mut bytes = 0;
        for &r in self.ranges {
            let s = Split::of(r);
            let edges = [
                (r.start().as_u64(), s.body_start),
                (s.body_end, r.end().as_u64()),
            ];
            for (a, b) in edges {
                if a >= b {
                    continue;
                }
                let edge = GpaRange::new(a, b)
                    .map_err(|e| BootError::Accept(AcceptError::InvalidRange(e)))?;
                if let Err(e) = acceptor.accept_range(tdcall, edge) {
                    self.failed.store(true, Ordering::Release);
                    return Err(BootError::Accept(e));
                }
                bytes += b - a;
                self.edges_done.fetch_add(b - a, Ordering::AcqRel);
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{operand, Gpaw, StatusCode, TdxStatus};
    use crate::acceptor::AcceptPolicy;
    use crate::tracker::tests::Logged;
    use std::sync::Mutex;
    use std::vec::Vec;

    const K4: u64 = 4096;
    const M2: u64 = 2 << 20;
    const G: u64 = 1 << 30;

    fn r(s: u64, e: u64) -> GpaRange {
        GpaRange::new(s, e).unwrap()
    }

    /// Odd ranges: 4K head and tail, 2M runs on both sides of a 1G body, a range with no 2M
    /// chunk, one of exactly one 2M page, one 2M-aligned without 1G.
    fn ranges() -> Vec<GpaRange> {
        std::vec![
            r(G - 3 * M2 - 3 * K4, 3 * G + 2 * M2 + 5 * K4),
            r(5 * G + K4, 5 * G + 6 * M2),
            r(7 * G, 7 * G + 8 * K4),
            r(8 * G + M2, 8 * G + 2 * M2),
            r(9 * G + 2 * M2, 9 * G + 4 * M2),
            r(12 * G, 13 * G),
        ]
    }

    /// The host maps some 2M pages at 4K (PAGE_SIZE_MISMATCH at 2M), the module caps at 2M or not.
    fn module(cap_2m: bool) -> impl Fn(Gpa, PageLevel) -> TdxStatus + Sync {
        move |gpa, level| match level {
            PageLevel::Size1G if cap_2m => StatusCode::OperandInvalid.with_operand(operand::RCX),
            PageLevel::Size2M if (gpa.as_u64() / M2) % 7 == 3 => {
                StatusCode::PageSizeMismatch.with_operand(1)
            }
            _ => TdxStatus::SUCCESS,
        }
    }

    fn accepted_per_level(a: &Acceptor) -> [u64; 3] {
        let s = a.stats();
        [
            s.level(PageLevel::Size4K).accepted,
            s.level(PageLevel::Size2M).accepted,
            s.level(PageLevel::Size1G).accepted,
        ]
    }

    /// Sorted, non-overlapping, and exactly covering `ranges`.
    fn assert_exact_cover(mut calls: Vec<(u64, PageLevel)>, ranges: &[GpaRange]) {
        calls.sort_unstable();
        let mut want: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| (r.start().as_u64(), r.end().as_u64()))
            .collect();
        want.sort_unstable();
        let mut got: Vec<(u64, u64)> = Vec::new();
        for (gpa, level) in calls {
            match got.last_mut() {
                Some((_, e)) if *e == gpa => *e += level.size(),
                Some((_, e)) => {
                    assert!(*e < gpa, "page {gpa:#x} accepted twice");
                    got.push((gpa, gpa + level.size()));
                }
                None => got.push((gpa, gpa + level.size())),
            }
        }
        // Adjacent input ranges would merge; ours are not adjacent.
        assert_eq!(got, want);
    }

    fn run_job(workers: usize, cap_2m: bool) -> ([u64; 3], Vec<(u64, PageLevel)>, Vec<u64>) {
        let ranges = ranges();
        let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let rule = module(cap_2m);
        let log = Mutex::new(Vec::new());
        let progress: Vec<WorkerProgress> = (0..workers).map(|_| WorkerProgress::new()).collect();
        let job = BootJob::new(&ranges, &progress);
        let reports: Vec<WorkerReport> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..workers)
                .map(|w| {
                    let (job, acceptor, rule, log) = (&job, &acceptor, &rule, &log);
                    s.spawn(move || job.run(w, &mut Logged { rule, log }, acceptor).unwrap())
                })
                .collect();
            // The boot vCPU: edges, then its share of the chunks.
            let mut td = Logged {
                rule: &rule,
                log: &log,
            };
            assert_eq!(job.run_edges(&mut td, &acceptor).unwrap(), job.edge_bytes());
            let mut reports = std::vec![job.run(0, &mut td, &acceptor).unwrap()];
            reports.extend(handles.into_iter().map(|h| h.join().unwrap()));
            reports
        });
        assert!(job.is_complete());
        assert_eq!(job.workers_exited(), workers as u64);
        let per_worker: Vec<u64> = progress.iter().map(|p| p.bytes()).collect();
        let report_bytes: Vec<u64> = reports.iter().map(|r| r.bytes).collect();
        assert_eq!(per_worker, report_bytes);
        assert_eq!(per_worker.iter().sum::<u64>(), job.chunk_bytes());
        let calls = log.into_inner().unwrap();
        assert_exact_cover(calls.clone(), &ranges);
        (accepted_per_level(&acceptor), calls, per_worker)
    }

    #[test]
    fn every_page_once_and_same_levels_for_1_2_4_8_workers() {
        for cap_2m in [false, true] {
            // The single-range-walk reference: what accept_range does range by range.
            let reference = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
            let rule = module(cap_2m);
            let log = Mutex::new(Vec::new());
            let mut td = Logged {
                rule: &rule,
                log: &log,
            };
            for rg in ranges() {
                reference.accept_range(&mut td, rg).unwrap();
            }
            let want = accepted_per_level(&reference);
            let mut single_calls = Vec::new();
            for workers in [1, 2, 4, 8] {
                let (levels, mut calls, _) = run_job(workers, cap_2m);
                assert_eq!(levels, want, "{workers} workers, cap_2m {cap_2m}");
                calls.sort_unstable();
                if workers == 1 {
                    single_calls = calls;
                } else {
                    assert_eq!(calls, single_calls, "{workers} workers");
                }
            }
            let mut ref_calls = log.into_inner().unwrap();
            ref_calls.sort_unstable();
            assert_eq!(ref_calls, single_calls);
        }
    }

    #[test]
    fn chunking_follows_the_acceptor_walk() {
        let ranges = [r(G - 2 * M2 - K4, 2 * G + M2 / 2 + K4)];
        let progress = [WorkerProgress::new()];
        let job = BootJob::new(&ranges, &progress);
        // 4K head, 2 x 2M, 1 x 1G, then a tail of 1M + 4K: no 2M chunk, all edge.
        assert_eq!(job.total_chunks(), 3);
        assert_eq!(
            job.chunk(0),
            Some((Gpa::new_truncate(G - 2 * M2), PageLevel::Size2M))
        );
        assert_eq!(
            job.chunk(2),
            Some((Gpa::new_truncate(G), PageLevel::Size1G))
        );
        assert_eq!(job.chunk(3), None);
        assert_eq!(job.edge_bytes(), K4 + (M2 / 2 + K4));
        assert_eq!(job.chunk_bytes(), 2 * M2 + G);
    }

    #[test]
    fn a_failing_chunk_stops_the_job() {
        let ranges = [r(0, 64 * M2)];
        let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let bad = 10 * M2;
        let rule = move |gpa: Gpa, _: PageLevel| {
            if gpa.as_u64() == bad {
                StatusCode::EptWalkFailed.status()
            } else {
                TdxStatus::SUCCESS
            }
        };
        let log = Mutex::new(Vec::new());
        let progress: Vec<WorkerProgress> = (0..4).map(|_| WorkerProgress::new()).collect();
        let job = BootJob::new(&ranges, &progress);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|w| {
                    let (job, acceptor, rule, log) = (&job, &acceptor, &rule, &log);
                    s.spawn(move || job.run(w, &mut Logged { rule, log }, acceptor))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let failures: Vec<_> = results
            .iter()
            .filter(|r| matches!(r, Err(BootError::Accept(_))))
            .collect();
        assert_eq!(failures.len(), 1);
        assert!(matches!(
            failures[0],
            Err(BootError::Accept(AcceptError::Module { gpa, .. })) if gpa.as_u64() == bad
        ));
        assert!(job.failed());
        assert!(!job.is_complete());
        assert_eq!(job.workers_exited(), 4);
        // No page accepted twice even on the failure path.
        let mut calls = log.into_inner().unwrap();
        let n = calls.len();
        calls.sort_unstable();
        calls.dedup();
        assert_eq!(calls.len(), n);
        let mut td = Logged {
            rule: &rule,
            log: &Mutex::new(Vec::new()),
        };
        assert_eq!(
            job.run(9, &mut td, &acceptor),
            Err(BootError::NoSuchWorker { worker: 9 })
        );
    }

    /// Progress is visible while workers run: a watcher sees it grow monotonically to the end.
    #[test]
    fn progress_is_readable_during_the_run() {
        let ranges = [r(0, 256 * M2)];
        let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let rule = |_: Gpa, _: PageLevel| {
            std::thread::yield_now();
            TdxStatus::SUCCESS
        };
        let log = Mutex::new(Vec::new());
        let progress: Vec<WorkerProgress> = (0..2).map(|_| WorkerProgress::new()).collect();
        let job = BootJob::new(&ranges, &progress);
        std::thread::scope(|s| {
            for w in 0..2 {
                let (job, acceptor, rule, log) = (&job, &acceptor, &rule, &log);
                s.spawn(move || job.run(w, &mut Logged { rule, log }, acceptor).unwrap());
            }
            let mut last = 0;
            while job.workers_exited() < 2 {
                let now: u64 = (0..2).map(|w| job.progress(w).unwrap().bytes()).sum();
                assert!(now >= last);
                last = now;
                std::thread::yield_now();
            }
        });
        assert_eq!(
            (0..2)
                .map(|w| job.progress(w).unwrap().chunks())
                .sum::<u64>(),
            256
        );
        assert!(job.is_complete());
    }
}
