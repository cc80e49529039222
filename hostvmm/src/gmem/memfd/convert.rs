//! Conversions and hole punches of a [`GuestMemfd`]: all-or-nothing shareability changes
//! (seed 002) with the private MMU's invalidation as the point of no return, deferred commits
//! while host references remain (seed 004), and lazy hole punching that frees a folio only when
//! all its sub-pages are gone (seed 001).

use super::*;

impl GuestMemfd {
    fn check_range(&self, range: GpaRange) -> Result<(u64, u64), ConvertError> {
        if range.end().as_u64() > self.size {
            return Err(ConvertError::OutOfRange {
                range,
                size: self.size,
            });
        }
        Ok((range.start().as_u64(), range.end().as_u64()))
    }

    fn alloc_nodes(&mut self, count: usize, offset: u64) -> Result<(), ConvertError> {
        for _ in 0..count {
            if !self.nodes.attempt() {
                self.stats.no_memory = self.stats.no_memory.saturating_add(1);
                return Err(ConvertError::NoMemory {
                    offset: gpa(offset),
                });
            }
        }
        Ok(())
    }

    /// Converts `range` to `to`, all or nothing (shaped like KVM_SET_MEMORY_ATTRIBUTES2 on a
    /// guest_memfd, seed 002):
    ///
    /// 1. *Preallocate* the range-map nodes the commit needs (exactly) and one record per page
    ///    whose commit is deferred; any allocation may fail.
    /// 2. *Safety check* (to private): a page mapped by the host fails with EAGAIN at its
    ///    offset. A page with only transient references is accepted; its commit is deferred to
    ///    the last [`GuestMemfd::put_ref`] (seed 004).
    /// 3. *Prepare*: [`InvalidateHook::prepare`] for every run that changes (BLOCK first when
    ///    `mode.block_first`); on failure every prepared run is aborted.
    /// 4. *Invalidate*: the point of no return. [`InvalidateHook::invalidate`] cannot fail;
    ///    pages it could not zap are recorded as poisoned.
    /// 5. *Commit*: update and coalesce the runs, record deferred pages. Cannot fail.
    ///
    /// Folios are never split or freed by a conversion (seed 001). A range already in the
    /// target state succeeds without calling the hook. Converting to shared cancels pending
    /// conversions to private in the range.
    ///
    /// # Errors
    /// Every error leaves the state unchanged (counters aside) and comes from a phase before the
    /// point of no return (see [`ConvertError::phase`]): [`ConvertError::OutOfRange`]
    /// (validation), [`ConvertError::NoMemory`] (phase 1), [`ConvertError::Again`] (phase 2),
    /// [`ConvertError::HookFailed`] (phase 3).
    pub fn convert<H: InvalidateHook + ?Sized>(
        &mut self,
        range: GpaRange,
        to: Shareability,
        mode: ConvertMode,
        hook: &mut H,
    ) -> Result<ConvertReport, ConvertError> {
        let (s, e) = self.check_range(range)?;
        let runs: Vec<GpaRange> = self
            .attrs
            .runs_in(s, e)
            .filter(|&(_, _, v)| v != to)
            .filter_map(|(rs, re, _)| GpaRange::new(rs, re).ok())
            .collect();
        let cancels: Vec<u64> = match to {
            Shareability::Shared => self.pending.range(s..e).copied().collect(),
            Shareability::Private => Vec::new(),
        };
        if runs.is_empty() && cancels.is_empty() {
            self.stats.idempotent_conversions = self.stats.idempotent_conversions.saturating_add(1);
            return Ok(ConvertReport::noop(to));
        }

        // Which pages commit now (pieces) and which wait for their references (deferred).
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut deferred: Vec<u64> = Vec::new();
        for run in &runs {
            let (rs, re) = (run.start().as_u64(), run.end().as_u64());
            let mut cursor = rs;
            if to == Shareability::Private {
                for (&page, _) in self.host.range(rs..re).filter(|(_, h)| h.refs > 0) {
                    if page > cursor {
                        pieces.push((cursor, page));
                    }
                    deferred.push(page);
                    cursor = page + PAGE;
                }
            }
            if cursor < re {
                pieces.push((cursor, re));
            }
        }
        let new_records: Vec<u64> = deferred
            .iter()
            .copied()
            .filter(|p| !self.pending.contains(p))
            .collect();

        // Phase 1: preallocate.
        let mut nodes = 0usize;
        for &(ps, pe) in &pieces {
            let need = self.attrs.nodes_needed(ps, pe, to);
            self.alloc_nodes(need, ps)?;
            nodes += need;
        }
        for &page in &new_records {
            self.alloc_nodes(1, page)?;
        }

        // Phase 2: safety check.
        if to == Shareability::Private {
            for run in &runs {
                let r = run.start().as_u64()..run.end().as_u64();
                if let Some((&page, _)) = self.host.range(r).find(|(_, h)| h.maps > 0) {
                    self.stats.eagain = self.stats.eagain.saturating_add(1);
                    return Err(ConvertError::Again { offset: gpa(page) });
                }
            }
        }

        // Phase 3: prepare (and BLOCK).
        let ctx = InvalidateCtx {
            reason: match to {
                Shareability::Shared => InvalidateReason::ToShared,
                Shareability::Private => InvalidateReason::ToPrivate,
            },
            block_first: mode.block_first,
        };
        if let Err(err) = prepare_all(hook, &runs, ctx) {
            self.stats.hook_failures = self.stats.hook_failures.saturating_add(1);
            return Err(err);
        }

        // Phase 4: invalidate. Point of no return; nothing below can fail.
        let poisoned = self.invalidate_runs(hook, &runs, ctx);

        // Phase 5: commit.
        let mut used = 0usize;
        let mut pages = 0u64;
        for &(ps, pe) in &pieces {
            used += self.attrs.set(ps, pe, to);
            pages += (pe - ps) / PAGE;
        }
        debug_assert_eq!(used, nodes);
        for &page in &new_records {
            self.pending.insert(page);
        }
        for page in &cancels {
            self.pending.remove(page);
        }
        let st = &mut self.stats;
        match to {
            Shareability::Shared => {
                if !pieces.is_empty() {
                    st.conversions_to_shared = st.conversions_to_shared.saturating_add(1);
                }
                st.pages_to_shared = st.pages_to_shared.saturating_add(pages);
            }
            Shareability::Private => {
                st.conversions_to_private = st.conversions_to_private.saturating_add(1);
                st.pages_to_private = st.pages_to_private.saturating_add(pages);
            }
        }
        st.deferred_pages = st.deferred_pages.saturating_add(new_records.len() as u64);
        st.deferred_cancelled = st.deferred_cancelled.saturating_add(cancels.len() as u64);
        Ok(ConvertReport {
            to,
            invalidated: runs,
            pages_committed: pages,
            deferred: deferred.into_iter().map(gpa).collect(),
            cancelled: cancels.len() as u64,
            poisoned,
        })
    }

