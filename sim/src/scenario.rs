//! Scenarios: what the simulated TD's vCPUs do.
//!
//! Every scenario starts like a TD boot: the firmware accepts a prefix of memory eagerly with
//! all vCPUs (the parallel boot job, largest pages first) and records the rest in a
//! Linux-format unaccepted table; the kernel then accepts lazily through the tracker. The
//! scenarios differ in what the kernel does next. Every choice is drawn from the vCPU's seeded
//! generator, so a run is reproducible.
//!
//! Guest data ownership: vCPU `i` writes to and converts only the 8 MiB regions `r` with
//! `r % vcpus == i`, so the expected content of every page is well defined under any
//! interleaving (lazy acceptance itself is shared: the tracker serialises it).

use crate::convert::convert_simulated;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use accept::abi::GpaRange;
use accept::convert::{ConvertHooks, HookError, Visibility};
use accept::parallel::BootJob;

use super::vcpu::SimVcpu;
use super::SimTd;
use hostvmm::module::Access;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
/// 2M blocks per ownership region (8 MiB): conversions up to a region span several MapGPA
/// chunks.
const REGION_BLOCKS: u64 = 4;

/// The parts of `range` that vCPU `vcpu` of `vcpus` owns (whole ownership regions, clipped).
pub(crate) fn owned_parts(range: GpaRange, vcpu: usize, vcpus: u32) -> Vec<GpaRange> {
    let region = M2 * REGION_BLOCKS;
    let n = u64::from(vcpus.max(1));
    let (s, e) = (range.start().as_u64(), range.end().as_u64());
    let mut parts = Vec::new();
    let mut r = s / region;
    while r * region < e {
        if r % n == vcpu as u64 {
            let lo = (r * region).max(s);
            let hi = ((r + 1) * region).min(e);
            if let Ok(p) = GpaRange::new(lo, hi) {
                parts.push(p);
            }
        }
        r += 1;
    }
    parts
}

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Scenario {
    /// Parallel eager acceptance of all memory, then a data check.
    BootEager,
    /// Firmware accepts a prefix; the kernel accepts on allocation through the tracker.
    BootLazy,
    /// A bounce-buffer pool of 4K pages converted private -> shared -> private inside 2M
    /// ranges, from every vCPU.
    Swiotlb,
    /// Memory touched before acceptance: the host maps 2M PENDING, the guest takes #VE and
    /// accepts from its handler.
    VeSplit,
    /// Random conversions of random sizes from every vCPU.
    ConvertStorm,
    /// boot-lazy, then swiotlb and convert-storm traffic together.
    Mixed,
}

impl Scenario {
    /// Every scenario with its name and one line of description.
    pub const ALL: [(Scenario, &'static str, &'static str); 6] = [
        (
            Scenario::BootEager,
            "boot-eager",
            "all vCPUs accept all memory at boot, largest pages first",
        ),
        (
            Scenario::BootLazy,
            "boot-lazy",
            "firmware accepts a prefix and builds the unaccepted table; the kernel accepts on allocation",
        ),
        (
            Scenario::Swiotlb,
            "swiotlb",
            "4K bounce buffers converted private -> shared -> private inside 2M ranges",
        ),
        (
            Scenario::VeSplit,
            "ve-split",
            "memory touched before acceptance: 2M PENDING mappings, #VE, accept from the handler",
        ),
        (
            Scenario::ConvertStorm,
            "convert-storm",
            "random conversions of random sizes from every vCPU",
        ),
        (
            Scenario::Mixed,
            "mixed",
            "boot-lazy, then swiotlb and convert-storm traffic together (the default)",
        ),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Scenario::ALL
            .iter()
            .find(|(s, _, _)| *s == self)
            .map_or("?", |(_, n, _)| n)
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(s, _, _)| *s)
    }

    /// Bytes the firmware accepts eagerly (a 2 MiB multiple).
    pub fn eager_bytes(self, memory: u64) -> u64 {
        match self {
            Scenario::BootEager => memory,
            _ => ((memory / 16) / M2 * M2).max(32 << 20).min(memory - M2 * 8),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The guest's page-table hooks for conversions. The simulator has no guest page tables: the
/// shared or private alias is chosen per access, so the hooks only count.
#[derive(Debug, Default)]
struct PageTables {
    changes: u64,
    flushes: u64,
}

impl ConvertHooks for PageTables {
    type Error = HookError;
    fn set_visibility(&mut self, _range: GpaRange, _to: Visibility) -> Result<(), HookError> {
        self.changes += 1;
        Ok(())
    }
    fn flush_tlb(&mut self, _range: GpaRange) {
        self.flushes += 1;
    }
}

/// One phase barrier.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    arrived: u32,
    claimed: bool,
    released: bool,
}

/// Counts its vCPU as finished when dropped: when its program returns and when it panics.
struct Finished<'a>(&'a AtomicU32);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A scenario ready to run: the shared boot job and phase barriers.
pub struct Plan<'p, 'g> {
    td: &'p SimTd<'g>,
    job: &'p BootJob<'p>,
    arrived: Mutex<Vec<Phase>>,
    finished: AtomicU32,
    steps_done: AtomicU64,
    steps_total: u64,
    errors: Mutex<Vec<Option<String>>>,
}

