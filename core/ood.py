"""When not to trust a prediction: images and folders unlike the run's training data.

Two layers:
- a cheap gate on the image itself (`image_gate`) for what is not a chest radiograph at all: colour photos,
  blank or uniform images, mostly white pages (documents, inverted films), extreme aspect ratios;
- a score from the run's own model (`OodDetector`): the Mahalanobis distance of the image's penultimate-layer
  features (the backbone's output) to the nearest class mean of the training features, with one shrinkage
  covariance shared by the classes (Lee et al., NeurIPS 2018; Ledoit-Wolf shrinkage from scikit-learn). Its
  threshold lets 95% of the run's validation images pass, so on images like the training data about 5% are
  flagged by design.

For a folder, `folder_shift` adds a two-sample test of its features against the run's validation features
(maximum mean discrepancy with a permutation p-value), the validation images resampled to the folder's mix of
classes (each image's class: the class mean it is nearest to, no labels needed) so that another prevalence alone
is not called a shift. The reference is validation, not train: the model was
fitted on its training images, whose features sit tighter around the class means than those of any new image
from the same population, so a test against them would call held-out images of the training distribution
"different". Validation is carved from the same pool and never trained on.

The detector is saved with the run as `ood.safetensors` (tensors and string metadata, no pickle).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

OOD_FILE = "ood.safetensors"
QUANTILE = 0.95  # share of validation images that pass the score threshold
PROJECTION_DIM = 32  # principal components of the training features the folder test works in
MAX_REFERENCE = 1000  # validation images kept as the folder test's reference
MAX_TEST_SAMPLE = 500  # images per side in one folder test (seeded subsample above that)
N_PERMUTATIONS = 1000
MIN_FOLDER = 10  # fewer images than this: no folder test
ALPHA = 0.05

# Gate limits, set on the 6,256 Kermany images in shared/data (none of which trips any of them): widest aspect
# ratio 3.15, lowest standard deviation of gray levels 19.7, highest share of near-white pixels 0.15, and no
# colour at all (their RGB files carry R = G = B).
MAX_ASPECT = 3.5
MIN_GRAY_STD = 8.0
MAX_WHITE_SHARE = 0.5  # pixels above 240 of 255
MAX_MEAN_CHROMA = 12.0  # mean of max(R, G, B) - min(R, G, B)
MAX_COLOURFUL_SHARE = 0.10  # pixels whose chroma exceeds 50
GATE_PX = 128


# ---------------------------------------------------------------- the gate

def gate_reason(width: int, height: int, rgb: np.ndarray | None, gray: np.ndarray) -> str | None:
    """Why an image is not a chest radiograph, in words a clinician reads, or None. `rgb` is an (h, w, 3) uint8
    copy for colour files (None for grayscale ones), `gray` an (h, w) uint8 copy, both small."""
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > MAX_ASPECT:
        return (f"Not a chest X-ray: the image is {width} x {height} pixels, {aspect:.1f} times longer than wide "
                "(chest radiographs are close to square).")
    if rgb is not None:
        # Channel by channel: numpy's max over the last axis of an interleaved image is ~15x slower.
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        chroma = np.maximum(np.maximum(r, g), b).astype(np.int16) - np.minimum(np.minimum(r, g), b)
        if chroma.mean() > MAX_MEAN_CHROMA or (chroma > 50).mean() > MAX_COLOURFUL_SHARE:
            return ("Not a chest X-ray: the image is in colour (a photo, a screenshot or a drawing); radiographs are "
                    "grayscale.")
    g = gray.astype(np.float32)
    if g.std() < MIN_GRAY_STD:
        return "Not a chest X-ray: the image is blank or almost uniform; there is nothing to read."
    if (g > 240).mean() > MAX_WHITE_SHARE:
        return ("Not a chest X-ray as the model knows it: the image is mostly white, like a page of text or a "
                "negative (inverted) film; radiographs show the body light on a dark background.")
    return None


def gate_from_image(img, original_size: tuple[int, int]) -> str | None:
    """The gate for a decoded PIL image (perhaps decoded at reduced size) of a file `original_size` pixels."""
    from PIL import Image

    from .dataset import to_grayscale_uint8

    small = img.copy()
    small.thumbnail((GATE_PX, GATE_PX), Image.Resampling.BILINEAR)
    rgb = None
    if small.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV") or (small.mode == "P" and
                                                                        small.palette is not None):
        rgb = np.asarray(small.convert("RGB"), dtype=np.uint8)
    gray = np.asarray(to_grayscale_uint8(small), dtype=np.uint8)
    return gate_reason(*original_size, rgb, gray)


def image_gate(source: str | os.PathLike | bytes | BinaryIO) -> str | None:
    """The gate for one image file (path or bytes); None when it may be a chest radiograph. Raises ValueError
    for files that cannot be read (as dataset.load_grayscale does)."""
    from .dataset import open_image

    try:
        with open_image(source) as img:
            width, height = img.size
            if img.format == "JPEG":
                img.draft("L" if img.mode == "L" else "RGB", (GATE_PX, GATE_PX))
            img.load()
            return gate_from_image(img, (width, height))
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- the feature score

@dataclass
class OodDetector:
    """Class means and shared precision of the training features, the score threshold, and what the folder test
    needs (a projection and the projected validation features)."""

    means: np.ndarray  # (classes, d)
    precision: np.ndarray  # (d, d)
    threshold: float  # distance above which an image is unlike the training data
    projection_mean: np.ndarray  # (d,)
    projection: np.ndarray  # (d, k): whitened principal components of the training features
    reference: np.ndarray  # (n, k): validation features, projected
    info: dict[str, Any] = field(default_factory=dict)
    reference_class: np.ndarray | None = None  # (n,): each reference image's nearest class mean

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to the nearest class mean."""
        f = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        best = np.full(len(f), np.inf)
        for mean in self.means:
            diff = f - mean
            best = np.minimum(best, ((diff @ self.precision) * diff).sum(axis=1))
        return np.sqrt(np.maximum(best, 0.0))

    def nearest_class(self, features: np.ndarray) -> np.ndarray:
        """Index of the class mean each row is nearest to (Mahalanobis): a label-free stand-in for its class."""
        f = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        distances = np.stack([((f - mean) @ self.precision * (f - mean)).sum(axis=1) for mean in self.means], axis=1)
        return distances.argmin(axis=1)

    def project(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64).reshape(-1, self.dim) - self.projection_mean) @ self.projection

    def describe(self, score: float) -> str:
        return f"score {score:.2f}, threshold {self.threshold:.2f}"


