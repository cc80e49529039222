//! The Secure-EPT tree: 512-entry nodes allocated on demand, one 64-bit word per entry.
//!
//! An entry word holds the entry state, a lock bit, the host physical address (leaf) or the
//! arena index of the child node (non-leaf), and the 2M/1G ACCEPT progress counter. The block
//! epoch (BEPOCH, kept by the module in the PAMT) lives in a per-node side array that is only
//! allocated once an entry of that node is blocked, so a node costs 4 KiB like a real S-EPT
//! page. Memory use therefore scales with the number of nodes, not with the TD size.
//!
//! This module does no locking of its own. The caller holds the tree lock (a `ShardedLock`, the memory
//! lock of the arena: shared for walks and entry updates, exclusive for node allocation, node
//! release and BEPOCH updates) and uses the entry lock bit and host-priority bit as the module
//! uses TDEL and TDHP (`tdx_locks.h` sept_lock_acquire_host / sept_lock_acquire_guest). The
//! module's own S-EPT tree lock, with its shared and exclusive modes, is modelled separately in
//! `host.rs`. The architectural entry encoding the module reports in RCX on failures is built
//! by [`Word::arch`] (`sept_manager.c` set_arch_septe_details_in_vmm_regs).

use std::sync::atomic::{AtomicU64, Ordering};

/// Entries per S-EPT node.
pub(crate) const ENTRIES: usize = 512;

/// A Secure-EPT entry state (spec §3, non-migration subset; REMOVED is treated as FREE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeptState {
    /// Not mapped.
    Free,
    /// Non-leaf, points to a child S-EPT page.
    NlMapped,
    /// Non-leaf, blocked.
    NlBlocked,
    /// Accepted leaf, RWX.
    Mapped,
    /// Blocked leaf (was MAPPED).
    Blocked,
    /// Leaf added by PAGE.AUG, not yet accepted.
    Pending,
    /// Blocked pending leaf.
    PendingBlocked,
}

impl SeptState {
    /// All states, in encoding order.
    pub const ALL: [SeptState; 7] = [
        SeptState::Free,
        SeptState::NlMapped,
        SeptState::NlBlocked,
        SeptState::Mapped,
        SeptState::Blocked,
        SeptState::Pending,
        SeptState::PendingBlocked,
    ];

    /// The public state number the module reports in RDX bits 15:8 (`sept_state_lookup.h`).
    pub const fn public_state(self) -> u8 {
        match self {
            SeptState::Free => 0,
            SeptState::Blocked => 1,
            SeptState::Pending => 2,
            SeptState::PendingBlocked => 3,
            SeptState::Mapped => 4,
            SeptState::NlBlocked => 0x81,
            SeptState::NlMapped => 0x84,
        }
    }

    /// True for the four leaf states.
    pub const fn is_leaf(self) -> bool {
        matches!(
            self,
            SeptState::Mapped | SeptState::Blocked | SeptState::Pending | SeptState::PendingBlocked
        )
    }

    /// True for NL_MAPPED and NL_BLOCKED.
    pub const fn is_non_leaf(self) -> bool {
        matches!(self, SeptState::NlMapped | SeptState::NlBlocked)
    }

    /// True for any blocked state.
    pub const fn is_blocked(self) -> bool {
        matches!(
            self,
            SeptState::NlBlocked | SeptState::Blocked | SeptState::PendingBlocked
        )
    }

    /// The state RANGE.BLOCK moves to, `None` when the state cannot be blocked.
    pub const fn blocked(self) -> Option<SeptState> {
        match self {
            SeptState::NlMapped => Some(SeptState::NlBlocked),
            SeptState::Mapped => Some(SeptState::Blocked),
            SeptState::Pending => Some(SeptState::PendingBlocked),
            _ => None,
        }
    }

    /// The unblocked counterpart (identity for unblocked states).
    pub const fn unblocked(self) -> SeptState {
        match self {
            SeptState::NlBlocked => SeptState::NlMapped,
            SeptState::Blocked => SeptState::Mapped,
            SeptState::PendingBlocked => SeptState::Pending,
            other => other,
        }
    }

    const fn code(self) -> u64 {
        match self {
            SeptState::Free => 0,
            SeptState::NlMapped => 1,
            SeptState::NlBlocked => 2,
            SeptState::Mapped => 3,
            SeptState::Blocked => 4,
            SeptState::Pending => 5,
            SeptState::PendingBlocked => 6,
        }
    }

