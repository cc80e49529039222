//! Conversion cost on the two conversion backends, side by side in one run: the guest_memfd
//! model and the kernel's guest_memfd (`/dev/kvm`). Wall time, best of several rounds, and how
//! many times slower the kernel is; the kernel's column says "unavailable" where this machine
//! has no guest_memfd.
//!
//! `cargo run --release -p tdmem-tests --bin gmem_bench [-- --rounds N]`
//!
//! Measured per backend, with a hook that zaps nothing (the backend's own cost, not the
//! private MMU's):
//! - a 4 KiB page private -> shared -> private (two conversions), inside a populated 2 MiB range;
//! - a 2 MiB range private -> shared -> private;
//! - a hole punch of a populated 2 MiB range.

use std::time::{Duration, Instant};

use accept::abi::{Gpa, GpaRange, PageLevel};
use hostvmm::gmem::{
    ConversionBackend, ConvertMode, FolioPool, GmemConfig, GuestMemfd, KernelBackend, NoopHook,
    Shareability,
};
use hostvmm::vmm::GUEST_HPA_BASE;

const M2: u64 = 2 << 20;
const K4: u64 = 4096;
/// Guest memory of each backend.
const MEMORY: u64 = 256 * M2;

fn range(s: u64, e: u64) -> GpaRange {
    GpaRange::new(s, e).expect("range")
}

/// Populates the private backing of every 2 MiB block (as the fault path would).
fn populate(b: &mut dyn ConversionBackend) {
    let mut g = 0;
    while g < MEMORY {
        let _ = b.get_pfn(Gpa::new_truncate(g));
        g += M2;
    }
}

/// Operations per second of `op` over `n` operations, best of `rounds`.
fn rate(rounds: u32, n: u64, mut op: impl FnMut(u64)) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..n {
            op(i);
        }
        best = best.min(t.elapsed());
    }
    n as f64 / best.as_secs_f64()
}

fn convert(b: &mut dyn ConversionBackend, r: GpaRange, to: Shareability) {
    b.convert(r, to, ConvertMode::default(), &mut NoopHook)
        .expect("conversion");
}

/// (4K round trips/s, 2M round trips/s, 2M punches/s).
fn measure(b: &mut dyn ConversionBackend, rounds: u32) -> [f64; 3] {
    populate(b);
    let small = rate(rounds, 2000, |i| {
        let p = (i % 256) * M2 + 17 * K4;
        let r = range(p, p + K4);
        convert(b, r, Shareability::Shared);
        convert(b, r, Shareability::Private);
    });
    let big = rate(rounds, 256, |i| {
        let r = range(i * M2, (i + 1) * M2);
        convert(b, r, Shareability::Shared);
        convert(b, r, Shareability::Private);
    });
    let punch = rate(rounds, 256, |i| {
        let base = i * M2;
        // Repopulate, then punch: the punch is what is timed most of, the get_pfn is common to
        // both backends.
        let _ = b.get_pfn(Gpa::new_truncate(base));
        b.punch_hole(range(base, base + M2), &mut NoopHook)
            .expect("punch");
    });
    [small, big, punch]
}

fn main() {
    let rounds = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5u32);
    let mut model = GuestMemfd::new(
        GmemConfig::new(MEMORY, PageLevel::Size2M),
        FolioPool::new(GUEST_HPA_BASE, MEMORY).expect("pool"),
    )
    .expect("model");
    let m = measure(&mut model, rounds);
    let k = match KernelBackend::new(MEMORY, GUEST_HPA_BASE) {
        Ok(mut kb) => Some(measure(&mut kb, rounds)),
        Err(e) => {
            eprintln!("kernel backend unavailable: {e}");
            None
        }
    };
    println!(
        "| operation (backend only, no MMU) | model (/s) | kernel guest_memfd (/s) | model / kernel |"
    );
    println!("|---|---:|---:|---:|");
    let names = [
        "4 KiB private -> shared -> private",
        "2 MiB private -> shared -> private",
        "hole punch of a populated 2 MiB range",
    ];
    for (i, name) in names.iter().enumerate() {
        match k {
            Some(k) => println!(
                "| {name} | {:.0} | {:.0} | {:.0}x |",
                m[i],
                k[i],
                m[i] / k[i]
            ),
            None => println!("| {name} | {:.0} | unavailable | - |", m[i]),
        }
    }
}
