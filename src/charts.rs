//! The seed's charts as SVG, rendered from snapshots: explained-variance ratio by component,
//! inertia by number of clusters (projected and full data), the confusion matrix of cluster vs
//! Naive Bayes labels, cluster sizes over recent snapshots, drift between snapshots, and the
//! flows of users between a snapshot's clusters and the previous snapshot's.
//! Hand-written SVG: no fonts or files needed, and byte-identical for the same input. Every
//! data mark carries its value (`data-value`) so tests and scripts can read the chart back.

use std::fmt::Write;

use crate::snapshot::{Diagnostics, Snapshot, SnapshotSummary};

/// The charts there are, by URL name (`/charts/{name}.svg`).
pub const CHART_NAMES: [&str; 6] = [
    "explained_variance",
    "inertia_by_k",
    "confusion_matrix",
    "cluster_sizes",
    "drift",
    "flows",
];

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 48.0;
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Renders chart `name` for `snapshot`; `diagnostics` are the snapshot's own or, when it has
/// none, those of the snapshot [`diagnostics_source`] names (with its version); `history`
/// (summaries, oldest first, the snapshot's included) feeds the charts over time. `None` for an
/// unknown name.
pub fn render(
    name: &str,
    snapshot: &Snapshot,
    diagnostics: Option<(&Diagnostics, u64)>,
    history: &[SnapshotSummary],
) -> Option<String> {
    let diagnostics = snapshot
        .diagnostics
        .as_ref()
        .map(|d| (d, snapshot.version))
        .or(diagnostics);
    Some(match name {
        "explained_variance" => explained_variance(snapshot, diagnostics),
        "inertia_by_k" => inertia_by_k(diagnostics),
        "confusion_matrix" => confusion_matrix(snapshot),
        "cluster_sizes" => cluster_sizes(history),
        "drift" => drift(history),
        "flows" => flows(snapshot),
        _ => return None,
    })
}

/// Everything the charts of one snapshot read: the snapshot, the diagnostics it shows (its own
/// or an earlier snapshot's, see [`diagnostics_source`]) and the summaries of recent snapshots.
pub struct ChartInputs {
    pub snapshot: Snapshot,
    pub diagnostics: Option<(Diagnostics, u64)>,
    pub history: Vec<SnapshotSummary>,
}

impl ChartInputs {
    /// Reads a snapshot's chart inputs through `snapshot_at` (a version's whole snapshot) and
    /// the `history` summaries: at most two whole snapshots, however long the history.
    pub fn gather<E>(
        snapshot: Snapshot,
        history: Vec<SnapshotSummary>,
        snapshot_at: impl FnOnce(u64) -> Result<Option<Snapshot>, E>,
    ) -> Result<ChartInputs, E> {
        let diagnostics = match diagnostics_source(&snapshot, &history) {
            Some(v) => snapshot_at(v)?.and_then(|s| s.diagnostics.map(|d| (d, v))),
            None => None,
        };
        Ok(ChartInputs {
            snapshot,
            diagnostics,
            history,
        })
    }

    pub fn render(&self, name: &str) -> Option<String> {
        render(
            name,
            &self.snapshot,
            self.diagnostics.as_ref().map(|(d, v)| (d, *v)),
            &self.history,
        )
    }
}

