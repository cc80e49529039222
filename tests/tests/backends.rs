//! The conversion-backend seam: a second backend under `ConversionBackend` runs the whole
//! hostile catalogue, and the calls the host half makes through the seam keep its contract.

use std::sync::{Arc, Mutex};

use hostvmm::gmem::{
    BackendCall, FolioPool, GmemConfig, GuestMemfd, RecordingBackend, Shareability,
};
use hostvmm::sim::hostile;
use hostvmm::vmm::{HostConfig, SharedBackend, GUEST_HPA_BASE};

type Recorded = Arc<Mutex<RecordingBackend<GuestMemfd>>>;

fn recording(config: &HostConfig, keep: &Mutex<Vec<Recorded>>) -> Result<SharedBackend, String> {
    let pool = FolioPool::new(GUEST_HPA_BASE, config.memory).map_err(|e| e.to_string())?;
    let model = GuestMemfd::new(GmemConfig::new(config.memory, config.folio_level), pool)
        .map_err(|e| e.to_string())?;
    let backend = Arc::new(Mutex::new(RecordingBackend::new(model)));
    keep.lock().unwrap().push(backend.clone());
    Ok(backend)
}

#[test]
fn the_hostile_catalogue_passes_on_a_second_backend() {
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
        let b = b.lock().unwrap();
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
fn both_backends_give_the_same_verdicts() {
    let kept = Mutex::new(Vec::new());
    let on_model = hostile::run_all();
    let on_recording = hostile::run_all_on(&|c| recording(c, &kept));
    for (a, b) in on_model.iter().zip(&on_recording) {
        assert_eq!(
            (a.name, a.observed, a.tdcalls),
            (b.name, b.observed, b.tdcalls)
        );
    }
}
