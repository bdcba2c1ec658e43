//! The realistic profile: rating data shaped like public rating data sets (MovieLens, the
//! Netflix Prize) instead of cleanly separated segments. Targets, sources and the measured
//! figures are in docs/generator.md; the constants below are what was calibrated.
//!
//! The shape: Zipf item popularity; every user rates at least [`MIN_RATINGS_PER_USER`] items
//! and log-normally more above that; each user is a mixture of a few latent tastes with a
//! dominant one (the ground truth), items belong to one or two tastes so tastes overlap and
//! share the popular head; stars come from a per-user bias, a per-item quality, the user's
//! affinity for the item's tastes and noise, cut at the star shares of MovieLens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashSet;

use super::{GeneratorParams, TruthAndCatalogue, Weighted, item_id, round_seed, user_id};
use crate::event::{Mode, RatingEvent};

/// Every MovieLens user has rated at least 20 movies (the data sets' READMEs).
pub const MIN_RATINGS_PER_USER: usize = 20;
/// σ of the log-normal number of ratings above the minimum: gives the medians and means of
/// ratings per user of ML-100K (65 / 106) and ML-1M (96 / 166) within a few ratings.
pub const ACTIVITY_SIGMA: f64 = 1.15;
/// The most of the catalogue one user rates (ML-100K's busiest user rated 44%, ML-1M's 62%).
pub const MAX_CATALOGUE_SHARE: f64 = 0.6;
/// Item popularity is Zipf–Mandelbrot, `(rank + offset)^-exponent`: the offset flattens the
/// head (no film is rated by everyone), the exponent thins the tail (many films are rated by
/// a handful). Calibrated to the item Gini of ML-100K and ML-1M (0.63).
pub const POPULARITY_EXPONENT: f64 = 1.4;
pub const POPULARITY_OFFSET: f64 = 30.0;
/// Share of items that belong to a second taste (overlapping tastes).
pub const SECOND_TASTE_SHARE: f64 = 0.5;
/// How much more likely a user picks an item of a taste it fully has than the popularity
/// baseline alone. Users put about 30% of their ratings on their dominant taste's items,
/// against 13% that popularity alone would give that taste: popularity still decides most
/// of what everyone rates.
pub const TASTE_STRENGTH: f64 = 8.0;
/// Implicit mode's [`TASTE_STRENGTH`] and [`DOMINANT_SHARE`]: people choose what they play
/// more by their own taste than what they rate, and with a clearer favourite. Not calibrated
/// to a published figure (docs/generator.md): chosen so that scikit-learn's PCA + KMeans on
/// the best transforms recovers the tastes with an ARI of about 0.92-0.94 and on raw counts
/// near 0, the landscape measured on the play-count set of the issue that asked for this
/// profile.
pub const LISTENING_TASTE_STRENGTH: f64 = 20.0;
pub const LISTENING_DOMINANT_SHARE: (f64, f64) = (0.6, 0.9);
/// Share of a user's taste mixture held by its dominant taste: uniform in this range; the
/// rest is split between two other tastes.
pub const DOMINANT_SHARE: (f64, f64) = (0.45, 0.8);
/// Shares of 1..5 stars in ML-100K (6,110 / 11,370 / 27,145 / 34,174 / 21,201 of 100,000).
pub const STAR_SHARES: [f64; 5] = [0.0611, 0.1137, 0.2715, 0.3417, 0.2120];
/// Spread of the latent score's parts (in units of the noise's): per-user bias, per-item
/// quality, taste affinity. Real data: user and item means vary by about half a star each.
const USER_BIAS_SD: f64 = 0.6;
const ITEM_QUALITY_SD: f64 = 0.6;
/// Popular items are rated higher than obscure ones, as in every public rating set.
const POPULARITY_QUALITY: f64 = 0.3;
const TASTE_AFFINITY: f64 = 1.5;
/// ML-100K's collection period: September 19th 1997 to April 22nd 1998, 215 days.
pub const SPAN_SECONDS: i64 = 215 * 86_400;
/// Implicit mode: chance that a session replays an item the user already played (picked in
/// proportion to its earlier sessions, so favourites accumulate plays).
pub const REPLAY_SHARE: f64 = 0.35;
/// Implicit mode: plays in one session follow a Pareto law with this tail index for an item
/// of no taste of the user's, falling to `1.1` for one of its dominant taste.
pub const SESSION_TAIL_INDEX: f64 = 1.6;
/// Implicit mode: longest session, in plays.
pub const SESSION_MAX_PLAYS: f64 = 100.0;

