//! The two SVG plots in `bench/`: modelled boot time vs memory size, and the bounce pool's
//! huge-mapping ratio over the steps of `swiotlb`, drawn with `plotters`' SVG backend (its
//! text is SVG `<text>`, so no fonts are needed to draw it).

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::matrix::{How, Key, Rep, GUESTS, HEADLINE_GIB, HEADLINE_VCPUS, HOSTS};
use super::report::gib_label;
use super::run::Row;

/// One colour per line, in legend order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];
/// Grid lines.
const GRID: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);
/// The font of every text; the SVG names the family and the viewer picks the face.
const FONT: &str = "sans-serif";
/// Width of the legend column to the right of the boot-time plot, in pixels.
const LEGEND_W: u32 = 330;
/// Width of the legend column to the right of the timeline plot, in pixels.
const TIMELINE_LEGEND_W: u32 = 200;
/// Pairs named per legend line.
const PAIRS_PER_LINE: usize = 2;

/// Pair labels sharing one line, and its points (GiB, modelled seconds, extrapolated).
type Series = (Vec<String>, Vec<(u64, f64, bool)>);

/// The lines of the boot-time plot: boot-eager at the headline vCPUs, one per guest/host pair,
/// pairs whose points agree within 1% sharing one line.
fn boot_series(cells: &[(Key, How)], results: &BTreeMap<Key, Rep>) -> Vec<Series> {
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
    series
}

/// The whole picture.
type Root<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Runs `draw` on a `width` x `height` SVG and returns the SVG text.
fn svg((width, height): (u32, u32), draw: impl FnOnce(&Root<'_>) -> Result<()>) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    out.push('\n');
    Ok(out)
}

/// A `plotters` error as an `anyhow` one.
fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// Text of `px` pixels in the SVG (`plotters` writes its font size divided by 1.24).
fn font(px: f64) -> TextStyle<'static> {
    (FONT, px * 1.24).into()
}

/// What a legend line shows before its text.
#[derive(Debug, Clone, Copy)]
enum Marker {
    /// Nothing: the line goes on with the entry above.
    Continued,
    /// A line in this colour.
    Line(RGBColor),
    /// A hollow point (an extrapolated value).
    Hollow,
}

/// Draws a legend whose first line's middle is at `(x, y)`: a line every 15 pixels, 6 more
/// before each new entry. Returns the middle of the line below the last.
fn draw_legend(root: &Root<'_>, (x, mut y): (i32, i32), lines: &[(Marker, String)]) -> Result<i32> {
    for (i, (marker, text)) in lines.iter().enumerate() {
        if i > 0 && !matches!(marker, Marker::Continued) {
            y += 6;
        }
        match *marker {
            Marker::Continued => {}
            Marker::Line(c) => root
                .draw(&PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)))
                .map_err(plot_error)?,
            Marker::Hollow => root
                .draw(&Circle::new((x + 10, y), 4, BLACK.stroke_width(2)))
                .map_err(plot_error)?,
        }
        root.draw(&Text::new(
            text.as_str(),
            (x + 26, y),
            font(12.0).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(plot_error)?;
        y += 15;
    }
    Ok(y)
}

/// The top-right corner of `chart`'s plotting area, in the picture's pixels: where its legend
/// starts.
fn legend_corner<X: Ranged, Y: Ranged>(
    chart: &ChartContext<'_, SVGBackend<'_>, Cartesian2d<X, Y>>,
) -> (i32, i32) {
    let (x0, y0) = chart.plotting_area().get_base_pixel();
    let (w, _) = chart.plotting_area().dim_in_pixel();
    (x0 + w as i32 + 15, y0 + 10)
}

