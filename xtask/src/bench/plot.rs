//! The two SVG plots in `bench/`: modelled boot time vs memory size, and the bounce pool's
//! huge-mapping ratio over the steps of `swiotlb`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::matrix::{How, Key, Rep, GUESTS, HEADLINE_GIB, HEADLINE_VCPUS, HOSTS};
use super::report::gib_label;
use super::run::Row;

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Pair labels sharing one line, and its points (GiB, modelled seconds, extrapolated).
type Series = (Vec<String>, Vec<(u64, f64, bool)>);

/// Modelled boot time vs memory, log-log, one line per distinct behaviour.
pub(super) fn plot_boot_time(cells: &[(Key, How)], results: &BTreeMap<Key, Rep>) -> String {
    let mut series: Vec<Series> = Vec::new();
    for guest in GUESTS {
        for host in HOSTS {
            let pts: Vec<(u64, f64, bool)> = cells
                .iter()
                .filter(|(k, _)| {
                    k.scenario == "boot-eager"
                        && k.vcpus == HEADLINE_VCPUS
                        && k.guest == guest
                        && k.host == host
                })
                .filter_map(|(k, h)| {
                    results.get(k).map(|r| {
                        (
                            k.gib,
                            r.modelled_us as f64 / 1e6,
                            matches!(h, How::Extrapolated { .. }),
                        )
                    })
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let label = format!("{guest}/{host}");
            let same = series.iter_mut().find(|(_, p)| {
                p.len() == pts.len()
                    && p.iter()
                        .zip(&pts)
                        .all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() <= 0.01 * a.1.max(b.1))
            });
            match same {
                Some((labels, _)) => labels.push(label),
                None => series.push((vec![label], pts)),
            }
        }
    }
    let (w, h) = (900.0, 560.0);
    let (l, r, t, b) = (80.0, 330.0, 50.0, 60.0);
    let all: Vec<(u64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(g, s, _)| (g, s)))
        .collect();
    let (gmin, gmax) = all
        .iter()
        .fold((u64::MAX, 0u64), |(a, b), &(g, _)| (a.min(g), b.max(g)));
    let (smin, smax) = all
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), &(_, s)| (a.min(s), b.max(s)));
    let (gmin, gmax) = if gmin >= gmax {
        (gmin.max(1) as f64 / 2.0, gmin.max(1) as f64 * 2.0)
    } else {
        (gmin as f64, gmax as f64)
    };
    let ylo = 10f64.powf(smin.max(1e-3).log10().floor());
    let yhi = 10f64.powf(smax.max(1e-3).log10().ceil()).max(ylo * 10.0);
    let x = |g: f64| l + (g.log2() - gmin.log2()) / (gmax.log2() - gmin.log2()) * (w - l - r);
    let y = |s: f64| {
        h - b - (s.max(ylo).log10() - ylo.log10()) / (yhi.log10() - ylo.log10()) * (h - t - b)
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="25" font-size="15" text-anchor="middle">Modelled eager boot time vs memory ({HEADLINE_VCPUS} vCPUs, boot-eager)</text>"#,
        (l + w - r) / 2.0
    );
    // Axes and grid.
    let mut d = ylo;
    while d <= yhi * 1.0001 {
        let yy = y(d);
        let _ = writeln!(
            o,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - r,
            l - 6.0,
            yy + 4.0,
            if d >= 1.0 {
                format!("{d:.0}")
            } else {
                format!("{d}")
            }
        );
        d *= 10.0;
    }
    let mut ticks: Vec<u64> = all.iter().map(|&(g, _)| g).collect();
    ticks.sort_unstable();
    ticks.dedup();
    for g in ticks {
        let xx = x(g as f64);
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            h - b,
            h - b + 18.0,
            gib_label(g)
        );
    }
    let _ = writeln!(
        o,
        r#"<line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{:.1}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">guest memory (log scale)</text>"#,
        (l + w - r) / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">modelled boot time, s (log scale)</text>"#,
        (t + h - b) / 2.0
    );
    // Series.
    let mut ly = t + 10.0;
    for (i, (labels, pts)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        for pair in pts.windows(2) {
            let dash = if pair[1].2 {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                o,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="2"{dash}/>"#,
                x(pair[0].0 as f64),
                y(pair[0].1),
                x(pair[1].0 as f64),
                y(pair[1].1)
            );
        }
        for &(g, s, ex) in pts {
            let fill = if ex { "white" } else { c };
            let _ = writeln!(
                o,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{c}" stroke-width="2"><title>{}: {s:.3} s at {}</title></circle>"#,
                x(g as f64),
                y(s),
                esc(&labels.join(", ")),
                gib_label(g)
            );
        }
        // Legend: colour swatch, then the pairs, a few per line.
        let lx = w - r + 15.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"/>"#,
            ly - 4.0,
            lx + 20.0,
            ly - 4.0
        );
        for chunk in labels.chunks(2) {
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#,
                lx + 26.0,
                esc(&chunk.join(", "))
            );
            ly += 15.0;
        }
        ly += 6.0;
    }
    let lx = w - r + 15.0;
    let _ = writeln!(
        o,
        r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="white" stroke="black" stroke-width="2"/><text x="{:.1}" y="{:.1}">extrapolated from 64 GiB</text>"#,
        lx + 10.0,
        ly,
        lx + 26.0,
        ly + 4.0
    );
    let _ = writeln!(
        o,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">guest/host; modelled from the cost table, not measured</text>"##,
        lx,
        ly + 24.0
    );
    o.push_str("</svg>\n");
    o
}