/// One drawn rating before it is turned into an event: 24 bytes, so a 10M-event set sorts by
/// time in about 240 MB.
#[derive(Clone, Copy)]
struct Drawn {
    ts: i64,
    user: u32,
    item: u32,
    /// Explicit: the latent score (stars are cut from its quantiles); implicit: plays.
    value: f64,
}

/// Most ratings (explicit) or sessions (implicit) `users` users can have in the realistic
/// profile: each rates at most [`MAX_CATALOGUE_SHARE`] of the catalogue.
pub fn max_events(users: usize, items: usize, mode: Mode) -> usize {
    match mode {
        Mode::Explicit => users.saturating_mul(per_user_cap(items)),
        Mode::Implicit => usize::MAX,
    }
}

fn per_user_cap(items: usize) -> usize {
    ((items as f64 * MAX_CATALOGUE_SHARE).floor() as usize).max(1)
}

/// A standard normal draw (Box–Muller; one of the pair is enough here).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// What stays the same across the rounds of a stream: items' popularity, tastes and quality,
/// users' taste mixtures, biases and activity weights.
struct World {
    popularity: Vec<f64>,
    global: Weighted,
    /// Per taste: its items and a sampler over them by popularity, and its share of all
    /// popularity.
    tastes: Vec<(Vec<u32>, Weighted, f64)>,
    /// Per item: its one or two tastes.
    item_tastes: Vec<[Option<u32>; 2]>,
    quality: Vec<f64>,
    /// Per user: `(taste, share)` of its mixture, the dominant taste first.
    mixture: Vec<[(u32, f64); 3]>,
    bias: Vec<f64>,
    activity: Vec<f64>,
    /// [`TASTE_STRENGTH`] or [`LISTENING_TASTE_STRENGTH`], by mode.
    strength: f64,
}

impl World {
    fn plant(params: &GeneratorParams, tastes: usize, rng: &mut ChaCha8Rng) -> World {
        let items = params.items;
        let mut ranks: Vec<usize> = (0..items).collect();
        for i in (1..ranks.len()).rev() {
            ranks.swap(i, rng.random_range(0..=i));
        }
        let popularity: Vec<f64> = ranks
            .iter()
            .map(|&r| ((r + 1) as f64 + POPULARITY_OFFSET).powf(-POPULARITY_EXPONENT))
            .collect();
        let total: f64 = popularity.iter().sum();
        let popularity: Vec<f64> = popularity.iter().map(|p| p / total).collect();
        let global = Weighted::new(popularity.iter().copied());
        let item_tastes: Vec<[Option<u32>; 2]> = (0..items)
            .map(|_| {
                let first = rng.random_range(0..tastes) as u32;
                let second = (tastes > 1 && rng.random::<f64>() < SECOND_TASTE_SHARE)
                    .then(|| (first + rng.random_range(1..tastes) as u32) % tastes as u32);
                [Some(first), second]
            })
            .collect();
        let mut members: Vec<Vec<u32>> = vec![vec![]; tastes];
        for (i, ts) in item_tastes.iter().enumerate() {
            for t in ts.iter().flatten() {
                members[*t as usize].push(i as u32);
            }
        }
        let tastes_of: Vec<(Vec<u32>, Weighted, f64)> = members
            .into_iter()
            .map(|m| {
                let mass = m.iter().map(|&i| popularity[i as usize]).sum();
                let sampler = Weighted::new(m.iter().map(|&i| popularity[i as usize]));
                (m, sampler, mass)
            })
            .collect();
        // Log popularity, centred and scaled, so quality leans towards the popular head.
        let log_pop: Vec<f64> = popularity.iter().map(|p| p.ln()).collect();
        let mean = log_pop.iter().sum::<f64>() / items.max(1) as f64;
        let sd = (log_pop.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / items.max(1) as f64)
            .sqrt()
            .max(1e-9);
        let quality: Vec<f64> = log_pop
            .iter()
            .map(|l| ITEM_QUALITY_SD * normal(rng) + POPULARITY_QUALITY * (l - mean) / sd)
            .collect();
        // Tastes are not equally common: prevalence falls like 1/sqrt(rank).
        let prevalence = Weighted::new((0..tastes).map(|t| 1.0 / ((t + 1) as f64).sqrt()));
        let mixture: Vec<[(u32, f64); 3]> = (0..params.users)
            .map(|_| {
                let dominant = prevalence.sample(rng) as u32;
                let (low, high) = match params.mode {
                    Mode::Explicit => DOMINANT_SHARE,
                    Mode::Implicit => LISTENING_DOMINANT_SHARE,
                };
                let share = rng.random_range(low..high);
                let split = rng.random::<f64>();
                let other = |rng: &mut ChaCha8Rng| {
                    if tastes > 1 {
                        (dominant + rng.random_range(1..tastes) as u32) % tastes as u32
                    } else {
                        dominant
                    }
                };
                let second = other(rng);
                let third = other(rng);
                [
                    (dominant, share),
                    (second, (1.0 - share) * split),
                    (third, (1.0 - share) * (1.0 - split)),
                ]
            })
            .collect();
        let bias: Vec<f64> = (0..params.users)
            .map(|_| USER_BIAS_SD * normal(rng))
            .collect();
        let activity: Vec<f64> = (0..params.users)
            .map(|_| (ACTIVITY_SIGMA * normal(rng)).exp())
            .collect();
        World {
            popularity,
            global,
            tastes: tastes_of,
            item_tastes,
            quality,
            mixture,
            bias,
            activity,
            strength: match params.mode {
                Mode::Explicit => TASTE_STRENGTH,
                Mode::Implicit => LISTENING_TASTE_STRENGTH,
            },
        }
    }