impl fmt::Debug for Plan<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("steps_total", &self.steps_total)
            .finish_non_exhaustive()
    }
}

/// Sizes of the kernel phase for one run.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    allocations: u64,
    touches: u64,
    bounces: u64,
    storms: u64,
}

impl Traffic {
    fn of(td: &SimTd<'_>) -> Traffic {
        let c = td.config();
        let t = u64::from(c.traffic.max(1));
        let lazy_blocks = (c.memory - td.guest().eager_end) / M2;
        let per_vcpu_blocks = (lazy_blocks / u64::from(c.vcpus)).max(1);
        let (allocations, touches, bounces, storms) = match c.scenario {
            Scenario::BootEager => (0, 0, 0, 0),
            Scenario::BootLazy => ((per_vcpu_blocks / 8).clamp(4, 512), 0, 0, 0),
            Scenario::Swiotlb => (0, 0, 200, 0),
            Scenario::VeSplit => (0, (per_vcpu_blocks / 4).clamp(8, 256), 0, 0),
            Scenario::ConvertStorm => (0, 0, 0, 120),
            Scenario::Mixed => ((per_vcpu_blocks / 16).clamp(4, 256), 32, 120, 60),
        };
        Traffic {
            allocations: allocations * t,
            touches: touches * t,
            bounces: bounces * t,
            storms: storms * t,
        }
    }

    fn steps(&self) -> u64 {
        self.allocations + self.touches + self.bounces + self.storms + 1
    }
}

/// Size of the bounce-buffer pool (at the start of lazily accepted memory).
fn pool_bytes(td: &SimTd<'_>) -> u64 {
    let c = td.config();
    let lazy = c.memory - td.guest().eager_end;
    let floor = M2 * REGION_BLOCKS * u64::from(c.vcpus);
    ((lazy / 16) / (M2 * REGION_BLOCKS) * (M2 * REGION_BLOCKS)).clamp(floor, floor.max(64 << 20))
}

impl<'p, 'g> Plan<'p, 'g> {
    /// A plan for `td`, with the firmware's boot job.
    pub fn new(td: &'p SimTd<'g>, job: &'p BootJob<'p>) -> Plan<'p, 'g> {
        let n = td.config().vcpus as usize;
        let traffic = Traffic::of(td);
        Plan {
            td,
            job,
            arrived: Mutex::new(Vec::new()),
            finished: AtomicU32::new(0),
            steps_done: AtomicU64::new(0),
            steps_total: traffic.steps() * n as u64,
            errors: Mutex::new(vec![None; n]),
        }
    }

    /// The error that stopped vCPU `id`'s program, if any.
    pub fn error(&self, id: usize) -> Option<String> {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .flatten()
    }

