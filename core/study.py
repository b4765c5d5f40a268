"""A strategy study: every arm (frozen, partial or full fine-tuning of an ImageNet backbone, the same backbone
randomly initialised, the small CNN from scratch) trained with several seeds on one fixed split, then compared
on the same test images.

A study is a folder `<runs_dir>/studies/<id>/` holding `study.json` (the plan: base config, arms, seeds, and
the run folder of each arm and seed once it exists). Its runs are ordinary run folders beside the others, each
with the study id in its config. Running a study again trains only what is not finished yet: a finished run is
kept, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import runs
from .config import TrainConfig
from .metrics import metrics_at_threshold
from .model import apply_strategy, build_model, check_weights, count_parameters
from .significance import compare_arms, mean_interval

ARMS = ("frozen", "partial", "full", "scratch", "random-init")
ARM_HELP = {"frozen": "ImageNet backbone frozen, head trained", "partial": "ImageNet backbone, last blocks + head "
            "trained", "full": "ImageNet backbone, every layer trained", "scratch": "the small CNN from scratch",
            "random-init": "the same backbone randomly initialised, every layer trained"}
STUDIES_FOLDER = "studies"
MAX_SEEDS = 20


@dataclass
class Study:
    id: str
    folder: Path
    base: dict
    arms: list[str]
    seeds: list[int]
    runs: dict[str, str] = field(default_factory=dict)  # "<arm>/<seed>" -> run folder name
    created: float = 0.0
    command: str = ""

    @property
    def runs_dir(self) -> Path:
        return self.folder.parent.parent

    def plan(self) -> list[tuple[str, int]]:
        """Seed by seed, each seed through every arm, so early results already cover all arms."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]

    def run_dir(self, arm: str, seed: int) -> Path | None:
        name = self.runs.get(f"{arm}/{seed}")
        return self.runs_dir / name if name else None

    def save(self) -> None:
        data = {"id": self.id, "base": self.base, "arms": self.arms, "seeds": self.seeds, "runs": self.runs,
                "created": self.created, "command": self.command}
        tmp = self.folder / "study.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.folder / "study.json")


def arm_config(base: TrainConfig, arm: str, seed: int, study_id: str) -> TrainConfig:
    """The run config of one arm and seed: the study's split seed for every run, the seed for the rest."""
    common = dict(seed=seed, split_seed=base.data_split_seed, study=study_id, name=f"{study_id}-{arm}-s{seed}")
    if arm == "scratch":
        return dataclasses.replace(base, arch="smallcnn", pretrained=False, weights_file="", strategy="full",
                                   **common)
    if arm == "random-init":
        return dataclasses.replace(base, pretrained=False, weights_file="", strategy="full", **common)
    if arm in ("frozen", "partial", "full"):
        return dataclasses.replace(base, pretrained=True, strategy=arm, **common)
    raise ValueError(f"Unknown study arm '{arm}'; choose from {', '.join(ARMS)}.")


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"Unknown study arms {unknown or text!r}; choose from {', '.join(ARMS)}.")
    if len(set(arms)) != len(arms):
        raise ValueError(f"An arm is listed twice: {text}.")
    return arms