    /// Phase 4 of conversions and hole punches: returns the number of newly poisoned pages.
    fn invalidate_runs<H: InvalidateHook + ?Sized>(
        &mut self,
        hook: &mut H,
        runs: &[GpaRange],
        ctx: InvalidateCtx,
    ) -> u64 {
        let folios = &mut self.folios;
        let stats = &mut self.stats;
        let (level, size) = (self.folio_level, self.size);
        let mut poisoned = 0u64;
        for run in runs {
            hook.invalidate(*run, ctx, &mut |at| {
                if record_poison(folios, stats, level, size, at) {
                    poisoned += 1;
                }
            });
        }
        poisoned
    }

    /// Removes `range` from the file (fallocate PUNCH_HOLE): invalidates the folio-backed part,
    /// then drops the pages. A folio goes back to the pool only when none of its sub-pages is
    /// left (lazy hole punch, seed 001); its poisoned frames are leaked (retired in the pool,
    /// never reused) and counted. Shareability is not changed.
    ///
    /// # Errors
    /// All before the point of no return, leaving the state unchanged:
    /// [`ConvertError::OutOfRange`]; [`ConvertError::Again`] at the first page the host maps or
    /// references (unmap and put first); [`ConvertError::HookFailed`].
    pub fn punch_hole<H: InvalidateHook + ?Sized>(
        &mut self,
        range: GpaRange,
        hook: &mut H,
    ) -> Result<PunchReport, ConvertError> {
        let (s, e) = self.check_range(range)?;
        if let Some((&page, _)) = self.host.range(s..e).next() {
            self.stats.eagain = self.stats.eagain.saturating_add(1);
            return Err(ConvertError::Again { offset: gpa(page) });
        }
        let fsize = self.folio_level.size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for base in self.folios.bases_in(self.folio_base(s), e) {
            let (rs, re) = (base.max(s), (base + fsize).min(e));
            match runs.last_mut() {
                Some(last) if last.1 == rs => last.1 = re,
                _ => runs.push((rs, re)),
            }
        }
        let runs: Vec<GpaRange> = runs
            .into_iter()
            .filter_map(|(rs, re)| GpaRange::new(rs, re).ok())
            .collect();
        if runs.is_empty() {
            return Ok(PunchReport::default());
        }
        let ctx = InvalidateCtx {
            reason: InvalidateReason::PunchHole,
            block_first: false,
        };
        if let Err(err) = prepare_all(hook, &runs, ctx) {
            self.stats.hook_failures = self.stats.hook_failures.saturating_add(1);
            return Err(err);
        }
        let poisoned = self.invalidate_runs(hook, &runs, ctx);

        let mut report = PunchReport {
            invalidated: runs,
            poisoned,
            ..PunchReport::default()
        };
        for base in self.folios.bases_in(self.folio_base(s), e) {
            let Some(folio) = self.folios.get_mut(base) else {
                continue;
            };
            let first = (base.max(s) - base) / PAGE;
            let last = ((base + fsize).min(e) - base) / PAGE;
            if first == 0 && last == folio.level.pages_4k() {
                // The whole folio goes: no need to clear its pages one by one.
                report.pages_released += folio.present.ones();
            } else {
                for i in first..last {
                    if folio.present.clear(i) {
                        report.pages_released += 1;
                    }
                }
                if folio.present.ones() > 0 {
                    continue;
                }
            }
            let Some(folio) = self.folios.remove(base) else {
                continue;
            };
            let bad: Vec<u64> = folio.poison.iter_ones().collect();
            match self.pool_mut().free(folio.hpa, folio.level, &bad) {
                Ok(_) => {}
                Err(err) => log::error!("gmem: freeing folio at {base:#x}: {err}"),
            }
            report.folios_freed += 1;
            report.frames_leaked += bad.len() as u64;
            self.stats.folios_freed.add(folio.level, 1);
        }
        let st = &mut self.stats;
        st.leaked_frames = st.leaked_frames.saturating_add(report.frames_leaked);
        st.pages_punched = st.pages_punched.saturating_add(report.pages_released);
        Ok(report)
    }
}