    fn step(&self, progress: &(dyn Fn(u64, u64) + Sync)) {
        let done = self.steps_done.fetch_add(1, Ordering::Relaxed) + 1;
        progress(done, self.steps_total);
        self.td.maybe_sample(done, self.pool(), false);
    }

    /// Scenario steps completed so far, by all vCPUs.
    pub(crate) fn steps_done(&self) -> u64 {
        self.steps_done.load(Ordering::Relaxed)
    }

    /// The bounce-buffer pool `[start, end)` (empty when the scenario accepts all memory
    /// eagerly).
    pub(crate) fn pool(&self) -> (u64, u64) {
        let start = self.td.guest().eager_end;
        let end = (start + pool_bytes(self.td)).min(self.td.config().memory);
        (start, end)
    }

    /// Waits until every vCPU reaches phase barrier `phase` (or stopped), letting the others
    /// run meanwhile. `at_quiescence` runs once, on one vCPU, when all have arrived and before
    /// any leaves: no vCPU is running guest code then, in either mode.
    fn barrier(&self, v: &mut SimVcpu<'_>, phase: usize, at_quiescence: impl FnOnce()) {
        let n = self.td.config().vcpus;
        {
            let mut a = self.arrived.lock().unwrap_or_else(PoisonError::into_inner);
            if a.len() <= phase {
                a.resize(phase + 1, Phase::default());
            }
            a[phase].arrived += 1;
        }
        let mut action = Some(at_quiescence);
        loop {
            let run = {
                let mut a = self.arrived.lock().unwrap_or_else(PoisonError::into_inner);
                let finished = self.finished.load(Ordering::Acquire);
                match a.get_mut(phase) {
                    Some(p) if p.released => return,
                    Some(p) if p.arrived + finished >= n && !p.claimed => {
                        p.claimed = true;
                        true
                    }
                    _ => false,
                }
            };
            if run {
                if let Some(f) = action.take() {
                    f();
                }
                let mut a = self.arrived.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(p) = a.get_mut(phase) {
                    p.released = true;
                }
                return;
            }
            v.wait_point();
        }
    }

    /// Runs vCPU `v`'s part of the scenario.
    ///
    /// # Errors
    /// The first guest-visible failure (also recorded for [`Plan::error`]).
    pub fn run_vcpu(
        &self,
        v: &mut SimVcpu<'_>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), String> {
        // A vCPU that stopped, also by a panic, no longer holds the others at their barriers.
        let _finished = Finished(&self.finished);
        let r = self.program(v, progress);
        if let Err(e) = &r {
            if let Some(slot) = self
                .errors
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(v.id())
            {
                *slot = Some(e.clone());
            }
        }
        r
    }

