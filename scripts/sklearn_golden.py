#!/usr/bin/env python3
"""Produce scikit-learn "golden" outputs for the Rust parity tests of `segmenter`.

The Rust crate re-implements a small pipeline (user x item matrix -> PCA ->
KMeans -> TF-IDF cluster profiles -> multinomial naive Bayes).  This script runs
the reference implementation of every step with scikit-learn and writes the
results to a JSON file that the Rust tests compare against.  It is a developer
tool only: the Rust build and tests never run it, they just read the JSON it
wrote.

Regenerate a golden file with (from the repository root):

    pip install -r scripts/requirements-golden.txt
    python3 scripts/sklearn_golden.py --ratings FILE.csv --out GOLDEN.json \
        [--mode explicit|implicit] [--transform none|binary|sqrt|log1p|l2|binary+l2|...] \
        [--components 10] [--clusters 25] [--curve-components 30] [--seed 0] [--top 100]

Input CSV: header `user,item,rating,ts`.  Ids are strings (never parsed as
numbers), rating is a float, ts an integer.  The matrix is built as follows:

* rows are stable-sorted by ts (rows with equal ts keep their file order);
* explicit mode: the last value per (user, item) wins; an empty rating field is
  a retraction and deletes the cell;
* implicit mode: values per (user, item) are added up in that order (an empty
  rating field contributes nothing);
* cells whose final value is exactly 0.0 are dropped; rows are the users and
  columns the items that keep at least one non-zero cell, each sorted by id
  string (code-point order, which equals UTF-8 byte order, i.e. Rust's
  `String` ordering);
* `--transform` (segmenter's `[events] transform`) then replaces the matrix by
  its transform: each value by 1 (binary), its square root (sqrt) or
  `log1p`, then with `+l2` (or `l2` alone) each row divided by its l2 norm
  (`sklearn.preprocessing.normalize`).  Every later step sees only the
  transformed matrix.

Every float in the output is written with full (round-trip) precision.  Numeric
libraries are limited to one thread while fitting so that the golden values do
not depend on the machine's core count.
"""

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import scipy
import scipy.sparse as sp
import sklearn
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.metrics import confusion_matrix
from sklearn.naive_bayes import MultinomialNB

from threadpoolctl import threadpool_limits

from value_transform import NAMES as TRANSFORMS, transform