/// The version whose diagnostics a snapshot without any shows: the newest earlier one in
/// `history` that has them (diagnostics are computed every `[snapshot] diagnostics_every`
/// snapshots). `None` when the snapshot has its own, or no such snapshot is in `history`.
pub fn diagnostics_source(snapshot: &Snapshot, history: &[SnapshotSummary]) -> Option<u64> {
    if snapshot.diagnostics.is_some() {
        return None;
    }
    history
        .iter()
        .rev()
        .find(|s| s.version < snapshot.version && s.has_diagnostics)
        .map(|s| s.version)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Numbers in SVG attributes: fixed precision so output is stable and compact.
fn n(x: f64) -> String {
    format!("{:.2}", if x.is_finite() { x } else { 0.0 })
}

/// A chart frame with a title, axes and y ticks over `[0, y_max]`.
struct Frame {
    svg: String,
    y_max: f64,
}

impl Frame {
    fn new(name: &str, title: &str, x_label: &str, y_label: &str, y_max: f64) -> Frame {
        let y_max = if y_max > 0.0 && y_max.is_finite() {
            y_max
        } else {
            1.0
        };
        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{name}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12"><title>{title}</title><rect width="{w}" height="{h}" fill="#ffffff"/><text x="{cx}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>"##,
            w = WIDTH,
            h = HEIGHT,
            cx = n(WIDTH / 2.0),
            title = escape(title),
        );
        let (x0, y0, x1) = (LEFT, HEIGHT - BOTTOM, WIDTH - RIGHT);
        for i in 0..=4 {
            let v = y_max * i as f64 / 4.0;
            let y = y0 - (y0 - TOP) * i as f64 / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#e0e0e0"/><text x="{tx}" y="{ty}" text-anchor="end">{label}</text>"##,
                x0 = n(x0),
                x1 = n(x1),
                y = n(y),
                tx = n(x0 - 6.0),
                ty = n(y + 4.0),
                label = tick_label(v),
            );
        }
        let _ = write!(
            svg,
            r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/><line x1="{x0}" y1="{top}" x2="{x0}" y2="{y0}" stroke="#333"/><text x="{cx}" y="{xl}" text-anchor="middle">{x_label}</text><text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">{y_label}</text>"##,
            x0 = n(x0),
            x1 = n(x1),
            y0 = n(y0),
            top = n(TOP),
            cx = n((x0 + x1) / 2.0),
            xl = n(HEIGHT - 12.0),
            cy = n((TOP + y0) / 2.0),
            x_label = escape(x_label),
            y_label = escape(y_label),
        );
        Frame { svg, y_max }
    }

    fn y(&self, v: f64) -> f64 {
        let y0 = HEIGHT - BOTTOM;
        y0 - (y0 - TOP) * (v / self.y_max).clamp(0.0, 1.0)
    }

    fn x_label(&mut self, x: f64, label: &str) {
        let _ = write!(
            self.svg,
            r#"<text x="{x}" y="{y}" text-anchor="middle">{label}</text>"#,
            x = n(x),
            y = n(HEIGHT - BOTTOM + 16.0),
            label = escape(label),
        );
    }

    fn note(&mut self, text: &str) {
        let _ = write!(
            self.svg,
            r##"<text x="{x}" y="{y}" text-anchor="middle" fill="#777">{text}</text>"##,
            x = n(WIDTH / 2.0),
            y = n(HEIGHT / 2.0),
            text = escape(text),
        );
    }

    /// A polyline series with a point per value (`xs` in pixels).
    fn series(&mut self, class: &str, label: &str, color: &str, xs: &[f64], values: &[f64]) {
        let points: Vec<String> = xs
            .iter()
            .zip(values)
            .map(|(x, v)| format!("{},{}", n(*x), n(self.y(*v))))
            .collect();
        let _ = write!(
            self.svg,
            r#"<polyline class="{class}" data-series="{label}" fill="none" stroke="{color}" stroke-width="2" points="{points}"/>"#,
            label = escape(label),
            points = points.join(" "),
        );
        for (x, v) in xs.iter().zip(values) {
            let _ = write!(
                self.svg,
                r#"<circle class="{class}-point" data-series="{label}" data-value="{v}" cx="{x}" cy="{y}" r="3" fill="{color}"/>"#,
                label = escape(label),
                x = n(*x),
                y = n(self.y(*v)),
            );
        }
    }

    fn legend(&mut self, entries: &[(&str, &str)]) {
        for (i, (label, color)) in entries.iter().enumerate() {
            let x = LEFT + 8.0 + 150.0 * i as f64;
            let _ = write!(
                self.svg,
                r#"<rect x="{x}" y="30" width="10" height="10" fill="{color}"/><text x="{tx}" y="39">{label}</text>"#,
                x = n(x),
                tx = n(x + 14.0),
                label = escape(label),
            );
        }
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>");
        self.svg
    }
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn x_positions(count: usize) -> Vec<f64> {
    let span = WIDTH - LEFT - RIGHT;
    let step = span / count.max(1) as f64;
    (0..count).map(|i| LEFT + step * (i as f64 + 0.5)).collect()
}

