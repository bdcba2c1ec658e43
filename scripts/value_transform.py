"""segmenter's `[events] transform` of a sparse user x item matrix, for the Python scripts
that run the recipe beside segmenter (sklearn_golden.py, bench_sklearn.py,
implicit_transforms.py): binary / sqrt / log1p per value, then with `+l2` (or `l2` alone)
each row scaled to unit l2 norm."""

import numpy as np
from sklearn.preprocessing import normalize

NAMES = ["none", "binary", "sqrt", "log1p", "l2", "binary+l2", "sqrt+l2", "log1p+l2"]


def transform(X, name):
    """The transform `name` of the CSR matrix X (values >= 0), as a new matrix (X itself for
    "none")."""
    if name not in NAMES:
        raise SystemExit(f"unknown transform {name!r}: use one of {', '.join(NAMES)}")
    if name == "none":
        return X
    cell, l2 = name, False
    if name == "l2":
        cell, l2 = "none", True
    elif name.endswith("+l2"):
        cell, l2 = name[: -len("+l2")], True
    X = X.copy()
    if cell == "binary":
        X.data = np.ones_like(X.data)
    elif cell == "sqrt":
        np.sqrt(X.data, out=X.data)
    elif cell == "log1p":
        np.log1p(X.data, out=X.data)
    if l2:
        X = normalize(X, norm="l2", axis=1, copy=False).tocsr()
        X.sort_indices()
    return X