INERTIA_KS = [2, 5, 10, 15, 20, 25, 30]
HEADER = ["user", "item", "rating", "ts"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Write scikit-learn golden outputs for the segmenter Rust parity tests."
    )
    p.add_argument("--ratings", required=True, help="input CSV with header user,item,rating,ts")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--mode", choices=["explicit", "implicit"], default="explicit")
    p.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default="none",
    )
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--clusters", type=int, default=25)
    p.add_argument("--curve-components", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=100)
    args = p.parse_args(argv)
    for name in ("components", "clusters", "curve_components", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def read_events(path):
    """Return [(user, item, rating_or_None, ts)] in file order."""
    events = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            raise SystemExit(f"{path}: expected header {','.join(HEADER)}, got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue  # blank line
            if len(row) != 4:
                raise SystemExit(f"{path}:{lineno}: expected 4 fields, got {len(row)}")
            user, item, rating_s, ts_s = row
            if rating_s.strip() == "":
                rating = None
            else:
                try:
                    rating = float(rating_s)
                except ValueError:
                    raise SystemExit(f"{path}:{lineno}: bad rating {rating_s!r}")
                if not math.isfinite(rating):
                    raise SystemExit(f"{path}:{lineno}: non-finite rating {rating_s!r}")
            try:
                ts = int(ts_s)
            except ValueError:
                raise SystemExit(f"{path}:{lineno}: bad ts {ts_s!r}")
            events.append((user, item, rating, ts))
    return events


def build_cells(events, mode):
    """Fold the events into {(user, item): value} following the mode's rules."""
    events = sorted(events, key=lambda e: e[3])  # list.sort is stable: ties keep file order
    cells = {}
    ignored_empty = 0
    for user, item, rating, _ts in events:
        key = (user, item)
        if mode == "explicit":
            if rating is None:
                cells.pop(key, None)  # retraction
            else:
                cells[key] = rating
        else:
            if rating is None:
                ignored_empty += 1
                continue
            cells[key] = cells.get(key, 0.0) + rating
    if ignored_empty:
        print(f"warning: implicit mode ignored {ignored_empty} empty rating field(s)", file=sys.stderr)
    return {k: v for k, v in cells.items() if v != 0.0}


def build_matrix(cells):
    users = sorted({u for u, _ in cells})
    items = sorted({i for _, i in cells})
    uidx = {u: n for n, u in enumerate(users)}
    iidx = {i: n for n, i in enumerate(items)}
    n = len(cells)
    rows = np.empty(n, dtype=np.int64)
    cols = np.empty(n, dtype=np.int64)
    vals = np.empty(n, dtype=np.float64)
    for k, ((u, i), v) in enumerate(cells.items()):
        rows[k] = uidx[u]
        cols[k] = iidx[i]
        vals[k] = v
    X = sp.csr_matrix((vals, (rows, cols)), shape=(len(users), len(items)), dtype=np.float64)
    X.sort_indices()
    assert X.nnz == n, "duplicate cells after folding"
    return X, users, items


def floats(a):
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def top_items(scores, items, top):
    # Stable sort on -score: equal scores keep column order, and columns are sorted
    # by item id, so ties are broken by item id ascending.
    order = np.argsort(-scores, kind="stable")[:top]
    return [[items[j], float(scores[j])] for j in order]


def nb_perturbed(X, labels, k):
    perturbed = np.array(
        [(int(l) + 1) % k if i % 4 == 0 else int(l) for i, l in enumerate(labels)]
    )
    pred = MultinomialNB(alpha=1.0).fit(X, perturbed).predict(X)
    return {
        "rule": "label (l + 1) % k for every user at row index i with i % 4 == 0",
        "train_agreement": float(np.mean(pred == perturbed)),
        "predictions": [int(x) for x in pred],
    }


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()

    cells = build_cells(read_events(args.ratings), args.mode)
    if not cells:
        raise SystemExit(f"{args.ratings}: no non-zero cells remain")
    X, users, items = build_matrix(cells)
    X = transform(X, args.transform)
    D = X.toarray()
    n_users, n_items = X.shape

    if X.data.min() < 0:
        raise SystemExit("negative cell values: MultinomialNB (and TF-IDF counts) need non-negative ratings")
    if args.clusters > n_users:
        raise SystemExit(f"--clusters {args.clusters} > number of users {n_users}")
    ks = [k for k in INERTIA_KS if k <= n_users]
    if len(ks) != len(INERTIA_KS):
        print(f"warning: inertia_by_k limited to k <= {n_users} users: {ks}", file=sys.stderr)

    with threadpool_limits(limits=1):
        # PCA on the dense matrix.
        pca = PCA(n_components=args.components, svd_solver="full").fit(D)
        curve = PCA(n_components=args.curve_components, svd_solver="full").fit(D)
        P = pca.transform(D)

        # KMeans on the PCA projection.
        km = KMeans(n_clusters=args.clusters, n_init=10, random_state=args.seed).fit(P)
        labels = km.labels_.astype(np.int64)
        sizes = np.bincount(labels, minlength=args.clusters)

        # TF-IDF cluster profiles.
        tfidf = TfidfTransformer()
        T = tfidf.fit_transform(X).tocsr()
        profiles = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            scores = np.asarray(T[members].mean(axis=0)).ravel()
            profiles.append(
                {"label": int(c), "size": int(members.size), "top": top_items(scores, items, args.top)}
            )

        # Multinomial naive Bayes trained on the KMeans labels.
        nb = MultinomialNB(alpha=1.0).fit(X, labels)
        pred = nb.predict(X).astype(np.int64)
        agreement = float(np.mean(pred == labels))
        cm = confusion_matrix(labels, pred)

        # Inertia diagnostics.
        inert_proj, inert_full = [], []
        for k in ks:
            inert_proj.append(float(KMeans(n_clusters=k, n_init=10, random_state=args.seed).fit(P).inertia_))
            inert_full.append(float(KMeans(n_clusters=k, n_init=10, random_state=args.seed).fit(D).inertia_))

    out = {
        "sklearn_version": sklearn.__version__,
        "numpy_version": np.__version__,
        "params": {
            "mode": args.mode,
            "transform": args.transform,
            "components": args.components,
            "clusters": args.clusters,
            "curve_components": args.curve_components,
            "seed": args.seed,
        },
        "fingerprint": {
            "users": int(n_users),
            "items": int(n_items),
            "ratings": int(X.nnz),
            # Exactly rounded sum (independent of summation order).
            "value_sum": math.fsum(X.data.tolist()),
        },
        "users": users,
        "items": items,
        "pca": {
            "explained_variance": floats(pca.explained_variance_),
            "explained_variance_ratio": floats(pca.explained_variance_ratio_),
            "singular_values": floats(pca.singular_values_),
            "mean": floats(pca.mean_),
            "components": [floats(row) for row in pca.components_],
            "curve_explained_variance_ratio": floats(curve.explained_variance_ratio_),
        },
        "kmeans": {
            "inertia": float(km.inertia_),
            "labels": [int(x) for x in labels],
            "sizes": [int(x) for x in sizes],
        },
        "tfidf": {
            "idf": floats(tfidf.idf_),
            "profiles": profiles,
        },
        "naive_bayes": {
            "train_agreement": agreement,
            "confusion_matrix": [[int(x) for x in row] for row in cm],
            "predictions": [int(x) for x in pred],
        },
        "inertia_by_k": {"k": ks, "projected": inert_proj, "full": inert_full},
        # NB on deliberately perturbed labels (every 4th user in row order moved to the next
        # label), so that agreement is well below 1 and a wrong NB port cannot match it.
        "naive_bayes_perturbed": nb_perturbed(X, labels, args.clusters),
    }

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, allow_nan=False, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, args.out)

    print(
        f"sklearn_golden: {args.mode} {n_users} users x {n_items} items, {X.nnz} ratings; "
        f"PCA({args.components}) evr={sum(out['pca']['explained_variance_ratio']):.4f}; "
        f"KMeans({args.clusters}) inertia={km.inertia_:.6g}; NB agreement={agreement:.4f}; "
        f"sklearn {sklearn.__version__} numpy {np.__version__} scipy {scipy.__version__}; "
        f"wrote {args.out} in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
