"""`python -m core`: everything the dashboard does, headless."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

from .config import LABEL_FIELDS, PRESETS, TrainConfig, config_from_preset


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


def _add_label_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The label-file options of `train` (TrainConfig's fields) on a command that reads a dataset."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in LABEL_FIELDS:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                                choices=f.metadata.get("choices"), help=prefix + f.metadata.get("help", ""))


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


def _print_summary(label: str, summary: dict) -> None:
    """Every metric with its 95% interval, one per line, and the confusion counts."""
    from .bootstrap import METRIC_KEYS, METRIC_LABELS, format_interval

    c = summary["counts"]
    resampled = "patients" if summary.get("patients_known", True) else "images (no patient ids)"
    print(f"{label}: {summary['n']} images, {summary['n_patients']} patients; "
          f"TP {c['tp']} FN {c['fn']} TN {c['tn']} FP {c['fp']}")
    for key in METRIC_KEYS:
        print(f"  {METRIC_LABELS[key]:<28} {format_interval(summary['metrics'][key])}")
    print(f"  (95% intervals: {summary['n_resamples']} bootstrap resamples of {resampled}, seed {summary['seed']})")


def cmd_train(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if not config.data:
        print("error: --data DIR is required", file=sys.stderr)
        return 2
    config.validate()
    from .model import check_weights

    check_weights(config.arch, config.pretrained, config.weights_file)  # fails before a run folder exists
    if args.torchrun_nodes:
        from .distributed import torchrun_commands

        nodes, _, gpus = args.torchrun_nodes.partition("x")
        if not (nodes.isdigit() and gpus.isdigit() and int(nodes) >= 1 and int(gpus) >= 1):
            raise ValueError("--torchrun-nodes is NODESxGPUS, e.g. 2x8 (two machines of eight GPUs).")
        words = [w for w in sys.argv[sys.argv.index("train") + 1:] if w]
        if "--torchrun-nodes" in words:
            i = words.index("--torchrun-nodes")
            del words[i:i + 2]
        words = [w for w in words if not w.startswith("--torchrun-nodes=")]
        print("# one command per machine; node 0's address is the master (replace MASTER_ADDRESS):")
        for line in torchrun_commands(int(nodes), int(gpus), "MASTER_ADDRESS", words):
            print(line)
        return 0  # printed for other machines: their GPUs and data, not this one's
    from .device import select_device
    from .labels import load_index, spec_from

    select_device(config.device)  # e.g. cuda on a machine without a GPU
    # A bad folder, label file or positive class is refused here, before a run folder exists (none left as failed).
    load_index(config.data, spec_from(config), config.positive_class or None)
    return _train_distributed(lambda dist: None, config, args, resume=False)


def _train_distributed(existing, config, args: argparse.Namespace, resume: bool) -> int:
    """Train in this process, or as one rank of a torchrun job (rank 0 creates the run folder and tells the
    others where it is)."""
    from .distributed import from_environment, start, stop
    from .trainer import create_run, train

    dist = from_environment()
    dist = start(dist, config.device if config is not None else "auto")
    try:
        run_dir = existing(dist)
        if run_dir is None:
            run_dir = dist.broadcast_object(str(create_run(config)) if dist.is_main else None)
        run_dir = train(run_dir=Path(run_dir), resume=resume, show_progress=dist.is_main and sys.stderr.isatty()
                        and not args.quiet, launched=getattr(args, "launched", False), dist=dist)
    finally:
        stop(dist)
    return _report_finished(run_dir) if dist.is_main else 0


def _find_study(runs_dir: str, name: str):
    from .study import STUDIES_FOLDER, read_study

    folder = Path(name)
    if not (folder / "study.json").exists():
        folder = Path(runs_dir) / STUDIES_FOLDER / name
    return read_study(folder)


def cmd_study(args: argparse.Namespace) -> int:
    from . import runs
    from .study import create_study, parse_arms, run_study, study_progress

    runs_dir = args.runs_dir or TrainConfig.runs_dir
    if args.show or args.resume:
        study = _find_study(runs_dir, args.show or args.resume)
        if args.show:
            print(format_study(study))
            return 0
        if study_progress(study)["running"]:
            raise ValueError(f"{study.id} is already running in another process.")
    else:
        config = _config_from_args(args)
        if not config.data:
            print("error: --data DIR is required", file=sys.stderr)
            return 2
        study = create_study(config, parse_arms(args.strategies), args.seeds, runs.typed_command(sys.argv))
        print(f"study {study.id}: {len(study.arms)} arms x {len(study.seeds)} seeds = {len(study.plan())} runs "
              f"({study.folder}); resume it with: python -m core study --resume {study.id}"
              + (f" --runs-dir {runs_dir}" if args.runs_dir else ""))
    run_study(study, show_progress=sys.stderr.isatty() and not args.quiet)
    print(format_study(study))
    return 0 if study_progress(study)["finished"] == len(study.plan()) else 1


def format_study(study) -> str:
    """The study as text: progress, per-arm table and the paired comparisons with their verdicts."""
    from .significance import format_mean_interval
    from .study import ARM_HELP, study_progress, study_results

    progress, results = study_progress(study), study_results(study)
    lines = [f"study {study.id}: {progress['finished']}/{progress['total']} runs finished"
             + (f", {progress['failed']} failed or killed" if progress["failed"] else "")
             + (f", about {progress['minutes_left']:.0f} min left" if progress["minutes_left"] else ""),
             f"test set: {results['n_test']} images; sensitivity and specificity at each run's threshold chosen on "
             f"validation (Youden); 95% intervals: t-interval over seeds", ""]

    def iv(d: dict, digits: int = 3) -> str:
        return format_mean_interval(d, digits) or "-"

    for arm in results["arms"]:
        lines.append(f"{arm['arm']:<12} {ARM_HELP[arm['arm']]} ({arm['arch']}, {arm['runs']} runs)")
        lines.append(f"  test AUC {iv(arm['auc'])}  sensitivity {iv(arm['sensitivity'])}  "
                     f"specificity {iv(arm['specificity'])}")
        params = (f"{arm['trainable']:,} of {arm['total']:,}" if arm["trainable"] is not None else "unknown") + (
            f" ({', '.join(arm['trains'])} + head)" if arm["strategy"] == "partial" and arm["trains"] else "")
        lines.append(f"  wall time per run {iv(arm['minutes'], 1)} min; trainable parameters {params}")
    if results["pairs"]:
        lines += ["", "Paired comparisons of mean test AUC over seeds (95% interval and p: patient bootstrap of the "
                      "test set plus the spread over seeds, Welch t; p Holm-adjusted; DeLong p on the seed-averaged "
                      "scores as a check):"]
        for p in results["pairs"]:
            checks = []
            if p["delong_p"] == p["delong_p"]:  # not NaN
                checks.append(f"DeLong p = {p['delong_p']:.3g}")
            lines.append(f"  {p['verdict']}" + (f" ({'; '.join(checks)})" if checks else ""))
    for problem in results["problems"]:
        lines.append(f"note: {problem}")
    return "\n".join(lines)


def _report_finished(run_dir: Path) -> int:
    from . import runs
    from .operating import run_summary

    status = runs.read_status(run_dir)
    print(f"run: {run_dir}  ({status.get('state')})")
    data_report = runs.read_json(run_dir / "data_report.json", {})
    skipped = data_report.get("skipped") if isinstance(data_report, dict) else None
    if isinstance(skipped, list) and skipped:
        print(f"skipped {len(skipped)} unreadable or unusable files (also in data_report.json):")
        for item in skipped[:20]:
            if isinstance(item, dict):
                print(f"  {item.get('path')}: {item.get('reason')}")
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more")
    report = runs.read_report(run_dir)
    if report and status.get("state") == "finished":
        print(f"best epoch {report.get('best_epoch')}, temperature {_fmt(report.get('temperature'), 3)}")
        summary = run_summary(run_dir, ["val", "test"])
        print(f"operating threshold {summary['operating'].describe()}")
        for name, s in summary["sets"].items():
            _print_summary(runs.set_label(name), s)
    return 0 if status.get("state") in ("finished", "stopped") else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from . import runs

    run_dir = Path(args.run)
    if not runs.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.json).")
    from .distributed import from_environment

    if not from_environment().is_main:  # rank 0 of a torchrun job checks and records; the others follow it
        return _train_distributed(lambda dist: run_dir, TrainConfig.load(run_dir / "config.json"), args, True)
    # The dashboard's launcher checks and queues a run, then starts this command on it with --launched.
    refusal = None if args.launched else runs.resume_refusal(run_dir)
    if refusal:
        raise ValueError(refusal)
    if not (run_dir / "last.pt").exists() and runs.epoch_metrics(run_dir).shape[0] > 0:
        note = "last.pt (the checkpoint to resume from) is missing: training restarts from epoch 0."
        print(f"note: {note}", file=sys.stderr)
        runs.log(run_dir, note)
    try:
        config = TrainConfig.load(run_dir / "config.json")
    except (OSError, ValueError, TypeError):
        config = None  # train() marks the run failed with the reason
    return _train_distributed(lambda dist: run_dir, config, args, resume=True)


def cmd_stop(args: argparse.Namespace) -> int:
    from . import runs

    run_dir = Path(args.run)
    if not runs.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.json): nothing to stop.")
    state = runs.read_status(run_dir).get("state")
    if state not in runs.ACTIVE_STATES:
        raise ValueError(f"{run_dir.name} is not training (state: {state}): nothing to stop.")
    if state == "queued":  # it never trained: cancelled at once, nothing to save
        ended = runs.cancel_queued(run_dir)
        print(f"Cancelled {args.run} (it was waiting in the queue)." if ended == "cancelled" else
              f"Stop requested for {args.run}; it had just started and stops at its first step with a checkpoint.")
        return 0
    runs.request_stop(run_dir)
    print(f"Stop requested for {args.run}; it stops at its next step with a resumable checkpoint.")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from . import runs

    # Every argument is checked before anything is asked or deleted.
    folders = []
    for name in args.runs:
        run_dir = Path(name)
        if ".." in run_dir.parts:  # 'run/external/..' names the run through a folder inside it: say it plainly
            raise ValueError(f"{runs.display_path(run_dir)}: give the run folder's path without '..' (nothing "
                             "deleted).")
        runs.check_deletable(run_dir)  # raises ValueError with the reason
        if run_dir.resolve() not in [f.resolve() for f in folders]:
            folders.append(run_dir)
    for run_dir in folders:
        state = runs.read_status(run_dir).get("state")
        files, size = runs.run_size(run_dir)
        what = f"{runs.display_path(run_dir)} ({state}; {files} files, {size / 2**20:.1f} MB)"
        if not args.yes:
            if not sys.stdin.isatty():
                raise ValueError(f"Deleting {what} cannot be undone: add --yes to delete without being asked.")
            answer = input(f"Delete {what}? This cannot be undone. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print(f"Kept {runs.display_path(run_dir)}.")
                continue
        runs.delete_run(run_dir)
        print(f"Deleted {what}.")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import runs
    from .external import format_external, format_refit
    from .labels import spec_from
    from .operating import load_set, set_summary

    run_dir = Path(args.run)
    if not runs.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.json).")
    out = runs.check_output_file(args.out, args.force, suffixes=(".csv",)) if args.out is not None else None
    operating = runs.operating_point(run_dir)
    threshold = operating.threshold if args.threshold is None else args.threshold
    if not 0 <= threshold <= 1:
        raise ValueError("--threshold is a probability between 0 and 1.")
    if args.groups and not Path(args.groups).is_file():
        raise FileNotFoundError(f"--groups {args.groups}: no such file.")
    if args.data:
        from .cache import DecodeProgress
        from .external import (
            RefitRequest,
            evaluate_external,
            parse_class_map,
            parse_refit_rule,
            read_class_map_file,
        )

        if args.class_map and args.class_map_file:
            raise ValueError("Give the class map with --class-map or with --class-map-file, not both.")
        class_map = read_class_map_file(args.class_map_file) if args.class_map_file else \
            parse_class_map(args.class_map) if args.class_map else None
        refit = None
        if args.refit_threshold is not None:
            fraction = 0.5 if args.refit_fraction is None else args.refit_fraction
            refit = RefitRequest(*parse_refit_rule(args.refit_threshold), fraction=fraction)
            refit.check()
        elif args.refit_fraction is not None:
            raise ValueError("--refit-fraction goes with --refit-threshold RULE[:VALUE].")
        result = evaluate_external(run_dir, args.data, class_map=class_map, name=args.name,
                                   split=args.split or "all", replace=args.replace, refit=refit,
                                   labels=spec_from(args), progress=DecodeProgress())
        print(format_external(result, include_refit=False))
        set_name = runs.EXTERNAL_PREFIX + result["name"]
    else:
        used = [flag for flag, value in (("--class-map", args.class_map), ("--class-map-file", args.class_map_file),
                                         ("--name", args.name), ("--refit-threshold", args.refit_threshold),
                                         ("--refit-fraction", args.refit_fraction), ("--replace", args.replace),
                                         ("--labels", args.labels or None))
                if value not in (None, False)]
        if used:
            raise ValueError(f"{', '.join(used)} go{'es' if len(used) == 1 else ''} with --data DIR.")
        set_name = args.split or "test"
        if set_name not in runs.prediction_sets(run_dir) and not set_name.startswith(runs.EXTERNAL_PREFIX):
            ext = runs.EXTERNAL_PREFIX + set_name
            set_name = ext if ext in runs.prediction_sets(run_dir) else set_name
    pset = load_set(run_dir, set_name)
    summary = set_summary(pset, threshold)
    if not args.data:  # said first (an evaluation just made says it at the top of its own lines)
        from .metrics import chance_level_warning

        chance = chance_level_warning(summary["metrics"]["auc"], runs.set_label(set_name))
        if chance:
            print(f"WARNING: {chance}")
        if set_name.startswith(runs.EXTERNAL_PREFIX):
            _print_saved_shift(run_dir, set_name[len(runs.EXTERNAL_PREFIX):])
    where = f"operating threshold {operating.describe()}" if args.threshold is None else \
        f"threshold {threshold:.3f} given on the command line (the operating threshold is {operating.threshold:.3f})"
    print(where)
    _print_summary(runs.set_label(set_name), summary)
    _print_ood_parts(pset, threshold)
    _print_subgroups(pset, threshold, args.groups)
    if args.data and result.get("refit"):
        print(format_refit(result["refit"]))
    if out is not None:
        runs.check_output_file(out, args.force, suffixes=(".csv",))  # again, just before replacing
        runs.write_file_atomic(out, lambda tmp: pset.frame.to_csv(tmp, index=False))
        print(f"predictions written to {out}")
    return 0


def _print_saved_shift(run_dir: Path, name: str) -> None:
    from .external import read_external

    try:
        shift = read_external(run_dir, name).get("ood") or {}
    except (FileNotFoundError, ValueError):
        return
    if shift.get("verdict"):
        print(f"{'WARNING: ' if shift.get('shifted') else ''}Out-of-distribution check: {shift['verdict']}")


def _print_ood_parts(pset, threshold: float) -> None:
    """The set's metrics on the images the model calls like and unlike its training data."""
    from .bootstrap import format_interval
    from .ood import split_by_ood
    from .operating import set_summary

    parts = split_by_ood(pset)
    if parts is None:
        return
    print("split by the model's own verdict on each image (same threshold):")
    for part in parts:
        if len(part.labels) == 0:
            print(f"  {part.name}: no images")
            continue
        m = set_summary(part, threshold)["metrics"]
        print(f"  {part.name}: {len(part.labels)} images  AUC {format_interval(m['auc'])}  sensitivity "
              f"{format_interval(m['sensitivity'])}  specificity {format_interval(m['specificity'])}")