    /// How much of user `u`'s mixture is on the tastes of `item` (0 to 1).
    fn affinity(&self, u: usize, item: usize) -> f64 {
        self.mixture[u]
            .iter()
            .filter(|(t, _)| self.item_tastes[item].contains(&Some(*t)))
            .map(|(_, share)| share)
            .sum()
    }

    /// An item for user `u`: by popularity times `1 + TASTE_STRENGTH · affinity`, drawn as a
    /// mixture of the global sampler and the user's tastes' samplers, which is exact and costs
    /// O(log items).
    fn draw_item(&self, u: usize, rng: &mut ChaCha8Rng) -> usize {
        let mixture = &self.mixture[u];
        let strength = self.strength;
        let masses = mixture.map(|(t, share)| strength * share * self.tastes[t as usize].2);
        let mut target = rng.random::<f64>() * (1.0 + masses.iter().sum::<f64>());
        for ((t, _), mass) in mixture.iter().zip(masses) {
            if target < mass {
                let (members, sampler, _) = &self.tastes[*t as usize];
                return members[sampler.sample(rng)] as usize;
            }
            target -= mass;
        }
        self.global.sample(rng)
    }

    /// `n` distinct items for user `u`, drawn as [`World::draw_item`] without replacement.
    /// Rejection while the user has rated little of the catalogue; a heavy user's last items
    /// come from weighted keys over the rest of the catalogue (Efraimidis–Spirakis), so the
    /// cost stays O(items) per heavy user.
    fn draw_distinct(&self, u: usize, n: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
        let mut seen: FxHashSet<u32> = FxHashSet::default();
        let mut picked = Vec::with_capacity(n);
        let mut attempts = 0usize;
        let patience = 4 * n + 64;
        while picked.len() < n && attempts < patience {
            attempts += 1;
            let item = self.draw_item(u, rng) as u32;
            if seen.insert(item) {
                picked.push(item);
            }
        }
        if picked.len() < n {
            let mut keyed: Vec<(f64, u32)> = (0..self.popularity.len() as u32)
                .filter(|i| !seen.contains(i))
                .map(|i| {
                    let weight = self.popularity[i as usize]
                        * (1.0 + self.strength * self.affinity(u, i as usize));
                    let r: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    (r.ln() / weight, i)
                })
                .collect();
            let missing = n - picked.len();
            keyed.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            picked.extend(keyed.iter().take(missing).map(|&(_, i)| i));
        }
        picked
    }
}