/// Bars of the kept components' explained-variance ratios, with the longer curve behind.
fn explained_variance(s: &Snapshot, diagnostics: Option<(&Diagnostics, u64)>) -> String {
    let kept = &s.pca.explained_variance_ratio;
    let curve: Vec<f64> = diagnostics
        .map(|(d, _)| d.explained_variance_ratio_curve.clone())
        .unwrap_or_default();
    let count = curve.len().max(kept.len());
    let y_max = kept.iter().chain(&curve).copied().fold(0.0, f64::max) * 1.1;
    let mut f = Frame::new(
        "explained_variance",
        "Explained variance ratio by component",
        "component",
        "explained variance ratio",
        y_max,
    );
    let xs = x_positions(count);
    let width = ((WIDTH - LEFT - RIGHT) / count.max(1) as f64 * 0.7).max(1.0);
    for (i, v) in kept.iter().enumerate() {
        let y = f.y(*v);
        let _ = write!(
            f.svg,
            r#"<rect class="bar" data-component="{c}" data-value="{v}" x="{x}" y="{y}" width="{w}" height="{h}" fill="{color}"/>"#,
            c = i + 1,
            x = n(xs[i] - width / 2.0),
            y = n(y),
            w = n(width),
            h = n(HEIGHT - BOTTOM - y),
            color = PALETTE[0],
        );
    }
    if !curve.is_empty() {
        f.series(
            "curve",
            "all components",
            PALETTE[1],
            &xs[..curve.len()],
            &curve,
        );
    }
    let every = count.div_ceil(15).max(1);
    for (i, x) in xs.iter().enumerate() {
        if i % every == 0 {
            f.x_label(*x, &(i + 1).to_string());
        }
    }
    let curve_label = match diagnostics {
        Some((_, v)) if v != s.version => format!("curve (diagnostics of v{v})"),
        _ => "curve (diagnostics)".to_string(),
    };
    f.legend(&[("kept components", PALETTE[0]), (&curve_label, PALETTE[1])]);
    f.finish()
}

fn inertia_by_k(diagnostics: Option<(&Diagnostics, u64)>) -> String {
    let Some((d, version)) = diagnostics else {
        let mut f = Frame::new(
            "inertia_by_k",
            "Inertia by number of clusters",
            "k",
            "inertia",
            1.0,
        );
        f.note("diagnostics are not computed for this snapshot ([snapshot] diagnostics_every)");
        return f.finish();
    };
    let i = &d.inertia_by_k;
    let y_max = i
        .projected
        .iter()
        .chain(&i.full)
        .copied()
        .fold(0.0, f64::max)
        * 1.1;
    let title = format!("Inertia by number of clusters (snapshot v{version})");
    let mut f = Frame::new("inertia_by_k", &title, "k (clusters)", "inertia", y_max);
    let xs = x_positions(i.k.len());
    f.series("projected", "projected data", PALETTE[0], &xs, &i.projected);
    f.series("full", "full data", PALETTE[2], &xs, &i.full);
    for (x, k) in xs.iter().zip(&i.k) {
        f.x_label(*x, &k.to_string());
    }
    f.legend(&[("projected data", PALETTE[0]), ("full data", PALETTE[2])]);
    f.finish()
}

