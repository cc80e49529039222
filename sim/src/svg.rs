//! A picture of the TD's memory: one cell per 2 MiB block (or per group of blocks for large
//! TDs), coloured by state and mapping size, with a legend. Readable at a glance: green is
//! private memory mapped huge, light green private memory mapped 4K, blue shared, amber
//! pending acceptance, grey not mapped, red error pages.

use std::fmt::Write as _;

use accept::abi::{Gpa, GpaRange};

use hostvmm::gmem::Shareability;
use hostvmm::module::SeptState;
use hostvmm::vmm::Host;

const M2: u64 = 2 << 20;

/// How a block (or group of blocks) is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Nothing mapped.
    Unmapped,
    /// Shared with the host.
    Shared,
    /// Private, mapped by a 1G leaf.
    Private1G,
    /// Private, mapped by a 2M leaf.
    Private2M,
    /// Private, mapped by 4K leaves.
    Private4K,
    /// Shared and private 4K pages mixed.
    Mixed,
    /// Mapped but not yet accepted (PENDING).
    Pending,
    /// Holds error pages.
    Poisoned,
}

impl Class {
    const ALL: [(Class, &'static str, &'static str); 8] = [
        (Class::Private1G, "#1b5e20", "private, 1G mapping"),
        (Class::Private2M, "#2e7d32", "private, 2M mapping"),
        (Class::Private4K, "#9ccc65", "private, 4K mappings (split)"),
        (Class::Pending, "#ffb300", "pending (mapped, not accepted)"),
        (Class::Shared, "#1e88e5", "shared"),
        (Class::Mixed, "#26a69a", "shared and private 4K pages"),
        (Class::Unmapped, "#e0e0e0", "not mapped"),
        (Class::Poisoned, "#d32f2f", "error pages (poisoned)"),
    ];

    fn colour(self) -> &'static str {
        Class::ALL
            .iter()
            .find(|(c, _, _)| *c == self)
            .map_or("#000000", |(_, col, _)| col)
    }
}

/// Classifies the 2 MiB block at `base`.
pub fn classify(host: &Host, base: u64) -> Class {
    let Ok(range) = GpaRange::from_len(base, M2) else {
        return Class::Unmapped;
    };
    let shared_any = {
        let g = host.gmem();
        if g.poisoned_pages() > 0
            && (0..512).any(|i| g.is_poisoned(Gpa::new_truncate(base + i * 4096)))
        {
            return Class::Poisoned;
        }
        if g.is_uniform(range, Shareability::Shared) {
            return Class::Shared;
        }
        !g.is_uniform(range, Shareability::Private)
    };
    let module = host.module();
    let leaf = module.leaf(Gpa::new_truncate(base));
    if leaf.state.is_leaf() && leaf.level >= 1 {
        return match leaf.state {
            SeptState::Mapped if leaf.level == 2 => Class::Private1G,
            SeptState::Mapped => Class::Private2M,
            SeptState::Pending | SeptState::PendingBlocked => Class::Pending,
            _ => Class::Unmapped,
        };
    }
    let (mut mapped, mut pending) = (0u32, 0u32);
    for i in 0..512 {
        match module.leaf(Gpa::new_truncate(base + i * 4096)).state {
            SeptState::Mapped | SeptState::Blocked => mapped += 1,
            SeptState::Pending | SeptState::PendingBlocked => pending += 1,
            _ => {}
        }
    }
    if pending > 0 {
        Class::Pending
    } else if mapped > 0 && shared_any {
        Class::Mixed
    } else if mapped > 0 {
        Class::Private4K
    } else if shared_any {
        Class::Shared
    } else {
        Class::Unmapped
    }
}

/// Draws `memory` bytes of `host`'s TD as an SVG document.
pub fn render(host: &Host, memory: u64, title: &str) -> String {
    let blocks = memory / M2;
    // At most 128 x 128 cells; a cell covers `per` blocks and shows the most notable class.
    let per = blocks.div_ceil(128 * 128).max(1);
    let cells = blocks.div_ceil(per);
    let cols = 128u64.min(cells).max(1);
    let rows = cells.div_ceil(cols);
    let (cw, ch) = (6u64, 6u64);
    // The grid starts right of a column of row labels: the GPA each labelled row starts at.
    let (margin, top) = (10u64, 40u64);
    let left = margin + LABEL_WIDTH;
    let width = left + margin + cols * cw + 260;
    let height = (top + rows * ch + 20).max(top + 8 * 22 + 20);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{margin}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{margin}" y="34" fill="#555">one cell = {} MiB, rows of {} cells, GPA increasing left to right, top to bottom</text>"##,
        per * 2,
        cols
    );
    let mut row_runs: Vec<(u64, u64, u64, Class)> = Vec::new();
    for cell in 0..cells {
        let mut class = Class::Unmapped;
        for b in cell * per..((cell + 1) * per).min(blocks) {
            class = class.max(classify(host, b * M2));
        }
        let (r, c) = (cell / cols, cell % cols);
        match row_runs.last_mut() {
            Some((rr, _, len, cl)) if *rr == r && *cl == class => *len += 1,
            _ => row_runs.push((r, c, 1, class)),
        }
    }
    for (r, c, len, class) in row_runs {
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}"/>"#,
            left + c * cw,
            top + r * ch,
            len * cw,
            ch,
            class.colour()
        );
    }
    let row_bytes = cols * per * M2;
    for r in (0..rows).step_by(LABEL_EVERY_ROWS as usize) {
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="end" fill="#333">{}</text>"##,
            left - 4,
            top + r * ch + ch,
            gpa_label(r * row_bytes)
        );
    }
    let lx = left + margin + cols * cw;
    for (i, (class, colour, label)) in Class::ALL.iter().enumerate() {
        let y = top + i as u64 * 22;
        debug_assert!(Class::ALL[i].0 == *class);
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{y}" width="14" height="14" fill="{colour}"/><text x="{}" y="{}">{label}</text>"#,
            lx + 20,
            y + 12
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Width of the row-label column.
const LABEL_WIDTH: u64 = 110;
/// A row label every this many rows (labels are taller than a row).
const LABEL_EVERY_ROWS: u64 = 4;

/// A GPA as a row label: hexadecimal, with its size in GiB where it is a whole number of them.
fn gpa_label(gpa: u64) -> String {
    const G: u64 = 1 << 30;
    if gpa % G == 0 {
        format!("{gpa:#x} ({} GiB)", gpa / G)
    } else {
        format!("{gpa:#x}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use hostvmm::kvm::YieldKicker;
    use hostvmm::vmm::HostConfig;

    #[test]
    fn rows_are_labelled_with_the_gpa_they_start_at() {
        let memory = 64 << 30;
        let host = Host::new(HostConfig::new(memory, 1), Arc::new(YieldKicker)).expect("host");
        let svg = render(&host, memory, "t");
        // 32768 blocks of 2M in cells of 2 blocks, rows of 128 cells: 512 MiB a row, a label
        // every 4 rows, so every 2 GiB.
        assert!(svg.contains(">0x0 (0 GiB)</text>"), "{svg}");
        assert!(svg.contains(">0x80000000 (2 GiB)</text>"));
        assert!(svg.contains(">0xf80000000 (62 GiB)</text>"));
        assert!(!svg.contains("(64 GiB)"));
    }

    #[test]
    fn labels_say_gib_only_for_whole_gib() {
        assert_eq!(gpa_label(3 << 30), "0xc0000000 (3 GiB)");
        assert_eq!(gpa_label(3 << 20), "0x300000");
    }
}
