"""A corpus of bad inputs the tests build: image files that must be refused or skipped with a reason, and
damage to a run folder's files. Each item says what a user must be told."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

from conftest import make_xray
from PIL import Image


def png_header_only(width: int, height: int, colour_type: int = 6) -> bytes:
    """A PNG whose header declares width x height (RGBA by default) with almost no pixel data: a
    decompression bomb in a few dozen bytes. Refusal must come from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def compressed_bomb_png(side: int) -> bytes:
    """A real, fully decodable 1-bit PNG of side x side pixels that compresses to a small file."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def jpeg_bytes(seed: int = 0) -> bytes:
    out = io.BytesIO()
    make_xray(seed=seed).convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def animated_png(frames: int = 3) -> bytes:
    """An animated PNG with a normal .png name: which frame is the X-ray cannot be known."""
    images = [make_xray(seed=i) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format="PNG", save_all=True, append_images=images[1:])
    return out.getvalue()


def all_nan_tiff() -> bytes:
    """A 32-bit float TIFF whose every pixel is NaN."""
    import numpy as np

    out = io.BytesIO()
    Image.fromarray(np.full((40, 40), np.nan, np.float32)).save(out, format="TIFF")
    return out.getvalue()


# name -> (file bytes, the reason's words a user must see)
BAD_IMAGE_FILES: dict[str, tuple[bytes, str]] = {
    "zero_bytes.jpeg": (b"", "not an image"),
    "text.png": (b"this is not an image\n" * 10, "not an image"),
    "truncated.jpeg": (jpeg_bytes()[:200], "truncated"),
    "header_bomb.png": (png_header_only(30_000, 30_000), "too large"),
    "just_over_limit.png": (png_header_only(7_000, 6_000), "too large"),
    "no_pixels.png": (png_header_only(0, 10), ""),
    "animated.png": (animated_png(), "3 frames"),
    "all_nan.tiff": (all_nan_tiff(), "no finite pixel values"),
}


def write_bad_images(folder: Path) -> dict[str, str]:
    """Write every bad image file into `folder`; returns {path: words its reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (data, words) in BAD_IMAGE_FILES.items():
        (folder / name).write_bytes(data)
        out[str(folder / name)] = words
    return out


def write_bad_entries(folder: Path) -> dict[str, str]:
    """Entries a scan cannot use: a name that is not UTF-8, a dangling link, a link loop, a link to a
    folder. Returns {escaped path: words its reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    bad_name = os.fsencode(folder) + b"/bad\xff name.jpeg"
    with open(bad_name, "wb") as f:
        f.write(jpeg_bytes(1))
    (folder / "dangling.jpeg").symlink_to(folder / "missing.jpeg")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "linked_folder").symlink_to(folder.parent)
    return {f"{folder}/bad\\xff name.jpeg": "not valid UTF-8", f"{folder}/dangling.jpeg": "broken symbolic link",
            f"{folder}/loop_a.png": "broken symbolic link", f"{folder}/loop_b.png": "broken symbolic link",
            f"{folder}/linked_folder": "link to a folder"}


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff\xfe garbage \x89PNG" * 20)


def _json(value):
    import json

    return lambda path: path.write_text(json.dumps(value))


def _edit_json(**fields):
    import json

    def edit(path: Path) -> None:
        data = json.loads(path.read_text())
        data.update(fields)
        path.write_text(json.dumps(data))
    return edit


# variant name -> (file in the run folder, how it is damaged). Each leaves the rest of the run intact.
RUN_DAMAGE = {
    "status-types": ("status.json", _edit_json(pid="abc", epoch="x", elapsed=[1], images_per_s="fast", phase=3)),
    "status-garbage": ("status.json", _garbage),
    "report-types": ("report.json", _edit_json(test="abc", val=[1], best_epoch="x", temperature="hot")),
    "report-threshold": ("report.json", _edit_json(threshold="abc")),
    "report-garbage": ("report.json", _garbage),
    "metrics-binary": ("metrics.jsonl", _garbage),
    "metrics-types": ("metrics.jsonl", lambda p: p.write_text('{"kind": "epoch", "epoch": "x", "val_auc": "y"}\n'
                                                              '[1, 2]\n{"kind": 5, "global_step": null}\n')),
    "split-garbage": ("split.csv", _garbage),
    "test-predictions-garbage": ("predictions_test.csv", _garbage),
    "test-predictions-values": ("predictions_test.csv",
                                lambda p: p.write_text("path,patient,label,class_name,prob\nx.jpeg,p1,1,P,abc\n")),
    "val-predictions-missing": ("predictions_val.csv", lambda p: p.unlink()),
    "threshold-nan": ("threshold.json", lambda p: p.write_text('{"threshold": NaN, "chosen_on": "val"}')),
    "threshold-list": ("threshold.json", _json([0.5])),
    "config-types": ("config.json", _edit_json(epochs="abc", arch=5, image_size=-1)),
    "config-garbage": ("config.json", _garbage),
    "config-missing": ("config.json", lambda p: p.unlink()),
    "environment-list": ("environment.json", _json([1, 2])),
    "data-report-types": ("data_report.json", _json({"counts": "abc", "skipped": 5, "leakage": [1]})),
    "checkpoint-garbage": ("best.safetensors", _garbage),
    "checkpoint-metadata": ("best.safetensors", None),  # see damage_run: image size 0, one class
    "checkpoint-missing": ("best.safetensors", lambda p: p.unlink()),
}


def damage_run(run_dir: Path, variant: str) -> None:
    """Apply one RUN_DAMAGE variant to a copy of a finished run."""
    name, damage = RUN_DAMAGE[variant]
    path = run_dir / name
    if variant == "checkpoint-metadata":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata())
        metadata.update(image_size="0", classes='["ONLY"]', temperature="nan")
        save_file(tensors, str(path), metadata=metadata)
        return
    if name == "threshold.json" and not path.exists():
        path.write_text("{}")
    damage(path)


# ---------------------------------------------------------------- external evaluations and paths in files

HOSTILE_TEXT = "![x](http://evil/a.png) <b>bold</b> [link](http://x) **$x$** :red[r]"
EXTERNAL_NAME = "site"  # the external evaluation add_external_set writes


def add_external_set(run_dir: Path, images: Path) -> None:
    """A real external evaluation `site` of `images` (a folder-per-class tree with the run's classes)."""
    from core.external import evaluate_external

    evaluate_external(run_dir, str(images), name=EXTERNAL_NAME, device="cpu")


def _summary_numbers(path: Path) -> None:
    """Numbers no table or formatter can hold: 1e30 and an integer of 400 digits, where counts and thresholds
    belong; refit fields of the wrong type."""
    import json

    data = json.loads(path.read_text())
    data.update(n=10**400, n_patients=1e30, counts={"NORMAL": 10**400, "PNEUMONIA": -1},
                threshold={"value": 1e30, "described": 10**400}, metrics={"auc": {"value": 1e30}},
                refit={"rule_described": 5, "threshold": "abc", "fit": [], "read": None})
    path.write_text(json.dumps(data))


def _refit_types(path: Path) -> None:
    import json

    data = json.loads(path.read_text())
    data["refit"] = {"rule_described": ["x"], "threshold": {"a": 1}, "operating_threshold": "0.5", "fit": "x",
                     "read": 3, "at_operating": [], "at_refit": ""}
    path.write_text(json.dumps(data))


def _probabilities_out_of_range(path: Path) -> None:
    import pandas as pd

    table = pd.read_csv(path)
    table.loc[0, "prob"], table.loc[1, "prob"], table.loc[2, "prob"] = 1.5, -0.2, 1e30
    table.to_csv(path, index=False)


def _hostile_names(path: Path) -> None:
    """Markdown, HTML and links where a class name and a patient id belong."""
    import pandas as pd

    table = pd.read_csv(path)
    table["class_name"] = table["class_name"].astype(object)
    table.loc[:, "patient"] = HOSTILE_TEXT
    table.loc[table["label"] == 1, "class_name"] = HOSTILE_TEXT
    table.to_csv(path, index=False)


_EXTERNAL = f"external/{EXTERNAL_NAME}"
# variant name -> (file in the run folder, how it is damaged), for a run with the external set `site`.
EXTERNAL_DAMAGE = {
    "external-summary-numbers": (f"{_EXTERNAL}/summary.json", _summary_numbers),
    "external-summary-refit-types": (f"{_EXTERNAL}/summary.json", _refit_types),
    "external-summary-empty": (f"{_EXTERNAL}/summary.json", lambda p: p.write_text("")),
    "external-summary-garbage": (f"{_EXTERNAL}/summary.json", _garbage),
    "external-probabilities": (f"{_EXTERNAL}/predictions.csv", _probabilities_out_of_range),
    "external-hostile-names": (f"{_EXTERNAL}/predictions.csv", _hostile_names),
}


def damage_external(run_dir: Path, variant: str) -> None:
    name, damage = EXTERNAL_DAMAGE[variant]
    damage(run_dir / name)


def unreadable_paths(folder: Path) -> dict[str, str]:
    """Paths an untrusted predictions or groups file may name that are no image file: a FIFO (opening it for
    reading blocks until a writer comes), a device that never ends, a folder, a missing file. Returns
    {path: words the refusal must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo = folder / "pipe.jpeg"
    if not fifo.exists():
        os.mkfifo(fifo)
    (folder / "a_folder.jpeg").mkdir(exist_ok=True)
    return {str(fifo): "not a regular file", "/dev/zero": "not a regular file",
            str(folder / "a_folder.jpeg"): "not a regular file", str(folder / "missing.jpeg"): "No such file"}


def point_predictions_at(path: Path, targets: list[str]) -> None:
    """Make the first rows of a predictions CSV the most confident mistakes, naming `targets` as their images,
    so that a gallery and a Grad-CAM view open them first."""
    import pandas as pd

    table = pd.read_csv(path)
    for i, target in enumerate(targets):
        table.loc[i, "path"] = target
        table.loc[i, "prob"] = 0.999 if table.loc[i, "label"] == 0 else 0.001
    table.to_csv(path, index=False)


def as_read(markdown: str) -> str:
    """What a reader sees of text escaped for Markdown by ui.plain: the backslash escapes removed."""
    import re

    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)


# A run, study or class folder name with Markdown, HTML and a link in it (a folder name cannot hold '/').
HOSTILE_NAME = "![x](evil.png) <b>bold<b> [link](x) $x$"
