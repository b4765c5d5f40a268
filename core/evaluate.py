"""Evaluation of a finished run on a split, and the dataset overview the data page and CLI show."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import runs
from .cache import decode_images
from .dataset import assign_splits, image_summary, leakage_report, metadata_columns, with_header_fields
from .labels import LabelSpec, load_index
from .metrics import metrics_at_threshold
from .predict import load_run_model
from .trainer import compute_logits, positive_probs, select_device, uses_bf16


def evaluate_run(run_dir: Path, data: str | None = None, split: str = "test",
                 threshold: float | None = None, device: str = "auto", labels: LabelSpec | None = None) -> dict:
    """Score the run's best checkpoint on `split` of its own data split (split.csv), or of another
    dataset folder `data` (its official split folder; 'all' for every image)."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    if data is None:
        table = pd.read_csv(run_dir / "split.csv")
        table = table[table["split"] == split].reset_index(drop=True)
        root = None
    else:
        index = load_index(data, labels, config.get("positive_class") or None)
        records = [r for r in index.records if split == "all" or r.official_split in (split, None)]
        table = pd.DataFrame({"path": [r.path for r in records], "label": [r.label for r in records],
                              "class_name": [r.class_name for r in records],
                              "patient": [r.patient for r in records]})
        root = index.root
    if table.empty:
        raise ValueError(f"No images in split '{split}'" + (f" of {data}" if data else f" of {run_dir}"))
    dev = select_device(device)
    loaded = load_run_model(run_dir, dev)
    decoded = decode_images(list(table["path"]), loaded.image_size, config.get("cache_dir") or None,
                            root=root)
    table = table.iloc[decoded.ok_indices].reset_index(drop=True)
    images = torch.from_numpy(decoded.images).unsqueeze(1)
    logits = compute_logits(loaded.model, images, dev, loaded.mean, loaded.std,
                            uses_bf16(dev, config.get("precision", "auto")))
    probs = positive_probs(logits, loaded.temperature)
    used_threshold = loaded.threshold if threshold is None else float(threshold)
    out = table[[c for c in ("path", "patient", "label", "class_name") if c in table]].copy()
    out["prob"] = probs
    return {"n": len(out), "skipped": decoded.failed, "threshold": used_threshold, "predictions": out,
            "metrics": metrics_at_threshold(out["label"].to_numpy(), probs, used_threshold)}


def dataset_overview(data: str, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                     image_size: int = 224, cache_dir: str | None = None, progress=None,
                     labels: LabelSpec | None = None) -> dict:
    """Counts per split and class, image sizes and modes, unreadable files, metadata, and leakage: for the
    official splits as they are, and for the patient-grouped split training will use. With `labels`, the dataset
    is the label file's images under `data`."""
    index = load_index(data, labels)
    paths = [r.path for r in index.records]
    # Decoding (cached, and the cache training reuses) is the only way to find corrupt files, and it reads the
    # DICOM headers that give patient ids.
    decoded = decode_images(paths, image_size, cache_dir, progress=progress, root=index.root)
    index = with_header_fields(index, decoded.metadata)
    ok = np.zeros(len(paths), bool)
    ok[decoded.ok_indices] = True
    usable = [r for r, good in zip(index.records, ok) if good]
    hashes = [h for h, good in zip(decoded.sha256, ok) if good]
    planned = assign_splits(index, val_fraction, test_fraction, seed)
    planned_ok = [s for s, good in zip(planned, ok) if good]

    step = max(1, len(paths) // 300)  # headers of a spread-out sample: sizes and modes
    summary = pd.DataFrame(image_summary(paths[::step], limit=300))
    sizes = summary.dropna(subset=["width"]) if not summary.empty else summary
    overview = {
        "root": index.root, "classes": index.classes, "positive_class": index.positive_class,
        "has_official_splits": index.has_official_splits,
        "label_file": index.label_file, "labels": index.labels, "patients_from": index.patients_from or "file names",
        "n_patients": len({r.patient for r in index.records}),
        "metadata": {k: dict(Counter(_metadata_group(k, v) for v in values).most_common())
                     for k, values in metadata_columns(usable).items()},
        "counts": index.counts(),
        "planned_counts": {s: dict(Counter(r.class_name for r, p in zip(usable, planned_ok) if p == s))
                           for s in ("train", "val", "test")},
        "n_images": len(paths),
        "unreadable": [{"path": p, "reason": r} for p, r in decoded.failed.items()],
        "ignored_non_image_files": index.ignored_files,
        "unusable_entries": [{"path": p, "reason": r} for p, r in index.unusable.items()],
        "image_sizes": {
            "sampled": int(len(sizes)),
            "width_min": int(sizes["width"].min()) if len(sizes) else None,
            "width_max": int(sizes["width"].max()) if len(sizes) else None,
            "height_min": int(sizes["height"].min()) if len(sizes) else None,
            "height_max": int(sizes["height"].max()) if len(sizes) else None,
            "modes": dict(Counter(sizes["mode"])) if len(sizes) else {},
        },
        "leakage_planned": leakage_report(usable, planned_ok, hashes),
    }
    if index.has_official_splits:
        overview["leakage_official"] = leakage_report(usable, [r.official_split or "" for r in usable], hashes)
    return overview


def _metadata_group(field: str, value: str) -> str:
    """How a metadata value is counted in the overview: ages in the bands subgroups use, blanks as unknown."""
    if not value:
        return "unknown"
    if field == "age":
        from .subgroups import age_band

        return age_band(value)
    return value
