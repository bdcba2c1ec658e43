//! The seed-style text report of a snapshot: a header with the key figures, then per cluster a
//! line `ID (SIZE, N_ITEMS)` followed by its top items with their TF-IDF scores.

use std::fmt::Write;

use super::Snapshot;

pub fn seed_report(snapshot: &Snapshot, top: usize) -> String {
    let mut out = String::new();
    let c = &snapshot.counts;
    let explained: f64 = snapshot.pca.explained_variance_ratio.iter().sum();
    let nb = &snapshot.validation.naive_bayes;
    let _ = writeln!(
        out,
        "snapshot v{} ({}, {} mode, values {}): {} users, {} items, {} ratings, {} events applied",
        snapshot.version,
        snapshot.created_at,
        snapshot.mode,
        snapshot.transform,
        c.users,
        c.items,
        c.ratings,
        c.events_applied
    );
    let _ = writeln!(
        out,
        "PCA: {} components explain {:.2}% of the variance; K-Means: k={}, inertia {:.4}",
        snapshot.pca.n_components,
        100.0 * explained,
        snapshot.kmeans.k,
        snapshot.kmeans.inertia
    );
    let holdout = nb
        .holdout_agreement
        .map_or("n/a".to_string(), |a| format!("{a:.4}"));
    let _ = writeln!(
        out,
        "Naive Bayes agreement: train {:.4}, holdout {holdout} ({} users)",
        nb.train_agreement, nb.holdout_users
    );
    if let Some(d) = &snapshot.drift {
        let _ = writeln!(
            out,
            "drift vs v{}: {} of {} users moved, adjusted Rand index {:.4}",
            d.previous_version, d.users_moved, d.users_compared, d.adjusted_rand_index
        );
    }
    for cluster in &snapshot.clusters {
        let _ = writeln!(
            out,
            "\n{} ({}, {})",
            cluster.id, cluster.size, cluster.n_items
        );
        for item in cluster.top_items.iter().take(top) {
            let name = item.title.as_deref().unwrap_or(&item.item);
            let _ = writeln!(out, "{name} {:.4}", item.score);
        }
    }
    out
}