def fit_detector(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                 quantile: float = QUANTILE, seed: int = 0) -> OodDetector:
    """Fit on the training features (class means, Ledoit-Wolf covariance of the class-centred features), set
    the threshold at the `quantile` of the validation scores. Raises ValueError when there is too little data."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    train = np.asarray(train_features, dtype=np.float64)
    val = np.asarray(val_features, dtype=np.float64)
    labels = np.asarray(train_labels)
    if train.ndim != 2 or len(train) < 4 or len(val) < 2:
        raise ValueError(f"too few images to fit the out-of-distribution score ({len(train)} training, {len(val)} "
                         "validation)")
    if not (np.isfinite(train).all() and np.isfinite(val).all()):
        raise ValueError("the model's features hold NaN or infinite values")
    classes = sorted(set(labels.tolist()))
    means = np.stack([train[labels == c].mean(axis=0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    k = int(min(PROJECTION_DIM, train.shape[1], len(train) - 1))
    pca = PCA(n_components=k, whiten=True, random_state=seed).fit(train)
    projection = pca.components_.T / np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(val), min(len(val), MAX_REFERENCE), replace=False))
    detector = OodDetector(means, precision, 0.0, pca.mean_, projection, np.zeros((0, k)))
    val_scores = detector.scores(val)
    # "higher" keeps the threshold an observed score: exactly the quantile's share of validation passes.
    detector.threshold = float(np.quantile(val_scores, quantile, method="higher"))
    detector.reference = detector.project(val[keep])
    detector.reference_class = detector.nearest_class(val[keep]).astype(np.float64)
    detector.info = {"n_train": int(len(train)), "n_val": int(len(val)), "quantile": float(quantile),
                     "val_flagged": float((val_scores > detector.threshold).mean()), "feature_dim": int(train.shape[1]),
                     "method": "Mahalanobis distance to the nearest class mean, Ledoit-Wolf shared covariance"}
    return detector


def save_detector(detector: OodDetector, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
    """Write atomically as safetensors (float32 tensors, string metadata)."""
    import torch
    from safetensors.torch import save

    from .runs import write_file_atomic

    path = Path(path)
    # The means and precision in float64: a shrinkage precision can be ill-conditioned on a small training set,
    # and float32 rounding would make it indefinite.
    tensors = {name: torch.from_numpy(np.ascontiguousarray(
        getattr(detector, name), dtype=np.float64 if name in ("means", "precision") else np.float32))
        for name in ("means", "precision", "projection_mean", "projection", "reference", "reference_class")
        if getattr(detector, name) is not None}
    metadata = {"threshold": repr(float(detector.threshold)), "info": json.dumps(detector.info), **(extra or {})}
    # Serialised here and written by Python: an unwritable folder is an OSError naming the file, not safetensors'.
    data = save(tensors, metadata=metadata)
    write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def load_detector(path: str | os.PathLike) -> OodDetector:
    """Read and check an ood.safetensors; ValueError naming the file and what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a usable out-of-distribution file ({type(e).__name__}: {e}); fit it again "
                         "with python -m core fit-ood RUN.") from None

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is damaged ({why}); fit it again with python -m core fit-ood RUN.")

    needed = ("means", "precision", "projection_mean", "projection", "reference")
    if any(k not in arrays for k in needed):
        raise bad(f"missing {', '.join(k for k in needed if k not in arrays)}")
    means, precision = arrays["means"], arrays["precision"]
    if means.ndim != 2 or means.shape[0] < 1 or precision.shape != (means.shape[1], means.shape[1]):
        raise bad("shapes do not agree")
    d, projection = means.shape[1], arrays["projection"]
    if arrays["projection_mean"].shape != (d,) or projection.ndim != 2 or projection.shape[0] != d or \
            arrays["reference"].ndim != 2 or arrays["reference"].shape[1] != projection.shape[1]:
        raise bad("shapes do not agree")
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise bad("NaN or infinite values")
    if len(arrays["reference"]) < 2:
        raise bad("its validation reference holds fewer than 2 images")
    reference_class = arrays.get("reference_class")
    if reference_class is not None and (reference_class.shape != (len(arrays["reference"]),) or not np.isin(
            reference_class, np.arange(len(means))).all()):
        raise bad("its reference classes do not fit its reference")
    scale = float(np.abs(precision).max()) or 1.0
    eigenvalues = np.linalg.eigvalsh((precision + precision.T) / 2) if np.isfinite(precision).all() else [-1.0]
    if not np.allclose(precision, precision.T, rtol=1e-4, atol=1e-6 * scale) or \
            min(eigenvalues) <= -1e-9 * max(abs(e) for e in eigenvalues):
        raise bad("its precision matrix is not symmetric positive definite")
    try:
        threshold = float(meta.get("threshold", "nan"))
    except ValueError:
        threshold = math.nan
    if not (math.isfinite(threshold) and threshold > 0):
        raise bad("its threshold is not a positive number")
    try:
        info = json.loads(meta.get("info", "{}"))
    except ValueError:
        info = {}
    info = info if isinstance(info, dict) else {}
    return OodDetector(means, precision, threshold, arrays["projection_mean"], projection, arrays["reference"],
                       {k: v for k, v in info.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)},
                       reference_class.astype(int) if reference_class is not None else None)


