//! The Markdown of BENCHMARKS.md (all but the concurrency and guest_memfd sections, which
//! `concurrency` and `gmem` splice in): the headline comparisons, the full tables and the cost
//! table, from the matrix's results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::matrix::{
    How, Key, Rep, GUESTS, HEADLINE_GIB, HEADLINE_VCPUS, HOSTS, SCENARIOS, SEED, SWITCH_EVERY,
    TIMELINE_EVERY, TRAFFIC_VCPUS, WALL_REPEATS,
};
use super::run::{commit, cpu_model, nproc, Row};
use super::BenchArgs;

/// What the report is written from.
pub(super) struct Ctx<'a> {
    pub(super) root: &'a Path,
    pub(super) args: &'a BenchArgs,
    pub(super) sizes: &'a [u64],
    pub(super) cells: &'a [(Key, How)],
    pub(super) results: &'a BTreeMap<Key, Rep>,
    pub(super) timelines: &'a [(&'static str, Vec<Row>)],
    /// Wall times (ms) of every run of the 1 TiB ours/ours boot-eager cells, by vCPUs.
    pub(super) walls_1t: &'a [(u32, Vec<u64>)],
    pub(super) failures: &'a [String],
    pub(super) elapsed_s: f64,
}

fn secs(us: u64) -> String {
    let s = us as f64 / 1e6;
    if s >= 100.0 {
        format!("{s:.0}")
    } else if s >= 10.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.3}")
    }
}

