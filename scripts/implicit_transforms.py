#!/usr/bin/env python3
"""How well each value transform segments an implicit (play-count) set: scikit-learn beside
segmenter.

The scoring side of scripts/implicit-transforms.sh: for a generated implicit ratings file and
its planted truth, fold the events into the user x item matrix (values add up), transform it
(binary, sqrt, log1p and/or l2 rows, as segmenter's `[events] transform`), run PCA + KMeans
(n_init=10) and print the adjusted Rand index of the clusters against the truth, one JSON line
per transform; with --assignments-dir, also the ARI of segmenter's assignments for that
transform (`<dir>/<transform>.csv`, as `segmenter replay --assignments-out` writes them).

    python3 scripts/implicit_transforms.py --ratings F.csv --truth T.csv \
        [--components 10] [--clusters K] [--seed 0] [--transforms none,sqrt+l2,...] \
        [--assignments-dir DIR]
"""

import argparse
import csv
import json
import time

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from value_transform import NAMES as TRANSFORMS, transform


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratings", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--clusters", type=int, default=0, help="default: the truth's segments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transforms", default=",".join(TRANSFORMS))
    p.add_argument("--assignments-dir", help="segmenter's assignments, <dir>/<transform>.csv")
    args = p.parse_args()

    cells = {}
    with open(args.ratings, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for user, item, rating, _ts in reader:
            if rating.strip():
                cells[(user, item)] = cells.get((user, item), 0.0) + float(rating)
    users = sorted({u for u, _ in cells})
    items = sorted({i for _, i in cells})
    uidx = {u: n for n, u in enumerate(users)}
    iidx = {i: n for n, i in enumerate(items)}
    rows = np.fromiter((uidx[u] for u, _ in cells), dtype=np.int64)
    cols = np.fromiter((iidx[i] for _, i in cells), dtype=np.int64)
    vals = np.fromiter(cells.values(), dtype=np.float64)
    X = sp.csr_matrix((vals, (rows, cols)), shape=(len(users), len(items)))
    truth = {}
    with open(args.truth, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for user, segment in reader:
            truth[user] = int(segment)
    planted = np.array([truth[u] for u in users])
    k = args.clusters or len(set(planted))
    for name in args.transforms.split(","):
        t0 = time.perf_counter()
        T = transform(X, name).toarray()
        projected = PCA(n_components=args.components, svd_solver="full").fit_transform(T)
        labels = KMeans(n_clusters=k, n_init=10, random_state=args.seed).fit(projected).labels_
        ari = adjusted_rand_score(planted, labels)
        segmenter = None
        if args.assignments_dir:
            found = {}
            with open(f"{args.assignments_dir}/{name}.csv", newline="") as f:
                reader = csv.reader(f)
                next(reader)
                for user, cluster in reader:
                    found[user] = int(cluster)
            scored = [u for u in users if u in found]
            segmenter = adjusted_rand_score([truth[u] for u in scored], [found[u] for u in scored])
        print(
            json.dumps(
                {
                    "transform": name,
                    "ari": round(float(ari), 4),
                    "segmenter_ari": None if segmenter is None else round(float(segmenter), 4),
                    "users": len(users),
                    "items": len(items),
                    "clusters": k,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