/// `mesh` with the grid, tick-label font and axis descriptions both plots share: grid lines at
/// the labelled ticks only.
fn axes<'m, 'a, 'b, 'c, X: Ranged, Y: Ranged>(
    mesh: &'m mut MeshStyle<'a, 'b, X, Y, SVGBackend<'c>>,
    x_desc: &str,
    y_desc: &str,
) -> &'m mut MeshStyle<'a, 'b, X, Y, SVGBackend<'c>> {
    mesh.bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .label_style(font(12.0))
        .axis_desc_style(font(12.0))
        .x_desc(x_desc)
        .y_desc(y_desc)
}

/// The label of a decade on the time axis: `0.01`, `0.1`, `1`, `10`, ...
fn decade_label(d: f64) -> String {
    if d >= 1.0 {
        format!("{d:.0}")
    } else {
        format!("{d}")
    }
}

/// Modelled boot time vs memory, log-log, one line per distinct behaviour: hollow points (and
/// dashed segments into them) are extrapolated.
pub(super) fn plot_boot_time(cells: &[(Key, How)], results: &BTreeMap<Key, Rep>) -> Result<String> {
    let series = boot_series(cells, results);
    let mut sizes: Vec<u64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(g, _, _)| g))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let (gmin, gmax) = match (sizes.first(), sizes.last()) {
        (Some(&lo), Some(&hi)) if lo < hi => (lo as f64, hi as f64),
        (Some(&g), _) => (g.max(1) as f64 / 2.0, g.max(1) as f64 * 2.0),
        _ => (1.0, 2.0),
    };
    let secs = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, s, _)| s));
    let (smin, smax) = secs.fold((f64::MAX, 0f64), |(a, b), s| (a.min(s), b.max(s)));
    let (smin, smax) = if smin > smax {
        (1.0, 1.0)
    } else {
        (smin, smax)
    };
    // Whole decades around the data, at least one.
    let dlo = smin.max(1e-3).log10().floor() as i32;
    let dhi = (smax.max(1e-3).log10().ceil() as i32).max(dlo + 1);
    let decades: Vec<f64> = (dlo..=dhi).map(|e| 10f64.powi(e)).collect();
    let (ylo, yhi) = (10f64.powi(dlo), 10f64.powi(dhi));

    svg((900, 560), |root| {
        let area = root
            .titled(
                &format!("Modelled eager boot time vs memory ({HEADLINE_VCPUS} vCPUs, boot-eager)"),
                font(15.0),
            )
            .map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&area)
            .margin(10)
            .margin_right(LEGEND_W)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (gmin..gmax)
                    .log_scale()
                    .base(2.0)
                    .with_key_points(sizes.iter().map(|&g| g as f64).collect()),
                (ylo..yhi).log_scale().with_key_points(decades),
            )
            .map_err(plot_error)?;
        axes(
            &mut chart.configure_mesh(),
            "guest memory (log scale)",
            "modelled boot time, s (log scale)",
        )
        .x_label_formatter(&|g| gib_label(g.round() as u64))
        .y_label_formatter(&|d| decade_label(*d))
        .draw()
        .map_err(plot_error)?;
        let mut legend = Vec::new();
        for (i, (labels, pts)) in series.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let xy = |&(g, s, _): &(u64, f64, bool)| (g as f64, s);
            for pair in pts.windows(2) {
                let seg = [xy(&pair[0]), xy(&pair[1])];
                if pair[1].2 {
                    chart.draw_series(DashedLineSeries::new(seg, 6, 4, c.stroke_width(2)))
                } else {
                    chart.draw_series(LineSeries::new(seg, c.stroke_width(2)))
                }
                .map_err(plot_error)?;
            }
            // Each point: filled (white when extrapolated), then ringed in the line's colour.
            chart
                .draw_series(pts.iter().map(|p| {
                    let fill = if p.2 { WHITE } else { c };
                    Circle::new(xy(p), 4, fill.filled())
                }))
                .map_err(plot_error)?;
            chart
                .draw_series(pts.iter().map(|p| Circle::new(xy(p), 4, c.stroke_width(2))))
                .map_err(plot_error)?;
            for (j, chunk) in labels.chunks(PAIRS_PER_LINE).enumerate() {
                let marker = if j == 0 {
                    Marker::Line(c)
                } else {
                    Marker::Continued
                };
                legend.push((marker, chunk.join(", ")));
            }
        }
        legend.push((
            Marker::Hollow,
            format!("extrapolated from {}", gib_label(HEADLINE_GIB)),
        ));
        let (x, y) = legend_corner(&chart);
        let y = draw_legend(root, (x, y), &legend)?;
        root.draw(&Text::new(
            "guest/host; modelled from the cost table, not measured",
            (x, y + 10),
            font(11.0)
                .color(&RGBColor(0x55, 0x55, 0x55))
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(plot_error)?;
        Ok(())
    })
}