def _print_subgroups(pset, threshold: float, groups_csv: str | None) -> None:
    from .bootstrap import format_interval
    from .subgroups import prepare_subgroups, set_groups, subgroup_table

    groups = set_groups(pset.frame, groups_csv)
    for note in groups.attrs.get("notes", []):
        print(f"note: {note}")
    if groups.empty:
        return
    table = subgroup_table(prepare_subgroups(pset.labels, pset.probs, pset.patients, groups), threshold)
    print("subgroups (same threshold):")
    for row in table.to_dict("records"):
        rates = "  ".join(f"{k} {format_interval(row.get(k)) if isinstance(row.get(k), dict) else '—'}"
                          for k in ("sensitivity", "specificity", "auc"))
        print(f"  {row['grouping']} = {row['group']}: {row['images']} images ({row['positives']} positive)  {rates}")


def cmd_predict(args: argparse.Namespace) -> int:
    from .dataset import display_path
    from .predict import batch_shift, load_run_model, predict_files

    if args.out:  # a folder, a label file or a zip of any size, in batches, to a CSV
        from .batch_predict import cli_batch_predict

        return cli_batch_predict(args)
    loaded = load_run_model(args.run)
    results = predict_files(loaded, _image_files(args.images), keep_features=True)
    shift = batch_shift(loaded, results)
    for r in results:
        r.pop("features", None)
    if args.json:  # one object per file, each with its "ood" verdict; the batch's verdict on stderr
        print(json.dumps(results, indent=2))
        if shift is not None:
            print(f"note: these {shift['n']} images: {shift['verdict']}", file=sys.stderr)
    else:
        if loaded.ood is None:
            print(f"note: {loaded.ood_error or 'this run has no out-of-distribution score'}; only the image checks "
                  f"ran (python -m core fit-ood {args.run} fits the score).", file=sys.stderr)
        for r in results:
            shown = display_path(r["file"])  # a newline or terminal escape in a file name stays on its line, inert
            if "error" in r:
                print(f"{shown}: ERROR {display_path(r['error'])}")
                continue
            line = f"P({r['positive_class']}) = {r['prob']:.4f}  (threshold {r['threshold']:.3f})"
            ood = r["ood"]
            if r["applicable"]:
                score = f"; like the training data (score {ood['score']:.2f}, threshold {ood['threshold']:.2f})" \
                    if ood["score"] is not None else ""
                print(f"{shown}: {r['predicted']}  {line}{score}")
            else:
                print(f"{shown}: NOT APPLICABLE ({r['predicted']} if it were)  {line}; {ood['reason']}")
        if shift is not None:
            print(f"{'WARNING: ' if shift.get('shifted') else ''}these {shift['n']} images: {shift['verdict']}")
    return 1 if any("error" in r for r in results) else 0


