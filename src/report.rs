//! `segmenter report`: a self-contained HTML report of a snapshot (inline SVG charts, the key
//! figures and the seed-style cluster profiles), readable offline.

use std::fmt::Write;

use crate::charts::{CHART_NAMES, ChartInputs};

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report of `charts.snapshot`, its charts drawn from `charts`.
pub fn html_report(charts: &ChartInputs, top: usize) -> String {
    let snapshot = &charts.snapshot;
    let mut html = String::new();
    let c = &snapshot.counts;
    let nb = &snapshot.validation.naive_bayes;
    let explained: f64 = snapshot.pca.explained_variance_ratio.iter().sum();
    let _ = write!(
        html,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>segmenter report: snapshot v{v}</title><style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}.charts{{display:flex;flex-wrap:wrap;gap:16px}}.figures td:last-child{{text-align:right}}</style></head><body><h1>Customer segments: snapshot v{v}</h1><p>Built {created} ({mode} mode, values: {transform}).</p><table class="figures"><tr><td>users</td><td>{users}</td></tr><tr><td>items</td><td>{items}</td></tr><tr><td>ratings</td><td>{ratings}</td></tr><tr><td>events applied</td><td>{events}</td></tr><tr><td>PCA components (variance explained)</td><td>{k} ({explained:.2}%)</td></tr><tr><td>clusters (inertia)</td><td>{clusters} ({inertia:.4})</td></tr><tr><td>Naive Bayes agreement: train / holdout</td><td>{train:.4} / {holdout}</td></tr></table><h2>Charts</h2><div class="charts">"#,
        v = snapshot.version,
        created = escape(&snapshot.created_at),
        mode = snapshot.mode,
        transform = snapshot.transform,
        users = c.users,
        items = c.items,
        ratings = c.ratings,
        events = c.events_applied,
        k = snapshot.pca.n_components,
        explained = 100.0 * explained,
        clusters = snapshot.kmeans.k,
        inertia = snapshot.kmeans.inertia,
        train = nb.train_agreement,
        holdout = nb
            .holdout_agreement
            .map_or("n/a".into(), |a| format!("{a:.4}")),
    );
    for name in CHART_NAMES {
        if let Some(svg) = charts.render(name) {
            let _ = write!(html, r#"<figure id="chart-{name}">{svg}</figure>"#);
        }
    }
    html.push_str("</div><h2>Segments</h2>");
    for cluster in &snapshot.clusters {
        let _ = write!(
            html,
            r#"<h3 id="cluster-{id}">{id} ({size}, {n})</h3><table><tr><th>item</th><th>score</th><th>mean rating</th><th>raters</th></tr>"#,
            id = cluster.id,
            size = cluster.size,
            n = cluster.n_items,
        );
        for item in cluster.top_items.iter().take(top) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td></tr>",
                escape(item.title.as_deref().unwrap_or(&item.item)),
                item.score,
                item.mean_rating.map_or("".into(), |m| format!("{m:.2}")),
                item.raters,
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    html
}