fn wall(r: &Rep) -> String {
    r.wall_ms
        .map_or_else(|| "—".into(), |ms| format!("{:.2}", ms as f64 / 1e3))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

pub(super) fn gib_label(gib: u64) -> String {
    if gib >= 1024 && gib % 1024 == 0 {
        format!("{} TiB", gib / 1024)
    } else {
        format!("{gib} GiB")
    }
}

fn how_label(h: &How) -> String {
    match h {
        How::Run => "simulated".into(),
        How::Extrapolated { from_gib } => {
            format!("**extrapolated** from the {} counts", gib_label(*from_gib))
        }
        How::Skipped(why) => why.to_string(),
    }
}

/// BENCHMARKS.md from the run `c`.
pub(super) fn report(c: &Ctx<'_>) -> String {
    let mut o = String::new();
    let get = |scenario: &str, gib: u64, vcpus: u32, guest: &str, host: &str| {
        c.results.iter().find_map(|(k, r)| {
            (k.scenario == scenario
                && k.gib == gib
                && k.vcpus == vcpus
                && k.guest == guest
                && k.host == host)
                .then_some(r)
        })
    };
    let how_of = |scenario: &str, gib: u64, vcpus: u32, guest: &str, host: &str| {
        c.cells
            .iter()
            .find(|(k, _)| {
                k.scenario == scenario
                    && k.gib == gib
                    && k.vcpus == vcpus
                    && k.guest == guest
                    && k.host == host
            })
            .map(|(_, h)| h.clone())
    };
    let simulated = c.cells.iter().filter(|(_, h)| *h == How::Run).count();
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Side-by-side runs of the simulated TD (`tdsim`) with this project's guest and host \
         policies and the baselines that behave like other guests (Linux, td-shim, asterinas \
         mainline, OVMF) and hosts (mainline KVM with 4K private mappings, the KVM TDX \
         huge-page series). Every guest policy runs the real `accept` engine with an \
         `AcceptPolicy` preset; every host policy runs the real `hostvmm` MMU with an \
         `MmuPolicy` preset (`GuestPolicy` and `HostPolicy` in `sim/src/config.rs`). \
         The `linux` rows are the Linux-equivalent baseline: `AcceptPolicy::LINUX`, \
         `ConvertPolicy::LINUX`, lazy acceptance in runs with PAGE_ALREADY_ACCEPTED fatal, \
         and no #VE on pending pages (SEPT_VE_DISABLE). Equivalence is shown by \
         `cargo xtask linux`, which compiles unmodified Linux 6.12 code (`tdx_accept_memory`, \
         `tdx_map_gpa`, the kernel's `accept_memory`, the EFI stub) and checks that it makes \
         the same TDCALLs in the same order as these presets on random ranges, tables and \
         scripted hosts, and end to end on the emulator (README, \"Linux conformance\").\n"
    );
    let _ = writeln!(
        o,
        "- **Counts are exact** and deterministic for the seed: TDCALLs, EPT-violation exits, \
         SEAMCALLs, splits, merges.\n\
         - **Modelled time is not a measurement**: it is the busiest vCPU's sum of event costs \
         from the one cost table, `sim/src/cost.rs` (each constant with its public \
         source; see below).\n\
         - **Wall time** is the simulator's own run time for the cell on the machine below.\n"
    );
    let _ = writeln!(o, "## Reproduce\n");
    let _ = writeln!(
        o,
        "Every number and both plots in this file come from one command:\n\n\
         ```sh\ncargo xtask bench\n```\n\n\
         It builds the release `tdsim`, runs each simulated cell as \
         `tdsim run --scenario S --memory NG --vcpus V --guest-policy G --host-policy H \
         --seed {SEED} --switch-every {SWITCH_EVERY} --json FILE` (the per-cell reports are \
         kept in `target/bench/`), aggregates them here, runs `swiotlb` with `--timeline` and \
         writes `bench/`. Any single row is reproduced by its `tdsim run` line (add \
         `--json FILE` for the full report). `--switch-every {SWITCH_EVERY}`: a scheduling \
         point switches to another vCPU with probability 1/{SWITCH_EVERY}; the counts \
         of boot-eager do not depend on it, the modelled critical path slightly does.\n"
    );
    let _ = writeln!(
        o,
        "This run: commit {}, {} cells ({} simulated), `--sizes {}`, `--vcpus {}`, `--jobs {}`; \
         machine: {} logical CPUs (nproc), {}; total {:.0} s including the build.\n",
        commit(c.root),
        c.cells.len(),
        simulated,
        c.sizes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        c.args
            .vcpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        c.args.jobs.max(1),
        nproc(),
        cpu_model(),
        c.elapsed_s
    );
    if !c.failures.is_empty() {
        let _ = writeln!(o, "**Cells that failed to run:**\n");
        for f in c.failures {
            let _ = writeln!(o, "- {f}");
        }
        let _ = writeln!(o);
    }

    // 1. TDCALLs per GiB on a host that maps 2M.
    let _ = writeln!(o, "## TDCALLs per GiB accepted on a host that maps 2M\n");
    let _ = writeln!(
        o,
        "boot-eager, {HEADLINE_VCPUS} vCPUs, module capped at 2M ACCEPT (every public \
         module). The lower bound is 512 ACCEPT TDCALLs per GiB (one per 2M page). Our guest \
         issues one 1G ACCEPT per TD to learn the cap (the module answers OPERAND_INVALID) and \
         never again, so it issues `512 x GiB + 1`: 512.0625 per GiB at 16 GiB, \
         512.0039 at 256 GiB. The Linux-like guest retries 1G on every 1 GiB chunk (+1 per \
         GiB); asterinas accepts 4K only (262144 per GiB).\n"
    );
    let _ = writeln!(
        o,
        "| guest | host | memory | ACCEPT TDCALLs | 4K | 2M | 1G | per GiB | vs 512 | how |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---|"
    );
    for host in ["ours", "kvm-hugepage"] {
        for &gib in c.sizes {
            for guest in GUESTS {
                let Some(r) = get("boot-eager", gib, HEADLINE_VCPUS, guest, host) else {
                    continue;
                };
                let per = r.accept_calls as f64 / gib as f64;
                let h = how_of("boot-eager", gib, HEADLINE_VCPUS, guest, host)
                    .map_or_else(String::new, |h| how_label(&h));
                let _ = writeln!(
                    o,
                    "| {guest} | {host} | {} | {} | {} | {} | {} | {per:.4} | {:.3}x | {h} |",
                    gib_label(gib),
                    r.accept_calls,
                    r.k4,
                    r.m2,
                    r.g1,
                    per / 512.0
                );
            }
        }
    }
    let _ = writeln!(o);

    // 2. Eager boot of 64 GiB with 8 vCPUs.
    let _ = writeln!(
        o,
        "## Eager boot of {} with {HEADLINE_VCPUS} vCPUs (modelled)\n",
        gib_label(HEADLINE_GIB)
    );
    if let Some(base) = get("boot-eager", HEADLINE_GIB, HEADLINE_VCPUS, "ours", "ours") {
        let _ = writeln!(
            o,
            "Ratio = the pair's modelled boot time / ours-ours ({} s).\n",
            secs(base.modelled_us)
        );
        let _ = writeln!(
            o,
            "| guest | host | modelled boot (s) | ratio | ACCEPT TDCALLs | EPT exits | SEAMCALLs | splits | wall (s) |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for guest in GUESTS {
            for host in HOSTS {
                if let Some(r) = get("boot-eager", HEADLINE_GIB, HEADLINE_VCPUS, guest, host) {
                    let _ = writeln!(
                        o,
                        "| {guest} | {host} | {} | {:.1}x | {} | {} | {} | {} | {} |",
                        secs(r.modelled_us),
                        r.modelled_us as f64 / base.modelled_us.max(1) as f64,
                        r.accept_calls,
                        r.exits,
                        r.seamcalls,
                        r.splits,
                        wall(r)
                    );
                }
            }
        }
        let _ = writeln!(o);
    } else {
        let _ = writeln!(o, "Not run (needs `--sizes` with {HEADLINE_GIB}).\n");
    }

    // 3. swiotlb.
    let _ = writeln!(
        o,
        "## Huge-mapped private memory after `swiotlb`\n\n\
         {} TD, {HEADLINE_VCPUS} vCPUs: 200 bounces per vCPU of 1-4 pages, each converted \
         private -> shared -> private inside a 2M range of a 64 MiB pool. Optimum = bytes in \
         2M ranges the guest holds entirely private and accepted at the end (the most any \
         host could map huge).\n",
        gib_label(HEADLINE_GIB)
    );
    let _ = writeln!(
        o,
        "| guest | host | huge-mapped private | optimum | ratio | >= 99% | zap splits + fault splits | merges | MapGPA | modelled (s) |\n\
         |---|---|---:|---:|---:|:-:|---:|---:|---:|---:|"
    );
    for guest in GUESTS {
        for host in HOSTS {
            if let Some(r) = get("swiotlb", HEADLINE_GIB, HEADLINE_VCPUS, guest, host) {
                let _ = writeln!(
                    o,
                    "| {guest} | {host} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.huge,
                    r.optimal,
                    pct(r.ratio()),
                    if r.ratio() >= 0.99 { "yes" } else { "no" },
                    r.splits,
                    r.merges,
                    r.map_gpa,
                    secs(r.modelled_us)
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "\n![huge-mapping ratio during swiotlb](bench/swiotlb_huge_ratio.svg)\n\n\
         The plot samples the bounce pool every {TIMELINE_EVERY} scenario steps \
         (`tdsim run --timeline FILE`, the CSVs are in `bench/`), last point after the host's \
         final merge pass. Our host merges in a background pass, which this scenario runs on \
         every vCPU after every 16 of its bounces: the pool recovers at each pass while \
         bounces keep splitting it (a bounced range can only merge once the guest has accepted \
         it back), and the host's final pass restores the optimum. The huge-page series never \
         merges, so every bounced 2M range stays split; mainline KVM never maps 2M.\n"
    );
    for (host, rows) in c.timelines {
        let (mut lo, mut last) = (f64::MAX, 0.0);
        for &(_, _, _, ph, po) in rows {
            let r = if po == 0 { 1.0 } else { ph as f64 / po as f64 };
            lo = lo.min(r);
            last = r;
        }
        if !rows.is_empty() {
            let _ = writeln!(
                o,
                "- host {host}: pool ratio lowest {} during the run, {} at the end ({} samples).",
                pct(lo),
                pct(last),
                rows.len()
            );
        }
    }
    let _ = writeln!(o);

    // 4. 1 TiB wall time.
    let _ = writeln!(o, "## Simulator speed: acceptance of a 1 TiB TD\n");
    if c.walls_1t.is_empty() {
        let _ = writeln!(o, "Not run (needs `--sizes` with 1024).\n");
    } else {
        let _ = writeln!(
            o,
            "`tdsim run --scenario boot-eager --memory 1024G --vcpus V --switch-every \
             {SWITCH_EVERY}` (ours/ours) emulates the acceptance of a 1 TiB TD: 524289 ACCEPT \
             TDCALLs, 524288 EPT exits and 2M AUGs, every invariant checked. Wall time of the \
             whole run, {} runs each (the matrix's and {WALL_REPEATS} more):\n",
            WALL_REPEATS + 1
        );
        let _ = writeln!(
            o,
            "| vCPU threads | best (s) | median (s) | runs (s) | under 2 s |\n|---:|---:|---:|---|:-:|"
        );
        for (v, walls) in c.walls_1t {
            let mut sorted = walls.clone();
            sorted.sort_unstable();
            let best = sorted.first().copied().unwrap_or(0);
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "| {v} | **{:.2}** | {:.2} | {} | {} |",
                best as f64 / 1e3,
                median as f64 / 1e3,
                walls
                    .iter()
                    .map(|ms| format!("{:.2}", *ms as f64 / 1e3))
                    .collect::<Vec<_>>()
                    .join(", "),
                if best < 2000 { "yes" } else { "no" }
            );
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "The same cell at each vCPU count (the matrix's run):\n\n\
         | vCPUs | wall (s) | modelled (s) | ACCEPT TDCALLs | EPT exits | SEAMCALLs |\n\
         |---:|---:|---:|---:|---:|---:|"
    );
    for v in [1u32, 8, 64] {
        if let Some(r) = get("boot-eager", 1024, v, "ours", "ours") {
            let _ = writeln!(
                o,
                "| {v} | {} | {} | {} | {} | {} |",
                wall(r),
                secs(r.modelled_us),
                r.accept_calls,
                r.exits,
                r.seamcalls
            );
        }
    }
    let _ = writeln!(
        o,
        "\nWall times are of the whole run on the machine above, which other work may share. \
         The deterministic scheduler runs every vCPU as a coroutine on one thread and switches \
         between them without an OS hand-off, so its cost does not grow with the vCPU count \
         (the wall times above differ by the machine's noise, not by vCPUs). The counts are \
         the same at every vCPU count; the modelled time is what parallelism buys.\n"
    );

    // 5. Plot and boot-time table over sizes.
    let _ = writeln!(o, "## Modelled boot time vs memory size\n");
    let _ = writeln!(
        o,
        "![modelled boot time vs memory](bench/boot_time_vs_memory.svg)\n\n\
         boot-eager at {HEADLINE_VCPUS} vCPUs; hollow points are extrapolated from the 64 GiB \
         counts (boot-eager counts scale linearly with memory; the modelled critical path \
         with the 1 GiB boot chunks per vCPU). Pairs with the same numbers share a line.\n"
    );

    // 6. Full tables.
    let _ = writeln!(o, "## All cells\n");
    let _ = writeln!(
        o,
        "boot-eager runs at every size and vCPU count; the other scenarios scale their \
         traffic with vCPUs and run at {TRAFFIC_VCPUS} vCPUs. Columns: ACCEPT TDCALLs (4K / \
         2M / 1G), EPT-violation exits, #VEs, MapGPA calls, SEAMCALLs (all kinds), DEMOTE, \
         PROMOTE, splits (fault-path + zap-path), merges, huge-mapping ratio vs optimum, \
         modelled time of the busiest vCPU, simulator wall time, invariants.\n"
    );
    for scenario in SCENARIOS {
        let _ = writeln!(o, "### {scenario}\n");
        let _ = writeln!(
            o,
            "| memory | vCPUs | guest | host | ACCEPT | 4K / 2M / 1G | exits | #VE | MapGPA | SEAMCALLs | DEMOTE | PROMOTE | splits | merges | huge ratio | modelled (s) | wall (s) | checks | how |\n\
             |---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        for (k, h) in c.cells.iter().filter(|(k, _)| k.scenario == scenario) {
            let label = how_label(h);
            match c.results.get(k) {
                Some(r) => {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        gib_label(k.gib),
                        k.vcpus,
                        k.guest,
                        k.host,
                        r.accept_calls,
                        r.k4,
                        r.m2,
                        r.g1,
                        r.exits,
                        r.ve,
                        r.map_gpa,
                        r.seamcalls,
                        r.demote,
                        r.promote,
                        r.splits,
                        r.merges,
                        pct(r.ratio()),
                        secs(r.modelled_us),
                        wall(r),
                        if r.passed() { "pass" } else { "FAIL" },
                        label
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | | | | | | | | | | | | | | | {} |",
                        gib_label(k.gib),
                        k.vcpus,
                        k.guest,
                        k.host,
                        label
                    );
                }
            }
        }
        let _ = writeln!(o);
    }

    // 7. Cost table.
    let _ = writeln!(o, "## Cost table\n");
    let _ = writeln!(
        o,
        "As the reports give it: `sim/src/cost.rs` (`CostTable::DEFAULT`), where each constant names its \
         source (public figures collected in the spec notes, section 9: DEMOTE ~10 us on \
         Sapphire Rapids; EPT violation + AUG ~8 us idle; eager 4K accept ~12-15 us per page \
         including exit and AUG; \"model\" marks values chosen where no public figure exists).\n"
    );
    let _ = writeln!(o, "| event | ns |\n|---|---:|");
    let cost = c
        .results
        .values()
        .next()
        .map(|r| r.cost)
        .unwrap_or_default();
    for (n, v) in cost.entries() {
        let _ = writeln!(o, "| `{n}` | {v} |");
    }
    let _ = writeln!(
        o,
        "\nModelled time charges each vCPU for its own TDCALLs (with page zeroing in ACCEPT), \
         #VEs, and the host work of the exits it took (EPT exit, DEMOTE, PROMOTE, short \
         SEAMCALLs, MapGPA chunks); a run's modelled time is the busiest vCPU's total. The \
         parallel boot hands out 1 GiB chunks, so a TD of N GiB keeps at most N vCPUs busy."
    );
    o
}