def _image_files(sources: list[str]) -> list[str]:
    """The files given, with a folder standing for the images under it (sorted, hidden ones left out): a folder
    without labels gets its predictions and its folder verdict."""
    from .dataset import IMAGE_EXTENSIONS

    files: list[str] = []
    for source in sources:
        folder = Path(source)
        if folder.is_dir():
            found = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(folder).parts))
            if not found:
                raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            files += found
        else:
            files.append(source)
    return files


def cmd_fit_ood(args: argparse.Namespace) -> int:
    from . import runs
    from .ood import OOD_FILE, fit_run_detector, read_run_detector

    run_dir = Path(args.run)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", args.device):  # as train's --device
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, not '{args.device}'.")
    if not runs.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.json).")
    if runs.read_status(run_dir).get("state") != "finished":
        raise ValueError(f"{run_dir.name} has not finished training: the score is fitted on its best checkpoint.")
    try:
        existing = read_run_detector(run_dir)
    except ValueError:
        existing = None  # damaged: fitting again is the way out
    if existing is not None and not args.force:
        raise ValueError(f"{run_dir / OOD_FILE} exists (threshold {existing.threshold:.2f}): pass --force to fit it "
                         "again.")
    runs.check_writable(run_dir)  # before minutes of features whose score could not be saved
    detector = fit_run_detector(run_dir, args.device)
    info = detector.info
    print(f"wrote {run_dir / OOD_FILE}: Mahalanobis distance of the model's features to its {info['n_train']} training "
          f"images' class means (Ledoit-Wolf covariance); threshold {detector.threshold:.2f}, which "
          f"{1 - info['val_flagged']:.1%} of the {info['n_val']} validation images pass.")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .bootstrap import format_interval
    from .operating import run_summary
    from .runs import list_runs

    runs_dir = args.runs_dir or os.environ.get("CXR_RUNS_DIR") or "checkpoints"
    rows = list_runs(runs_dir)
    if not rows:
        print(f"No runs in {runs_dir}.")
        return 0
    print(f"{'run':<48} {'state':<9} {'epochs done':>11} {'threshold':>9}  test at the operating threshold, 95% "
          "intervals")
    for r in rows:
        epoch = f"{r['epoch'] or 0}/{r['epochs']}"
        line, detail = f"{r['run']:<48} {str(r['state']):<9} {epoch:>11}", ""
        if r["state"] == "finished":
            try:
                summary = run_summary(Path(r["path"]), ["test"])
            except ValueError as e:
                line, detail = line + f" {'?':>9}", str(e)
            else:
                test = summary["sets"].get("test")
                line += f" {summary['threshold']:>9.3f}"
                if test:
                    m = test["metrics"]
                    line += (f"  AUC {format_interval(m['auc'])}  sens {format_interval(m['sensitivity'])}  "
                             f"spec {format_interval(m['specificity'])}")
                detail = f"threshold {summary['operating'].describe()}"
                if "test" in summary["errors"]:
                    detail += f"; test metrics unavailable: {summary['errors']['test']}"
        print(line)
        if detail:
            print(f"    {detail}")
        if r["error"]:
            print(f"    {r['error']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import runs
    from .export import export_onnx

    run_dir = Path(args.run)
    if not runs.is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.json).")
    out = Path(args.out) if args.out is not None else run_dir / "model.onnx"
    metadata = export_onnx(run_dir, out, force=args.force)  # checks parity itself; ValueError when it fails
    size = int(metadata["image_size"])
    print(f"wrote {out}: input 'pixels' (N, 1, {size}, {size}) grayscale / 255; outputs 'probability' (calibrated, "
          f"{metadata['positive_class']}) and 'logits'; threshold {float(metadata['threshold']):.4f} in its metadata")
    print(f"parity with PyTorch: max |difference| {float(metadata['parity_max_abs_diff']):.2e}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(Path(args.run), Path(args.out), externals=args.external, force=args.force)
    print(f"report written to {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .cache import DecodeProgress
    from .evaluate import dataset_overview
    from .labels import spec_from

    if not 0 < args.val_fraction < 1 or not 0 < args.test_fraction < 1:
        raise ValueError("--val-fraction and --test-fraction are shares between 0 and 1 (exclusive).")
    overview = dataset_overview(args.data, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                seed=args.seed, labels=spec_from(args), progress=DecodeProgress())
    if args.json:
        print(json.dumps(overview, indent=2, default=str))
    else:
        print(format_overview(overview))
    return 0


def _count_lines(counts: dict[str, dict[str, int]], classes: list[str]) -> list[str]:
    order = [s for s in ("train", "val", "test", "all") if s in counts] + \
        [s for s in counts if s not in ("train", "val", "test", "all")]
    lines = [f"  {'split':<8}" + "".join(f"{c:>12}" for c in classes) + f"{'total':>10}"]
    for split in order:
        row = [int(counts[split].get(c, 0)) for c in classes]
        lines.append(f"  {split:<8}" + "".join(f"{n:>12,}" for n in row) + f"{sum(row):>10,}")
    return lines


def _leakage_lines(report: dict) -> list[str]:
    lines = []
    for pair, item in (report.get("shared_patients") or {}).items():
        if item.get("count"):
            lines.append(f"  {item['count']:,} patients in both {pair.replace('-', ' and ')} "
                         f"(e.g. {', '.join(item['examples'][:3])})")
    across = report.get("identical_files_across_splits", 0)
    lines.append(f"  byte-identical file groups: {report.get('identical_file_groups', 0):,}, "
                 f"{across:,} of them across splits")
    return lines or ["  none"]


def format_overview(overview: dict) -> str:
    """What `python -m core data` prints: counts, the split training will use, leakage, sizes, left-out files."""
    classes = overview["classes"]
    layout = "official train/val/test folders" if overview["has_official_splits"] else "no split folders"
    if overview.get("label_file"):
        layout = "split column of the label file" if overview["has_official_splits"] else "no split column"
    lines = [f"{overview['n_images']:,} images in {overview['root']} ({layout}); classes {', '.join(classes)}, "
             f"positive class {overview['positive_class']}."]
    if overview.get("label_file"):
        lines.append(f"Labels: {overview['labels']}.")
    lines.append(f"Patients: {overview.get('n_patients', 0):,}, ids from "
                 f"{overview.get('patients_from', 'file names')}.")
    for field, counts in (overview.get("metadata") or {}).items():
        name = {"view": "view position", "age": "age band"}.get(field, field)
        lines.append(f"  {name}: " + ", ".join(f"{value} {n:,}" for value, n in counts.items()))
    lines += ["", "Images per split folder and class:" if not overview.get("label_file")
              else "Images per split and class:"]
    lines += _count_lines(overview["counts"], classes)
    lines += ["", "Split training will use (grouped by patient, readable images only):"]
    lines += _count_lines(overview["planned_counts"], classes)
    if overview.get("leakage_official"):
        lines += ["", "Leakage between the official split folders:"] + _leakage_lines(overview["leakage_official"])
    lines += ["", "Leakage in the split training will use:"] + _leakage_lines(overview["leakage_planned"])
    sizes = overview["image_sizes"]
    if sizes["sampled"]:
        modes = ", ".join(f"{m} {n:,}" for m, n in sizes["modes"].items())
        lines += ["", f"Image sizes (headers of {sizes['sampled']:,} files): width {sizes['width_min']:,}-"
                      f"{sizes['width_max']:,} px, height {sizes['height_min']:,}-{sizes['height_max']:,} px; "
                      f"modes {modes}."]
    left_out = overview["unreadable"] + overview.get("unusable_entries", [])
    lines += ["", f"Skipped (unreadable or unusable): {len(left_out)}" + (":" if left_out else ".")]
    lines += [f"  {item['path']}: {item['reason']}" for item in left_out[:50]]
    if len(left_out) > 50:
        reasons = Counter(re.sub(r" \(.*row \d+\)$", "", item["reason"]) for item in left_out)
        lines.append(f"  ... and {len(left_out) - 50:,} more (--json lists them all); by reason: "
                     + "; ".join(f"{why} {n:,}" for why, n in reasons.most_common(5)))
    ignored = overview["ignored_non_image_files"]
    lines += [f"Ignored (not image files): {len(ignored)}" + (":" if ignored else ".")]
    lines += [f"  {path}" for path in ignored[:20]]
    if len(ignored) > 20:
        lines.append(f"  ... and {len(ignored) - 20:,} more (--json lists them all)")
    return "\n".join(lines)


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
                        "ImageNet full fine-tuning; cpu-transfer: frozen EfficientNet-Lite0, offline; "
                        "tiny: smoke test). "
                        "Options given explicitly override it.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.add_argument("--torchrun-nodes", metavar="NODESxGPUS",
                   help="Print the torchrun command to run on each of NODES machines with GPUS GPUs each (e.g. 2x8), "
                        "for these options, and exit. On one machine: torchrun --nproc-per-node=N -m core train ...")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("study", help="Train every fine-tuning strategy with several seeds on one fixed split and "
                                     "compare them with paired tests on the same test images.",
                       description="Runs every arm x seed one after another (finished runs are kept when the "
                                   "study is resumed), then prints per-arm mean ± sd with 95%% intervals and a "
                                   "paired comparison of every two arms (Holm-adjusted).")
    p.add_argument("--strategies", default="frozen,partial,full,scratch",
                   help="Arms, comma-separated, from frozen, partial, full (ImageNet backbone), scratch (the small "
                        "CNN), random-init (the backbone without ImageNet weights). Default: %(default)s.")
    p.add_argument("--seeds", type=int, default=3, help="Training seeds per arm: --seed, --seed+1, ... The split "
                   "is the same for every run (--split-seed, default --seed). Default: %(default)s.")
    p.add_argument("--resume", metavar="STUDY", help="Continue a study (its id under --runs-dir/studies, or its "
                                                     "folder): finished runs are kept, the interrupted one resumes.")
    p.add_argument("--show", metavar="STUDY", help="Print a study's progress, table and paired tests.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="Start from a preset; options override it.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    _add_config_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("resume", help="Continue a stopped, failed or killed run from its last checkpoint.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # the dashboard's launcher
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("stop", help="Ask a training run (in another process) to stop at its next step.")
    p.add_argument("run", help="Run directory.")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("delete", help="Delete run folders (asks first; a queued or training run is refused).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="Run directory.")
    p.add_argument("--yes", action="store_true", help="Do not ask for confirmation (needed when not on a terminal).")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("evaluate", help="Metrics with 95%% intervals at the run's operating threshold, on its own "
                                         "sets or on another folder of X-rays (external validation).",
                       description="Without --data: metrics of the run's saved predictions on --split (val, test, "
                                   "or the name of an earlier external evaluation). With --data: score the run's "
                                   "best checkpoint on that folder, save the result under RUN/external/NAME/ (then "
                                   "selectable on Thresholds and Mistakes) and print its metrics.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--data", help="Another folder of X-rays, with or without split folders (external validation).")
    p.add_argument("--split", help="Own sets: val or test (default test), or an external evaluation's name. With "
                                   "--data: the split folder to use (train, val or test) or 'all' (default).")
    p.add_argument("--class-map", help="With --data: map its class folders onto the run's classes, e.g. "
                                       "No_findings=NORMAL,Pneumonia=PNEUMONIA (names that match, ignoring case, "
                                       "map themselves; map a folder to 'ignore' to leave it out).")
    p.add_argument("--class-map-file", metavar="FILE",
                   help="With --data: the class map from a file, a JSON object {\"No_findings\": \"NORMAL\"} or CSV "
                        "rows folder,class (names exactly as written; for folder names with commas or spaces).")
    p.add_argument("--name", help="With --data: name of this evaluation, letters, digits, '_', '.' and '-', at most "
                                  "64 (default: the folder's name; numbered, e.g. images-2, when an evaluation of "
                                  "another folder holds it).")
    p.add_argument("--replace", action="store_true",
                   help="With --data: replace the saved evaluation of the same name (refused without it).")
    p.add_argument("--refit-threshold", metavar="RULE[:VALUE]",
                   help="With --data: also re-pick the threshold on a patient-grouped part of the folder and read "
                        "the rest (rules: youden, best_f1, recall, specificity, cost, ppv, npv; e.g. recall:0.95); "
                        "saved with the evaluation; a rule, value or set that cannot be used saves nothing. On a "
                        "folder the model ranks no better than chance the evaluation is saved without a re-pick, "
                        "and says why.")
    p.add_argument("--refit-fraction", type=float, default=None,
                   help="Share of the folder's patients used to re-pick the threshold (default 0.5).")
    p.add_argument("--groups", help="CSV with a path column and group columns: metrics per group. Without it the "
                                    "groups come from the images: Kermany file names (bacterial/viral, the NORMAL "
                                    "series) and metadata (age band, sex, view position, site from a label file or "
                                    "DICOM headers).")
    p.add_argument("--threshold", type=float, help="Read at this threshold instead of the run's operating one.")
    p.add_argument("--out", help="Write the per-image predictions to this CSV (never over a run's own files or a "
                                 "device; an existing file only with --force).")
    p.add_argument("--force", action="store_true", help="With --out: replace an existing file.")
    _add_label_options(p, "With --data: ")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="Export a run's model to ONNX: pixels in, calibrated probability out, with "
                                      "classes, image size, normalisation and threshold in its metadata.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="Only onnx for now.")
    p.add_argument("--out", help="Output file (default: RUN/model.onnx).")
    p.add_argument("--force", action="store_true", help="Replace an existing output file.")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="Write one self-contained HTML report of a run (opens offline).")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--external", action="append", default=[], metavar="NAME",
                   help="Include this external evaluation (repeatable; default: all of them).")
    p.add_argument("--out", default="report.html", help="Output file (default report.html).")
    p.add_argument("--force", action="store_true", help="Replace an existing output file.")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="Class and probability for image files.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("images", nargs="+", help="Image files (JPEG/PNG, any size), or folders of them (no labels "
                                              "needed): several images also get the folder's out-of-distribution "
                                              "verdict.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.add_argument("--out", help="Write one row per image to this CSV (probability, decision at the operating "
                                 "threshold, out-of-distribution verdict, unreadable files with the reason): images "
                                 "may be folders, a CSV label file with a path column, or a .zip, predicted in "
                                 "batches with a progress bar (never over a run's own files; an existing file "
                                 "only with --force).")
    p.add_argument("--force", action="store_true", help="With --out: replace an existing file.")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fit-ood", help="Fit the out-of-distribution score of a finished run from its checkpoint "
                                       "(runs trained before the score existed; training fits it itself).",
                       description="Computes the model's features of the run's training and validation images (from "
                                   "split.csv, through the decode cache), fits the Mahalanobis score on the training "
                                   "features and sets its threshold so that 95%% of validation images pass; writes "
                                   "RUN/ood.safetensors. Predict, evaluate --data and the export then use it.")
    p.add_argument("run", help="Run directory.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto).")
    p.add_argument("--force", action="store_true", help="Fit again when the run already has a score.")
    p.set_defaults(func=cmd_fit_ood)

    p = sub.add_parser("runs", help="List runs with their state, operating threshold and test metrics with "
                                     "95%% intervals.")
    p.add_argument("--runs-dir", help="Folder of runs (default: $CXR_RUNS_DIR, else checkpoints).")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("data", help="Describe a dataset folder: counts, image sizes, leakage, unreadable files.",
                       description="Scan and decode every image once (filling the cache training reuses), then print "
                                   "counts per split and class, the patient-grouped split training would use, "
                                   "leakage, image sizes, and every file left out with the reason.")
    p.add_argument("data", help="Dataset folder: <root>/{train,val,test}/<CLASS>/* or <root>/<CLASS>/*.")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="Share of the training pool held out for validation, as training would (default 0.15).")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="Share held out for test when the folder has no test split folder (default 0.15).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the planned split (default 0).")
    p.add_argument("--json", action="store_true", help="Print everything as JSON (every list complete).")
    _add_label_options(p)
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .dataset import DatasetError
    from .model import WeightsUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (DatasetError, WeightsUnavailableError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, read-only folder, permission denied: the OS's words and the file
        from .trainer import failure_reason

        print(f"error: {failure_reason(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback with CXR_DEBUG=1
        if os.environ.get("CXR_DEBUG"):
            raise
        from .trainer import failure_reason

        print(f"error (unexpected): {failure_reason(e)}. Run again with CXR_DEBUG=1 for the traceback, and "
              "please report it.", file=sys.stderr)
        return 1
