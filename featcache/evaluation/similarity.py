"""How similar are two representations: CKA and RSA between feature sets of one or more stores.

- **Linear CKA** (Kornblith et al. 2019, "Similarity of Neural Network Representations
  Revisited"), with the biased HSIC or the unbiased one (Song et al. 2012, as Kornblith's
  ``feature_space_linear_cka(debiased=True)``): from the centred features' covariances
  (D x D), read a chunk of rows at a time: never an n x n matrix, every matched image used.
- **RBF CKA**: Gaussian kernels whose bandwidth is the median distance (``threshold`` 1.0 of
  Kornblith's ``gram_rbf``), on a seeded sample of ``rsa_images`` images (n x n kernels).
- **RSA** (Kriegeskorte et al. 2008): Spearman's correlation between the representational
  dissimilarity matrices (correlation distance, 1 - Pearson between images' features) of the
  same sample, over their upper triangles.

Images are matched by id across stores (the first set's order); labels must agree, and at
least ``min_images`` must match. Every pair of the given sets is compared (every layer of two
stores: a layer-by-layer matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.errors import ArgumentError, StoreError
from featcache.store import Store

MEASURES = ("linear_cka", "linear_cka_unbiased", "rbf_cka", "rsa")
_CHUNK = 8192  # rows per step of the covariance pass


@dataclass(frozen=True)
class SimilarityConfig:
    split: str = "test"
    # Images of the seeded sample that RBF CKA and RSA use (their n x n matrices).
    rsa_images: int = 5000
    # Fewest images the sets must have in common.
    min_images: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.rsa_images < 3 or self.min_images < 4:
            raise ArgumentError("--rsa-images must be at least 3 and --min-images at least 4")


@dataclass
class FeatureSet:
    """One store's feature set, rows ``positions`` of its split in the common order."""

    store: Store
    feature: str
    positions: np.ndarray | None = None  # None until matched

    @property
    def name(self) -> str:
        return f"{self.store.path.stem}:{self.feature}"


def feature_sets(spec: str) -> list[FeatureSet]:
    """``STORE``, ``STORE:FEATURE[,FEATURE...]`` or ``STORE:all`` (every set, in depth order)."""
    path, sep, names = spec.rpartition(":")
    if not sep or "/" in names or names.endswith(".h5"):  # no feature part
        path, names = spec, ""
    store = Store(path)
    if names == "all":
        return [FeatureSet(store, f) for f in store.feature_sets]
    return [
        FeatureSet(store, f) for f in (names.split(",") if names else [store.default_feature()])
    ]


def match(sets: list[FeatureSet], cfg: SimilarityConfig) -> tuple[list[str], np.ndarray]:
    """Align every set on the images all hold (the first set's order): ids and labels."""
    seen = {}
    for s in sets:
        s.store.check(cfg.split, s.feature)
        key = str(s.store.path)
        if key not in seen:
            ids = list(s.store.read(cfg.split, "ids"))
            if len(set(ids)) != len(ids):
                raise StoreError(
                    f"{s.store.path} holds an image id twice in its {cfg.split} split: images "
                    "cannot be matched by id; extract it again"
                )
            seen[key] = (ids, s.store.read(cfg.split, "labels"))
    first_ids = seen[str(sets[0].store.path)][0]
    common = set(first_ids)
    for ids, _ in seen.values():
        common &= set(ids)
    order = [i for i in first_ids if i in common]
    if len(order) < cfg.min_images:
        raise StoreError(
            f"the sets have {len(order)} images of the {cfg.split} split in common (by id), "
            f"fewer than {cfg.min_images}: compare stores of the same images "
            "(or lower --min-images)"
        )
    index_of = {key: {sid: k for k, sid in enumerate(ids)} for key, (ids, _) in seen.items()}
    ref = None
    for s in sets:
        where = index_of[str(s.store.path)]
        s.positions = np.fromiter((where[i] for i in order), np.int64, len(order))
        own = seen[str(s.store.path)][1][s.positions]
        if ref is None:
            ref = own
        elif not np.array_equal(own, ref):
            bad = order[int(np.flatnonzero(own != ref)[0])]
            raise StoreError(
                f"{s.store.path} labels image {bad!r} otherwise than {sets[0].store.path}: "
                "these stores do not hold the same labelled images"
            )
    return order, ref


def _rows(s: FeatureSet, split: str, positions: np.ndarray) -> np.ndarray:
    """Rows ``positions`` (any order) of a set, float64."""
    return s.store.rows_at(split, s.feature, positions)


def centred(s: FeatureSet, split: str) -> dict:
    """What linear CKA needs of one set alone, computed once whatever the pairs: its mean,
    the squared norm of its centred covariance ||X^T X||_F^2, and the sum and the sum of
    squares of its centred rows' squared norms, and those norms (two passes of chunks)."""
    chunks = [s.positions[a : a + _CHUNK] for a in range(0, len(s.positions), _CHUNK)]
    mean = sum(_rows(s, split, p).sum(0) for p in chunks) / len(s.positions)
    gram, norms = 0.0, []
    for p in chunks:
        xs = _rows(s, split, p) - mean
        gram = gram + xs.T @ xs
        norms.append(np.einsum("ij,ij->i", xs, xs))
    r = np.concatenate(norms)
    return {"mean": mean, "gram": float(np.sum(gram**2)), "r": r, "r1": float(r.sum()),
            "r2": float(r @ r)}  # fmt: skip


