#!/usr/bin/env python3
"""The batch recipe of `segmenter`, written from scratch the way a strong Python user would,
for the side-by-side benchmark scripts/bench-vs-sklearn.sh (not a parity/golden tool: see
scripts/sklearn_golden.py for that).

    ratings CSV -> sparse user x item matrix -> PCA(arpack, sparse) -> KMeans on the projection
    -> MultinomialNB validation -> per-cluster mean TF-IDF profiles, top items first.

Matrix semantics are the engine's (`segmenter replay`):
  * records with an empty user/item id, a non-finite value or a value outside
    [--min-value, --max-value] are rejected ([events] min_value/max_value, default 0..5);
    in implicit mode an empty rating is rejected too;
  * events are applied in timestamp order, equal timestamps in file order (a stable sort;
    skipped when the file is already in time order, as generated files are);
  * explicit: the last value per (user, item) wins, an empty rating removes the cell;
    implicit: values per (user, item) add up;
  * cells equal to 0 are dropped; users and items without a remaining cell are dropped;
  * --transform (segmenter's `[events] transform`) then replaces the matrix by its
    transform: binary / sqrt / log1p per value, then with `+l2` (or `l2` alone) each row
    scaled to unit l2 norm; every later stage sees the transformed matrix (stage `transform`).

Timing: `wall_s` is in-process wall time from just before the CSV is read to the end of the
recipe (profiles); scoring against --truth/--assignments is reported as stage `score` and is
*not* part of wall_s. Peak RSS is ru_maxrss of this process (whole run, scoring included).

Usage:
    python scripts/bench_sklearn.py --ratings ratings.csv --clusters 25 [--mode explicit]
        [--components 10] [--truth truth.csv] [--assignments assign.csv] [--json]
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.metrics import adjusted_rand_score
from sklearn.naive_bayes import MultinomialNB

from value_transform import NAMES as TRANSFORMS, transform

SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratings", required=True, help="CSV with header user,item,rating,ts")
    p.add_argument("--mode", choices=["explicit", "implicit"], default="explicit")
    p.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default="none",
        help="as [events] transform (segmenter's implicit default is binary+l2)",
    )
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--clusters", type=int, default=25)
    p.add_argument("--min-value", type=float, default=0.0, help="as [events] min_value")
    p.add_argument("--max-value", type=float, default=5.0, help="as [events] max_value")
    p.add_argument("--truth", help="planted segments, CSV user,segment (ARI of our labels)")
    p.add_argument("--assignments", help="segmenter's assignments CSV user,cluster (ARI vs truth)")
    p.add_argument(
        "--score-seeds",
        type=int,
        default=0,
        help="with --truth: also fit KMeans(n_init=10) with random_state 1..N on the same projection "
        "and report each seed's inertia and ARI (how much the ARI depends on the seed alone)",
    )
    p.add_argument("--top", type=int, default=10, help="top items kept per cluster profile")
    p.add_argument("--threads", type=int, help="cap BLAS/OpenMP threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def read_ratings(path):
    # keep_default_na=False: ids such as "NA" or "null" stay ids; only an empty rating is NaN.
    df = pd.read_csv(
        path,
        dtype={"user": str, "item": str, "rating": "float64", "ts": "int64"},
        keep_default_na=False,
        na_values={"rating": [""]},
    )
    if list(df.columns) != ["user", "item", "rating", "ts"]:
        raise SystemExit(f"{path}: expected header user,item,rating,ts, got {list(df.columns)}")
    return df


def fold(df, mode, lo, hi):
    """Fold events into a users x items CSR matrix (engine semantics); returns X, users, items,
    rejected."""
    rating = df["rating"].to_numpy()
    empty = np.isnan(rating)
    ok = (df["user"].to_numpy() != "") & (df["item"].to_numpy() != "")
    with np.errstate(invalid="ignore"):
        in_range = np.isfinite(rating) & (rating >= lo) & (rating <= hi)
    ok &= in_range | empty if mode == "explicit" else in_range
    rejected = int(len(df) - ok.sum())
    if rejected:
        df = df[ok]
    ts = df["ts"].to_numpy()
    if len(ts) > 1 and not (ts[1:] >= ts[:-1]).all():
        df = df.iloc[np.argsort(ts, kind="stable")]

    # Integer codes first: deduplicating int64 keys is far cheaper than string pairs.
    ucode, users = pd.factorize(df["user"], sort=True)
    icode, items = pd.factorize(df["item"], sort=True)
    key = ucode.astype(np.int64) * len(items) + icode
    vals = df["rating"].to_numpy()
    if mode == "explicit":
        last = ~pd.Series(key).duplicated(keep="last").to_numpy()
        key, vals = key[last], vals[last]
        keep = ~np.isnan(vals) & (vals != 0.0)  # retraction or zero: no cell
    else:
        s = pd.Series(vals).groupby(key, sort=False).sum()
        key, vals = s.index.to_numpy(), s.to_numpy()
        keep = vals != 0.0
    key, vals = key[keep], vals[keep]
    rows, cols = np.divmod(key, len(items))
    # Drop users/items with no remaining cell (np.unique keeps the sorted id order).
    urow, rows = np.unique(rows, return_inverse=True)
    icol, cols = np.unique(cols, return_inverse=True)
    X = sp.csr_matrix(
        (vals.astype(np.float64), (rows, cols)), shape=(len(urow), len(icol)), dtype=np.float64
    )
    X.sort_indices()
    return X, np.asarray(users)[urow], np.asarray(items)[icol], rejected


def read_labels(path, value_col):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != ["user", value_col]:
        raise SystemExit(f"{path}: expected header user,{value_col}, got {list(df.columns)}")
    return df.set_index("user")[value_col]


def ari(a, b):
    """ARI of two label Series aligned on user id (inner join); (score, users compared)."""
    j = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    if len(j) == 0:
        return None, 0
    return float(adjusted_rand_score(j["a"], j["b"])), int(len(j))


def seed_spread(P, users, truth, args, labels, inertia):
    """Inertia and ARI vs truth of KMeans(n_init=10) for random_state SEED and 1..N: the
    spread a user would see from the seed alone, on the same projection."""
    runs = [{"random_state": SEED, "inertia": float(inertia),
             "ari_truth": ari(pd.Series(labels, index=pd.Index(users, name="user")), truth)[0]}]
    for seed in range(1, args.score_seeds + 1):
        km = KMeans(n_clusters=args.clusters, n_init=10, random_state=seed).fit(P)
        s = pd.Series(km.labels_, index=pd.Index(users, name="user"))
        runs.append({"random_state": seed, "inertia": float(km.inertia_), "ari_truth": ari(s, truth)[0]})
    return runs


def run(args):
    stages = {}
    t0 = time.perf_counter()
    t = t0

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        stages[name] = round(now - t, 6)
        t = now

    df = read_ratings(args.ratings)
    lap("read_csv")
    X, users, items, rejected = fold(df, args.mode, args.min_value, args.max_value)
    events = len(df)
    del df
    lap("matrix")
    X = transform(X, args.transform)
    lap("transform")
    n_users, n_items = X.shape
    if args.clusters > n_users or args.components >= min(X.shape):
        raise SystemExit(f"matrix {X.shape} too small for {args.components} components / {args.clusters} clusters")

    pca = PCA(n_components=args.components, svd_solver="arpack", random_state=SEED)
    P = pca.fit_transform(X)
    lap("pca")
    km = KMeans(n_clusters=args.clusters, n_init=10, random_state=SEED).fit(P)
    labels = km.labels_
    lap("kmeans")
    nb = MultinomialNB().fit(X, labels)
    nb_train = float(np.mean(nb.predict(X) == labels))
    lap("naive_bayes")
    T = TfidfTransformer(smooth_idf=True, norm="l2").fit_transform(X)
    sizes = np.bincount(labels, minlength=args.clusters)
    M = sp.csr_matrix(
        (1.0 / sizes[labels], (labels, np.arange(n_users))), shape=(args.clusters, n_users)
    )
    profiles = np.asarray((M @ T).todense())  # clusters x items, mean TF-IDF row per cluster
    top = np.argsort(-profiles, axis=1, kind="stable")[:, : args.top]
    top_items = [[str(items[j]) for j in row] for row in top]
    lap("profiles")
    wall = time.perf_counter() - t0

    out = {
        "wall_s": round(wall, 6),
        "stages": stages,
        "inertia": float(km.inertia_),
        "ari_truth": None,
        "users": int(n_users),
        "items": int(n_items),
        "ratings": int(X.nnz),
        "events": int(events),
        "rejected": rejected,
        "explained_variance_ratio_sum": float(pca.explained_variance_ratio_.sum()),
        "kmeans_iterations": int(km.n_iter_),
        "nb_train_agreement": nb_train,
        "cluster_sizes": [int(s) for s in sizes],
        "top_items": top_items,
    }
    if args.truth or args.assignments:
        ours = pd.Series(labels, index=pd.Index(users, name="user"))
        truth = read_labels(args.truth, "segment") if args.truth else None
        if truth is not None:
            out["ari_truth"], out["truth_users_scored"] = ari(ours, truth)
            out["truth_users"] = int(len(truth))
        if args.assignments:
            theirs = read_labels(args.assignments, "cluster")
            out["assignments_users"] = int(len(theirs))
            ids = set(users)
            out["assignments_users_not_in_matrix"] = int(sum(u not in ids for u in theirs.index))
            out["ari_assignments_vs_sklearn"], _ = ari(theirs, ours)
            if truth is not None:
                out["ari_truth_assignments"], out["assignments_users_scored"] = ari(theirs, truth)
        if truth is not None and args.score_seeds > 0:
            out["seeds"] = seed_spread(P, users, truth, args, labels, km.inertia_)
        lap("score")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    return out


def main(argv=None):
    args = parse_args(argv)
    np.random.seed(SEED)
    if args.threads:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads):
            out = run(args)
    else:
        out = run(args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"users {out['users']}  items {out['items']}  ratings {out['ratings']}  "
          f"(events {out['events']}, rejected {out['rejected']})")
    print(f"wall {out['wall_s']:.3f} s  peak RSS {out['peak_rss_mb']} MB  stages " +
          "  ".join(f"{k} {v:.3f}" for k, v in out["stages"].items()))
    print(f"inertia {out['inertia']:.6g}  explained {out['explained_variance_ratio_sum']:.4f}  "
          f"NB train agreement {out['nb_train_agreement']:.4f}")
    for key in ("ari_truth", "ari_truth_assignments", "ari_assignments_vs_sklearn"):
        if out.get(key) is not None:
            print(f"{key} {out[key]:.4f}")
    for c, row in enumerate(out["top_items"]):
        print(f"cluster {c:>3} ({out['cluster_sizes'][c]} users): {' '.join(row)}")


if __name__ == "__main__":
    sys.exit(main())