def _new_id(root: Path) -> str:
    stamp = time.strftime("study-%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(2, 100)]:
        if not (root / (stamp + suffix)).exists():
            return stamp + suffix
    raise RuntimeError(f"Could not name a new study under {root}")


def create_study(base: TrainConfig, arms: list[str], n_seeds: int, command: str = "") -> Study:
    """Check everything a study needs (config of every run, the dataset folder, ImageNet weights for the
    arms that need them) and write its plan. Nothing is written when a check fails."""
    from .labels import load_index, spec_from

    if not 1 <= n_seeds <= MAX_SEEDS:
        raise ValueError(f"seeds must be between 1 and {MAX_SEEDS}, not {n_seeds}.")
    if base.arch == "smallcnn" and any(a in ("frozen", "partial", "full", "random-init") for a in arms):
        raise ValueError("Choose an ImageNet backbone for the study (the small CNN is the 'scratch' arm).")
    base = dataclasses.replace(base, runs_dir=str(Path(base.runs_dir).expanduser().resolve()),
                               data=str(Path(base.data).expanduser().resolve()))
    base.validate()
    seeds = [base.seed + i for i in range(n_seeds)]
    configs = [arm_config(base, arm, seed, "study-00000000-000000-00") for seed in seeds for arm in arms]
    for config in configs:
        config.validate()
    for config in {(c.arch, c.pretrained, c.weights_file): c for c in configs}.values():
        check_weights(config.arch, config.pretrained, config.weights_file)
    # A bad folder, label file or positive class is refused now, not as a dozen failed runs.
    load_index(base.data, spec_from(base), base.positive_class or None)
    root = Path(base.runs_dir) / STUDIES_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    study_id = _new_id(root)
    folder = root / study_id
    folder.mkdir()
    study = Study(study_id, folder, dataclasses.replace(base, split_seed=base.data_split_seed).to_dict(), list(arms),
                  seeds, {}, time.time(), command)
    study.save()
    return study


MAX_RUN_NAME = 255  # a folder name: the OS limits its length


def _plain_run_name(name: object) -> bool:
    """A run folder name inside the runs folder: one path part, printable, valid UTF-8; never a path, '.'
    or '..' (a study file must not point outside the runs folder)."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_RUN_NAME and name not in (".", "..")
            and "/" not in name and "\\" not in name and name.isprintable() and runs.has_valid_name(name))


def _is_seed(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**32


def read_study(folder: Path) -> Study:
    """The study in `folder`, every field validated: ValueError with a one-line message naming the file and
    the field when it is missing or damaged. One run folder serves one arm and seed: a study file that maps
    a run to two arms or two seeds would compare a run with itself, so it is refused."""
    folder = Path(folder)
    path = folder / "study.json"
    data = runs.read_json(path, None)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is missing or not a JSON object.")
    arms, seeds, run_names = data.get("arms"), data.get("seeds"), data.get("runs", {})
    if not isinstance(arms, list) or not arms or any(not isinstance(a, str) or a not in ARMS for a in arms) \
            or len(set(arms)) != len(arms):
        raise ValueError(f"{path}: 'arms' must be a list of distinct arms from {', '.join(ARMS)}.")
    if (not isinstance(seeds, list) or not 1 <= len(seeds) <= MAX_SEEDS or not all(_is_seed(s) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"{path}: 'seeds' must be a list of 1 to {MAX_SEEDS} distinct integers between 0 and "
                         "2**32 - 1.")
    if not isinstance(data.get("base"), dict):
        raise ValueError(f"{path}: 'base' must be a config object.")
    if not isinstance(run_names, dict):
        raise ValueError(f"{path}: 'runs' must map '<arm>/<seed>' to run folder names.")
    planned = {f"{arm}/{seed}" for seed in seeds for arm in arms}
    unknown = [str(k)[:60] for k in run_names if k not in planned]
    if unknown:
        raise ValueError(f"{path}: 'runs' names {', '.join(repr(k) for k in unknown[:3])}, which "
                         f"{'is' if len(unknown) == 1 else 'are'} not '<arm>/<seed>' of this study's arms and seeds.")
    bad = [k for k, v in run_names.items() if not _plain_run_name(v)]
    if bad:
        raise ValueError(f"{path}: 'runs' maps {', '.join(repr(k) for k in bad[:3])} to something that is not a run "
                         "folder name (one plain name inside the runs folder, not a path).")
    by_run: dict[str, list[str]] = {}
    for key, name in run_names.items():
        by_run.setdefault(name, []).append(key)
    shared = {name: keys for name, keys in by_run.items() if len(keys) > 1}
    if shared:
        name, keys = next(iter(shared.items()))
        raise ValueError(f"{path}: the run {name!r} is mapped to {' and '.join(keys)}; one run serves one arm and "
                         "seed (otherwise a run would be compared with itself). Fix or remove the study file.")
    base = _validated_base(data["base"], path)
    if base.arch == "smallcnn" and any(a != "scratch" for a in arms):
        raise ValueError(f"{path}: its base config trains smallcnn, which only the 'scratch' arm can be.")
    created = data.get("created")
    created_ok = isinstance(created, (int, float)) and not isinstance(created, bool) and 0 <= created < 2**40
    command = data.get("command")
    return Study(folder.name, folder, data["base"], list(arms), list(seeds), dict(run_names),
                 float(created) if created_ok else 0.0, command if isinstance(command, str) else "")


def list_studies(runs_dir: str | os.PathLike) -> list[Study | tuple[str, str]]:
    """Every study under runs_dir, newest first; a damaged one as (folder name, reason)."""
    root = Path(runs_dir) / STUDIES_FOLDER
    try:
        folders = sorted((p for p in root.iterdir() if p.is_dir() and runs.has_valid_name(p.name)), reverse=True)
    except OSError:
        return []
    out: list[Study | tuple[str, str]] = []
    for folder in folders:
        try:
            out.append(read_study(folder))
        except ValueError as e:
            out.append((folder.name, str(e)))
    return out


def _validated_base(base_fields: dict, path: Path) -> TrainConfig:
    try:
        base = TrainConfig.from_dict(base_fields)
        base.validate()
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{path}: its base config is damaged: {e}") from None
    return base


def _base_config(study: Study) -> TrainConfig:
    return _validated_base(study.base, study.folder / "study.json")


def arm_of(config: dict) -> str | None:
    """The study arm a run's config.json trains (None when the config is damaged): what a study checks
    before it pairs the run with an arm."""
    arch, strategy, pretrained = config.get("arch"), config.get("strategy"), config.get("pretrained")
    if not isinstance(arch, str) or not isinstance(strategy, str) or not isinstance(pretrained, bool):
        return None
    if arch == "smallcnn":
        return "scratch"
    if not pretrained:
        return "random-init" if strategy == "full" else None
    return strategy if strategy in ("frozen", "partial", "full") else None


def run_study(study: Study, show_progress: bool = False, say: Callable[[str], None] = print) -> dict:
    """Train every arm and seed not finished yet, in plan order; a run that fails is reported and the study
    goes on. Returns the progress at the end."""
    from .trainer import create_run, train

    # Runs go where the study is now, even if its folder was moved since it was planned.
    base = dataclasses.replace(_base_config(study), runs_dir=str(study.runs_dir))
    lock = open(study.folder / "study.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"{study.id} is already running in another process.") from None
    record_process(study.folder, state="running")
    try:
        for arm, seed in study.plan():
            run_dir = study.run_dir(arm, seed)
            state = runs.read_status(run_dir).get("state") if run_dir and run_dir.is_dir() else None
            if state == "finished":
                continue
            if state in runs.ACTIVE_STATES:  # resumed by hand (Train page, CLI) and still alive: leave it be
                say(f"{study.id}: {arm}, seed {seed} ({run_dir.name}) is {state} in another process; skipped")
                continue
            refusal = runs.resume_refusal(run_dir) if state else None
            if refusal:  # e.g. a damaged status.json over a finished run's results: kept, never retrained
                say(f"{study.id}: {arm}, seed {seed} skipped: {refusal}")
                continue
            if run_dir is None or state is None:
                run_dir = create_run(arm_config(base, arm, seed, study.id))
                study.runs[f"{arm}/{seed}"] = run_dir.name
                study.save()
                resume = False
            else:
                resume = True
            say(f"{study.id}: {arm}, seed {seed} -> {run_dir.name}" + (" (resuming)" if resume else ""))
            try:
                train(run_dir=run_dir, resume=resume, show_progress=show_progress)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # recorded in the run's status.json; the other runs still train
                say(f"  {arm}, seed {seed} failed: {e}")
            progress = study_progress(study)
            say(f"  {progress['finished']}/{progress['total']} runs finished"
                + (f", about {progress['minutes_left']:.0f} min left" if progress["minutes_left"] else ""))
    finally:
        record_process(study.folder, state="done", pid=None)
        lock.close()  # releases the lock
    return study_progress(study)


def record_process(folder: Path, **fields) -> None:
    """process.json: the pid of the process running the study, so the page can tell whether it runs."""
    path = Path(folder) / "process.json"
    current = runs.read_json(path, {})
    current = current if isinstance(current, dict) else {}
    current.update({"pid": os.getpid(), **fields, "updated": time.time()})
    tmp = Path(folder) / f"process.json.{os.getpid()}.tmp"  # the page and the study process may both write
    tmp.write_text(json.dumps(current))
    os.replace(tmp, path)


def study_process_alive(study: Study) -> bool:
    """Whether another process is running this study now."""
    process = runs.read_json(study.folder / "process.json", {})
    pid = process.get("pid") if isinstance(process, dict) else None
    return pid != os.getpid() and runs.pid_alive(pid)


def wall_seconds(status: dict) -> float | None:
    """Seconds the run took: its last session from start to end (data, features, training and evaluation), or
    for a resumed run its training time over all sessions when that is longer."""
    started, finished, elapsed = status.get("started"), status.get("finished"), status.get("elapsed")
    last = float(finished - started) if isinstance(started, (int, float)) and isinstance(finished, (int, float)) \
        and finished >= started else None
    total = float(elapsed) if isinstance(elapsed, (int, float)) and elapsed >= 0 else None
    candidates = [v for v in (last, total) if v is not None]
    return max(candidates) if candidates else None


def study_progress(study: Study) -> dict:
    """Runs finished / total, the run training now, and the time left estimated from the finished runs of
    each arm (their mean wall time; the mean over all arms for an arm with none finished yet)."""
    states, seconds = {}, {}
    for arm, seed in study.plan():
        run_dir = study.run_dir(arm, seed)
        status = runs.read_status(run_dir) if run_dir and run_dir.is_dir() else {}
        states[(arm, seed)] = status.get("state") or "planned"
        if states[(arm, seed)] == "finished":
            seconds.setdefault(arm, []).append(wall_seconds(status))
    done = [k for k, s in states.items() if s == "finished"]
    per_arm = {a: float(np.mean([s for s in v if s is not None])) for a, v in seconds.items()
               if any(s is not None for s in v)}
    overall = float(np.mean(list(per_arm.values()))) if per_arm else None
    left = [k for k, s in states.items() if s != "finished"]
    minutes_left = (sum(per_arm.get(arm, overall) for arm, _ in left) / 60) if overall is not None else None
    current = next(((arm, seed) for (arm, seed), s in states.items() if s in ("running", "queued")), None)
    return {"total": len(states), "finished": len(done), "failed": sum(s in ("failed", "killed") for s in
                                                                       states.values()),
            "states": {f"{a}/{s}": v for (a, s), v in states.items()}, "current": current,
            "minutes_left": minutes_left if left else 0.0, "running": study_process_alive(study)}


def trainable_parameters(arch: str, strategy: str) -> tuple[int, int, list[str]]:
    """(trainable, total, blocks the strategy trains besides the head) for an architecture and strategy,
    from the model's definition (no weights needed)."""
    model = build_model(arch, pretrained=False)
    apply_strategy(model, strategy)
    trainable, total = count_parameters(model)
    blocks = {"frozen": [], "partial": list(model.partial_names), "full": ["all"]}[strategy]
    return trainable, total, blocks


def study_results(study: Study, n_resamples: int = 2000) -> dict:
    """Per-run rows, per-arm summaries (mean, sd and the 95% t-interval over seeds of test AUC, sensitivity
    and specificity at each run's validation-chosen threshold) and the paired comparisons of the arms."""
    rows, scores, reference, reference_run = [], {}, None, ""
    problems: list[str] = []
    for arm, seed in study.plan():
        run_dir = study.run_dir(arm, seed)
        row = {"arm": arm, "seed": seed, "run": run_dir.name if run_dir else None, "state": "planned"}
        rows.append(row)
        if run_dir is None or not run_dir.is_dir():
            continue
        status = runs.read_status(run_dir)
        row["state"] = status.get("state")
        if row["state"] != "finished":
            continue
        try:
            report = runs.read_report(run_dir)
            threshold = report.get("threshold")
            if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
                raise ValueError(f"{run_dir / 'report.json'} has no validation-chosen threshold.")
            preds = runs.read_predictions(run_dir, "test").sort_values("path", kind="mergesort")
        except (OSError, ValueError) as e:
            problems.append(f"{run_dir.name}: {e}")
            continue
        config = runs.read_config(run_dir)
        if config.get("study") != study.id:
            problems.append(f"{run_dir.name} does not belong to {study.id} (its config names another study): left "
                            f"out.")
            continue
        # A run (or a link to one) that trained another arm or seed would be paired with the wrong runs, or
        # with itself.
        if arm_of(config) != arm or config.get("seed") != seed or isinstance(config.get("seed"), bool):
            problems.append(f"{run_dir.name} is listed as {arm}, seed {seed}, but its config.json trains "
                            f"{arm_of(config) or 'an unknown arm'}, seed {str(config.get('seed'))[:20]}: left out.")
            continue
        if reference is None:
            reference, reference_run = preds, run_dir.name
        elif len(preds) != len(reference) or (preds["path"].values != reference["path"].values).any():
            problems.append(f"{run_dir.name} was tested on other images than {reference_run}: left out of the "
                            f"paired tests.")
            continue
        m = metrics_at_threshold(preds["label"].to_numpy(), preds["prob"].to_numpy(), float(threshold))
        row.update(threshold=float(threshold), auc=m["auc"], sensitivity=m["sensitivity"],
                   specificity=m["specificity"], minutes=(wall_seconds(status) or float("nan")) / 60)
        scores.setdefault(arm, []).append(preds["prob"].to_numpy())
    arms = []
    try:
        base = _base_config(study)
    except ValueError as e:
        problems.append(str(e))
        base = None
    for arm in study.arms:
        done = [r for r in rows if r["arm"] == arm and "auc" in r]
        config = arm_config(base, arm, 0, study.id) if base is not None else None
        try:
            trainable, total, blocks = trainable_parameters(config.arch, config.strategy) if config else (None,) * 3
        except (RuntimeError, ValueError) as e:  # e.g. the backbone's package is not installed here
            problems.append(f"{arm}: cannot count its parameters: {e}")
            trainable = total = blocks = None
        arms.append({"arm": arm, "arch": config.arch if config else None,
                     "init": None if config is None else "ImageNet" if config.pretrained and config.arch != "smallcnn"
                     else "random", "strategy": config.strategy if config else None, "runs": len(done),
                     "trainable": trainable, "total": total, "trains": blocks,
                     **{k: mean_interval([r[k] for r in done], 0.0, 1.0) for k in ("auc", "sensitivity",
                                                                                  "specificity")},
                     "minutes": mean_interval([r["minutes"] for r in done], 0.0)})
    pairs = []
    if reference is not None and sum(1 for v in scores.values() if v) >= 2:
        patients = reference["patient"].tolist() if "patient" in reference else None
        pairs = compare_arms(reference["label"].to_numpy(), patients, scores, n_resamples=n_resamples)
    return {"rows": rows, "arms": arms, "pairs": pairs, "problems": problems,
            "n_test": int(len(reference)) if reference is not None else 0}
