"""Thresholds page interaction benchmark: server time per threshold change, with 95% patient-bootstrap
intervals on, through Streamlit's AppTest (the page script as the server runs it, no browser).

    .venv/bin/python bench/benchmark_thresholds.py [--run RUN_DIR] [--changes 40]

Without --run it uses the newest finished run in $CXR_RUNS_DIR (or checkpoints/) whose test set has 624
images (Kermany's official test split); failing that it builds a run folder over Kermany's test file names
(real patient ids) from ../shared/data with seeded synthetic probabilities. It prints the median, 90th
percentile and maximum seconds per slider move and per rule change, beside the bootstrap's own share
(the intervals computed alone, the same work without Streamlit), against the 0.3 s budget.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import runs  # noqa: E402
from core.bootstrap import PatientBootstrap, intervals_at_threshold, ranking_intervals  # noqa: E402
from core.dataset import patient_id  # noqa: E402

KERMANY_TEST = ROOT.parent / "shared" / "data" / "kermany_224" / "test"
BUDGET_S = 0.3


def find_run() -> Path | None:
    root = Path(os.environ.get("CXR_RUNS_DIR", ROOT / "checkpoints"))
    for r in runs.list_runs(root):
        path = Path(r["path"])
        if r["state"] == "finished" and (path / "predictions_test.csv").exists() and \
                len(pd.read_csv(path / "predictions_test.csv")) == 624:
            return path
    return None


def synthetic_run(folder: Path) -> Path:
    """A run folder with Kermany's 624 test file names and patient ids, and seeded probabilities."""
    rng = np.random.default_rng(0)
    rows = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for f in sorted((KERMANY_TEST / cls).iterdir()):
            rows.append({"path": str(f), "patient": patient_id(f.name), "label": label, "class_name": cls})
    test = pd.DataFrame(rows)
    test["prob"] = 1 / (1 + np.exp(-(rng.normal(0, 1.5, len(test)) + 3 * (test["label"] - 0.4))))
    val = test.sample(frac=1.0, random_state=1).reset_index(drop=True)
    run = folder / "20000101-000000-smallcnn-full-bench"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"arch": "smallcnn", "strategy": "full", "epochs": 1}')
    runs.write_status(run, state="finished", epoch=1)
    (run / "report.json").write_text('{"threshold": 0.5, "threshold_rule": "youden on validation", '
                                     '"temperature": 1.0, "best_epoch": 1}')
    test.to_csv(run / "predictions_test.csv", index=False)
    val.to_csv(run / "predictions_val.csv", index=False)
    return run


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def describe(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return (f"{name:<34} median {statistics.median(seconds):.3f} s  p90 {p90:.3f} s  max {max(seconds):.3f} s  "
            f"({len(seconds)} changes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="A finished run directory (default: see the module docstring).")
    parser.add_argument("--changes", type=int, default=40, help="Threshold changes to time.")
    args = parser.parse_args()

    from streamlit.testing.v1 import AppTest

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.run) if args.run else find_run()
        runs_dir = Path(tmp) / "runs"
        runs_dir.mkdir()
        if source is None:
            if not KERMANY_TEST.is_dir():
                print(f"No finished run with 624 test images and no {KERMANY_TEST}: nothing to measure.")
                return 1
            run = synthetic_run(runs_dir)
            origin = "synthetic probabilities over Kermany's 624 test file names"
        else:
            run = runs_dir / source.name
            shutil.copytree(source, run, ignore=shutil.ignore_patterns("last.pt", "external"))
            origin = f"run {source}"
        os.environ["CXR_RUNS_DIR"] = str(runs_dir)
        os.environ.setdefault("CXR_SETTINGS", str(Path(tmp) / "settings.json"))
        test = pd.read_csv(run / "predictions_test.csv")
        print(f"{origin}: test {len(test)} images, {test['patient'].nunique()} patients; bootstrap 2,000 resamples")

        at = AppTest.from_file(str(ROOT / "views" / "3_Thresholds.py"), default_timeout=300)
        first = timed(at.run)
        assert not at.exception, at.exception
        values = np.linspace(0.05, 0.95, args.changes)
        slider = [timed(lambda v=v: at.slider(key="thr_slider").set_value(float(v)).run()) for v in values]
        assert not at.exception, at.exception
        rules = []
        for rule in ("recall", "specificity", "cost", "ppv", "npv", "best_f1", "youden", "slider") * 3:
            rules.append(timed(lambda r=rule: at.radio(key="thr_mode").set_value(r).run()))
        assert not at.exception, at.exception

        labels, probs = test["label"].to_numpy(), test["prob"].to_numpy()
        boot = PatientBootstrap(test["patient"].astype(str).to_numpy(), len(test))
        ranking = ranking_intervals(labels, probs, boot)
        core_only = [timed(lambda v=v: intervals_at_threshold(labels, probs, float(v), boot, ranking)) for v in values]

    print(f"first page run (resamples built, cached): {first:.2f} s")
    print(describe("slider move (page, server side)", slider))
    print(describe("rule change (page, server side)", rules))
    print(describe("intervals alone, test set (core)", core_only))
    median = statistics.median(slider)
    print(f"budget {BUDGET_S} s per change: {'met' if median <= BUDGET_S else 'NOT met'} (median {median:.3f} s)")
    return 0 if median <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
