//! A picture of the TD's memory: one cell per 2 MiB block (or per group of blocks for large
//! TDs), coloured by state and mapping size, with a legend. Readable at a glance: green is
//! private memory mapped huge, light green private memory mapped 4K, blue shared, amber
//! pending acceptance, grey not mapped, red error pages.

use std::fmt::Write as _;

use accept::abi::{Gpa, GpaRange};

use crate::gmem::Shareability;
use crate::module::SeptState;
use crate::vmm::Host;

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
    let (left, top) = (10u64, 40u64);
    let width = left * 2 + cols * cw + 260;
    let height = (top + rows * ch + 20).max(top + 8 * 22 + 20);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="34" fill="#555">one cell = {} MiB, rows of {} cells, GPA increasing left to right, top to bottom</text>"##,
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
    let lx = left * 2 + cols * cw;
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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
