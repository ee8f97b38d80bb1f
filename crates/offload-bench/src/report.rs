//! The result rows: how they are built, printed as a table, and written as JSON.
//!
//! Row ids are `group.metric.system` (`thread.roundtrip_p50_us.offload`) and are tracked
//! across the project's history: never rename one. A row whose id ends in a peer's name
//! (anything but `offload`) is compared with the `offload` row of the same metric.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::stats;

/// Which direction of a metric is good, so a reader knows what a ratio above 1 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Better {
    Lower,
    Higher,
}

/// One measured figure: the median over several runs, with every run's value kept.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) unit: &'static str,
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) better: Better,
    /// One value per run, in run order.
    pub(crate) samples: Vec<f64>,
    /// On a peer's row: the offload row's median divided by this one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) offload_ratio: Option<f64>,
    /// Context a reader needs, e.g. the calibrated task length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

impl Row {
    /// A row summarising `samples` (one value per run).
    pub(crate) fn new(
        id: impl Into<String>,
        unit: &'static str,
        better: Better,
        samples: Vec<f64>,
    ) -> Row {
        let (min, max) = stats::min_max(&samples);
        Row {
            id: id.into(),
            unit,
            median: stats::median(&samples),
            min,
            max,
            better,
            samples,
            offload_ratio: None,
            note: None,
        }
    }

    /// Adds a note shown under the table and kept in the JSON.
    pub(crate) fn with_note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }

    /// `("thread.roundtrip_p50_us", "rayon")` for `thread.roundtrip_p50_us.rayon`.
    fn metric_and_system(&self) -> Option<(&str, &str)> {
        self.id.rsplit_once('.')
    }
}

/// Fills in `offload_ratio` on every peer row that has an `offload` row of the same metric.
pub(crate) fn compute_ratios(rows: &mut [Row]) {
    let offload: Vec<(String, f64)> = rows
        .iter()
        .filter_map(|r| match r.metric_and_system() {
            Some((metric, "offload")) => Some((metric.to_owned(), r.median)),
            _ => None,
        })
        .collect();
    for row in rows.iter_mut() {
        let Some((metric, system)) = row.metric_and_system() else {
            continue;
        };
        if system == "offload" {
            continue;
        }
        if let Some((_, ours)) = offload.iter().find(|(m, _)| m == metric) {
            row.offload_ratio = Some(ours / row.median);
        }
    }
}

/// The table printed at the end of a run.
pub(crate) fn table(rows: &[Row]) -> String {
    let id_width = rows.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<id_width$}  {:<7}  {:>9}  {:>19}  vs offload",
        "id", "unit", "median", "min..max of runs"
    );
    let _ = writeln!(
        out,
        "{}",
        "-".repeat(id_width + 2 + 7 + 2 + 9 + 2 + 19 + 12)
    );
    for row in rows {
        let range = format!("{}..{}", number(row.min), number(row.max));
        let ratio = match (row.offload_ratio, row.metric_and_system()) {
            (Some(ratio), Some((_, system))) => {
                let better = match row.better {
                    Better::Lower => "lower is better",
                    Better::Higher => "higher is better",
                };
                format!("offload / {system} = {ratio:.2} ({better})")
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<id_width$}  {:<7}  {:>9}  {:>19}  {}",
            row.id,
            row.unit,
            number(row.median),
            range,
            ratio
        );
    }
    let notes: Vec<_> = rows
        .iter()
        .filter_map(|r| r.note.as_ref().map(|n| (&r.id, n)))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out);
        for (id, note) in notes {
            let _ = writeln!(out, "{id}: {note}");
        }
    }
    out
}

/// A target a figure is held to: a row's median, or its ratio to another row's.
pub(crate) struct Goal {
    /// What is compared, for people.
    pub(crate) what: &'static str,
    pub(crate) row: &'static str,
    /// When set, the figure is `row`'s median divided by this row's.
    pub(crate) against: Option<&'static str>,
    pub(crate) target: Target,
}

/// The bound a [`Goal`]'s figure must meet.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// No bound: the figure is reported, not judged.
    None,
}

/// A goal checked against one run's rows.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Checked {
    what: &'static str,
    row: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    against: Option<&'static str>,
    value: f64,
    /// `">= 20"`, `"<= 1.5"`, or `null` when the figure is only reported.
    target: Option<String>,
    /// `null` when there is no target.
    met: Option<bool>,
}