/// The bounce pool's huge-mapping ratio over the steps of swiotlb, one line per host.
pub(super) fn plot_timeline(timelines: &[(&'static str, Vec<Row>)]) -> Result<String> {
    let smax = timelines
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|row| row.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    svg((900, 480), |root| {
        let area = root
            .titled(
                &format!(
                    "swiotlb: huge-mapped share of the bounce pool's optimum over time \
                     ({HEADLINE_GIB} GiB, {HEADLINE_VCPUS} vCPUs, guest ours)"
                ),
                font(15.0),
            )
            .map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&area)
            .margin(10)
            .margin_right(TIMELINE_LEGEND_W)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..smax, 0.0..100.0)
            .map_err(plot_error)?;
        axes(
            &mut chart.configure_mesh(),
            "scenario steps (all vCPUs; last point after the final merge pass)",
            "huge-mapped / optimum, bounce pool",
        )
        // Round step counts, about eight of them; every 20%.
        .x_labels(9)
        .y_labels(6)
        .x_label_formatter(&|s| format!("{s:.0}"))
        .y_label_formatter(&|p| format!("{p:.0}%"))
        .draw()
        .map_err(plot_error)?;
        let mut legend = Vec::new();
        for (i, (host, rows)) in timelines.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let pts = rows.iter().map(|&(step, _, _, ph, po)| {
                let p = if po == 0 {
                    100.0
                } else {
                    ph as f64 / po as f64 * 100.0
                };
                (step as f64, p)
            });
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(plot_error)?;
            legend.push((Marker::Line(c), format!("host {host}")));
        }
        draw_legend(root, legend_corner(&chart), &legend)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts of `svg`'s `<text>` elements, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..t.find("</text>")?];
                Some(body.trim().to_string())
            })
            .collect()
    }

    /// Asserts that `svg` has a `<text>` reading exactly each of `wanted`.
    fn assert_texts(svg: &str, wanted: &[String]) {
        let have = texts(svg);
        for w in wanted {
            assert!(have.contains(w), "no text {w:?} in {have:?}");
        }
    }

    /// A boot-eager cell at the headline vCPUs with `modelled_s` seconds.
    fn boot_cell(
        guest: &'static str,
        host: &'static str,
        gib: u64,
        modelled_s: f64,
        how: How,
    ) -> ((Key, How), Rep) {
        let k = Key {
            scenario: "boot-eager",
            gib,
            vcpus: HEADLINE_VCPUS,
            guest,
            host,
        };
        let r = Rep {
            modelled_us: (modelled_s * 1e6) as u64,
            ..Rep::default()
        };
        ((k, how), r)
    }

    /// Two pairs with the same times (one line) and a 4K pair whose 1 TiB point is
    /// extrapolated and takes `aster_1t_s` seconds.
    fn boot_fixture(aster_1t_s: f64) -> (Vec<(Key, How)>, BTreeMap<Key, Rep>) {
        let mut cells = Vec::new();
        let mut results = BTreeMap::new();
        for (guest, host, gib, s, how) in [
            ("ours", "ours", 4, 0.05, How::Run),
            ("ours", "ours", 64, 0.8, How::Run),
            ("ours", "ours", 1024, 12.8, How::Run),
            ("ours", "kvm-hugepage", 4, 0.05, How::Run),
            ("ours", "kvm-hugepage", 64, 0.8, How::Run),
            ("ours", "kvm-hugepage", 1024, 12.8, How::Run),
            ("asterinas", "kvm-4k", 4, 3.0, How::Run),
            ("asterinas", "kvm-4k", 64, 48.0, How::Run),
            (
                "asterinas",
                "kvm-4k",
                1024,
                aster_1t_s,
                How::Extrapolated { from_gib: 64 },
            ),
        ] {
            let (cell, r) = boot_cell(guest, host, gib, s, how);
            results.insert(cell.0.clone(), r);
            cells.push(cell);
        }
        (cells, results)
    }

    #[test]
    fn pairs_with_the_same_boot_times_share_a_line() {
        let (cells, results) = boot_fixture(768.0);
        let series = boot_series(&cells, &results);
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].0, ["ours/ours", "ours/kvm-hugepage"]);
        assert_eq!(series[1].0, ["asterinas/kvm-4k"]);
        assert_eq!(
            series[1].1,
            [(4, 3.0, false), (64, 48.0, false), (1024, 768.0, true)]
        );
    }

    #[test]
    fn the_boot_time_plot_has_its_title_axes_legend_and_points() {
        let (cells, results) = boot_fixture(768.0);
        let svg = plot_boot_time(&cells, &results).unwrap();
        assert_texts(
            &svg,
            &[
                format!("Modelled eager boot time vs memory ({HEADLINE_VCPUS} vCPUs, boot-eager)"),
                "guest memory (log scale)".into(),
                "modelled boot time, s (log scale)".into(),
                "ours/ours, ours/kvm-hugepage".into(),
                "asterinas/kvm-4k".into(),
                "extrapolated from 64 GiB".into(),
                "guest/host; modelled from the cost table, not measured".into(),
                // Size ticks, and the decades from 0.01 s to 1000 s.
                "4 GiB".into(),
                "64 GiB".into(),
                "1 TiB".into(),
                "0.01".into(),
                "0.1".into(),
                "1000".into(),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Six points, each a fill and a ring, plus the hollow legend marker.
        assert_eq!(svg.matches("<circle").count(), 6 * 2 + 1);
        // The extrapolated point is hollow.
        assert!(
            svg.contains(r##"r="4" opacity="1" fill="#FFFFFF""##),
            "{svg}"
        );
        let other = plot_boot_time(&cells, &boot_fixture(900.0).1).unwrap();
        assert_ne!(svg, other, "the plot does not follow the data");
    }

    /// A timeline of `n` samples whose pool ratio falls to `low` percent and comes back.
    fn timeline(n: u64, low: u64) -> Vec<Row> {
        (1..=n)
            .map(|i| {
                let p = if i == n {
                    100
                } else {
                    100 - (100 - low) * i / n
                };
                (i * 4, 0, 0, p << 21, 100 << 21)
            })
            .collect()
    }

    #[test]
    fn the_timeline_plot_has_its_title_axes_and_a_line_per_host() {
        let tl = [
            ("ours", timeline(50, 60)),
            ("kvm-4k", vec![(4, 0, 0, 0, 0)]),
        ];
        let svg = plot_timeline(&tl).unwrap();
        assert_texts(
            &svg,
            &[
                // plotters escapes the apostrophe.
                format!(
                    "swiotlb: huge-mapped share of the bounce pool&apos;s optimum over time \
                 ({HEADLINE_GIB} GiB, {HEADLINE_VCPUS} vCPUs, guest ours)"
                ),
                "scenario steps (all vCPUs; last point after the final merge pass)".into(),
                "huge-mapped / optimum, bounce pool".into(),
                "host ours".into(),
                "host kvm-4k".into(),
                "0%".into(),
                "20%".into(),
                "100%".into(),
            ],
        );
        let other = plot_timeline(&[("ours", timeline(50, 20)), tl[1].clone()]).unwrap();
        assert_ne!(svg, other, "the plot does not follow the data");
    }
}