    const fn from_code(code: u64) -> SeptState {
        match code {
            1 => SeptState::NlMapped,
            2 => SeptState::NlBlocked,
            3 => SeptState::Mapped,
            4 => SeptState::Blocked,
            5 => SeptState::Pending,
            6 => SeptState::PendingBlocked,
            _ => SeptState::Free,
        }
    }
}

const STATE_MASK: u64 = 0xF;
const LOCK_BIT: u64 = 1 << 4;
const HP_BIT: u64 = 1 << 5;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const PROGRESS_SHIFT: u32 = 52;
const PROGRESS_MASK: u64 = 0x3FF << PROGRESS_SHIFT;

/// One entry word (model encoding, not the architectural one): state in bits 3:0, lock bit 4
/// (TDEL), host-priority bit 5 (TDHP), address bits 51:12 (HPA of a leaf, or `child index << 12` of a non-leaf), ACCEPT progress
/// counter (in chunks, 0..=512) in bits 61:52.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Word(pub(crate) u64);

impl Word {
    pub(crate) const FREE: Word = Word(0);

    pub(crate) const fn leaf(state: SeptState, hpa: u64) -> Word {
        Word((hpa & ADDR_MASK) | state.code())
    }

    pub(crate) const fn non_leaf(state: SeptState, child: usize) -> Word {
        Word((((child as u64) << 12) & ADDR_MASK) | state.code())
    }

    pub(crate) const fn state(self) -> SeptState {
        SeptState::from_code(self.0 & STATE_MASK)
    }

    pub(crate) const fn locked(self) -> bool {
        self.0 & LOCK_BIT != 0
    }

    pub(crate) const fn with_lock(self) -> Word {
        Word(self.0 | LOCK_BIT)
    }

    pub(crate) const fn unlocked(self) -> Word {
        Word(self.0 & !LOCK_BIT)
    }

    /// The host-priority bit: a host SEAMCALL failed to take this entry's lock and guest
    /// calls must leave the entry to it (`tdx_locks.h` sept_lock_acquire_host).
    pub(crate) const fn host_priority(self) -> bool {
        self.0 & HP_BIT != 0
    }

    pub(crate) const fn with_hp(self) -> Word {
        Word(self.0 | HP_BIT)
    }

    pub(crate) const fn without_hp(self) -> Word {
        Word(self.0 & !HP_BIT)
    }

    /// The architectural S-EPT entry the module reports in RCX on failures
    /// (`sept_manager.c` set_arch_septe_details_in_vmm_regs): a FREE entry is only SVE
    /// (bit 63); a non-leaf keeps only RWX (7 when NL_MAPPED, 0 when NL_BLOCKED, which
    /// RANGE.BLOCK clears) and PS = 0; a leaf keeps RWX (7 only when MAPPED), the memory type WB
    /// (bits 5:3 = 6), IPAT (bit 6), PS (bit 7, set for 4K leaves too), the HPA and SVE. The
    /// HPA field of a 2M PENDING leaf also carries its ACCEPT counter (bits 20:12): the
    /// source copies the entry before clearing the counter in its local copy.
    pub(crate) const fn arch(self, level: u8) -> u64 {
        const SVE: u64 = 1 << 63;
        const RWX: u64 = 7;
        const LEAF_ATTRS: u64 = (6 << 3) | (1 << 6) | (1 << 7);
        let state = self.state();
        match state {
            SeptState::Free => SVE,
            SeptState::NlMapped => RWX,
            SeptState::NlBlocked => 0,
            _ => {
                let rwx = if matches!(state, SeptState::Mapped) {
                    RWX
                } else {
                    0
                };
                let counter = if level == 1 && matches!(state, SeptState::Pending) {
                    (self.progress() & 0x1FF) << 12
                } else {
                    0
                };
                (self.hpa() | counter) | rwx | LEAF_ATTRS | SVE
            }
        }
    }

    /// HPA of a leaf.
    pub(crate) const fn hpa(self) -> u64 {
        self.0 & ADDR_MASK
    }

    /// Arena index of the child node of a non-leaf.
    pub(crate) const fn child(self) -> usize {
        ((self.0 & ADDR_MASK) >> 12) as usize
    }