fn confusion_matrix(s: &Snapshot) -> String {
    let m = &s.validation.naive_bayes.confusion_matrix;
    let k = m.len().max(1);
    let max = m.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let side = (HEIGHT - TOP - BOTTOM).min(WIDTH - LEFT - RIGHT);
    let cell = side / k as f64;
    let x0 = LEFT + (WIDTH - LEFT - RIGHT - side) / 2.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="confusion_matrix" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11"><title>Cluster vs Naive Bayes label</title><rect width="{w}" height="{h}" fill="#ffffff"/><text x="{cx}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Cluster (rows) vs Naive Bayes label (columns)</text>"##,
        w = WIDTH,
        h = HEIGHT,
        cx = n(WIDTH / 2.0),
    );
    for (r, row) in m.iter().enumerate() {
        for (c, &count) in row.iter().enumerate() {
            // White for 0, dark blue for the largest cell.
            let t = (count as f64 / max).sqrt();
            let shade = |from: f64, to: f64| (from + (to - from) * t).round() as u8;
            let _ = write!(
                svg,
                r#"<rect class="cell" data-row="{r}" data-col="{c}" data-value="{count}" x="{x}" y="{y}" width="{cw}" height="{cw}" fill="rgb({red},{green},{blue})"/>"#,
                x = n(x0 + cell * c as f64),
                y = n(TOP + cell * r as f64),
                cw = n(cell),
                red = shade(255.0, 8.0),
                green = shade(255.0, 48.0),
                blue = shade(255.0, 107.0),
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text x="{cx}" y="{y}" text-anchor="middle">train agreement {a:.4}</text></svg>"#,
        cx = n(WIDTH / 2.0),
        y = n(HEIGHT - 14.0),
        a = s.validation.naive_bayes.train_agreement,
    );
    svg
}

/// Cluster sizes over the recent snapshots, one line per cluster id.
fn cluster_sizes(history: &[SnapshotSummary]) -> String {
    let k = history.iter().map(|s| s.sizes.len()).max().unwrap_or(0);
    let y_max = history
        .iter()
        .flat_map(|s| s.sizes.iter())
        .copied()
        .max()
        .unwrap_or(0) as f64
        * 1.1;
    let mut f = Frame::new(
        "cluster_sizes",
        "Cluster sizes over recent snapshots",
        "snapshot version",
        "users",
        y_max,
    );
    let xs = x_positions(history.len());
    for c in 0..k {
        let values: Vec<f64> = history
            .iter()
            .map(|s| s.sizes.get(c).copied().unwrap_or(0) as f64)
            .collect();
        f.series(
            "size",
            &format!("cluster {c}"),
            PALETTE[c % PALETTE.len()],
            &xs,
            &values,
        );
    }
    let every = history.len().div_ceil(12).max(1);
    for (i, (x, s)) in xs.iter().zip(history).enumerate() {
        if i % every == 0 {
            f.x_label(*x, &format!("v{}", s.version));
        }
    }
    f.finish()
}

/// Who moved where since the previous snapshot: the previous snapshot's clusters on the left,
/// this one's on the right, each as tall as its users; a band per (from, to) pair as wide as
/// the users it carries. Bands of users who stayed are grey, moves take the colour of the
/// cluster they left.
fn flows(s: &Snapshot) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="flows" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11"><title>Flows between snapshots</title><rect width="{w}" height="{h}" fill="#ffffff"/>"##,
        w = WIDTH,
        h = HEIGHT,
    );
    let Some(drift) = s.drift.as_ref().filter(|d| !d.flows.is_empty()) else {
        let why = if s.drift.is_some() {
            "flows were not recorded for this snapshot"
        } else {
            "no earlier snapshot to compare with"
        };
        let _ = write!(
            svg,
            r#"<text x="{cx}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Flows between snapshots</text><text x="{cx}" y="{cy}" text-anchor="middle">{why}</text></svg>"#,
            cx = n(WIDTH / 2.0),
            cy = n(HEIGHT / 2.0),
        );
        return svg;
    };
    let _ = write!(
        svg,
        r#"<text x="{cx}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Flows from v{prev} (left) to v{ver} (right): {moved} of {total} users moved</text>"#,
        cx = n(WIDTH / 2.0),
        prev = drift.previous_version,
        ver = s.version,
        moved = drift.users_moved,
        total = drift.users_compared,
    );
    let layout = FlowLayout::new(drift);
    layout.draw_nodes(&mut svg);
    layout.draw_bands(&mut svg, drift);
    svg.push_str("</svg>");
    svg
}

/// Where the flows chart puts each cluster: node tops on both sides and the users-to-pixels
/// scale.
struct FlowLayout {
    left: Vec<u64>,
    right: Vec<u64>,
    left_top: Vec<f64>,
    right_top: Vec<f64>,
    scale: f64,
}

const FLOW_X0: f64 = LEFT + 40.0;
const FLOW_X1: f64 = WIDTH - RIGHT - 40.0;
const FLOW_NODE_WIDTH: f64 = 10.0;

