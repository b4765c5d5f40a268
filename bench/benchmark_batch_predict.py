"""Batch prediction against one-by-one prediction: images per second of `predict --out`'s path
(core.batch_predict.predict_batch: parallel decode, 64 images per forward pass) and of the one-by-one path
(core.predict.predict_files), on the same files with the same run. The folder verdict both paths add once
per set (ood.folder_shift, the same computation in both) is timed on its own.

    .venv/bin/python bench/benchmark_batch_predict.py RUN [--images 200] [--data FOLDER] [--repeats 3] [--threads N]

Files: the first N JPEGs (sorted) under --data (default ../shared/data/kermany_224/test). Also times batch
prediction with each number of decoding processes from 1 to the cores available, and checks that both paths give
the same probabilities. Floor (issue 17): batch >= 4x one-by-one on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.batch_predict import BatchInputs, ImageInput, default_workers, predict_batch  # noqa: E402
from core.predict import batch_shift, load_run_model, predict_files  # noqa: E402

TEST_224 = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany_224" / "test"
FLOOR = 4.0


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding processes), user and system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(paths: dict[str, object], repeats: int) -> tuple[dict[str, tuple[float, float]], dict[str, object]]:
    """Median (wall, CPU) seconds per path over `repeats` rounds, the paths interleaved within each round (so that
    load from other processes on the machine falls on all of them alike), and each path's last result. CPU time is
    the steadier figure on a machine other processes share."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in paths.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            results[name] = fn()
            times[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--data", default=str(TEST_224))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the model (default: torch's own, "
                        "one per core); 1 gives steadier figures on a machine other processes share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    files = sorted(str(p) for p in Path(args.data).rglob("*.jp*g"))[:args.images]
    if not files:
        print(f"No JPEG under {args.data}.")
        return 1
    loaded = load_run_model(args.run)
    n = len(files)
    inputs = BatchInputs(items=[ImageInput(f, path=f) for f in files])
    predict_files(loaded, files[:8])  # warm up the model and the allocator
    predict_batch(loaded, BatchInputs(items=inputs.items[:8]), workers=1)

    def one_by_one():
        return predict_files(loaded, files, keep_features=True)

    cores = default_workers()
    paths = {"one by one (predict_files)": one_by_one}
    for workers in range(1, cores + 1):
        paths[f"batch, {workers} decoding process{'es' * (workers > 1)}"] = \
            lambda workers=workers: predict_batch(loaded, inputs, workers=workers, folder_verdict=False)
    seconds, results = timed(paths, args.repeats)
    single_name = next(iter(paths))
    (single_s, _), single = seconds[single_name], results[single_name]
    print(f"{n} images from {args.data}; run {Path(args.run).name} ({loaded.arch}, {loaded.image_size} px); "
          f"{cores} cores, {torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats} interleaved rounds")
    print(f"{'path':<34} {'seconds':>8} {'images/s':>9} {'vs one-by-one':>14} {'CPU ms/image':>13}")
    for name, (s, cpu) in seconds.items():
        print(f"{name:<34} {s:>8.2f} {n / s:>9.1f} {single_s / s:>13.1f}x {cpu / n * 1000:>13.2f}")
    best = max(single_s / s for name, (s, _) in seconds.items() if name != single_name)
    batch = results[list(paths)[-1]]
    verdict_s, _ = timed({"verdict": lambda: batch_shift(loaded, single)}, args.repeats)
    print(f"the folder verdict (two-sample test, both paths, once per set): {verdict_s['verdict'][0]:.2f} s")
    diff = np.abs(np.array([r["prob"] for r in single]) - np.array([r["probability"] for r in batch.rows]))
    print(f"largest probability difference batch vs one by one: {diff.max():.1e} (float32 rounding)")
    print(f"best ratio {best:.1f}x; floor {FLOOR:.0f}x: {'met' if best >= FLOOR else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