    pub(crate) const fn progress(self) -> u64 {
        (self.0 & PROGRESS_MASK) >> PROGRESS_SHIFT
    }

    pub(crate) const fn with_state(self, state: SeptState) -> Word {
        Word((self.0 & !STATE_MASK) | state.code())
    }

    pub(crate) const fn with_progress(self, progress: u64) -> Word {
        Word((self.0 & !PROGRESS_MASK) | ((progress << PROGRESS_SHIFT) & PROGRESS_MASK))
    }
}

/// One 512-entry S-EPT page.
#[derive(Debug)]
pub(crate) struct Node {
    /// Level of the entries in this node (0 = 4K entries).
    pub(crate) level: u8,
    /// HPA of the S-EPT page the host supplied (0 for the root, which lives in the TDCS).
    pub(crate) hpa: u64,
    pub(crate) entries: Box<[AtomicU64]>,
    /// BEPOCH per entry, allocated when an entry of this node is first blocked. Written only
    /// under the exclusive tree lock.
    pub(crate) bepoch: Option<Box<[u64]>>,
}

impl Node {
    fn new(level: u8, hpa: u64) -> Node {
        Node {
            level,
            hpa,
            entries: (0..ENTRIES).map(|_| AtomicU64::new(0)).collect(),
            bepoch: None,
        }
    }

    /// A node whose entries are the given words.
    fn with_words(level: u8, hpa: u64, words: impl Iterator<Item = Word>) -> Node {
        Node {
            level,
            hpa,
            entries: words.map(|w| AtomicU64::new(w.0)).collect(),
            bepoch: None,
        }
    }
}

/// Index of `gpa` in a node whose entries are at `level`.
pub(crate) const fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * level as u32)) & 0x1FF) as usize
}

/// Bytes mapped by one entry at `level` (`level` <= 4).
pub(crate) const fn level_size(level: u8) -> u64 {
    1u64 << (12 + 9 * level as u32)
}

/// Where a walk ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkEnd {
    pub(crate) node: usize,
    pub(crate) idx: usize,
    pub(crate) level: u8,
    pub(crate) word: Word,
    /// True when the walk reached the requested level.
    pub(crate) reached: bool,
}

/// The tree: an arena of nodes, node 0 is the root.
#[derive(Debug)]
pub(crate) struct Tree {
    nodes: Vec<Option<Node>>,
    free_slots: Vec<usize>,
    live: usize,
    top: u8,
}

impl Tree {
    /// A tree with only the root; `top` is the level of the root's entries (3 or 4).
    pub(crate) fn new(top: u8) -> Tree {
        Tree {
            nodes: vec![Some(Node::new(top, 0))],
            free_slots: Vec::new(),
            live: 1,
            top,
        }
    }

    /// Number of live nodes, the root included.
    pub(crate) fn live_nodes(&self) -> usize {
        self.live
    }

    pub(crate) fn node(&self, node: usize) -> Option<&Node> {
        self.nodes.get(node).and_then(Option::as_ref)
    }

    pub(crate) fn slot(&self, node: usize, idx: usize) -> Option<&AtomicU64> {
        self.node(node).and_then(|n| n.entries.get(idx))
    }

    pub(crate) fn load(&self, node: usize, idx: usize) -> Word {
        self.slot(node, idx)
            .map_or(Word::FREE, |s| Word(s.load(Ordering::Acquire)))
    }

    /// Stores a word (exclusive access).
    pub(crate) fn store_mut(&mut self, node: usize, idx: usize, word: Word) {
        if let Some(slot) = self
            .nodes
            .get_mut(node)
            .and_then(Option::as_mut)
            .and_then(|n| n.entries.get_mut(idx))
        {
            *slot.get_mut() = word.0;
        }
    }

    pub(crate) fn bepoch(&self, node: usize, idx: usize) -> u64 {
        self.node(node)
            .and_then(|n| n.bepoch.as_ref())
            .and_then(|b| b.get(idx).copied())
            .unwrap_or(0)
    }

    pub(crate) fn set_bepoch(&mut self, node: usize, idx: usize, epoch: u64) {
        if let Some(n) = self.nodes.get_mut(node).and_then(Option::as_mut) {
            let b = n
                .bepoch
                .get_or_insert_with(|| vec![0u64; ENTRIES].into_boxed_slice());
            if let Some(e) = b.get_mut(idx) {
                *e = epoch;
            }
        }
    }

