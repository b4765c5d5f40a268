"""Out-of-distribution evidence for a finished run: how often the score flags images like the training data
(validation, test, full-size originals), images that are not (made from real X-rays: rotated, inverted,
coloured, noise, crops), and how often the folder test fires on draws from validation.

    .venv/bin/python bench/ood_evidence.py RUN [--originals DIR] [--draws 100] [--draw-size 100]

Prints a table: set, images, flagged by the gate, flagged by the score, flagged in all, AUROC of the score
against the run's test images, and the folder test's verdict. Needs the run's ood.safetensors (the trainer
writes it; `python -m core fit-ood RUN` for older runs).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import ood  # noqa: E402
from core.dataset import IMAGE_EXTENSIONS  # noqa: E402
from core.predict import load_run_model, read_image  # noqa: E402


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def transforms(paths: list[str], seed: int = 0) -> dict[str, list[bytes]]:
    """Image files made from real X-rays that a chest X-ray model should not claim to know."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[bytes]] = {k: [] for k in ("rotated 90°", "inverted", "colour (tinted photo)",
                                                     "noise", "lateral-like crop", "blank")}
    for p in paths:
        img = Image.open(p).convert("L")
        w, h = img.size
        out["rotated 90°"].append(_png(img.rotate(90, expand=True)))
        out["inverted"].append(_png(ImageOps.invert(img)))
        tint = np.asarray(img, dtype=np.float32)[..., None] * rng.uniform(0.3, 1.0, 3) + rng.uniform(0, 80, 3)
        out["colour (tinted photo)"].append(_png(Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8))))
        out["noise"].append(_png(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))))
        # A side strip of the chest, stretched to the model's square input as every image is.
        out["lateral-like crop"].append(_png(img.crop((0, 0, w * 2 // 5, h))))
        out["blank"].append(_png(Image.new("L", (w, h), int(rng.integers(0, 256)))))
    return out


def score_files(loaded, sources: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, score, gated) for files (paths or bytes): decoded and gated one by one as Predict does, the
    model run in batches."""
    from core.trainer import features_and_logits

    pixels, gated = [], []
    for src in sources:
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        pixels.append(read_image(data, loaded.image_size))
        gated.append(ood.image_gate(data) is not None)
    images = torch.from_numpy(np.stack(pixels)).unsqueeze(1)
    features, _ = features_and_logits(loaded.model, images, torch.device("cpu"), loaded.mean, loaded.std, False)
    return features, loaded.ood.scores(features), np.array(gated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--originals", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                   "kermany_original_train_subset"))
    parser.add_argument("--transform-images", type=int, default=100, help="test images each transform starts from")
    parser.add_argument("--draws", type=int, default=100, help="folder-test draws from validation")
    parser.add_argument("--draw-size", type=int, default=100)
    parser.add_argument("--train-draws", type=int, default=0, help="folder-test draws from the run's training images")
    args = parser.parse_args()

    loaded = load_run_model(args.run)
    if loaded.ood is None:
        print(f"{args.run} has no out-of-distribution score ({loaded.ood_error or 'not fitted'}): run "
              "python -m core fit-ood RUN first.")
        return 1
    det = loaded.ood
    split = pd.read_csv(Path(args.run) / "split.csv", dtype={"path": str, "split": str})
    sets: dict[str, list] = {s: list(split.loc[split["split"] == s, "path"]) for s in ("val", "test")}
    originals = Path(args.originals)
    if originals.is_dir():
        sets["400 full-size originals (train images)"] = sorted(
            str(p) for p in originals.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    rng = np.random.default_rng(0)
    base = [sets["test"][i] for i in np.sort(rng.choice(len(sets["test"]), args.transform_images, replace=False))]
    sets.update(transforms(base))

    print(f"run {Path(args.run).name}: {loaded.arch} at {loaded.image_size} px; score threshold {det.threshold:.2f} "
          f"(passes {det.info.get('quantile', ood.QUANTILE):.0%} of validation)")
    print(f"{'set':<40} {'images':>6} {'gate':>6} {'score':>6} {'all':>6}  {'AUROC vs test':>13}  folder test")
    computed = {}
    t0 = time.time()
    for name, files in sets.items():
        computed[name] = score_files(loaded, files)
    test_scores = computed["test"][1]
    for name, (features, scores, gated) in computed.items():
        flagged = gated | (scores > det.threshold)
        auroc = "" if name in ("test", "val") else \
            f"{roc_auc_score(np.r_[np.zeros(len(test_scores)), np.ones(len(scores))], np.r_[test_scores, scores]):.3f}"
        shift = ood.folder_shift(det, features, flagged)
        p = shift["test"]["p_value"] if shift["test"] else float("nan")
        verdict = ("different" if shift["shifted"] else "no evidence") + f" (p = {p:.3f})"
        print(f"{name:<40} {len(scores):>6} {gated.mean():>6.1%} {(scores > det.threshold).mean():>6.1%} "
              f"{flagged.mean():>6.1%}  {auroc:>13}  {verdict}")
    print(f"(scoring took {time.time() - t0:.1f} s)")

    val_features = computed["val"][0]
    val_labels = split.loc[split["split"] == "val", "label"].to_numpy()
    for label, pool in (("validation images", np.arange(len(val_features))),
                        ("validation images of one class (NORMAL)", np.flatnonzero(val_labels == 0))):
        fired = 0
        for d in range(args.draws):
            rows = np.random.default_rng(1000 + d).choice(pool, args.draw_size, replace=False)
            fired += bool(ood.folder_shift(det, val_features[rows], np.zeros(len(rows), bool), seed=d)["shifted"])
        print(f"folder test on {args.draws} draws of {args.draw_size} {label}: fired {fired} times "
              f"({fired / args.draws:.0%}; nominal {ood.ALPHA:.0%})")
    if args.train_draws:
        from core.cache import decode_images
        from core.trainer import features_and_logits

        paths = list(split.loc[split["split"] == "train", "path"])
        decoded = decode_images(paths, loaded.image_size)
        train_features, _ = features_and_logits(loaded.model, torch.from_numpy(decoded.images).unsqueeze(1),
                                                torch.device("cpu"), loaded.mean, loaded.std, False)
        fired = 0
        for d in range(args.train_draws):
            rows = np.random.default_rng(2000 + d).choice(len(train_features), args.draw_size, replace=False)
            fired += bool(ood.folder_shift(det, train_features[rows], np.zeros(len(rows), bool), seed=d)["shifted"])
        flagged = (det.scores(train_features) > det.threshold).mean()
        print(f"folder test on {args.train_draws} draws of {args.draw_size} of the run's own training images: fired "
              f"{fired} times ({fired / args.train_draws:.0%}); {flagged:.1%} of all training images flagged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
