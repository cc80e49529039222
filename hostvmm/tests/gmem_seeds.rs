//! Seed 001 (no needless folio splits, lazy hole punch) and seed 004 (shared -> private waits
//! for host references; a mapped page fails with EAGAIN) on the guest_memfd model.

use accept::abi::{Gpa, GpaRange, PageLevel};
use hostvmm::gmem::{
    ConvertError, ConvertMode, FolioPool, GmemConfig, GmemError, GuestMemfd, NoopHook,
    RecordingHook, RefRelease, Shareability,
};

const K4: u64 = PageLevel::Size4K.size();
const M2: u64 = PageLevel::Size2M.size();
const G1: u64 = PageLevel::Size1G.size();

fn gpa(v: u64) -> Gpa {
    Gpa::try_new(v).unwrap()
}

fn range(s: u64, e: u64) -> GpaRange {
    GpaRange::new(s, e).unwrap()
}

fn memfd(size: u64, level: PageLevel) -> GuestMemfd {
    let pool = FolioPool::new(0, 4 * G1).unwrap();
    GuestMemfd::new(GmemConfig::new(size, level), pool).unwrap()
}

fn convert(g: &mut GuestMemfd, s: u64, e: u64, to: Shareability) {
    g.convert(range(s, e), to, ConvertMode::default(), &mut NoopHook)
        .unwrap();
}

#[test]
fn seed_001_4k_hole_in_a_2m_folio_never_splits_it() {
    let mut g = memfd(4 * M2, PageLevel::Size2M);
    let base = M2;
    let hole = base + 37 * K4;
    let pfn = g.get_pfn(gpa(base)).unwrap();
    let folio = g.folio(gpa(base)).unwrap();
    assert_eq!(g.max_private_level(gpa(base)), Ok(PageLevel::Size2M));

    // Private -> shared for one 4K page: the hook zaps just that page; the folio stays whole.
    let mut hook = RecordingHook::new();
    g.convert(
        range(hole, hole + K4),
        Shareability::Shared,
        ConvertMode::default(),
        &mut hook,
    )
    .unwrap();
    assert_eq!(hook.invalidated(), vec![range(hole, hole + K4)]);
    assert_eq!(g.folio(gpa(base)), Some(folio));
    assert_eq!(g.max_private_level(gpa(base)), Ok(PageLevel::Size4K));
    assert_eq!(g.max_private_level(gpa(hole + K4)), Ok(PageLevel::Size4K));
    assert!(matches!(
        g.max_private_level(gpa(hole)),
        Err(GmemError::WrongShareability { .. })
    ));
    // The shared page is the same memory, in place.
    let host = g.host_map(gpa(hole)).unwrap();
    assert_eq!(host.as_u64(), pfn.hpa.as_u64() + 37 * K4);
    g.host_unmap(gpa(hole)).unwrap();
    // Other sub-pages still fault from the same folio.
    let other = g.get_pfn(gpa(hole + K4)).unwrap();
    assert_eq!(other.hpa.as_u64(), pfn.hpa.as_u64() + 38 * K4);
    assert_eq!(other.folio_base, gpa(base));

    // Back to private: uniform again, the 2M level (and PROMOTE) is possible again.
    convert(&mut g, hole, hole + K4, Shareability::Private);
    assert_eq!(g.max_private_level(gpa(base)), Ok(PageLevel::Size2M));
    assert_eq!(g.max_private_level(gpa(hole)), Ok(PageLevel::Size2M));
    assert_eq!(g.get_pfn(gpa(hole)).unwrap().hpa, host);
    assert_eq!(g.folio(gpa(base)), Some(folio));
    assert_eq!(g.range_count(), 1);
    let st = g.stats();
    assert_eq!(st.folios_allocated.total(), 1);
    assert_eq!(st.folios_freed.total(), 0);
    assert_eq!(g.with_pool(|p| p.stats().allocated.total()), 1);
}

#[test]
fn seed_001_1g_folio_goes_1g_2m_4k_and_back() {
    let mut g = memfd(2 * G1, PageLevel::Size1G);
    g.get_pfn(gpa(0)).unwrap();
    assert_eq!(g.max_private_level(gpa(G1 - K4)), Ok(PageLevel::Size1G));
    convert(&mut g, 5 * M2 + K4, 5 * M2 + 2 * K4, Shareability::Shared);
    assert_eq!(g.max_private_level(gpa(0)), Ok(PageLevel::Size2M));
    assert_eq!(g.max_private_level(gpa(5 * M2)), Ok(PageLevel::Size4K));
    convert(&mut g, 5 * M2 + K4, 5 * M2 + 2 * K4, Shareability::Private);
    assert_eq!(g.max_private_level(gpa(5 * M2)), Ok(PageLevel::Size1G));
    assert_eq!(g.folio_count(), 1);
    assert_eq!(g.stats().folios_freed.total(), 0);
}

#[test]
fn seed_001_lazy_hole_punch_frees_only_when_all_sub_pages_are_gone() {
    let mut g = memfd(2 * M2, PageLevel::Size2M);
    g.get_pfn(gpa(0)).unwrap();
    let live = g.with_pool(FolioPool::live_folios);
    for i in (0..512).rev() {
        let r = g
            .punch_hole(range(i * K4, (i + 1) * K4), &mut NoopHook)
            .unwrap();
        assert_eq!(r.pages_released, 1);
        if i > 0 {
            assert_eq!(r.folios_freed, 0);
            assert_eq!(g.folio(gpa(0)).map(|f| f.present_pages), Some(i));
            assert_eq!(g.with_pool(FolioPool::live_folios), live);
        } else {
            assert_eq!(r.folios_freed, 1);
        }
    }
    assert_eq!(g.folio_count(), 0);
    assert_eq!(g.with_pool(FolioPool::live_folios), live - 1);
    assert_eq!(g.stats().pages_punched, 512);
}