def read_run_detector(run_dir: str | os.PathLike) -> OodDetector | None:
    """The run's detector; None when the run has none (older runs: `python -m core fit-ood RUN`). Raises
    ValueError for a damaged file."""
    path = Path(run_dir) / OOD_FILE
    if not path.exists():
        return None
    return load_detector(path)


# ---------------------------------------------------------------- per image

@dataclass(frozen=True)
class OodVerdict:
    """What the tool says about one image before its probability."""

    gate: str | None  # why it is not a chest radiograph at all
    score: float | None  # the feature distance (None without a detector); computed for a gated image too
    threshold: float | None
    flagged: bool  # the decision does not apply

    @property
    def reason(self) -> str | None:
        if self.gate:
            return self.gate
        if self.flagged and self.score is not None and self.threshold is not None:
            return (f"Unlike the training data (score {self.score:.2f}, threshold {self.threshold:.2f}): the model "
                    "has not seen images like this one, so its probability is not to be trusted.")
        return None

    def as_dict(self) -> dict:
        return {"flagged": self.flagged, "score": self.score, "threshold": self.threshold, "gate": self.gate,
                "reason": self.reason}


def verdict(detector: OodDetector | None, features: np.ndarray | None, gate: str | None) -> OodVerdict:
    score = float(detector.scores(features)[0]) if detector is not None and features is not None else None
    return verdict_from_score(gate, score, detector)