    fn program(
        &self,
        v: &mut SimVcpu<'_>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), String> {
        let td = self.td;
        let g = td.guest();
        let traffic = Traffic::of(td);

        // Firmware: parallel eager acceptance, the boot vCPU doing the unaligned edges.
        let boot = (|| {
            if v.id() == 0 {
                self.job
                    .run_edges(v, g.acceptor)
                    .map_err(|e| format!("boot edges: {e:?}"))?;
            }
            self.job
                .run(v.id(), v, g.acceptor)
                .map_err(|e| format!("boot: {e:?}"))
        })();
        #[cfg(feature = "testing")]
        if td.config().sabotage == Some(super::sabotage::Sabotage::VcpuPanic) && v.id() == 1 {
            panic!("sabotage: vCPU 1 panics at the end of the boot");
        }
        self.barrier(v, 0, || td.sched.end_phase());
        // Quiescent until the next barrier: every vCPU checks its share of the boot's range,
        // cut at 1 GiB boundaries as the end-of-run check is, instead of one checking it all
        // while the others wait.
        let n = td.config().vcpus as usize;
        let bounds = crate::split_bounds(g.eager_end, n);
        if let (Some(&lo), Some(&hi)) = (bounds.get(v.id()), bounds.get(v.id() + 1)) {
            if let Ok(r) = GpaRange::new(lo, hi) {
                td.check_range(r);
            }
        }
        self.barrier(v, 1, || {});
        boot?;
        self.step(progress);

        match td.config().scenario {
            Scenario::BootEager => self.data_check(v, 64)?,
            Scenario::BootLazy => self.allocations(v, traffic.allocations, progress)?,
            Scenario::VeSplit => self.touches(v, traffic.touches, progress)?,
            Scenario::Swiotlb => {
                self.pool_setup(v)?;
                self.barrier(v, 2, || {});
                self.bounces(v, traffic.bounces, progress)?;
            }
            Scenario::ConvertStorm => self.storms(v, traffic.storms, progress)?,
            Scenario::Mixed => {
                self.allocations(v, traffic.allocations, progress)?;
                self.touches(v, traffic.touches, progress)?;
                self.pool_setup(v)?;
                self.barrier(v, 2, || {});
                let (mut b, mut s) = (traffic.bounces, traffic.storms);
                while b + s > 0 {
                    if b > 0 && (s == 0 || v.rng().chance(b, b + s)) {
                        self.bounces(v, 1, progress)?;
                        b -= 1;
                    } else {
                        self.storms(v, 1, progress)?;
                        s -= 1;
                    }
                }
            }
        }
        #[cfg(feature = "testing")]
        if let Some(s) = td.config().sabotage {
            self.barrier(v, 3, || {});
            if v.id() == 0 {
                let what = super::sabotage::apply(td, v, s);
                log::warn!("sabotage {s:?}: {what}");
            }
        }
        Ok(())
    }

    /// A random region (of [`REGION_BLOCKS`] 2M blocks) owned by `v` and lying inside
    /// `[lo, hi)`: its first block number.
    fn own_region(&self, v: &mut SimVcpu<'_>, lo: u64, hi: u64) -> Option<u64> {
        let n = u64::from(self.td.config().vcpus);
        let id = v.id() as u64;
        let first = lo.div_ceil(M2 * REGION_BLOCKS);
        let last = hi / (M2 * REGION_BLOCKS);
        // Regions r in [first, last) with r % n == id.
        let start = first + (id + n - first % n) % n;
        if start >= last {
            return None;
        }
        let count = (last - start).div_ceil(n);
        Some((start + v.rng().below(count) * n) * REGION_BLOCKS)
    }

    /// A random 2M block owned by `v` inside `[lo, hi)`.
    fn own_block(&self, v: &mut SimVcpu<'_>, lo: u64, hi: u64) -> Option<u64> {
        let n = u64::from(self.td.config().vcpus);
        let id = v.id() as u64;
        let (first, last) = (lo.div_ceil(M2), hi / M2);
        if first >= last {
            return None;
        }
        // Regions overlapping [first, last) owned by `id` (r % n == id), one drawn uniformly,
        // then a block of it inside [first, last). O(1): no scan over the TD.
        let (rf, rl) = (first / REGION_BLOCKS, (last - 1) / REGION_BLOCKS);
        let start = rf + (id + n - rf % n) % n;
        if start > rl {
            return None;
        }
        let r = start + v.rng().below((rl - start) / n + 1) * n;
        let lo_b = (r * REGION_BLOCKS).max(first);
        let hi_b = ((r + 1) * REGION_BLOCKS).min(last);
        Some(lo_b + v.rng().below(hi_b - lo_b))
    }

    fn token(v: &mut SimVcpu<'_>) -> u64 {
        v.rng().next_u64() | 1
    }

    /// Writes a fresh token to `gpa` and reads it back.
    fn write_and_check(v: &mut SimVcpu<'_>, gpa: u64) -> Result<(), String> {
        let t = Self::token(v);
        v.touch(gpa, Access::Write(t))?;
        let back = v.touch(gpa, Access::Read)?;
        if back == t {
            Ok(())
        } else {
            Err(format!("{gpa:#x}: wrote {t:#x}, read {back:#x}"))
        }
    }

