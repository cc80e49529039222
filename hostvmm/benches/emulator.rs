//! Throughput of the TDX-module emulator under criterion: 2M PAGE.AUG + ACCEPT of a 16 GiB TD
//! (8192 pages) on one vCPU thread, in the two orders the host uses.
//!
//! - `aug_then_accept`: the host AUGs every 2M page, then the vCPU ACCEPTs each (eager).
//! - `accept_exit_aug`: the vCPU ACCEPTs first, takes the EPT-violation exit, the host AUGs at
//!   the requested level and the ACCEPT re-executes (lazy, as KVM handles it).
//!
//! Each iteration builds a fresh TD with its S-EPT down to the 2M level (not timed). The
//! `module_throughput` bench binary does the same at 1 TiB with 2 threads and prints counts;
//! this one gives criterion's statistics. Run with
//! `cargo bench -p hostvmm --bench emulator`.

use accept::abi::{page_info, Gpa, PageLevel};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hostvmm::module::{ModuleConfig, TdExit, TdcallOutcome, TdxModule};

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const G512: u64 = 512 << 30;
const HPA_BASE: u64 = 0x1000_0000_0000;
const SEPT_BASE: u64 = 0x8000_0000_0000;
const BYTES: u64 = 16 * G1;

/// A runnable one-vCPU TD of `bytes` with the S-EPT built down to the 2M level.
fn build(bytes: u64) -> TdxModule {
    let m = TdxModule::new(ModuleConfig {
        vcpus: 1,
        ..ModuleConfig::default()
    })
    .expect("config");
    assert!(m.finalize().status.is_success());
    let mut sept = SEPT_BASE;
    let mut add = |gpa: u64, level: u8| {
        let r = m.sept_add(Gpa::new_truncate(gpa), level, sept);
        assert!(r.status.is_success(), "SEPT.ADD {gpa:#x}/{level}: {r:?}");
        sept += 0x1000;
    };
    for gpa in (0..bytes).step_by(G512 as usize) {
        add(gpa, 3);
    }
    for gpa in (0..bytes).step_by(G1 as usize) {
        add(gpa, 2);
    }
    m
}

fn aug_then_accept(m: &TdxModule) {
    for p in 0..BYTES / M2 {
        let r = m.page_aug(
            Gpa::new_truncate(p * M2),
            PageLevel::Size2M,
            HPA_BASE + p * M2,
        );
        assert!(r.status.is_success());
    }
    m.vcpu_enter(0).expect("enter");
    for p in 0..BYTES / M2 {
        let info = page_info(Gpa::new_truncate(p * M2), PageLevel::Size2M);
        match m.tdg_mem_page_accept(0, info) {
            Ok(TdcallOutcome::Completed(st)) if st.is_success() => {}
            other => panic!("ACCEPT {:#x}: {other:?}", p * M2),
        }
    }
}

fn accept_exit_aug(m: &TdxModule) {
    m.vcpu_enter(0).expect("enter");
    for p in 0..BYTES / M2 {
        let gpa = Gpa::new_truncate(p * M2);
        let info = page_info(gpa, PageLevel::Size2M);
        loop {
            match m.tdg_mem_page_accept(0, info) {
                Ok(TdcallOutcome::Completed(st)) if st.is_success() => break,
                Ok(TdcallOutcome::Exit(TdExit::EptViolation { ext, .. })) => {
                    let level = PageLevel::from_index(u64::from(ext.req_level())).expect("level");
                    assert!(m
                        .page_aug(gpa, level, HPA_BASE + p * M2)
                        .status
                        .is_success());
                    m.vcpu_enter(0).expect("re-enter");
                }
                other => panic!("ACCEPT {gpa:?}: {other:?}"),
            }
        }
    }
}

fn emulator(c: &mut Criterion) {
    let mut g = c.benchmark_group("emulator_2m_16GiB");
    g.sample_size(10);
    g.throughput(Throughput::Elements(BYTES / M2));
    g.bench_function("aug_then_accept", |b| {
        b.iter_batched(
            || build(BYTES),
            |m| {
                aug_then_accept(&m);
                m // dropped outside the timing
            },
            BatchSize::PerIteration,
        );
    });
    g.bench_function("accept_exit_aug", |b| {
        b.iter_batched(
            || build(BYTES),
            |m| {
                accept_exit_aug(&m);
                m
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

criterion_group!(benches, emulator);
criterion_main!(benches);
