//! Deterministic fault injection: rules consulted at the entry of every module call.
//!
//! A rule matches a call kind and optionally a GPA (the page-info GPA, bits 11:0 cleared); it
//! lets `skip` matching calls through, then answers the next `count` matching calls with its
//! result instead of running them. Rules are checked in the order they were added; the first
//! one that fires wins. With no rules armed the check is one relaxed atomic load; without the
//! `testing` feature there are no rules and the check is a constant `None`.

#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "testing")]
use std::sync::{Mutex, PoisonError};

use accept::abi::TdxStatus;

use super::stats::CallKind;

/// What an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultResult {
    /// `TDX_OPERAND_BUSY` with the call's usual operand (RCX for GPA calls, TD_EPOCH for TRACK).
    Busy,
    /// `TDX_INTERRUPTED_RESTARTABLE`; for ACCEPT, the "interrupted, re-execute" outcome.
    InterruptedRestartable,
    /// This exact status.
    Status(TdxStatus),
}

/// One fault-injection rule.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// The call to intercept.
    pub call: CallKind,
    /// Only calls on this GPA (4K aligned, shared bit as passed); `None` matches any.
    pub gpa: Option<u64>,
    /// Matching calls to let through before firing.
    pub skip: u64,
    /// Matching calls to answer with `result` (then the rule is dropped).
    pub count: u64,
    /// The injected answer.
    pub result: FaultResult,
}

#[cfg(feature = "testing")]
impl FaultRule {
    /// A rule that answers the next matching call of `call` with `result`.
    pub const fn once(call: CallKind, result: FaultResult) -> FaultRule {
        FaultRule {
            call,
            gpa: None,
            skip: 0,
            count: 1,
            result,
        }
    }
}

#[cfg(feature = "testing")]
#[derive(Debug, Default)]
pub(crate) struct Injector {
    armed: AtomicBool,
    rules: Mutex<Vec<FaultRule>>,
}

#[cfg(feature = "testing")]
impl Injector {
    pub(crate) fn add(&self, rule: FaultRule) {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        if rule.count > 0 {
            rules.push(rule);
        }
        self.armed.store(!rules.is_empty(), Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        rules.clear();
        self.armed.store(false, Ordering::Release);
    }

    /// The injected result for this call, if a rule fires.
    pub(crate) fn check(&self, call: CallKind, gpa: Option<u64>) -> Option<FaultResult> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let page = gpa.map(|g| g & !0xFFF);
        let mut fired = None;
        for rule in rules.iter_mut() {
            if rule.call != call || (rule.gpa.is_some() && rule.gpa.map(|g| g & !0xFFF) != page) {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            rule.count = rule.count.saturating_sub(1);
            fired = Some(rule.result);
            break;
        }
        rules.retain(|r| r.count > 0);
        self.armed.store(!rules.is_empty(), Ordering::Release);
        fired
    }
}

/// Without the `testing` feature: no rules, nothing ever fires.
#[cfg(not(feature = "testing"))]
#[derive(Debug, Default)]
pub(crate) struct Injector {}

#[cfg(not(feature = "testing"))]
impl Injector {
    /// Always `None`: the callers' injected-fault branches compile away.
    #[inline(always)]
    pub(crate) fn check(&self, _call: CallKind, _gpa: Option<u64>) -> Option<FaultResult> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_then_fire_count_times() {
        let inj = Injector::default();
        inj.add(FaultRule {
            call: CallKind::PageAug,
            gpa: Some(0x20_0000),
            skip: 1,
            count: 2,
            result: FaultResult::Busy,
        });
        assert_eq!(inj.check(CallKind::PageAug, Some(0x40_0000)), None);
        assert_eq!(inj.check(CallKind::PageRemove, Some(0x20_0000)), None);
        assert_eq!(inj.check(CallKind::PageAug, Some(0x20_0000)), None);
        assert_eq!(
            inj.check(CallKind::PageAug, Some(0x20_0001)),
            Some(FaultResult::Busy)
        );
        assert_eq!(
            inj.check(CallKind::PageAug, Some(0x20_0000)),
            Some(FaultResult::Busy)
        );
        assert_eq!(inj.check(CallKind::PageAug, Some(0x20_0000)), None);
    }
}
