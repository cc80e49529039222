//! The conversion-backend seam: the same conversion flows and the whole hostile catalogue on
//! every backend under `ConversionBackend`: the guest_memfd model, a recording wrapper that
//! checks the seam's contract, and the kernel's own guest_memfd (skipped, with a note, where
//! `/dev/kvm` offers none).

use std::sync::{Arc, Mutex};

use crossbeam_utils::sync::ShardedLock;

use accept::abi::{GhciStatus, PageLevel};
use hostvmm::gmem::{
    BackendCall, ConversionBackend, FolioPool, GmemConfig, GuestMemfd, KernelBackend,
    RecordingBackend, Shareability,
};
use hostvmm::kvm::YieldKicker;
use hostvmm::module::SeptState;
use hostvmm::vmm::{Host, HostConfig, SharedBackend, GUEST_HPA_BASE};
use tdmem_gmem_kernel::KernelGmemError;
use tdmem_sim::hostile;
use tdmem_tests::drive::{accept, content, leaf, map_gpa, read, write, K4, M2, SHARED};

type Recorded = Arc<ShardedLock<RecordingBackend<GuestMemfd>>>;

fn model(config: &HostConfig) -> Result<GuestMemfd, String> {
    let pool = FolioPool::new(GUEST_HPA_BASE, config.memory).map_err(|e| e.to_string())?;
    GuestMemfd::new(GmemConfig::new(config.memory, config.folio_level), pool)
        .map_err(|e| e.to_string())
}

fn recording(config: &HostConfig, keep: &Mutex<Vec<Recorded>>) -> Result<SharedBackend, String> {
    let backend = Arc::new(ShardedLock::new(RecordingBackend::new(model(config)?)));
    keep.lock().unwrap().push(backend.clone());
    Ok(backend)
}

/// The kernel backend, or `None` (said on stderr) where this machine has no guest_memfd.
fn kernel(config: &HostConfig) -> Option<SharedBackend> {
    match KernelBackend::new(config.memory, GUEST_HPA_BASE) {
        Ok(b) => Some(Arc::new(ShardedLock::new(b))),
        Err(KernelGmemError::Unsupported(why)) => {
            eprintln!("SKIPPED (kernel backend): no guest_memfd on this machine ({why})");
            None
        }
        Err(e) => panic!("guest_memfd is offered but the backend failed: {e}"),
    }
}

/// A host of `memory` bytes on the guest_memfd model.
fn model_host(memory: u64) -> Option<(&'static str, Host)> {
    let config = HostConfig::new(memory, 1);
    Some((
        "model",
        Host::new(config, Arc::new(YieldKicker)).expect("model host"),
    ))
}

/// A host of `memory` bytes on the kernel's guest_memfd, where this machine has one.
fn kernel_host(memory: u64) -> Option<(&'static str, Host)> {
    let config = HostConfig::new(memory, 1);
    let b = kernel(&config)?;
    Some((
        "kernel",
        Host::with_backend(config, Arc::new(YieldKicker), b).expect("kernel host"),
    ))
}

