//! `soak`: the randomized soak of the host half with injected faults.
//!
//! `cargo run --release -p tdmem-tests --bin soak -- --ops 1000000 [--seed N] [--fault-per-mille N]
//! [--json]`. Exits non-zero on any invariant violation or lost private data.

use std::process::ExitCode;
use std::time::Instant;

use tdmem_tests::soak::{run_with_progress, SoakConfig};

fn usage() -> ExitCode {
    eprintln!("usage: soak [--ops N] [--seed N] [--fault-per-mille N] [--memory-mib N] [--json]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut cfg = SoakConfig {
        ops: 1_000_000,
        ..SoakConfig::default()
    };
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |cfg_field: &mut u64| -> bool {
            match args.next().and_then(|v| v.parse().ok()) {
                Some(v) => {
                    *cfg_field = v;
                    true
                }
                None => false,
            }
        };
        let ok = match a.as_str() {
            "--ops" => num(&mut cfg.ops),
            "--seed" => num(&mut cfg.seed),
            "--memory-mib" => {
                let mut m = 0;
                let ok = num(&mut m);
                cfg.memory = m << 20;
                ok && m % 2 == 0 && m > 0
            }
            "--fault-per-mille" => {
                let mut f = 0;
                let ok = num(&mut f);
                cfg.fault_per_mille = f.min(1000) as u32;
                ok
            }
            "--json" => {
                json = true;
                true
            }
            _ => false,
        };
        if !ok {
            return usage();
        }
    }
    let t = Instant::now();
    let report = run_with_progress(cfg, &mut |done, r| {
        eprintln!(
            "{done}/{} ops, {} faults injected, {} violations, {:.1} s",
            cfg.ops,
            r.faults_injected,
            r.violations,
            t.elapsed().as_secs_f64()
        );
    });
    let secs = t.elapsed().as_secs_f64();
    if json {
        println!(
            "{{\"ops\":{},\"seed\":{},\"faults_armed\":{},\"faults_injected\":{},\"sept_pool_failures_armed\":{},\"host_failures\":{},\"poisoned_pages\":{},\"violations\":{},\"lost_private_pages\":{},\"seconds\":{secs:.2}}}",
            report.ops,
            cfg.seed,
            report.faults_armed,
            report.faults_injected,
            report.sept_pool_failures_armed,
            report.host_failures,
            report.poisoned_pages,
            report.violations,
            report.lost_private_pages,
        );
    } else {
        println!("seed:                 {:#x}", cfg.seed);
        println!("{report}");
        println!("wall time:            {secs:.1} s");
    }
    if report.violations == 0 && report.lost_private_pages == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
