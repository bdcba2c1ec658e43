//! The statistics a rating data set is described by in the literature (counts, density,
//! ratings per user, item popularity concentration, the star histogram): what the realistic
//! profile is calibrated against and what `segmenter generate --stats` prints.

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use crate::event::RatingEvent;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataStats {
    pub users: usize,
    pub items: usize,
    /// Events (ratings in explicit mode, sessions in implicit mode).
    pub events: usize,
    /// Distinct (user, item) pairs over users x items with at least one event.
    pub density: f64,
    /// Distinct items per user: the 10th, 50th and 90th percentiles, the mean and the largest.
    pub per_user_p10: usize,
    pub per_user_median: usize,
    pub per_user_p90: usize,
    pub per_user_mean: f64,
    pub per_user_max: usize,
    /// Share of users with more than 500 distinct items.
    pub users_over_500: f64,
    /// Events per item: the median and the largest.
    pub per_item_median: usize,
    pub per_item_max: usize,
    /// Share of all events on the most popular 1% of the items (at least one item).
    pub top_1pct_items_share: f64,
    /// Gini coefficient of events per item (items with at least one event).
    pub item_gini: f64,
    pub mean_value: f64,
    /// Share of values 1, 2, 3, 4 and 5 (values rounded to the nearest whole number; others
    /// are counted in none).
    pub star_shares: [f64; 5],
    /// Share of events whose value is at least 10 (implicit: long sessions).
    pub values_at_least_10: f64,
    pub max_value: f64,
    /// Days between the first and the last event.
    pub span_days: f64,
}

/// The `p`-quantile (0..=1) of sorted values by the nearest rank.
fn quantile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Gini coefficient of non-negative counts (0: all equal; towards 1: all on one).
pub fn gini(counts: &[usize]) -> f64 {
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let n = sorted.len() as f64;
    let total: f64 = sorted.iter().map(|&c| c as f64).sum();
    if sorted.is_empty() || total == 0.0 {
        return 0.0;
    }
    let weighted: f64 = sorted
        .iter()
        .enumerate()
        .map(|(i, &c)| (i as f64 + 1.0) * c as f64)
        .sum();
    (2.0 * weighted) / (n * total) - (n + 1.0) / n
}

impl DataStats {
    pub fn of(events: &[RatingEvent]) -> DataStats {
        let mut per_user: FxHashMap<&str, FxHashSet<&str>> = FxHashMap::default();
        let mut per_item: FxHashMap<&str, usize> = FxHashMap::default();
        let mut stars = [0usize; 5];
        let mut sum = 0.0;
        let mut valued = 0usize;
        let mut long = 0usize;
        let mut max_value = f64::NEG_INFINITY;
        for e in events {
            per_user.entry(&e.user).or_default().insert(&e.item);
            *per_item.entry(&e.item).or_default() += 1;
            if let Some(v) = e.value {
                sum += v;
                valued += 1;
                max_value = max_value.max(v);
                if v >= 10.0 {
                    long += 1;
                }
                let star = v.round();
                if (1.0..=5.0).contains(&star) && (v - star).abs() < 1e-9 {
                    stars[star as usize - 1] += 1;
                }
            }
        }
        let mut user_counts: Vec<usize> = per_user.values().map(|s| s.len()).collect();
        user_counts.sort_unstable();
        let mut item_counts: Vec<usize> = per_item.values().copied().collect();
        item_counts.sort_unstable();
        let pairs: usize = user_counts.iter().sum();
        let (users, items) = (user_counts.len(), item_counts.len());
        let top = items.div_ceil(100).max(1).min(items);
        let top_events: usize = item_counts.iter().rev().take(top).sum();
        let n = events.len().max(1) as f64;
        let (first, last) = events.iter().fold((i64::MAX, i64::MIN), |(lo, hi), e| {
            (lo.min(e.ts), hi.max(e.ts))
        });
        DataStats {
            users,
            items,
            events: events.len(),
            density: pairs as f64 / (users.max(1) * items.max(1)) as f64,
            per_user_p10: quantile(&user_counts, 0.1),
            per_user_median: quantile(&user_counts, 0.5),
            per_user_p90: quantile(&user_counts, 0.9),
            per_user_mean: pairs as f64 / users.max(1) as f64,
            per_user_max: user_counts.last().copied().unwrap_or(0),
            users_over_500: user_counts.iter().filter(|&&c| c > 500).count() as f64
                / users.max(1) as f64,
            per_item_median: quantile(&item_counts, 0.5),
            per_item_max: item_counts.last().copied().unwrap_or(0),
            top_1pct_items_share: top_events as f64 / n,
            item_gini: gini(&item_counts),
            mean_value: sum / valued.max(1) as f64,
            star_shares: stars.map(|s| s as f64 / valued.max(1) as f64),
            values_at_least_10: long as f64 / valued.max(1) as f64,
            max_value: if valued > 0 { max_value } else { 0.0 },
            span_days: if events.is_empty() {
                0.0
            } else {
                (last - first) as f64 / 86_400.0
            },
        }
    }
}

impl std::fmt::Display for DataStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.star_shares;
        write!(
            f,
            "{users} users, {items} items, {events} events, density {density:.2}%\n\
             per user: p10 {p10}, median {median}, p90 {p90}, mean {mean:.1}, max {max}, over 500: {over:.1}%\n\
             per item: median {imed}, max {imax}; top 1% of items: {top:.1}% of events; item Gini {gini:.3}\n\
             values: mean {mv:.2}, max {maxv}, at least 10: {long:.2}%; stars 1-5: {s1:.1}% {s2:.1}% {s3:.1}% {s4:.1}% {s5:.1}%\n\
             span: {span:.0} days",
            users = self.users,
            items = self.items,
            events = self.events,
            density = 100.0 * self.density,
            p10 = self.per_user_p10,
            median = self.per_user_median,
            p90 = self.per_user_p90,
            mean = self.per_user_mean,
            max = self.per_user_max,
            over = 100.0 * self.users_over_500,
            imed = self.per_item_median,
            imax = self.per_item_max,
            top = 100.0 * self.top_1pct_items_share,
            gini = self.item_gini,
            mv = self.mean_value,
            maxv = self.max_value,
            long = 100.0 * self.values_at_least_10,
            s1 = 100.0 * s[0],
            s2 = 100.0 * s[1],
            s3 = 100.0 * s[2],
            s4 = 100.0 * s[3],
            s5 = 100.0 * s[4],
            span = self.span_days,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gini_of_equal_counts_is_zero_and_of_one_owner_near_one() {
        assert!(gini(&[5, 5, 5, 5]).abs() < 1e-12);
        let g = gini(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 100]);
        assert!((g - 0.9).abs() < 1e-12, "{g}");
    }
}