#[test]
fn seed_004_transient_reference_defers_the_commit() {
    let mut g = memfd(2 * M2, PageLevel::Size2M);
    convert(&mut g, 0, M2, Shareability::Shared);
    let page = 9 * K4;
    let io1 = g.get_ref(gpa(page)).unwrap();
    let io2 = g.get_ref(gpa(page)).unwrap();

    let report = g
        .convert(
            range(0, M2),
            Shareability::Private,
            ConvertMode::default(),
            &mut NoopHook,
        )
        .unwrap();
    assert_eq!(report.deferred, vec![gpa(page)]);
    assert_eq!(report.pages_committed, 511);
    assert!(g.is_pending(gpa(page)));
    assert_eq!(g.pending_count(), 1);
    assert_eq!(g.shareability(gpa(page)), Ok(Shareability::Shared));
    assert_eq!(g.shareability(gpa(page + K4)), Ok(Shareability::Private));
    // Nobody may use the page meanwhile.
    let pending = GmemError::ConversionPending { gpa: gpa(page) };
    assert_eq!(g.get_pfn(gpa(page)), Err(pending.clone()));
    assert_eq!(g.host_map(gpa(page)), Err(pending));
    assert!(matches!(
        g.get_ref(gpa(page)),
        Err(GmemError::ConversionPending { .. })
    ));
    assert!(matches!(
        g.max_private_level(gpa(page)),
        Err(GmemError::ConversionPending { .. })
    ));
    assert_eq!(g.max_private_level(gpa(0)), Ok(PageLevel::Size4K));

    assert_eq!(g.put_ref(io1), Ok(RefRelease::StillReferenced));
    assert!(g.is_pending(gpa(page)));
    assert_eq!(g.stats().deferred_completions, 0);
    assert_eq!(g.put_ref(io2), Ok(RefRelease::ConversionCompleted));
    assert!(!g.is_pending(gpa(page)));
    assert_eq!(g.shareability(gpa(page)), Ok(Shareability::Private));
    assert!(g.get_pfn(gpa(page)).is_ok());
    assert_eq!(g.max_private_level(gpa(0)), Ok(PageLevel::Size2M));
    assert_eq!(g.range_count(), 1);
    let st = g.stats();
    assert_eq!(st.deferred_pages, 1);
    assert_eq!(st.deferred_completions, 1);
    assert_eq!(st.pages_to_private, 512);
}

#[test]
fn seed_004_mapped_page_fails_with_eagain_at_its_offset() {
    let mut g = memfd(2 * M2, PageLevel::Size2M);
    convert(&mut g, 0, 2 * M2, Shareability::Shared);
    g.host_map(gpa(M2 + 3 * K4)).unwrap();
    let io = g.get_ref(gpa(5 * K4)).unwrap();
    let before = g.snapshot();
    let mut hook = RecordingHook::new();
    let err = g
        .convert(
            range(0, 2 * M2),
            Shareability::Private,
            ConvertMode::default(),
            &mut hook,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ConvertError::Again {
            offset: gpa(M2 + 3 * K4)
        }
    );
    assert_eq!(g.snapshot(), before);
    assert!(hook.calls.is_empty());
    assert_eq!(g.stats().eagain, 1);
    // A conversion not touching the mapped page goes through.
    convert(&mut g, 0, M2, Shareability::Private);
    assert!(g.is_pending(gpa(5 * K4)));
    g.host_unmap(gpa(M2 + 3 * K4)).unwrap();
    convert(&mut g, M2, 2 * M2, Shareability::Private);
    assert_eq!(g.put_ref(io), Ok(RefRelease::ConversionCompleted));
    assert!(g.is_uniform(range(0, 2 * M2), Shareability::Private));
}

#[test]
fn seed_004_converting_back_to_shared_cancels_the_pending_commit() {
    let mut g = memfd(M2, PageLevel::Size2M);
    convert(&mut g, 0, M2, Shareability::Shared);
    let io = g.get_ref(gpa(0)).unwrap();
    convert(&mut g, 0, M2, Shareability::Private);
    assert!(g.is_pending(gpa(0)));
    let mut hook = RecordingHook::new();
    let report = g
        .convert(
            range(0, K4),
            Shareability::Shared,
            ConvertMode::default(),
            &mut hook,
        )
        .unwrap();
    assert_eq!(report.cancelled, 1);
    assert!(
        hook.calls.is_empty(),
        "the page never left shared: nothing to invalidate"
    );
    assert_eq!(g.put_ref(io), Ok(RefRelease::Released));
    assert_eq!(g.shareability(gpa(0)), Ok(Shareability::Shared));
    assert_eq!(g.stats().deferred_cancelled, 1);
    assert!(g.host_map(gpa(0)).is_ok());
}

#[test]
fn punch_hole_refuses_pages_in_host_use() {
    let mut g = memfd(M2, PageLevel::Size2M);
    convert(&mut g, 0, M2, Shareability::Shared);
    let io = g.get_ref(gpa(4 * K4)).unwrap();
    let before = g.snapshot();
    assert_eq!(
        g.punch_hole(range(0, M2), &mut NoopHook),
        Err(ConvertError::Again {
            offset: gpa(4 * K4)
        })
    );
    assert_eq!(g.snapshot(), before);
    assert_eq!(g.put_ref(io), Ok(RefRelease::Released));
    assert_eq!(
        g.punch_hole(range(0, M2), &mut NoopHook)
            .unwrap()
            .folios_freed,
        1
    );
}