impl FlowLayout {
    fn new(drift: &crate::snapshot::Drift) -> Self {
        let k = drift
            .flows
            .iter()
            .map(|f| f.from.max(f.to) as usize + 1)
            .max()
            .unwrap_or(0);
        let (mut left, mut right) = (vec![0u64; k], vec![0u64; k]);
        for f in &drift.flows {
            left[f.from as usize] += f.users;
            right[f.to as usize] += f.users;
        }
        // Gaps take at most a quarter of the height, however many clusters.
        let gap = (0.25 * (HEIGHT - TOP - BOTTOM) / k.max(1) as f64).min(2.0);
        let scale =
            (HEIGHT - TOP - BOTTOM - gap * k as f64).max(1.0) / drift.users_compared.max(1) as f64;
        let tops = |sizes: &[u64]| -> Vec<f64> {
            sizes
                .iter()
                .scan(TOP, |y, &size| {
                    let top = *y;
                    *y += size as f64 * scale + gap;
                    Some(top)
                })
                .collect()
        };
        FlowLayout {
            left_top: tops(&left),
            right_top: tops(&right),
            left,
            right,
            scale,
        }
    }

    fn draw_nodes(&self, svg: &mut String) {
        let bar = FLOW_NODE_WIDTH;
        let sides = [
            (&self.left, &self.left_top, FLOW_X0 - bar, "end"),
            (&self.right, &self.right_top, FLOW_X1, "start"),
        ];
        for (column, (sizes, ys, x, anchor)) in sides.into_iter().enumerate() {
            for (c, (&size, &y)) in sizes.iter().zip(ys.iter()).enumerate() {
                let h = size as f64 * self.scale;
                let _ = write!(
                    svg,
                    r#"<rect class="node" data-side="{column}" data-cluster="{c}" data-users="{size}" x="{x}" y="{y}" width="{bar}" height="{h}" fill="{color}"/>"#,
                    x = n(x),
                    y = n(y),
                    h = n(h),
                    color = PALETTE[c % PALETTE.len()],
                );
                if size > 0 {
                    let lx = if column == 0 { x - 4.0 } else { x + bar + 4.0 };
                    let _ = write!(
                        svg,
                        r#"<text x="{lx}" y="{ly}" text-anchor="{anchor}">{c}</text>"#,
                        lx = n(lx),
                        ly = n(y + h / 2.0 + 4.0),
                    );
                }
            }
        }
    }

    /// Bands leave each left node and enter each right node in (from, to) order.
    fn draw_bands(&self, svg: &mut String, drift: &crate::snapshot::Drift) {
        let (mut out_at, mut in_at) = (self.left_top.clone(), self.right_top.clone());
        let (x0, x1) = (FLOW_X0, FLOW_X1);
        let mid = (x0 + x1) / 2.0;
        for f in &drift.flows {
            let h = f.users as f64 * self.scale;
            let (a, b) = (out_at[f.from as usize], in_at[f.to as usize]);
            out_at[f.from as usize] += h;
            in_at[f.to as usize] += h;
            let (color, opacity) = if f.from == f.to {
                ("#bbbbbb", 0.5)
            } else {
                (PALETTE[f.from as usize % PALETTE.len()], 0.75)
            };
            let _ = write!(
                svg,
                r#"<path class="flow" data-from="{from}" data-to="{to}" data-users="{users}" d="M{x0} {a}C{mid} {a} {mid} {b} {x1} {b}L{x1} {b2}C{mid} {b2} {mid} {a2} {x0} {a2}Z" fill="{color}" fill-opacity="{opacity}"/>"#,
                from = f.from,
                to = f.to,
                users = f.users,
                x0 = n(x0),
                x1 = n(x1),
                mid = n(mid),
                a = n(a),
                b = n(b),
                a2 = n(a + h),
                b2 = n(b + h),
            );
        }
    }
}