/// The bounce pool's huge-mapping ratio over the steps of swiotlb, one line per host.
pub(super) fn plot_timeline(timelines: &[(&'static str, Vec<Row>)]) -> String {
    let (w, h) = (900.0, 480.0);
    let (l, r, t, b) = (70.0, 200.0, 50.0, 60.0);
    let smax = timelines
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|row| row.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |s: f64| l + s / smax * (w - l - r);
    let y = |p: f64| h - b - p / 100.0 * (h - t - b);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="25" font-size="15" text-anchor="middle">swiotlb: huge-mapped share of the bounce pool's optimum over time ({} GiB, {HEADLINE_VCPUS} vCPUs, guest ours)</text>"#,
        (l + w - r) / 2.0,
        HEADLINE_GIB
    );
    for p in (0..=100).step_by(20) {
        let yy = y(f64::from(p));
        let _ = writeln!(
            o,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{p}%</text>"##,
            w - r,
            l - 6.0,
            yy + 4.0
        );
    }
    let step_tick = (smax / 8.0 / 100.0).ceil().max(1.0) * 100.0;
    let mut s = 0.0;
    while s <= smax {
        let xx = x(s);
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{s:.0}</text>"##,
            h - b,
            h - b + 18.0
        );
        s += step_tick;
    }
    let _ = writeln!(
        o,
        r#"<line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{:.1}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">scenario steps (all vCPUs; last point after the final merge pass)</text>"#,
        (l + w - r) / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">huge-mapped / optimum, bounce pool</text>"#,
        (t + h - b) / 2.0
    );
    for (i, (host, rows)) in timelines.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = rows
            .iter()
            .map(|&(step, _, _, ph, po)| {
                let p = if po == 0 {
                    100.0
                } else {
                    ph as f64 / po as f64 * 100.0
                };
                format!("{:.1},{:.1}", x(step as f64), y(p))
            })
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        let ly = t + 15.0 + i as f64 * 20.0;
        let lx = w - r + 15.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}">host {}</text>"#,
            ly - 4.0,
            lx + 20.0,
            ly - 4.0,
            lx + 26.0,
            esc(host)
        );
    }
    o.push_str("</svg>\n");
    o
}