/// Per user, how many ratings (explicit) or sessions (implicit): [`MIN_RATINGS_PER_USER`]
/// each (fewer if `events` cannot cover that), the rest shared in proportion to the users'
/// log-normal activity weights, each user held to `cap`; the counts add up to `events`
/// unless every user is at the cap.
fn counts_per_user(activity: &[f64], events: usize, cap: usize) -> Vec<usize> {
    let users = activity.len();
    if users == 0 {
        return vec![];
    }
    let floor = MIN_RATINGS_PER_USER.min(events / users).min(cap);
    let mut counts = vec![floor; users];
    let mut left = events.saturating_sub(floor * users);
    // Overflow past the cap goes back to the others; a few rounds settle it.
    for _ in 0..8 {
        let open: Vec<usize> = (0..users).filter(|&u| counts[u] < cap).collect();
        let weight: f64 = open.iter().map(|&u| activity[u]).sum();
        if left == 0 || open.is_empty() || weight <= 0.0 {
            break;
        }
        let mut given = 0;
        let mut remainders: Vec<(f64, usize)> = Vec::with_capacity(open.len());
        for &u in &open {
            let share = left as f64 * activity[u] / weight;
            let whole = (share.floor() as usize).min(cap - counts[u]);
            counts[u] += whole;
            given += whole;
            if counts[u] < cap {
                remainders.push((share - share.floor(), u));
            }
        }
        left -= given;
        // Largest remainders first (ties by user), one each, while some are left.
        remainders.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, u) in remainders.iter().take(left) {
            counts[u] += 1;
            left -= 1;
        }
    }
    counts
}

/// The realistic profile's events in time order, handed to `sink`; truth is each user's
/// dominant taste.
pub(super) fn generate_into(
    params: &GeneratorParams,
    mut sink: impl FnMut(RatingEvent),
) -> TruthAndCatalogue {
    let tastes = params.segments.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let world = World::plant(params, tastes, &mut rng);
    if params.round > 0 {
        rng = ChaCha8Rng::seed_from_u64(round_seed(params.seed, params.round));
    }
    let cap = match params.mode {
        Mode::Explicit => per_user_cap(params.items),
        Mode::Implicit => usize::MAX,
    };
    let counts = if params.items == 0 {
        vec![0; params.users]
    } else {
        counts_per_user(&world.activity, params.events, cap)
    };
    let mut drawn: Vec<Drawn> = Vec::with_capacity(counts.iter().sum());
    for (u, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        // A user joins some time in the span, rates most of its items in its first days and
        // stays for a (mostly short) while.
        let joined = rng.random_range(0..SPAN_SECONDS.max(1));
        let stays = ((SPAN_SECONDS - joined) as f64 * rng.random::<f64>().powi(2)) as i64;
        let when = |rng: &mut ChaCha8Rng, front_loaded: bool| {
            let r: f64 = rng.random();
            let r = if front_loaded { r.powi(3) } else { r };
            params.start_ts + joined + (stays as f64 * r) as i64
        };
        match params.mode {
            Mode::Explicit => {
                for item in world.draw_distinct(u, n, &mut rng) {
                    let latent = world.bias[u]
                        + world.quality[item as usize]
                        + TASTE_AFFINITY * world.affinity(u, item as usize)
                        + normal(&mut rng);
                    drawn.push(Drawn {
                        ts: when(&mut rng, true),
                        user: u as u32,
                        item,
                        value: latent,
                    });
                }
            }
            Mode::Implicit => {
                let mut sessions: Vec<u32> = Vec::with_capacity(n);
                for _ in 0..n {
                    let item = if !sessions.is_empty() && rng.random::<f64>() < REPLAY_SHARE {
                        sessions[rng.random_range(0..sessions.len())]
                    } else {
                        world.draw_item(u, &mut rng) as u32
                    };
                    sessions.push(item);
                    let tail = SESSION_TAIL_INDEX
                        - (SESSION_TAIL_INDEX - 1.1) * world.affinity(u, item as usize);
                    let r: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let plays = r.powf(-1.0 / tail).floor().clamp(1.0, SESSION_MAX_PLAYS);
                    drawn.push(Drawn {
                        ts: when(&mut rng, false),
                        user: u as u32,
                        item,
                        value: plays,
                    });
                }
            }
        }
    }
    if params.mode == Mode::Explicit {
        to_stars(&mut drawn);
    }
    // Stable: a user's events at one second keep the order they were drawn in.
    drawn.sort_by_key(|d| d.ts);
    for d in &drawn {
        sink(RatingEvent {
            user: user_id(d.user as usize),
            item: item_id(d.item as usize),
            value: Some(d.value),
            ts: d.ts,
        });
    }
    let truth = (0..params.users)
        .filter(|&u| counts[u] > 0)
        .map(|u| (user_id(u), world.mixture[u][0].0))
        .collect();
    (truth, catalogue(&world.item_tastes))
}

