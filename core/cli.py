"""`python -m core`: everything the dashboard does, headless."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from .config import PRESETS, TrainConfig, config_from_preset


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with the field's help text; unset options keep the preset."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {f.default!r})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None,
                                choices=f.metadata.get("choices"), help=f"{help_text} (default: {f.default!r})")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    if args.preset:
        return config_from_preset(args.preset, **overrides)
    return TrainConfig.from_dict(overrides)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_metrics(name: str, m: dict) -> None:
    print(f"{name}: AUC {_fmt(m.get('auc'))}  accuracy {_fmt(m.get('accuracy'))}  "
          f"sensitivity {_fmt(m.get('sensitivity'))}  specificity {_fmt(m.get('specificity'))}  "
          f"F1 {_fmt(m.get('f1'))}  (TP {m.get('tp')} FN {m.get('fn')} TN {m.get('tn')} FP {m.get('fp')})")


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    config = _config_from_args(args)
    if not config.data:
        print("error: --data DIR is required", file=sys.stderr)
        return 2
    config.validate()
    run_dir = train(config, show_progress=sys.stderr.isatty() and not args.quiet)
    return _report_finished(run_dir)


def _report_finished(run_dir: Path) -> int:
    from . import runs

    status = runs.read_status(run_dir)
    print(f"run: {run_dir}  ({status.get('state')})")
    report = runs.read_report(run_dir)
    if report:
        print(f"threshold {report['threshold']:.4f} chosen on validation ({report['threshold_rule']}), "
              f"best epoch {report['best_epoch']}, temperature {report['temperature']:.3f}")
        for split in ("val", "test"):
            if split in report:
                _print_metrics(split, report[split])
    return 0 if status.get("state") in ("finished", "stopped") else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from .trainer import train

    run_dir = Path(args.run)
    train(run_dir=run_dir, resume=True, show_progress=sys.stderr.isatty() and not args.quiet)
    return _report_finished(run_dir)


def cmd_stop(args: argparse.Namespace) -> int:
    from . import runs

    runs.request_stop(Path(args.run))
    print(f"Stop requested for {args.run}; it stops at its next step with a resumable checkpoint.")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(Path(args.run), data=args.data, split=args.split, threshold=args.threshold)
    print(f"{result['n']} images, {len(result['skipped'])} skipped, threshold {result['threshold']:.4f}")
    _print_metrics(args.split, result["metrics"])
    if args.out:
        result["predictions"].to_csv(args.out, index=False)
        print(f"predictions written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import load_run_model, predict_files

    loaded = load_run_model(args.run)
    results = predict_files(loaded, args.images)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: ERROR {r['error']}")
            else:
                print(f"{r['file']}: {r['predicted']}  P({r['positive_class']}) = {r['prob']:.4f}  "
                      f"(threshold {r['threshold']:.4f})")
    return 1 if any("error" in r for r in results) else 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .runs import list_runs

    rows = list_runs(args.runs_dir)
    if not rows:
        print(f"No runs in {args.runs_dir}.")
        return 0
    print(f"{'run':<48} {'state':<9} {'epoch':>7} {'val AUC':>8} {'test AUC':>8} {'sens':>6} {'spec':>6}")
    for r in rows:
        epoch = f"{r['epoch'] or 0}/{r['epochs']}"
        print(f"{r['run']:<48} {r['state']:<9} {epoch:>7} {_fmt(r['best_val_auc']):>8} "
              f"{_fmt(r['test_auc']):>8} {_fmt(r['test_sensitivity'], 3):>6} {_fmt(r['test_specificity'], 3):>6}")
        if r["error"]:
            print(f"    {r['error']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .evaluate import dataset_overview

    overview = dataset_overview(args.data, val_fraction=args.val_fraction, seed=args.seed)
    print(json.dumps(overview, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core",
                                     description="Chest X-ray pneumonia workbench: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Train a model on a dataset folder; writes a run directory.",
                       description="Train a pneumonia-vs-normal classifier and write a run directory under "
                                   "--runs-dir. Defaults shown are those without --preset; a preset sets its "
                                   "own values, and options given explicitly override both.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="Start from a preset (cpu: small CNN from scratch, fits 2 CPU cores; gpu: ResNet-18 "
                        "ImageNet full fine-tuning; cpu-transfer: frozen ResNet-18; tiny: smoke test). "
                        "Options given explicitly override it.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="Continue a stopped, failed or killed run from its last checkpoint.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("stop", help="Ask a training run (in another process) to stop at its next step.")
    p.add_argument("run", help="Run directory.")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("evaluate", help="Evaluate a run's best checkpoint on a split.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--data", help="Another dataset folder (default: the run's own split).")
    p.add_argument("--split", default="test", help="Split to evaluate: train, val or test; with --data and "
                                                   "no split folders, 'all'.")
    p.add_argument("--threshold", type=float, help="Decision threshold (default: the run's).")
    p.add_argument("--out", help="Write per-image predictions to this CSV.")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="Class and probability for image files.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("images", nargs="+", help="Image files (JPEG/PNG, any size).")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("runs", help="List runs with status and best metrics.")
    p.add_argument("--runs-dir", default="checkpoints")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("data", help="Describe a dataset folder: counts, image sizes, leakage, unreadable files.")
    p.add_argument("data", help="Dataset folder.")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .dataset import DatasetError
    from .model import WeightsUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, WeightsUnavailableError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