    /// Writes and reads back a few tokens in the vCPU's blocks of eagerly accepted memory.
    fn data_check(&self, v: &mut SimVcpu<'_>, pages: u64) -> Result<(), String> {
        let end = self.td.guest().eager_end;
        for _ in 0..pages {
            let Some(b) = self.own_block(v, 0, end) else {
                return Ok(());
            };
            let gpa = b * M2 + v.rng().below(512) * K4;
            Self::write_and_check(v, gpa)?;
        }
        Ok(())
    }

    /// Kernel allocations: accept through the tracker before use, then write and verify.
    fn allocations(
        &self,
        v: &mut SimVcpu<'_>,
        count: u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), String> {
        let td = self.td;
        let g = td.guest();
        let memory = td.config().memory;
        for _ in 0..count {
            let Some(b) = self.own_block(v, g.eager_end, memory) else {
                break;
            };
            // 2M to 8M, starting at the owned block (later blocks may belong to others: the
            // tracker shares them safely; this vCPU writes only to its own).
            let blocks = 1 + v.rng().below(4);
            let start = b * M2;
            let end = (start + blocks * M2).min(memory);
            let mut hooks = v.hooks();
            g.tracker
                .accept_range(v.id(), v, &mut hooks, start, end)
                .map_err(|e| format!("lazy accept [{start:#x}, {end:#x}): {e}"))?;
            let gpa = start + v.rng().below(512) * K4;
            let t = Self::token(v);
            v.touch(gpa, Access::Write(t))?;
            if let Ok(r) = GpaRange::new(start, end) {
                td.check_range_of(r, v.id());
            }
            self.step(progress);
        }
        Ok(())
    }

    /// Touches before accepting: the #VE path.
    fn touches(
        &self,
        v: &mut SimVcpu<'_>,
        count: u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), String> {
        let td = self.td;
        let g = td.guest();
        let memory = td.config().memory;
        for _ in 0..count {
            let Some(b) = self.own_block(v, g.eager_end + pool_bytes(td), memory) else {
                break;
            };
            let gpa = b * M2 + v.rng().below(512) * K4;
            if td.config().guest.sept_ve_disable() {
                // A guest that runs without #VE on pending pages (Linux) accepts on allocation.
                let mut hooks = v.hooks();
                g.tracker
                    .accept_range(v.id(), v, &mut hooks, b * M2, (b + 1) * M2)
                    .map_err(|e| format!("accept before use: {e}"))?;
            }
            Self::write_and_check(v, gpa)?;
            if let Ok(r) = GpaRange::from_len(b * M2, M2) {
                td.check_range_of(r, v.id());
            }
            self.step(progress);
        }
        Ok(())
    }

    /// The bounce-buffer pool: vCPU 0 accepts it (as a kernel allocating swiotlb would).
    fn pool_setup(&self, v: &mut SimVcpu<'_>) -> Result<(), String> {
        if v.id() != 0 {
            return Ok(());
        }
        let td = self.td;
        let g = td.guest();
        let (start, end) = (g.eager_end, g.eager_end + pool_bytes(td));
        let mut hooks = v.hooks();
        g.tracker
            .accept_range(v.id(), v, &mut hooks, start, end)
            .map_err(|e| format!("bounce pool accept: {e}"))
    }