    /// Walks from the root towards `target` level. The module's walk (`sept_manager.c`
    /// secure_ept_walk) stops at the requested level, at a leaf, or at any entry without
    /// permissions: FREE, and NL_BLOCKED because RANGE.BLOCK clears a page table's RWX. Every
    /// SEAMCALL and TDCALL walks that way (`through_blocked` false); `through_blocked` serves
    /// only introspection, which reads the tree as a host's mirror page table would.
    pub(crate) fn walk(&self, gpa: u64, target: u8, through_blocked: bool) -> WalkEnd {
        let mut node = 0usize;
        let mut level = self.top;
        loop {
            let idx = index(gpa, level);
            let word = self.load(node, idx);
            let end = WalkEnd {
                node,
                idx,
                level,
                word,
                reached: level == target,
            };
            if level <= target || level == 0 {
                return end;
            }
            match word.state() {
                SeptState::NlMapped => {}
                SeptState::NlBlocked if through_blocked => {}
                _ => return end,
            }
            node = word.child();
            level -= 1;
        }
    }

    /// Allocates a node and returns its index.
    pub(crate) fn alloc(&mut self, node: Node) -> usize {
        self.live = self.live.saturating_add(1);
        if let Some(i) = self.free_slots.pop() {
            if let Some(slot) = self.nodes.get_mut(i) {
                *slot = Some(node);
                return i;
            }
        }
        self.nodes.push(Some(node));
        self.nodes.len() - 1
    }

    pub(crate) fn alloc_empty(&mut self, level: u8, hpa: u64) -> usize {
        self.alloc(Node::new(level, hpa))
    }

    pub(crate) fn alloc_words(
        &mut self,
        level: u8,
        hpa: u64,
        words: impl Iterator<Item = Word>,
    ) -> usize {
        self.alloc(Node::with_words(level, hpa, words))
    }

    /// Frees a node (never the root) and returns it.
    pub(crate) fn free(&mut self, node: usize) -> Option<Node> {
        if node == 0 {
            return None;
        }
        let n = self.nodes.get_mut(node).and_then(Option::take)?;
        self.free_slots.push(node);
        self.live = self.live.saturating_sub(1);
        Some(n)
    }

    /// Words of a node (for checks over all 512 children).
    pub(crate) fn words(&self, node: usize) -> impl Iterator<Item = Word> + '_ {
        self.node(node)
            .into_iter()
            .flat_map(|n| n.entries.iter().map(|e| Word(e.load(Ordering::Acquire))))
    }

    /// Every live (node index, node) pair.
    pub(crate) fn live(&self) -> impl Iterator<Item = (usize, &Node)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_fields_round_trip() {
        let w = Word::leaf(SeptState::Pending, 0x1234_5000).with_progress(512);
        assert_eq!(w.state(), SeptState::Pending);
        assert_eq!(w.hpa(), 0x1234_5000);
        assert_eq!(w.progress(), 512);
        assert!(!w.locked());
        assert!(w.with_lock().locked());
        assert_eq!(w.with_lock().unlocked(), w);
        let nl = Word::non_leaf(SeptState::NlMapped, 77);
        assert_eq!(nl.child(), 77);
        assert_eq!(nl.state(), SeptState::NlMapped);
    }

    #[test]
    fn public_states_match_the_spec() {
        let nums: Vec<u8> = SeptState::ALL.iter().map(|s| s.public_state()).collect();
        assert_eq!(nums, vec![0, 0x84, 0x81, 4, 1, 2, 3]);
    }

    #[test]
    fn walk_stops_at_missing_levels() {
        let mut t = Tree::new(3);
        let end = t.walk(0x20_0000, 1, true);
        assert!(!end.reached);
        assert_eq!(end.level, 3);
        let child = t.alloc_empty(2, 0x1000);
        t.store_mut(0, 0, Word::non_leaf(SeptState::NlMapped, child));
        let end = t.walk(0x20_0000, 1, true);
        assert_eq!(end.level, 2);
        assert_eq!(t.live_nodes(), 2);
        assert!(t.free(child).is_some());
        assert_eq!(t.live_nodes(), 1);
        assert!(t.free(0).is_none());
    }
}
