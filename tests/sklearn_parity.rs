//! Parity with scikit-learn. The golden file was produced by scikit-learn itself from
//! `scripts/sklearn_golden.py` on the generated set below (regenerate with
//! `segmenter generate --users 900 --items 1600 --events 100000 --segments 12 --seed 7 --out /tmp/parity.csv`
//! then `python3 scripts/sklearn_golden.py --ratings /tmp/parity.csv --out tests/golden/parity_explicit.json`).

use ndarray::Array2;
use segmenter::engine::eigen::jacobi_eigen;
use segmenter::engine::{Engine, EngineParams, NO_CLUSTER, PreviousSegments, ValueTransform};
use segmenter::event::Mode;
use segmenter::generator::{GeneratorParams, Profile, generate};
use segmenter::snapshot::validation::{NaiveBayes, tfidf_profiles};
use segmenter::snapshot::{self, BuildInput, SnapshotParams};
use serde_json::Value;

fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("golden file")).expect("json")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn replayed_engine() -> Engine {
    let data = generate(&GeneratorParams {
        users: 900,
        items: 1600,
        events: 100_000,
        segments: 12,
        seed: 7,
        ..GeneratorParams::default()
    });
    let mut engine = Engine::new(EngineParams {
        components: 10,
        clusters: 25,
        ..EngineParams::default()
    });
    for batch in data.events.chunks(10_000) {
        let outcome = engine.apply(batch);
        assert!(outcome.rejected.is_empty());
    }
    engine
}

/// Golden labels re-indexed to the engine's user indices.
fn labels_by_engine_index(engine: &Engine, users: &[Value], labels: &[Value]) -> Vec<u32> {
    let mut out = vec![NO_CLUSTER; engine.users().len()];
    for (u, l) in users.iter().zip(labels) {
        let index = engine
            .users()
            .get(u.as_str().expect("id"))
            .expect("same users");
        out[index as usize] = l.as_u64().expect("label") as u32;
    }
    out
}

#[test]
fn online_engine_matches_scikit_learn_on_the_golden_set() {
    check_parity(&golden("parity_explicit"), &replayed_engine(), 10, 25);
}