def linear_cka(x: FeatureSet, y: FeatureSet, split: str, sx: dict, sy: dict) -> dict[str, float]:
    """Biased and unbiased linear CKA of two matched sets, from their covariances (each set's
    own terms, its ``centred``: ``sx``, ``sy``)."""
    n = len(x.positions)
    xy = 0.0
    for a in range(0, n, _CHUNK):
        xs = _rows(x, split, x.positions[a : a + _CHUNK]) - sx["mean"]
        ys = _rows(y, split, y.positions[a : a + _CHUNK]) - sy["mean"]
        xy = xy + xs.T @ ys
    xy, rx_ry = float(np.sum(xy**2)), float(sx["r"] @ sy["r"])

    def debiased(xty, rr, a, b):  # Kornblith's _debiased_dot_product_similarity_helper
        return xty - n / (n - 2) * rr + a * b / ((n - 1) * (n - 2))

    unbiased = debiased(xy, rx_ry, sx["r1"], sy["r1"]) / np.sqrt(
        debiased(sx["gram"], sx["r2"], sx["r1"], sx["r1"])
        * debiased(sy["gram"], sy["r2"], sy["r1"], sy["r1"])
    )
    return {
        "linear_cka": xy / np.sqrt(sx["gram"] * sy["gram"]),
        "linear_cka_unbiased": float(unbiased),
    }


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Kornblith's gram_rbf: exp(-d^2 / (2 threshold^2 median d^2)), built in place (one
    n x n array, and the median's copy)."""
    gram = x @ x.T
    sq = np.diag(gram).copy()
    gram *= -2
    gram += sq[:, None]
    gram += sq[None, :]
    gram /= -2 * threshold**2 * np.median(gram)
    return np.exp(gram, out=gram)


def center_gram(gram: np.ndarray) -> np.ndarray:
    """Kornblith's center_gram (biased): H K H, in place."""
    means = gram.mean(0)
    means -= means.mean() / 2
    gram -= means[:, None]
    gram -= means[None, :]
    return gram


def rbf_cka(x: np.ndarray, y: np.ndarray) -> float:
    gx = center_gram(gram_rbf(x))
    gy = center_gram(gram_rbf(y))
    hsic = float(np.einsum("ij,ij->", gx, gy))
    return hsic / float(np.linalg.norm(gx) * np.linalg.norm(gy))


def rdm(x: np.ndarray) -> np.ndarray:
    """Correlation distance between images: 1 - Pearson's r of their features (upper
    triangle, row by row)."""
    z = x - x.mean(1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    r = z @ z.T
    upper = r[np.triu_indices(len(x), k=1)]
    del r
    return np.subtract(1, upper, out=upper)


def rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's correlation between the two RDMs (ranks with ties averaged)."""
    from scipy.stats import rankdata

    a = rankdata(rdm(x))
    a -= a.mean()
    b = rankdata(rdm(y))
    b -= b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def similarity(sets: list[FeatureSet], cfg: SimilarityConfig) -> dict:
    """Every pair of ``sets`` compared by every measure, on the images they share."""
    if len(sets) < 2:
        raise ArgumentError("similarity compares two or more feature sets: A.h5 B.h5, or A.h5:all")
    ids, _ = match(sets, cfg)
    n = len(ids)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, min(n, cfg.rsa_images), replace=False))
    stats = [centred(s, cfg.split) for s in sets]  # once a set, not once a pair
    small = [_rows(s, cfg.split, s.positions[sample]) for s in sets]
    names = [s.name for s in sets]
    matrices = {m: np.eye(len(sets)).tolist() for m in MEASURES}
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            values = linear_cka(sets[i], sets[j], cfg.split, stats[i], stats[j])
            values["rbf_cka"] = rbf_cka(small[i], small[j])
            values["rsa"] = rsa(small[i], small[j])
            for m in MEASURES:
                matrices[m][i][j] = matrices[m][j][i] = float(values[m])
    return {
        "kind": "similarity",
        "sets": names,
        "stores": [str(s.store.path) for s in sets],
        "fingerprints": [s.store.fingerprint for s in sets],
        "split": cfg.split,
        "images": n,
        "sample_images": len(sample),
        **matrices,
    }


def plot_similarity(result: dict, path: str) -> None:
    """One heatmap per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result["sets"])
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 0.35 * k + 3))
    for ax, m in zip(axes, MEASURES):
        im = ax.imshow(np.asarray(result[m]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(m.replace("_", " "))
        ax.set_xticks(range(k), result["sets"], rotation=90, fontsize=7)
        ax.set_yticks(range(k), result["sets"], fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"{result['images']} {result['split']} images (RBF CKA and RSA: "
                 f"{result['sample_images']})")  # fmt: skip
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
