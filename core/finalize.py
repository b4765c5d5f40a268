"""The end of a run: the best weights calibrated on validation (temperature scaling), the operating threshold chosen
on validation, the out-of-distribution score fitted, and the val/test predictions and report written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import runs
from .checkpoint import checkpoint_metadata, load_weights_into, save_weights
from .config import TrainConfig
from .dataset import METADATA_FIELDS
from .distributed import SINGLE, Distributed
from .metrics import choose_threshold, metrics_at_threshold
from .model import Classifier, normalization
from .ood import OOD_FILE, OodDetector, fit_detector, save_detector
from .pipeline import PreparedData, compute_logits, features_and_logits

EVAL_SPLITS = ("val", "test")


def fit_temperature_checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str | None]:
    """Temperature scaling (Guo et al. 2017) on validation logits: calibrated probabilities without
    changing the ranking, so AUC and the threshold's meaning are kept. Returns (temperature, None), or
    (1.0, why the fit was refused)."""
    if len(labels) < 2 or len(labels.unique()) < 2:
        return 1.0, "validation holds fewer than two images of each class"
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not (math.isfinite(t) and 0.05 < t < 20):
        return 1.0, f"the fitted temperature {t:.3g} is outside (0.05, 20): validation is probably separated " \
                    "perfectly, so probabilities are left uncalibrated"
    return t, None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return fit_temperature_checked(logits, labels)[0]


def positive_probs(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    # float64: a float32 written to CSV and read back is another number, so an image whose probability
    # equals the threshold chosen on it could change sides between the training report and the views.
    return torch.softmax(logits / temperature, dim=1)[:, 1].double().numpy()


def fit_run_ood(run_dir: Path, config: TrainConfig, data: PreparedData, train_features: np.ndarray,
                val_features: np.ndarray) -> OodDetector | None:
    """Fit the out-of-distribution score on the training features and save it as ood.safetensors. A failure
    is logged and leaves the run without a score (prediction says so), never fails the run."""
    try:
        detector = fit_detector(train_features, data.splits["train"].labels.numpy(), val_features,
                                seed=config.seed)
        save_detector(detector, run_dir / OOD_FILE, {"fitted_by": "training", "arch": config.arch})
    except (ValueError, np.linalg.LinAlgError) as e:
        runs.log(run_dir, f"No out-of-distribution score: {e}")
        return None
    runs.log(run_dir, f"Out-of-distribution score fitted on {detector.info['n_train']} training images; threshold "
                      f"{detector.threshold:.2f} passes {1 - detector.info['val_flagged']:.1%} of validation")
    return detector


def _sharded_features_and_logits(model: Classifier, images, device: torch.device, mean: float, std: float,
                                 bf16: bool, dist: Distributed) -> tuple[np.ndarray, torch.Tensor]:
    """features_and_logits of this rank's share of the images, all ranks' shares on rank 0 (the others: theirs)."""
    features, logits = features_and_logits(model, images, device, mean, std, bf16, rows=dist.share(len(images)))
    return dist.gather_rows(torch.from_numpy(features), main_only=True).numpy(), \
        dist.gather_rows(logits, main_only=True)


def finalize_run(run_dir: Path, config: TrainConfig, model: Classifier, data: PreparedData,
                 device: torch.device, bf16: bool, dist: Distributed = SINGLE) -> dict:
    """Best weights -> calibrated val/test predictions, threshold chosen on validation, report. Distributed: every
    rank must call it; each computes its share of the val, test and training images' features and logits, and
    rank 0, holding them all, does the rest alone and returns the report (the other ranks: an empty one)."""
    best_path = run_dir / "best.safetensors"
    dist.barrier()  # rank 0 may still be writing the best weights the other ranks are about to read
    meta = load_weights_into(model, best_path)
    model.to(device)
    mean, std = normalization(config.arch)
    features, logits = {}, {}
    for s in EVAL_SPLITS:
        features[s], logits[s] = _sharded_features_and_logits(model, data.splits[s].images, device, mean, std,
                                                              bf16, dist)
    # float32 features only, the precision they are scored at; the training logits are not needed
    train_images = data.splits["train"].images
    train_features = dist.gather_rows(compute_logits(model, train_images, device, mean, std, False,
                                                     features_only=True, rows=dist.share(len(train_images))),
                                      main_only=True).numpy()
    if not dist.is_main:
        return {}
    temperature, refused = fit_temperature_checked(logits["val"], data.splits["val"].labels)
    report: dict = {"best_epoch": int(meta.get("epoch", 0)), "temperature": temperature,
                    "temperature_fit": {"fitted": refused is None, "note": refused, "on": "val"},
                    "threshold_rule": "youden on validation"}
    probs = {s: positive_probs(logits[s], temperature) for s in EVAL_SPLITS}
    raw_probs = {s: positive_probs(logits[s]) for s in EVAL_SPLITS}
    val_labels = data.splits["val"].labels.numpy()
    threshold = choose_threshold(val_labels, probs["val"], "youden")
    detector = fit_run_ood(run_dir, config, data, train_features, features["val"])
    report["ood"] = {"fitted": detector is not None, **(detector.info if detector is not None else {})}
    report["threshold"] = threshold
    for s in EVAL_SPLITS:
        table = data.splits[s].table
        if len(table) == 0:
            continue
        out = table[["path", "patient", "label", "class_name"]
                    + [c for c in METADATA_FIELDS if c in table.columns]].copy()
        out["prob"] = probs[s]
        out["prob_uncalibrated"] = raw_probs[s]
        if detector is not None:  # the feature score only: the image gate reads files, which training does not
            out["ood_score"] = detector.scores(features[s])
            out["ood_flag"] = out["ood_score"] > detector.threshold
        out.to_csv(run_dir / f"predictions_{s}.csv", index=False)
        report[s] = metrics_at_threshold(table["label"].to_numpy(), probs[s], threshold)
    save_weights(model, best_path, checkpoint_metadata(config, data.index.classes, temperature, threshold,
                                                       epoch=report["best_epoch"]))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
