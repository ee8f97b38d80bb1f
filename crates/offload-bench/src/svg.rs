//! Line charts as standalone SVG files, for the scaling curves in `docs/bench/`. Small on
//! purpose: log or linear axes, one polyline per series, a legend; no dependency.

use std::fmt::Write as _;

/// One line of a chart: a name and its points, in x order.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// What a chart shows.
pub(crate) struct Chart<'a> {
    pub(crate) title: &'a str,
    pub(crate) x_label: &'a str,
    pub(crate) y_label: &'a str,
    /// The x values to label, with their text (e.g. `(1024.0, "1 KiB")`).
    pub(crate) x_ticks: Vec<(f64, String)>,
    pub(crate) x_log: bool,
    pub(crate) y_log: bool,
    pub(crate) series: Vec<Series>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// One axis: maps values to pixels, linearly or by their logarithm.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool, from: f64, to: f64) -> Axis {
        let values: Vec<f64> = values
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .map(|v| if log { v.log10() } else { v })
            .collect();
        let mut lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let mut hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if log {
            (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
        } else {
            lo = lo.min(0.0);
            hi = if hi > lo { hi * 1.1 } else { lo + 1.0 };
        }
        Axis {
            log,
            lo,
            hi,
            from,
            to,
        }
    }

    fn pixel(&self, v: f64) -> f64 {
        let v = if self.log {
            v.max(f64::MIN_POSITIVE).log10()
        } else {
            v
        };
        self.from + (v - self.lo) / (self.hi - self.lo) * (self.to - self.from)
    }

    /// Values to draw grid lines at: powers of ten on a log axis, five steps otherwise.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            (self.lo as i32..=self.hi as i32)
                .map(|e| 10f64.powi(e))
                .collect()
        } else {
            (0..=5)
                .map(|i| self.lo + (self.hi - self.lo) * f64::from(i) / 5.0)
                .collect()
        }
    }
}

/// A number as an axis label: 3 significant digits, with k/M suffixes.
fn short(v: f64) -> String {
    let (v, suffix) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{text}{suffix}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as an SVG document.
pub(crate) fn render(chart: &Chart<'_>) -> String {
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let x = Axis::new(
        points()
            .map(|p| p.0)
            .chain(chart.x_ticks.iter().map(|t| t.0)),
        chart.x_log,
        LEFT,
        WIDTH - RIGHT,
    );
    let y = Axis::new(points().map(|p| p.1), chart.y_log, HEIGHT - BOTTOM, TOP);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"##,
        (LEFT + WIDTH - RIGHT) / 2.0,
        escape(chart.title)
    );
    for v in y.ticks() {
        let py = y.pixel(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            short(v)
        );
    }
    for (v, label) in &chart.x_ticks {
        let px = x.pixel(*v);
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{TOP}" y2="{}" stroke="#eeeeee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 16.0,
            escape(label)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333333"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"##,
        WIDTH - RIGHT - LEFT,
        HEIGHT - BOTTOM - TOP,
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - 18.0,
        escape(chart.x_label),
        (TOP + HEIGHT - BOTTOM) / 2.0,
        (TOP + HEIGHT - BOTTOM) / 2.0,
        escape(chart.y_label)
    );
    for (i, series) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = series
            .points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x.pixel(px), y.pixel(py)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(px, py) in &series.points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{}: {}</title></circle>"#,
                x.pixel(px),
                y.pixel(py),
                escape(&series.name),
                short(py)
            );
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = WIDTH - RIGHT + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_one_line_per_series_and_points_inside_the_plot() {
        let chart = Chart {
            title: "t <1>",
            x_label: "x",
            y_label: "y",
            x_ticks: vec![(16.0, "16 B".into()), (1024.0, "1 KiB".into())],
            x_log: true,
            y_log: true,
            series: vec![
                Series {
                    name: "a".into(),
                    points: vec![(16.0, 5.0), (1024.0, 50.0)],
                },
                Series {
                    name: "b".into(),
                    points: vec![(16.0, 7.0), (1024.0, 700.0)],
                },
            ],
        };
        let svg = render(&chart);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"), "titles are escaped");
        let y = Axis::new([5.0, 700.0].into_iter(), true, HEIGHT - BOTTOM, TOP);
        assert!(
            (y.pixel(1.0) - (HEIGHT - BOTTOM)).abs() < 1e-9,
            "log axis starts at 10^0"
        );
        assert!((y.pixel(1000.0) - TOP).abs() < 1e-9, "and ends at 10^3");
        assert_eq!(short(1_250_000.0), "1.25M");
        assert_eq!(short(42.0), "42");
    }
}