/// Checks every goal whose rows were measured in this run.
pub(crate) fn check_goals(rows: &[Row], goals: &[Goal]) -> Vec<Checked> {
    let median = |id: &str| rows.iter().find(|r| r.id == id).map(|r| r.median);
    goals
        .iter()
        .filter_map(|goal| {
            let ours = median(goal.row)?;
            let value = match goal.against {
                Some(other) => ours / median(other)?,
                None => ours,
            };
            let (target, met) = match goal.target {
                Target::AtLeast(t) => (Some(format!(">= {t}")), Some(value >= t)),
                Target::AtMost(t) => (Some(format!("<= {t}")), Some(value <= t)),
                Target::None => (None, None),
            };
            Some(Checked {
                what: goal.what,
                row: goal.row,
                against: goal.against,
                value,
                target,
                met,
            })
        })
        .collect()
}

/// The checked goals, one line each, for the end of the table.
pub(crate) fn goals_text(checked: &[Checked]) -> String {
    let mut out = String::new();
    if checked.is_empty() {
        return out;
    }
    let _ = writeln!(out, "\ngoals:");
    for c in checked {
        let verdict = match (&c.target, c.met) {
            (Some(t), Some(true)) => format!("goal {t}: met"),
            (Some(t), _) => format!("goal {t}: MISSED"),
            _ => "no goal set".to_owned(),
        };
        let _ = writeln!(out, "  {}: {:.2} ({verdict})", c.what, c.value);
    }
    out
}

/// Writes `{"rows": [...], "goals": [...]}` to `path`, creating its parent directories.
pub(crate) fn write_json(path: &Path, rows: &[Row], goals: &[Checked]) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Report<'a> {
        rows: &'a [Row],
        goals: &'a [Checked],
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&Report { rows, goals })?;
    std::fs::write(path, json + "\n").with_context(|| format!("could not write {}", path.display()))
}

/// A figure with as many digits as a noisy measurement deserves.
fn number(x: f64) -> String {
    let a = x.abs();
    if a.is_nan() {
        "-".to_owned()
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_get_the_ratio_of_offload_to_them() {
        let mut rows = vec![
            Row::new("g.m.offload", "us", Better::Lower, vec![10.0]),
            Row::new("g.m.peer", "us", Better::Lower, vec![20.0]),
            Row::new("g.other.peer", "us", Better::Lower, vec![1.0]),
        ];
        compute_ratios(&mut rows);
        assert_eq!(rows[0].offload_ratio, None);
        assert_eq!(rows[1].offload_ratio, Some(0.5));
        assert_eq!(rows[2].offload_ratio, None);
        assert!(table(&rows).contains("offload / peer = 0.50"));
    }

    #[test]
    fn goals_are_checked_on_ratios_and_on_figures() {
        let rows = vec![
            Row::new("g.m.offload", "x", Better::Higher, vec![30.0]),
            Row::new("g.m.peer", "x", Better::Higher, vec![1.0]),
            Row::new("g.t.offload", "ms", Better::Lower, vec![25.0]),
        ];
        let goals = [
            Goal {
                what: "ratio",
                row: "g.m.offload",
                against: Some("g.m.peer"),
                target: Target::AtLeast(20.0),
            },
            Goal {
                what: "figure",
                row: "g.t.offload",
                against: None,
                target: Target::AtMost(20.0),
            },
            Goal {
                what: "not measured",
                row: "g.x.offload",
                against: None,
                target: Target::None,
            },
        ];
        let checked = check_goals(&rows, &goals);
        assert_eq!(checked.len(), 2);
        assert_eq!((checked[0].value, checked[0].met), (30.0, Some(true)));
        assert_eq!((checked[1].value, checked[1].met), (25.0, Some(false)));
        let text = goals_text(&checked);
        assert!(text.contains("ratio: 30.00 (goal >= 20: met)"), "{text}");
        assert!(
            text.contains("figure: 25.00 (goal <= 20: MISSED)"),
            "{text}"
        );
    }

    #[test]
    fn json_has_the_tracked_fields() {
        let row = Row::new("g.m.offload", "us", Better::Lower, vec![1.0, 3.0, 2.0]);
        let json = serde_json::to_value(&row).unwrap_or_default();
        assert_eq!(json["id"], "g.m.offload");
        assert_eq!(json["unit"], "us");
        assert_eq!(json["median"], 2.0);
    }

    #[test]
    fn numbers_are_rounded_to_their_size() {
        assert_eq!(number(2_500_000.0), "2.50M");
        assert_eq!(number(122_345.0), "122.3k");
        assert_eq!(number(563.4), "563");
        assert_eq!(number(13.72), "13.7");
        assert_eq!(number(1.234), "1.23");
    }
}