/// A bounce buffer's life: accept 2M, convert 4K inside to shared (split), back to private,
/// accept again, and merge.
fn bounce_buffer_round_trip(host: fn(u64) -> Option<(&'static str, Host)>) {
    if let Some((name, h)) = host(16 * M2) {
        let base = 4 * M2;
        assert!(
            accept(&h, base, PageLevel::Size2M).unwrap().is_success(),
            "{name}"
        );
        assert_eq!(leaf(&h, base), (1, SeptState::Mapped), "{name}");
        assert!(write(&h, base, 0xAA).is_some() && write(&h, base + 8 * K4, 0xBB).is_some());

        let (status, _) = map_gpa(&h, SHARED | (base + 3 * K4), 2 * K4);
        assert_eq!(status, GhciStatus::Success, "{name}");
        assert!(h.gmem().is_uniform(
            accept::GpaRange::new(base + 3 * K4, base + 5 * K4).unwrap(),
            Shareability::Shared
        ));
        assert_eq!(leaf(&h, base + 3 * K4).1, SeptState::Free, "{name}: zapped");
        assert_eq!(leaf(&h, base).0, 0, "{name}: the 2M leaf was split");
        assert_eq!(
            read(&h, base),
            Some(0xAA),
            "{name}: private content survives the split"
        );
        assert_eq!(read(&h, base + 8 * K4), Some(0xBB), "{name}");

        let (status, _) = map_gpa(&h, base + 3 * K4, 2 * K4);
        assert_eq!(status, GhciStatus::Success, "{name}");
        for p in [base + 3 * K4, base + 4 * K4] {
            assert!(
                accept(&h, p, PageLevel::Size4K).unwrap().is_success(),
                "{name}"
            );
            assert_eq!(
                content(&h, p),
                Some(0),
                "{name}: a re-accepted page is zeroed"
            );
        }
        assert_eq!(h.merge_pass(), 1, "{name}: the 2M range is merged back");
        assert_eq!(leaf(&h, base), (1, SeptState::Mapped), "{name}");
        assert_eq!(read(&h, base + 8 * K4), Some(0xBB), "{name}");
        assert_eq!(h.gmem().poisoned_pages(), 0, "{name}");
        h.module().check_tree().expect("well-formed S-EPT");
    }
}

#[test]
fn a_bounce_buffer_round_trip_on_the_model() {
    bounce_buffer_round_trip(model_host);
}

#[test]
fn a_bounce_buffer_round_trip_on_the_kernel_guest_memfd() {
    bounce_buffer_round_trip(kernel_host);
}

/// MapGPA to shared makes the range shared; punching a hole zaps the private mappings and
/// the guest can accept the range again.
fn shared_pages_and_holes(host: fn(u64) -> Option<(&'static str, Host)>) {
    if let Some((name, h)) = host(8 * M2) {
        let (status, _) = map_gpa(&h, SHARED | M2, M2);
        assert_eq!(status, GhciStatus::Success, "{name}");
        assert!(
            h.gmem()
                .shareability(accept::Gpa::new_truncate(M2))
                .unwrap()
                == Shareability::Shared
        );
        let r = h.gmem().is_uniform(
            accept::GpaRange::new(M2, 2 * M2).unwrap(),
            Shareability::Shared,
        );
        assert!(r, "{name}");

        assert!(
            accept(&h, 2 * M2, PageLevel::Size2M).unwrap().is_success(),
            "{name}"
        );
        h.punch_hole(accept::GpaRange::new(2 * M2, 3 * M2).unwrap())
            .expect("punch");
        assert_eq!(
            leaf(&h, 2 * M2).1,
            SeptState::Free,
            "{name}: the hole zapped the leaf"
        );
        // The guest accepts the punched range again: a fresh, zeroed page.
        let s = accept(&h, 2 * M2, PageLevel::Size2M).unwrap();
        assert!(s.is_success(), "{name}: {s:?}");
        assert_eq!(content(&h, 2 * M2), Some(0), "{name}: a fresh, zeroed page");
        h.module().check_tree().expect("well-formed S-EPT");
    }
}

#[test]
fn shared_pages_and_holes_on_the_model() {
    shared_pages_and_holes(model_host);
}

#[test]
fn shared_pages_and_holes_on_the_kernel_guest_memfd() {
    shared_pages_and_holes(kernel_host);
}

#[test]
fn the_hostile_catalogue_passes_on_the_recording_backend() {
    let kept = Mutex::new(Vec::new());
    let rows = hostile::run_all_on(&|c| recording(c, &kept));
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed).map(|r| r.name).collect();
    assert!(
        failed.is_empty(),
        "rows failing on the recording backend: {failed:?}"
    );

    let kept = kept.into_inner().unwrap();
    assert_eq!(kept.len(), rows.len(), "one backend per behaviour");
    let mut conversions = 0;
    for b in &kept {
        let b = b.read().unwrap();
        assert!(
            b.contract_violations().is_empty(),
            "{:?}",
            b.contract_violations()
        );
        conversions += b
            .calls()
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    BackendCall::Convert {
                        to: Shareability::Shared,
                        ..
                    }
                )
            })
            .count();
    }
    assert!(conversions > 0, "the catalogue converts through the seam");
}

#[test]
fn the_hostile_catalogue_passes_on_the_kernel_backend() {
    if kernel(&HostConfig::new(M2, 1)).is_none() {
        return;
    }
    let rows = hostile::run_all_on(&|c| kernel(c).ok_or_else(|| "no guest_memfd".to_string()));
    eprintln!("backend kernel: {} hostile behaviours", rows.len());
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| !r.passed)
        .map(|r| (r.name, r.detail.clone()))
        .collect();
    assert!(
        failed.is_empty(),
        "rows failing on the kernel backend: {failed:?}"
    );
    assert_eq!(rows.iter().map(|r| r.private_data_lost).sum::<u64>(), 0);
}

#[test]
fn every_backend_gives_the_model_s_verdicts() {
    let kept = Mutex::new(Vec::new());
    let on_model = hostile::run_all();
    let on_recording = hostile::run_all_on(&|c| recording(c, &kept));
    let on_kernel = kernel(&HostConfig::new(M2, 1))
        .map(|_| hostile::run_all_on(&|c| kernel(c).ok_or_else(|| "no guest_memfd".into())));
    for (i, a) in on_model.iter().enumerate() {
        let b = &on_recording[i];
        assert_eq!(
            (a.name, a.observed, a.tdcalls),
            (b.name, b.observed, b.tdcalls)
        );
        if let Some(k) = &on_kernel {
            assert_eq!((a.name, a.observed), (k[i].name, k[i].observed));
        }
    }
}

/// The kernel backend's own view: shared content is real memory, punched on conversion.
#[test]
fn the_kernel_backend_holds_shared_content_in_real_memory() {
    let config = HostConfig::new(4 * M2, 1);
    let Ok(mut b) = KernelBackend::new(config.memory, GUEST_HPA_BASE) else {
        eprintln!("SKIPPED (kernel backend): no guest_memfd");
        return;
    };
    let range = accept::GpaRange::new(M2, M2 + K4).unwrap();
    b.convert(
        range,
        Shareability::Shared,
        Default::default(),
        &mut hostvmm::gmem::NoopHook,
    )
    .expect("to shared");
    b.memory_mut().write_shared(M2, b"dma").expect("host write");
    let mut buf = [0u8; 3];
    b.memory().read_shared(M2, &mut buf).expect("host read");
    assert_eq!(&buf, b"dma");
    assert!(
        b.memory().read_shared(0, &mut buf).is_err(),
        "private memory is not readable"
    );
}
