//! The one cost table that turns exact counts into modelled time. Every constant names its
//! source; "model" marks a value chosen here where no public figure exists. Reports label the
//! result as modelled: it is arithmetic over counts, not a measurement.

/// Modelled cost of each event, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CostTable {
    /// A TDCALL round trip into the module and back (ACCEPT bookkeeping, VEINFO.GET, ...).
    /// Model: chosen so that a 4K EPT exit + AUG + ACCEPT totals ~12.4 us, inside the
    /// 12-15 us per 4K page derived from asterinas PR #1691 / #3640 (8 GB eager 4K accept in
    /// 25-30 s, single vCPU).
    pub tdcall: u64,
    /// Zeroing one 4K page inside ACCEPT. Model: ~10 GB/s memory bandwidth.
    pub zero_4k: u64,
    /// An EPT-violation TD exit handled by the host, including one 4K AUG: 8 us on an idle
    /// host (dstack PR #1220; 153 us under load).
    pub ept_exit: u64,
    /// A #VE delivered to the guest and the handler's entry and exit. Model: same order as an
    /// exception round trip plus VEINFO.GET.
    pub ve: u64,
    /// One TDH.MEM.PAGE.DEMOTE: ~10 us on Sapphire Rapids, idle host (KVM list, TDX huge page
    /// v3 review).
    pub demote: u64,
    /// One TDH.MEM.PAGE.PROMOTE. Model: taken equal to DEMOTE.
    pub promote: u64,
    /// One TDH.MEM.SEPT.ADD, BLOCK, UNBLOCK, TRACK or REMOVE. Model: a short SEAMCALL.
    pub seamcall: u64,
    /// One MapGPA exit to the VMM and back, per 2 MiB chunk (KVM_HC_MAP_GPA_RANGE to userspace
    /// and KVM_SET_MEMORY_ATTRIBUTES). Model.
    pub map_gpa_chunk: u64,
}

impl CostTable {
    /// The default table (see each field for its source).
    pub const DEFAULT: CostTable = CostTable {
        tdcall: 4_000,
        zero_4k: 400,
        ept_exit: 8_000,
        ve: 2_000,
        demote: 10_000,
        promote: 10_000,
        seamcall: 1_000,
        map_gpa_chunk: 5_000,
    };
}

impl CostTable {
    /// Every constant with its field name, in declaration order (for tables of the costs).
    pub fn entries(&self) -> [(&'static str, u64); 8] {
        [
            ("tdcall", self.tdcall),
            ("zero_4k", self.zero_4k),
            ("ept_exit", self.ept_exit),
            ("ve", self.ve),
            ("demote", self.demote),
            ("promote", self.promote),
            ("seamcall", self.seamcall),
            ("map_gpa_chunk", self.map_gpa_chunk),
        ]
    }
}

impl Default for CostTable {
    fn default() -> Self {
        CostTable::DEFAULT
    }
}