/// Replaces latent scores by stars: the lowest [`STAR_SHARES`]`[0]` of scores get 1 star, and
/// so on, so the star histogram is MovieLens' whatever the size of the set.
fn to_stars(drawn: &mut [Drawn]) {
    let mut scores: Vec<f64> = drawn.iter().map(|d| d.value).collect();
    let mut cuts = [f64::INFINITY; 4];
    let mut cumulative = 0.0;
    for (s, cut) in cuts.iter_mut().enumerate() {
        cumulative += STAR_SHARES[s];
        let k = (cumulative * scores.len() as f64) as usize;
        if k < scores.len() {
            let (_, nth, _) = scores.select_nth_unstable_by(k, f64::total_cmp);
            *cut = *nth;
        }
    }
    for d in drawn.iter_mut() {
        d.value = 1.0 + cuts.iter().filter(|&&c| d.value >= c).count() as f64;
    }
}

/// `(item id, title)` for every item, the title naming its tastes.
fn catalogue(item_tastes: &[[Option<u32>; 2]]) -> Vec<(String, String)> {
    item_tastes
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            let names: Vec<String> = ts.iter().flatten().map(|t| t.to_string()).collect();
            (item_id(i), format!("Item {i} (tastes {})", names.join("+")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::stats::DataStats;
    use crate::generator::{Profile, generate};

    /// ML-100K's shape: 943 users, 1,682 items, 100,000 ratings.
    fn ml100k(seed: u64, mode: Mode) -> GeneratorParams {
        GeneratorParams {
            seed,
            mode,
            profile: Profile::Realistic,
            ..GeneratorParams::default()
        }
    }

    #[test]
    fn statistics_fall_in_the_documented_ranges_for_three_seeds() {
        for seed in [1, 2, 3] {
            let data = generate(&ml100k(seed, Mode::Explicit));
            let s = DataStats::of(&data.events);
            let context = format!("seed {seed}:\n{s}");
            assert_eq!((s.users, s.events), (943, 100_000), "{context}");
            assert!(s.items >= 1_600, "{context}");
            // Explicit: one rating per (user, item), as in MovieLens.
            assert!((s.density - 100_000.0 / (943.0 * s.items as f64)).abs() < 1e-9);
            assert!(s.per_user_p10 >= MIN_RATINGS_PER_USER, "{context}");
            assert!((50..=80).contains(&s.per_user_median), "{context}");
            assert!(s.per_user_p90 >= 3 * s.per_user_median, "{context}");
            assert!((0.005..=0.05).contains(&s.users_over_500), "{context}");
            assert!(s.per_user_max <= 1_009, "{context}");
            assert!((0.05..=0.15).contains(&s.top_1pct_items_share), "{context}");
            assert!((0.52..=0.70).contains(&s.item_gini), "{context}");
            assert!((15..=40).contains(&s.per_item_median), "{context}");
            assert!((3.45..=3.60).contains(&s.mean_value), "{context}");
            for (share, target) in s.star_shares.iter().zip(STAR_SHARES) {
                assert!((share - target).abs() < 0.005, "{context}");
            }
            assert!((200.0..=215.0).contains(&s.span_days), "{context}");
        }
    }

    #[test]
    fn same_seed_same_data_and_every_user_has_a_dominant_taste() {
        let p = ml100k(5, Mode::Explicit);
        let a = generate(&p);
        let b = generate(&p);
        assert_eq!(a.events, b.events);
        assert_eq!(a.truth, b.truth);
        let c = generate(&GeneratorParams {
            seed: 6,
            ..p.clone()
        });
        assert_ne!(a.events, c.events);
        assert!(a.events.windows(2).all(|w| w[0].ts <= w[1].ts));
        assert_eq!(a.truth.len(), 943);
        assert!(a.truth.iter().all(|(_, t)| (*t as usize) < p.segments));
        // Tastes are not equally common, and none is missing.
        let mut sizes = vec![0usize; p.segments];
        for (_, t) in &a.truth {
            sizes[*t as usize] += 1;
        }
        assert!(sizes.iter().all(|&n| n > 0), "{sizes:?}");
        assert!(sizes[0] > 2 * sizes[p.segments - 1], "{sizes:?}");
        // A later round: the same users and tastes, fresh events.
        let later = generate(&GeneratorParams {
            round: 1,
            ..p.clone()
        });
        assert_eq!(later.truth, a.truth);
        assert_ne!(later.events, a.events);
    }

    /// Weak tastes: a user's dominant taste holds a clear but minor share of its ratings, well
    /// above what popularity alone gives that taste.
    #[test]
    fn dominant_taste_holds_a_minor_share_of_a_users_ratings() {
        let params = ml100k(1, Mode::Explicit);
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let world = World::plant(&params, params.segments, &mut rng);
        let data = generate(&params);
        let mut on_dominant = 0usize;
        let mut baseline = 0.0;
        for e in &data.events {
            let u: usize = e.user[1..].parse().expect("generated user id");
            let i: usize = e.item[1..].parse().expect("generated item id");
            let dominant = world.mixture[u][0].0;
            if world.item_tastes[i].contains(&Some(dominant)) {
                on_dominant += 1;
            }
            baseline += world.tastes[dominant as usize].2;
        }
        let share = on_dominant as f64 / data.events.len() as f64;
        let baseline = baseline / data.events.len() as f64;
        // Measured: 0.294 against a baseline of 0.128.
        assert!((0.2..=0.45).contains(&share), "share {share}");
        assert!(share > 1.8 * baseline, "share {share}, baseline {baseline}");
    }

    #[test]
    fn implicit_sessions_are_heavy_tailed_plays_with_a_truth() {
        let data = generate(&ml100k(1, Mode::Implicit));
        let s = DataStats::of(&data.events);
        assert_eq!(s.events, 100_000);
        assert_eq!(data.truth.len(), 943);
        assert!(data.events.iter().all(|e| matches!(e.value,
            Some(v) if (1.0..=SESSION_MAX_PLAYS).contains(&v) && v.fract() == 0.0)));
        // Most sessions are a play or two, a few are long.
        assert!(s.star_shares[0] > 0.5, "{s}");
        assert!((0.01..=0.08).contains(&s.values_at_least_10), "{s}");
        assert!(s.max_value >= 50.0, "{s}");
        // Activity is log-normal: the busiest tenth of users far above the median.
        assert!(s.per_user_p90 >= 2 * s.per_user_median, "{s}");
        // Favourites accumulate: some (user, item) pairs gather hundreds of plays.
        let mut totals: rustc_hash::FxHashMap<(&str, &str), f64> = Default::default();
        for e in &data.events {
            *totals.entry((&e.user, &e.item)).or_default() += e.value.unwrap_or(0.0);
        }
        let most = totals.values().copied().fold(0.0, f64::max);
        assert!(most >= 200.0, "most plays of one pair {most}");
    }

    #[test]
    fn counts_add_up_with_the_floor_and_the_cap() {
        let activity = [1.0, 1.0, 50.0, 0.1];
        let counts = counts_per_user(&activity, 200, 90);
        assert_eq!(counts.iter().sum::<usize>(), 200, "{counts:?}");
        assert!(counts.iter().all(|&n| (20..=90).contains(&n)), "{counts:?}");
        assert_eq!(counts[2], 90);
        // Too few events for the floor: shared evenly.
        assert_eq!(counts_per_user(&activity, 40, 90), vec![10; 4]);
        // More than every user can take: all at the cap.
        assert_eq!(counts_per_user(&activity, 1_000, 90), vec![90; 4]);
    }

    #[test]
    fn an_ml1m_sized_set_has_ml1m_statistics() {
        let data = generate(&GeneratorParams {
            users: 6_040,
            items: 3_706,
            events: 1_000_209,
            ..ml100k(1, Mode::Explicit)
        });
        let s = DataStats::of(&data.events);
        assert!((80..=110).contains(&s.per_user_median), "{s}");
        assert!((0.55..=0.72).contains(&s.item_gini), "{s}");
        assert!((0.02..=0.10).contains(&s.users_over_500), "{s}");
    }
}