    /// swiotlb traffic: 1-4 pages of an owned pool block go shared, the device writes, the
    /// guest reads, the pages come back private and are written again; neighbours keep their
    /// data. Every vCPU runs the host's merge pass every 16 of its bounces (a background host
    /// worker; its time is not charged to the vCPU).
    fn bounces(
        &self,
        v: &mut SimVcpu<'_>,
        count: u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), String> {
        let td = self.td;
        let g = td.guest();
        let (lo, hi) = (g.eager_end, g.eager_end + pool_bytes(td));
        let shared_bit = td.host().config().module.gpaw.shared_bit();
        let mut pt = PageTables::default();
        for i in 0..count {
            let Some(b) = self.own_block(v, lo, hi) else {
                break;
            };
            let pages = 1 + v.rng().below(4);
            let first = v.rng().below(512 - pages);
            let start = b * M2 + first * K4;
            let range = GpaRange::from_len(start, pages * K4).map_err(|e| e.to_string())?;
            // A neighbour page with private data that must survive the split and the merge.
            let neighbour = if first > 0 {
                start - K4
            } else {
                start + pages * K4
            };
            let keep = Self::token(v);
            v.touch(neighbour, Access::Write(keep))?;
            convert_simulated(
                g.converter,
                v,
                g.acceptor,
                range,
                Visibility::Shared,
                &mut pt,
            )
            .map_err(|e| format!("to shared: {e}"))?;
            let dma = Self::token(v);
            td.shared_access(start | shared_bit, Access::Write(dma));
            let seen = v.touch(start | shared_bit, Access::Read)?;
            if seen != dma {
                return Err(format!(
                    "shared {start:#x}: device wrote {dma:#x}, guest read {seen:#x}"
                ));
            }
            convert_simulated(
                g.converter,
                v,
                g.acceptor,
                range,
                Visibility::Private,
                &mut pt,
            )
            .map_err(|e| format!("to private: {e}"))?;
            let t = Self::token(v);
            v.touch(start, Access::Write(t))?;
            let back = v.touch(neighbour, Access::Read)?;
            if back != keep {
                return Err(format!(
                    "neighbour {neighbour:#x}: wrote {keep:#x}, read {back:#x}"
                ));
            }
            td.check_range_of(
                GpaRange::from_len(b * M2, M2).map_err(|e| e.to_string())?,
                v.id(),
            );
            if i % 16 == 15 {
                td.host().merge_pass();
            }
            self.step(progress);
        }
        Ok(())
    }

    /// Random conversions: an owned lazily-accepted block is accepted, a random sub-range
    /// (4K to the whole block) goes shared and comes back private.
    fn storms(
        &self,
        v: &mut SimVcpu<'_>,
        count: u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), String> {
        let td = self.td;
        let g = td.guest();
        let memory = td.config().memory;
        let lo = g.eager_end + pool_bytes(td);
        let mut pt = PageTables::default();
        for i in 0..count {
            let Some(first_block) = self.own_region(v, lo, memory) else {
                break;
            };
            let base = first_block * M2;
            let region = M2 * REGION_BLOCKS;
            let mut hooks = v.hooks();
            g.tracker
                .accept_range(v.id(), v, &mut hooks, base, base + region)
                .map_err(|e| format!("storm accept: {e}"))?;
            let region_pages = region / K4;
            let pages = match v.rng().below(5) {
                0 => 1,
                1 => 1 + v.rng().below(16),
                2 => 1 + v.rng().below(511),
                3 => 512,
                _ => 1 + v.rng().below(region_pages),
            };
            let first = v.rng().below(region_pages - pages + 1);
            let range =
                GpaRange::from_len(base + first * K4, pages * K4).map_err(|e| e.to_string())?;
            convert_simulated(
                g.converter,
                v,
                g.acceptor,
                range,
                Visibility::Shared,
                &mut pt,
            )
            .map_err(|e| format!("storm to shared: {e}"))?;
            td.check_range_of(range, v.id());
            convert_simulated(
                g.converter,
                v,
                g.acceptor,
                range,
                Visibility::Private,
                &mut pt,
            )
            .map_err(|e| format!("storm to private: {e}"))?;
            let t = Self::token(v);
            v.touch(range.start().as_u64(), Access::Write(t))?;
            td.check_range_of(
                GpaRange::from_len(base, region).map_err(|e| e.to_string())?,
                v.id(),
            );
            if i % 16 == 15 {
                td.host().merge_pass();
            }
            self.step(progress);
        }
        Ok(())
    }
}