/// The engine (fed the golden set's events) against scikit-learn's outputs on the same
/// (transformed) matrix, with `components` and `clusters` as the golden run had them.
fn check_parity(g: &Value, engine: &Engine, components: usize, clusters: usize) {
    let what = format!(
        "transform {}",
        g["params"]["transform"].as_str().unwrap_or("none")
    );

    // Same data: the fingerprint scikit-learn saw.
    let fp = &g["fingerprint"];
    assert_eq!(engine.active_users(), fp["users"].as_u64().unwrap());
    assert_eq!(engine.items().len() as u64, fp["items"].as_u64().unwrap());
    assert_eq!(engine.ratings(), fp["ratings"].as_u64().unwrap());
    let sum: f64 = engine.vectors().iter().flat_map(|x| x.val.iter()).sum();
    let expected_sum = fp["value_sum"].as_f64().unwrap();
    assert!(
        (sum - expected_sum).abs() <= 1e-12 * expected_sum,
        "{what}: value sum {sum} vs {expected_sum}"
    );
    // The column means of the (transformed) matrix: PCA's mean, to 1e-9 of the largest.
    let items = g["items"].as_array().unwrap();
    let mean = floats(&g["pca"]["mean"]);
    let n = engine.active_users() as f64;
    let largest = mean.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (col, item) in items.iter().enumerate() {
        let j = engine.items().get(item.as_str().unwrap()).unwrap() as usize;
        let ours = engine.stats().sums()[j] / n;
        assert!(
            (ours - mean[col]).abs() <= 1e-9 * largest,
            "{what}: mean of {item}: {ours} vs {}",
            mean[col]
        );
    }

    let titles = Default::default();
    let (snap, _) = snapshot::build(
        engine,
        &SnapshotParams::default(),
        BuildInput::standalone(&titles, true),
    )
    .expect("snapshot");
    assert!(snap.pca.converged);

    // PCA: explained variance (ratios) within 1e-6 relative of PCA(svd_solver="full").
    let ratio = floats(&g["pca"]["explained_variance_ratio"]);
    let variance = floats(&g["pca"]["explained_variance"]);
    for i in 0..components {
        let r = snap.pca.explained_variance_ratio[i];
        assert!(
            (r - ratio[i]).abs() <= 1e-6 * ratio[i],
            "ratio {i}: {r} vs {}",
            ratio[i]
        );
        let v = snap.pca.explained_variance[i];
        assert!(
            (v - variance[i]).abs() <= 1e-6 * variance[i],
            "variance {i}"
        );
    }
    let curve = floats(&g["pca"]["curve_explained_variance_ratio"]);
    let ours = &snap
        .diagnostics
        .as_ref()
        .unwrap()
        .explained_variance_ratio_curve;
    for (i, (a, b)) in ours.iter().zip(&curve).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b, "curve {i}: {a} vs {b}");
    }

    // Subspace: smallest cosine of the principal angles >= 0.9999.
    let golden_components = g["pca"]["components"].as_array().unwrap();
    let d = items.len();
    let mut theirs = Array2::<f64>::zeros((components, d));
    for (c, row) in golden_components.iter().enumerate() {
        for (col, v) in floats(row).into_iter().enumerate() {
            theirs[[c, col]] = v;
        }
    }
    let model = engine.snapshot_model(true, PreviousSegments::None).unwrap();
    let mut mine = Array2::<f64>::zeros((components, d));
    for (col, item) in items.iter().enumerate() {
        let j = engine.items().get(item.as_str().unwrap()).unwrap() as usize;
        for c in 0..components {
            mine[[c, col]] = model.basis()[[c, j]];
        }
    }
    let overlap = mine.dot(&theirs.t());
    let (eig, _) = jacobi_eigen(&overlap.dot(&overlap.t()));
    let smallest_cosine = eig.last().unwrap().max(0.0).sqrt();
    assert!(
        smallest_cosine >= 0.9999,
        "smallest principal cosine {smallest_cosine}"
    );

    // K-Means: inertia within 2% of KMeans(n_init=10) on the same projection.
    let sklearn_inertia = g["kmeans"]["inertia"].as_f64().unwrap();
    let worst_ratio = (0..components)
        .map(|i| (snap.pca.explained_variance_ratio[i] - ratio[i]).abs() / ratio[i])
        .fold(0.0f64, f64::max);
    eprintln!(
        "parity ({what}): worst relative ratio error {worst_ratio:.2e}, smallest principal cosine \
         {smallest_cosine:.12}, inertia {:.3} vs scikit-learn {sklearn_inertia:.3} ({:.4}x)",
        snap.kmeans.inertia,
        snap.kmeans.inertia / sklearn_inertia
    );
    assert!(
        snap.kmeans.inertia <= 1.02 * sklearn_inertia,
        "inertia {} vs scikit-learn {sklearn_inertia}",
        snap.kmeans.inertia
    );

    // TF-IDF profiles for scikit-learn's own labels: scores within 1e-9.
    let users = g["users"].as_array().unwrap();
    let labels = labels_by_engine_index(engine, users, g["kmeans"]["labels"].as_array().unwrap());
    let d_engine = engine.items().len();
    let profiles = tfidf_profiles(engine.vectors(), &labels, clusters, d_engine);
    let idf = floats(&g["tfidf"]["idf"]);
    for (col, item) in items.iter().enumerate() {
        let j = engine.items().get(item.as_str().unwrap()).unwrap() as usize;
        assert!((profiles.idf[j] - idf[col]).abs() < 1e-12);
    }
    let mut compared = 0;
    for profile in g["tfidf"]["profiles"].as_array().unwrap() {
        let c = profile["label"].as_u64().unwrap() as usize;
        assert_eq!(profiles.sizes[c], profile["size"].as_u64().unwrap());
        for pair in profile["top"].as_array().unwrap() {
            let j = engine.items().get(pair[0].as_str().unwrap()).unwrap() as usize;
            let expected = pair[1].as_f64().unwrap();
            assert!(
                (profiles.score(c, j) - expected).abs() < 1e-9,
                "cluster {c} item {j}"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= clusters * 15,
        "{what}: {compared} scores compared"
    );

    // Naive Bayes: train agreement equal to MultinomialNB's for the same labels, and the same
    // predictions, on the real labels and on deliberately perturbed ones.
    let nb_agreement = |labels: &[u32], golden: &Value| {
        let nb = NaiveBayes::fit(engine.vectors(), labels, clusters, d_engine, |_| true);
        let expected = floats(&golden["predictions"]);
        let mut agree = 0;
        for (row, user) in users.iter().enumerate() {
            let u = engine.users().get(user.as_str().unwrap()).unwrap();
            let p = nb.predict(engine.vector(u));
            assert_eq!(p as f64, expected[row], "prediction of {user}");
            agree += usize::from(p == labels[u as usize]);
        }
        let ours = agree as f64 / users.len() as f64;
        assert_eq!(ours, golden["train_agreement"].as_f64().unwrap());
        ours
    };
    nb_agreement(&labels, &g["naive_bayes"]);
    let mut perturbed = labels.clone();
    for (row, user) in users.iter().enumerate() {
        if row % 4 == 0 {
            let u = engine.users().get(user.as_str().unwrap()).unwrap() as usize;
            perturbed[u] = (perturbed[u] + 1) % clusters as u32;
        }
    }
    let agreement = nb_agreement(&perturbed, &g["naive_bayes_perturbed"]);
    assert!(
        agreement < 0.9,
        "perturbed labels should disagree: {agreement}"
    );
}

/// The golden implicit set: a realistic play-count set (regenerate with `segmenter generate
/// --mode implicit --profile realistic --users 400 --items 300 --events 30000 --segments 6
/// --seed 11 --out /tmp/implicit.csv`, then for each transform T, `python3
/// scripts/sklearn_golden.py --ratings /tmp/implicit.csv --mode implicit --transform T
/// --components 6 --clusters 8 --curve-components 12 --top 20 --out
/// tests/golden/parity_implicit_<T with + as _>.json`).
#[test]
fn every_transform_matches_scikit_learn_on_the_transformed_matrix() {
    let data = generate(&GeneratorParams {
        users: 400,
        items: 300,
        events: 30_000,
        segments: 6,
        seed: 11,
        mode: Mode::Implicit,
        profile: Profile::Realistic,
        ..GeneratorParams::default()
    });
    for transform in ValueTransform::all().filter(|t| !t.is_identity()) {
        let name = transform.to_string();
        let g = golden(&format!("parity_implicit_{}", name.replace('+', "_")));
        assert_eq!(g["params"]["transform"], name.as_str());
        let mut engine = Engine::new(EngineParams {
            mode: Mode::Implicit,
            max_value: 1e6,
            transform,
            components: 6,
            clusters: 8,
            curve_components: 12,
            ..EngineParams::default()
        });
        for batch in data.events.chunks(4_000) {
            assert!(engine.apply(batch).rejected.is_empty());
        }
        check_parity(&g, &engine, 6, 8);
    }
}