def verdict_from_score(gate: str | None, score: float | None, detector: OodDetector | None) -> OodVerdict:
    """The verdict for an image whose score is already computed (None or NaN: no detector)."""
    threshold = detector.threshold if detector is not None else None
    if score is None or threshold is None or not math.isfinite(score):
        score = None
    flagged = bool(gate) or (score is not None and score > threshold)
    return OodVerdict(gate, score, threshold, flagged)


# ---------------------------------------------------------------- per folder

def mmd_permutation_test(x: np.ndarray, y: np.ndarray, n_permutations: int = N_PERMUTATIONS, seed: int = 0,
                         max_per_side: int = MAX_TEST_SAMPLE) -> dict:
    """Maximum mean discrepancy between samples x and y (rows), Gaussian kernel with the median pairwise
    distance of the pooled sample as bandwidth (a choice that does not depend on which row is which, so the
    permutation test stays exact), p-value from `n_permutations` relabellings. Written here because neither
    scipy nor scikit-learn has a kernel two-sample test; the permutations are one matrix product."""
    from sklearn.metrics.pairwise import euclidean_distances

    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) > max_per_side:
        x = x[np.sort(rng.choice(len(x), max_per_side, replace=False))]
    if len(y) > max_per_side:
        y = y[np.sort(rng.choice(len(y), max_per_side, replace=False))]
    z = np.vstack([x, y])
    m, n = len(x), len(y)
    d2 = euclidean_distances(z, z, squared=True)
    off = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    kernel = np.exp(-d2 / bandwidth)
    signs = np.empty((m + n, n_permutations + 1))
    base = np.r_[np.full(m, 1.0 / m), np.full(n, -1.0 / n)]
    signs[:, 0] = base
    for b in range(1, n_permutations + 1):
        signs[:, b] = base[rng.permutation(m + n)]
    stats = np.einsum("ib,ib->b", signs, kernel @ signs)
    observed = stats[0]
    p_value = (1 + int((stats[1:] >= observed - 1e-12).sum())) / (n_permutations + 1)
    return {"mmd2": float(observed), "p_value": float(p_value), "n_folder": m, "n_reference": n,
            "permutations": n_permutations, "bandwidth": bandwidth}