/// Users moved between consecutive snapshots (bars) and the adjusted Rand index (line, right
/// scale mapped onto 0..1 of the frame).
fn drift(history: &[SnapshotSummary]) -> String {
    let moved: Vec<f64> = history
        .iter()
        .map(|s| s.drift.as_ref().map_or(0.0, |d| d.users_moved as f64))
        .collect();
    let y_max = moved.iter().copied().fold(0.0, f64::max).max(1.0) * 1.1;
    let mut f = Frame::new(
        "drift",
        "Drift between consecutive snapshots",
        "snapshot version",
        "users moved",
        y_max,
    );
    let xs = x_positions(history.len());
    let width = ((WIDTH - LEFT - RIGHT) / history.len().max(1) as f64 * 0.6).max(1.0);
    for ((x, v), s) in xs.iter().zip(&moved).zip(history) {
        let y = f.y(*v);
        let _ = write!(
            f.svg,
            r#"<rect class="bar" data-version="{ver}" data-value="{v}" x="{x}" y="{y}" width="{w}" height="{h}" fill="{color}"/>"#,
            ver = s.version,
            x = n(x - width / 2.0),
            y = n(y),
            w = n(width),
            h = n(HEIGHT - BOTTOM - y),
            color = PALETTE[0],
        );
    }
    let ari: Vec<f64> = history
        .iter()
        .map(|s| s.drift.as_ref().map_or(1.0, |d| d.adjusted_rand_index))
        .collect();
    let scaled: Vec<f64> = ari.iter().map(|a| a.clamp(0.0, 1.0) * y_max).collect();
    f.series(
        "ari",
        "adjusted Rand index (0..1, right)",
        PALETTE[2],
        &xs,
        &scaled,
    );
    let every = history.len().div_ceil(12).max(1);
    for (i, (x, s)) in xs.iter().zip(history).enumerate() {
        if i % every == 0 {
            f.x_label(*x, &format!("v{}", s.version));
        }
    }
    f.legend(&[
        ("users moved", PALETTE[0]),
        ("adjusted Rand index", PALETTE[2]),
    ]);
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineParams};
    use crate::generator::{GeneratorParams, generate};
    use crate::snapshot::{self, BuildInput, SnapshotParams};

    fn snapshot() -> Snapshot {
        let data = generate(&GeneratorParams {
            users: 120,
            items: 80,
            events: 5_000,
            segments: 4,
            ..GeneratorParams::default()
        });
        let mut engine = Engine::new(EngineParams {
            components: 4,
            clusters: 4,
            curve_components: 8,
            ..EngineParams::default()
        });
        engine.apply(&data.events);
        let titles = Default::default();
        snapshot::build(
            &engine,
            &SnapshotParams {
                diagnostics_k: vec![2, 4, 6],
                ..SnapshotParams::default()
            },
            BuildInput::standalone(&titles, true),
        )
        .expect("snapshot")
        .0
    }

    #[test]
    fn rendering_is_byte_identical_and_carries_the_numbers() {
        let s = snapshot();
        let history = vec![SnapshotSummary::from(&s)];
        for name in CHART_NAMES {
            let a = render(name, &s, None, &history).unwrap();
            let b = render(name, &s.clone(), None, &history.clone()).unwrap();
            assert_eq!(a, b, "{name} must render deterministically");
            assert!(a.starts_with("<svg") && a.ends_with("</svg>"));
        }
        let ev = render("explained_variance", &s, None, &history).unwrap();
        assert_eq!(ev.matches("class=\"bar\"").count(), s.pca.n_components);
        assert!(render("no_such_chart", &s, None, &history).is_none());
        let cm = render("confusion_matrix", &s, None, &history).unwrap();
        assert_eq!(cm.matches("class=\"cell\"").count(), 16);
    }

    #[test]
    fn flows_draw_one_band_per_pair_and_say_when_there_is_nothing_to_compare() {
        let mut s = snapshot();
        s.drift = None;
        let none = render("flows", &s, None, &[]).unwrap();
        assert!(none.contains("no earlier snapshot"));
        let previous: Vec<u32> = (0..100).map(|u| u % 4).collect();
        let now: Vec<u32> = (0..100)
            .map(|u| if u < 10 { (u + 1) % 4 } else { u % 4 })
            .collect();
        let drift = crate::snapshot::drift_from(s.version - 1, &previous, &now);
        assert_eq!(drift.users_moved, 10);
        assert_eq!(drift.flows.iter().map(|f| f.users).sum::<u64>(), 100);
        let moved: u64 = drift
            .flows
            .iter()
            .filter(|f| f.from != f.to)
            .map(|f| f.users)
            .sum();
        assert_eq!(moved, 10);
        s.drift = Some(drift.clone());
        let svg = render("flows", &s, None, &[]).unwrap();
        assert_eq!(svg.matches("class=\"flow\"").count(), drift.flows.len());
        for f in &drift.flows {
            let band = format!(
                "data-from=\"{}\" data-to=\"{}\" data-users=\"{}\"",
                f.from, f.to, f.users
            );
            assert!(svg.contains(&band), "{band}");
        }
    }
}
