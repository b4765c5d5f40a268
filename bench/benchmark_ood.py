"""What the out-of-distribution check costs a prediction: per-image time of Predict's path with it (image gate +
feature score) against the same path without it (decode + model), in one run, on the same files.

    .venv/bin/python bench/benchmark_ood.py RUN [--images 100]

Files: full-size Kermany originals as JPEG (as users upload them) and the same images re-encoded as PNG (no
reduced-size decoding). Floor: the check costs under 10% of prediction time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import cam  # noqa: E402
from core.predict import _input_tensor, load_run_model, predict_image, read_image  # noqa: E402

ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany_original_train_subset"


def without_check(loaded, data: bytes) -> float:
    """Predict as it was before the check: decode, model, calibrated probability."""
    pixels = read_image(data, loaded.image_size)
    with cam.MODEL_LOCK, torch.inference_mode():
        logits = loaded.model(_input_tensor(loaded, pixels)).float()
    return float(torch.softmax(logits / loaded.temperature, dim=1)[0, 1])


def timed(fn, files: list[bytes], repeats: int) -> float:
    """Median over `repeats` passes of the mean seconds per file."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in files:
            fn(data)
        passes.append((time.perf_counter() - start) / len(files))
    return statistics.median(passes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_run_model(args.run)
    if loaded.ood is None:
        print(f"{args.run} has no out-of-distribution score: python -m core fit-ood RUN first.")
        return 1
    paths = sorted(ORIGINALS.rglob("*.jpeg"))[:args.images]
    jpegs = [p.read_bytes() for p in paths]
    pngs = []
    for data in jpegs:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    print(f"run {Path(args.run).name}: {loaded.arch} at {loaded.image_size} px, {torch.get_num_threads()} threads; "
          f"{len(paths)} full-size originals, median of {args.repeats} passes")
    print(f"{'files':<22} {'without (ms/img)':>17} {'with (ms/img)':>14} {'cost':>7}  floor < 10%")
    worst = 0.0
    for label, files in (("JPEG originals", jpegs), ("same images as PNG", pngs)):
        timed(lambda d: predict_image(loaded, d), files[:5], 1)  # warm-up
        base = timed(lambda d: without_check(loaded, d), files, args.repeats)
        full = timed(lambda d: predict_image(loaded, d), files, args.repeats)
        cost = full / base - 1
        worst = max(worst, cost)
        verdict = "PASS" if cost < 0.10 else "FAIL"
        print(f"{label:<22} {base * 1000:>17.1f} {full * 1000:>14.1f} {cost:>7.1%}  {verdict}")
    return 0 if worst < 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