def matched_reference(detector: OodDetector, features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The validation reference resampled (without replacement, seeded) to the folder's mix of classes, each
    image's class being the class mean it is nearest to: a folder of only NORMAL films, or of another prevalence,
    is then compared with validation films of the same mix, so the test asks whether the images differ, not
    whether the prevalence does."""
    if detector.reference_class is None or len(features) == 0:
        return detector.reference
    folder_class = detector.nearest_class(features)
    classes = np.arange(len(detector.means))
    share = np.array([(folder_class == c).mean() for c in classes])
    available = np.array([(detector.reference_class == c).sum() for c in classes])
    # The largest reference with the folder's mix that validation can supply.
    total = min(len(detector.reference), MAX_TEST_SAMPLE,
                *[int(available[c] / share[c]) for c in classes if share[c] > 0])
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(detector.reference_class == c), int(round(total * share[c])), replace=False)
            for c in classes if share[c] > 0 and round(total * share[c]) > 0]
    chosen = np.sort(np.concatenate(rows)) if rows else np.arange(len(detector.reference))
    return detector.reference[chosen] if len(chosen) >= MIN_FOLDER else detector.reference


def flagged_interval(flagged: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of the flagged share (scipy)."""
    from scipy.stats import binomtest

    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(int(flagged), int(n)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def folder_shift(detector: OodDetector | None, features: np.ndarray, flags: np.ndarray, gated: int = 0,
                 seed: int = 0) -> dict:
    """The folder's verdict: share of images flagged (with its interval, against the 5% expected) and the
    two-sample test of its features against the run's validation features, with a plain sentence."""
    flags = np.asarray(flags, dtype=bool)
    n = int(len(flags))
    k = int(flags.sum())
    low, high = flagged_interval(k, n)
    expected = 1 - float(detector.info.get("quantile", QUANTILE)) if detector is not None else None
    flagged_as = "as not chest X-rays or unlike the training data" if gated else "as unlike the training data"
    out: dict[str, Any] = {"n": n, "flagged": k, "flagged_share": k / n if n else None,
                           "flagged_ci": [low, high], "gated": int(gated), "expected_share": expected,
                           "test": None, "shifted": None}
    if detector is None:
        out["verdict"] = ("No out-of-distribution score for this run: fit one with python -m core fit-ood RUN "
                          "(only the image checks ran).")
        return out
    if len(features) < MIN_FOLDER:
        out["verdict"] = (f"{k} of {n} images flagged {flagged_as}; too few images for a folder test "
                          f"(at least {MIN_FOLDER}).")
        return out
    reference = matched_reference(detector, features, seed)
    test = mmd_permutation_test(detector.project(features), reference, seed=seed)
    out["test"] = test
    out["shifted"] = bool(test["p_value"] < ALPHA)
    share = f"{k} of {n} images ({k / n:.0%} [{low:.0%}, {high:.0%}]) flagged {flagged_as}, " \
            f"against {expected:.0%} expected for images like it"
    p = f"p = {test['p_value']:.3f}" if test["p_value"] >= 0.001 else "p < 0.001"
    if out["shifted"]:
        out["verdict"] = (f"This folder is distributed differently from the training data (two-sample test of the "
                          f"model's features against its validation images, {p}); {share}.")
    else:
        out["verdict"] = (f"No evidence that this folder is distributed differently from the training data "
                          f"(two-sample test, {p}); {share}.")
    return out


# ---------------------------------------------------------------- from a run

def fit_run_detector(run_dir: str | os.PathLike, device: str = "auto", progress=None) -> OodDetector:
    """Fit and save the detector of a finished run from its best checkpoint and its split.csv (for runs trained
    before the score existed). Images come through the decode cache training filled."""
    import pandas as pd
    import torch

    from . import runs
    from .cache import decode_images
    from .predict import load_run_model
    from .trainer import compute_logits, select_device

    run_dir = Path(run_dir)
    if not runs.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.json).")
    config = runs.read_config(run_dir)
    try:
        table = pd.read_csv(run_dir / "split.csv", dtype={"path": str, "split": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{run_dir / 'split.csv'} is missing or unreadable ({type(e).__name__}): the training "
                         "images are unknown, so the score cannot be fitted.") from None
    if not {"path", "split", "label"} <= set(table.columns):
        raise ValueError(f"{run_dir / 'split.csv'} lacks the path, split or label column.")
    dev = select_device(device)
    loaded = load_run_model(run_dir, dev)
    features, paths = {}, {}
    labels = None
    for split in ("train", "val", "test"):
        rows = table[table["split"] == split]
        decoded = decode_images(list(rows["path"]), loaded.image_size, config.get("cache_dir") or None,
                                config.get("decode_workers") or None, progress=progress)
        if not decoded.ok_indices and split != "test":
            raise ValueError(f"None of the run's {split} images could be read (moved or deleted since training?), "
                             f"e.g. {rows['path'].iloc[0] if len(rows) else '-'}.")
        images = torch.from_numpy(decoded.images).unsqueeze(1)
        # float32 features, as every score is read (see trainer.features_and_logits)
        features[split] = compute_logits(loaded.model, images, dev, loaded.mean, loaded.std, False,
                                         features_only=True).numpy()
        paths[split] = list(rows["path"].iloc[list(decoded.ok_indices)])
        if split == "train":
            labels = pd.to_numeric(rows["label"], errors="coerce").to_numpy()[decoded.ok_indices]
    detector = fit_detector(features["train"], labels, features["val"])
    # Every file is checked before any is written; the run's own sets then carry the new verdict, as Predict does.
    updated = {split: _with_verdicts(run_dir, split, paths[split], detector.scores(features[split]), detector)
               for split in ("val", "test")}
    save_detector(detector, run_dir / OOD_FILE, {"fitted_by": "fit-ood", "arch": loaded.arch})
    for split, frame in updated.items():
        if frame is not None:
            runs.write_file_atomic(runs.predictions_path(run_dir, split),
                                   lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    return detector


def _with_verdicts(run_dir: Path, split: str, paths: list[str], scores: np.ndarray, detector: OodDetector):
    """The run's predictions of `split` with ood_score and ood_flag from `detector` (None when there are none);
    an image that could not be read now gets no score and is flagged (its decision is not claimed to apply)."""
    from . import runs

    if not runs.predictions_path(run_dir, split).is_file():
        return None
    frame = runs.read_predictions(run_dir, split)
    frame["ood_score"] = frame["path"].map(dict(zip(paths, scores.tolist())))
    frame["ood_flag"] = ~(frame["ood_score"] <= detector.threshold)
    return frame


# ---------------------------------------------------------------- prediction sets, split by the verdict

OOD_COLUMNS = ("ood_score", "ood_flag", "ood_reason")


def has_ood(frame) -> bool:
    """Whether a predictions table carries the per-image verdict of a run's score (not of older evaluations, nor
    of runs without a score)."""
    return "ood_flag" in frame.columns and bool(frame["ood_flag"].notna().any())


def ood_flags(frame) -> np.ndarray:
    """The per-image 'unlike the training data' flags of a predictions table; a damaged cell reads as flagged
    (the cautious side: its decision is not claimed to apply)."""
    import pandas as pd

    raw = frame["ood_flag"]
    as_text = raw.astype(str).str.strip().str.lower()
    flags = as_text.isin(("true", "1", "1.0"))
    known = flags | as_text.isin(("false", "0", "0.0"))
    return np.asarray((flags | ~known) if len(raw) else pd.Series([], dtype=bool), dtype=bool)


def split_by_ood(pset):
    """(in-distribution part, flagged part) of a PredictionSet whose table has the verdict; None without it."""
    from .operating import PredictionSet

    if not has_ood(pset.frame):
        return None
    flagged = ood_flags(pset.frame)
    parts = []
    for mask, label in ((~flagged, "like the training data"), (flagged, "unlike the training data")):
        rows = np.flatnonzero(mask)
        parts.append(PredictionSet(f"{pset.name} ({label})", pset.frame.iloc[rows].reset_index(drop=True),
                                   pset.labels[rows], pset.probs[rows],
                                   pset.patients[rows] if pset.patients is not None else None, pset.class_names))
    return tuple(parts)
