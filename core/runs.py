"""Run directories: the trainer writes them, everything else (CLI, dashboard) reads them.

A run directory holds:
  config.json        the TrainConfig
  environment.json   library versions, device, command
  split.csv          every image with its split, label and patient
  data_report.json   counts, skipped files, leakage
  status.json        state (queued, running, finished, failed, stopped, cancelled), progress, error
  metrics.jsonl      one JSON object per line, kind "step" or "epoch", appended as training goes
  log.txt            human-readable log
  best.safetensors   best weights (by validation AUC) with the metadata prediction needs
  last.pt            resumable state (weights, optimizer, scheduler, RNG), loaded with weights_only
  predictions_{val,test}.csv   path, patient, label, class_name, prob (calibrated probability of the
                     positive class), prob_uncalibrated (before temperature scaling); and where the data had
                     them, the image metadata age (years), sex, view, site (see read_predictions)
  report.json        training-time metrics at the threshold chosen on validation (Youden), temperature
  ood.safetensors    the out-of-distribution score fitted on the training features (core/ood.py)
  threshold.json     the operating threshold chosen by the user (overrides the training-time one)
  external/<name>/   an evaluation on another folder: predictions.csv and summary.json
  STOP               present when another process asked training to stop
  process.log        the output of a background (dashboard-launched) training process
  *.tmp              a file being written (atomic writes), removed when a write fails
  *.onnx, *.html     an export (`python -m core export`, default model.onnx) or a report a user wrote here
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .dataset import display_path, has_valid_name, open_regular_file

ACTIVE_STATES = ("queued", "running")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # readers never see a half-written file


def typed_command(argv: list[str]) -> str:
    """The command as the user typed it: `python -m core ...` when argv[0] is core's __main__."""
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "core":
        return "python -m core " + shlex.join(argv[1:])
    return shlex.join(argv)


MAX_JSON_BYTES = 64 << 20  # a run's JSON files are kilobytes; more is not one of them


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it is missing, unreadable, not a regular file (a FIFO would block,
    a device never end), larger than MAX_JSON_BYTES or not JSON."""
    try:
        with open_regular_file(path) as f:
            data = f.read(MAX_JSON_BYTES + 1)
        return json.loads(data) if len(data) <= MAX_JSON_BYTES else default
    except (OSError, ValueError, RecursionError):
        return default


def pid_alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # also a damaged status.json's pid ("abc", -1)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # also a pid no process can have (10**30)
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped by its parent) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def write_status(run_dir: Path, **fields: Any) -> dict:
    status = read_json(run_dir / "status.json", {})
    status = status if isinstance(status, dict) else {}  # a damaged file is replaced, not merged into
    status.update(fields, updated=time.time())
    _write_json_atomic(run_dir / "status.json", status)
    return status


def mark_failed(run_dir: Path, reason: str) -> None:
    """Record a failed run with its reason, even on a full disk: when the atomic write (which needs room
    for a second copy) fails, status.json is overwritten in place. Never raises."""
    try:
        write_status(run_dir, state="failed", error=reason)
        return
    except OSError:
        pass
    status = read_json(Path(run_dir) / "status.json", {})
    status = status if isinstance(status, dict) else {}
    status.update(state="failed", error=reason, updated=time.time())
    try:
        with open(Path(run_dir) / "status.json", "w") as f:  # truncating frees the old blocks first
            f.write(json.dumps(status, default=str))
    except OSError:
        pass  # a read-only folder: the reader then explains the run as gone without a record


def remove_temporary_files(run_dir: Path) -> list[str]:
    """Delete half-written files (`*.tmp`) a failed write left in the run folder; returns their names."""
    removed = []
    for tmp in Path(run_dir).glob("*.tmp"):
        if not _our_temporary(tmp.name, RUN_FILES):  # a file of the user's that happens to end in .tmp
            continue
        try:
            tmp.unlink()
            removed.append(tmp.name)
        except OSError:
            pass
    return removed


def _last_output_line(run_dir: Path) -> str:
    """The last line the background training process printed (process.log), e.g. its error message."""
    try:
        with open(Path(run_dir) / "process.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def killed_reason(run_dir: Path, status: dict) -> str:
    """Why a run whose status says active is believed killed: its process is gone and left no outcome."""
    pid = status.get("pid")
    who = f"process {pid}" if isinstance(pid, int) and not isinstance(pid, bool) else "process"
    phase = status.get("phase") if isinstance(status.get("phase"), str) else None
    updated = status.get("updated")
    when = (time.strftime(" (last update %Y-%m-%d %H:%M:%S)", time.localtime(updated))
            if isinstance(updated, (int, float)) and not isinstance(updated, bool) and math.isfinite(updated)
            and 0 < updated < 2**33 else "")
    said = _last_output_line(run_dir)
    cause = f"its output ends with: {said}" if said else \
        "it was probably killed (Ctrl-C in another terminal, out of memory, or a restart)"
    return (f"Believed killed: status.json says {status.get('state')}{f' ({phase})' if phase else ''}{when}, but the "
            f"training {who} is no longer running; {cause}. Resume continues from the last epoch checkpoint.")


STATES = ("queued", "running", "finished", "failed", "stopped", "cancelled")
_COUNT_FIELDS = ("epochs", "steps_per_epoch", "epoch", "step", "global_step", "total_steps", "best_epoch")
_TIME_FIELDS = ("created", "queued_at", "started", "updated", "finished", "elapsed", "images_per_s")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_plain_number(value: Any) -> bool:
    """A finite number a table column can hold (a JSON integer can be any size; float64 and Arrow cannot)."""
    return _is_number(value) and abs(value) < 2**53


def _plain_numbers(record: dict) -> dict:
    """A JSON object with numbers out of any table's range (and NaN or infinities) left out."""
    return {k: v for k, v in record.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
            or _is_plain_number(v)}


def _status_field_ok(key: str, value: Any) -> bool:
    if key in _COUNT_FIELDS or key == "pid":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
    if key in _TIME_FIELDS:
        return _is_number(value) and value >= 0
    if key == "best_val_auc":
        return value is None or _is_number(value)
    if key in ("phase", "device", "error"):
        return value is None or isinstance(value, str)
    return True  # fields this version does not use are kept as they are


def read_status(run_dir: Path) -> dict:
    """status.json, validated: a field of the wrong type or range is dropped and named in `damaged`, an
    unknown state reads as 'unknown' with the reason; state 'killed' (and why it is believed so) when it says
    queued or running but its process is gone."""
    path = Path(run_dir) / "status.json"
    status = read_json(path, None)
    if not isinstance(status, dict):
        return {"state": "unknown", "error": f"{path} is missing or unreadable (not a JSON object)"}
    damaged = [k for k, v in status.items() if not _status_field_ok(k, v)]
    for key in damaged:
        status.pop(key)
    if status.get("state") not in STATES:
        state = status.get("state")
        status["state"] = "unknown"
        status["error"] = f"{path} is damaged: its state {json.dumps(state, default=str)[:40]} is not one of " \
                          f"{', '.join(STATES)}"
    if damaged:
        status["damaged"] = damaged
        note = f"{path} has damaged fields ({', '.join(damaged)}): they are ignored"
        status["error"] = f"{status['error']}; {note}" if status.get("error") else note
    if status.get("state") in ACTIVE_STATES and not pid_alive(status.get("pid")):
        status["error"] = killed_reason(Path(run_dir), status)
        status["state"] = "killed"
    return status


# What only a finished run holds: the end of training wrote them, after the last epoch.
FINISHED_RESULTS = ("report.json", "predictions_val.csv", "predictions_test.csv")


def resume_refusal(run_dir: Path) -> str | None:
    """Why a run must not be resumed, or None: it is queued or training in another process, it has finished, or
    its state is unknown (status.json damaged or missing) while it holds a finished run's results, which a
    resume would overwrite (retraining from epoch 0 when last.pt is gone too)."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    state = status.get("state")
    if state in ACTIVE_STATES:
        return f"{run_dir.name} is {state} in another process: stop it first (python -m core stop)."
    if state == "finished":
        return f"{run_dir.name} has finished: there is nothing to resume. Train a new run to train more."
    results = [name for name in FINISHED_RESULTS if os.path.exists(run_dir / name)]  # unreadable: False
    if state == "unknown" and results:
        return (f"{run_dir.name} cannot be resumed: its state is unknown ({status.get('error')}) and it holds a "
                f"finished run's results ({', '.join(results)}), which resuming would overwrite. They are kept as "
                "they are; train a new run to train again.")
    return None


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """All metric records; a half-written last line (run still writing) is skipped."""
    rows = []
    try:
        # errors="replace": a damaged (binary) file gives unparseable lines, which are skipped, not an exception.
        with open(Path(run_dir) / "metrics.jsonl", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    rows.append(record)
    except OSError:
        pass
    df = pd.DataFrame(rows)
    # Every field but `kind` is a number: text, huge integers and infinities (a damaged file) read as missing,
    # so a chart or table never meets a mixed column.
    for column in df.columns:
        if column != "kind":
            df[column] = pd.to_numeric(df[column].map(lambda v: v if _is_plain_number(v) else None),
                                       errors="coerce").astype(float)
    return df


def epoch_metrics(run_dir: Path) -> pd.DataFrame:
    """One row per epoch; after a resume, the latest record of each epoch wins."""
    df = read_metrics(run_dir)
    if df.empty or "kind" not in df:
        return pd.DataFrame()
    ep = df[df["kind"] == "epoch"]
    if ep.empty:  # first epoch still running: only step records so far
        return pd.DataFrame()
    ep = ep.assign(epoch=pd.to_numeric(ep["epoch"], errors="coerce")).dropna(subset=["epoch"])
    if ep.empty:  # damaged records only
        return pd.DataFrame()
    ep = ep.dropna(axis=1, how="all")
    return ep.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def step_metrics(run_dir: Path) -> pd.DataFrame:
    df = read_metrics(run_dir)
    if df.empty or "kind" not in df:
        return pd.DataFrame()
    st = df[df["kind"] == "step"]
    if st.empty:
        return pd.DataFrame()
    st = st.dropna(axis=1, how="all")
    return st.drop_duplicates("global_step", keep="last").sort_values("global_step").reset_index(drop=True)


def log(run_dir: Path, message: str) -> None:
    with open(run_dir / "log.txt", "a") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")


def log_tail(run_dir: Path, lines: int = 30) -> str:
    try:
        return "".join(Path(run_dir, "log.txt").read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def request_stop(run_dir: Path) -> None:
    (Path(run_dir) / "STOP").write_text(str(time.time()))


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / "STOP").exists()


CANCEL_WAIT_S = 5.0


def cancel_queued(run_dir: Path) -> str:
    """Cancel a run that waits in the queue: its waiting process is ended and the run becomes 'cancelled' at
    once (it never trained, so nothing is lost; it can be deleted, or started again with resume). Returns the
    state the run ends in: 'cancelled', or 'stopped' when it got its training slot in the same instant (the STOP
    request written first then stops it at its first step, with a checkpoint). Raises ValueError when the run
    is not queued."""
    import signal

    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status.get("state") != "queued":
        raise ValueError(f"{run_dir.name} is {status.get('state')}, not queued: nothing to cancel.")
    # STOP first: a process that takes its training slot in this instant stops before its first step. It stays
    # (resuming clears it), so a process this one may not signal never trains either.
    request_stop(run_dir)
    pid = status["pid"]  # alive: read_status says 'killed' otherwise
    if pid != os.getpid():  # a run trained inside this very process (tests, notebooks) is never signalled
        try:
            os.kill(pid, signal.SIGTERM)  # waiting in the queue, it holds no file open for writing
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + CANCEL_WAIT_S
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    raw = read_json(run_dir / "status.json", {})
    if isinstance(raw, dict) and raw.get("state") in STATES and raw.get("state") != "queued":
        return str(raw["state"])  # it started and stopped on the STOP request: its own outcome stands
    log(run_dir, "Cancelled while queued (it never trained).")
    write_status(run_dir, state="cancelled", phase=None, error=None)
    return "cancelled"


def epochs_done(status: dict) -> int:
    """Epochs a run has completed, from its status: the one count every view shows ('1/3' is one epoch of three
    done). status.json's `epoch` is the epoch in progress while its `step` is short of `steps_per_epoch`."""
    epoch, step, per_epoch = status.get("epoch"), status.get("step"), status.get("steps_per_epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= 0:
        return 0
    if status.get("state") != "finished" and isinstance(step, int) and isinstance(per_epoch, int) \
            and step < per_epoch:
        return epoch - 1
    return epoch


def clear_stop(run_dir: Path) -> None:
    (Path(run_dir) / "STOP").unlink(missing_ok=True)


EXTERNAL_DIR = "external"
EXTERNAL_STAGING_DIR = ".staging"  # core.external writes an evaluation there, then renames it into place
EXTERNAL_PREFIX = "external:"
SPLIT_LABELS = {"val": "validation", "test": "test"}


def predictions_path(run_dir: Path, name: str) -> Path:
    """'val' and 'test' are the run's own splits; 'external:<name>' a folder evaluated later."""
    if name.startswith(EXTERNAL_PREFIX):
        evaluation = name[len(EXTERNAL_PREFIX):]
        if evaluation in ("", ".", "..") or "/" in evaluation or os.sep in evaluation or "\0" in evaluation:
            raise ValueError(f"{display_path(name)} names no evaluation of this run (one folder name under "
                             f"{EXTERNAL_DIR}/, no path).")
        return Path(run_dir) / EXTERNAL_DIR / evaluation / "predictions.csv"
    return Path(run_dir) / f"predictions_{name}.csv"


def prediction_sets(run_dir: Path) -> list[str]:
    """The image sets this run has predictions for: val, test, then external evaluations by name."""
    run_dir = Path(run_dir)
    names = [s for s in ("val", "test") if predictions_path(run_dir, s).is_file()]
    ext = run_dir / EXTERNAL_DIR
    if ext.is_dir():
        names += [EXTERNAL_PREFIX + d.name for d in sorted(ext.iterdir())
                  if d.is_dir() and (d / "predictions.csv").is_file()]
    return names


def set_label(name: str) -> str:
    """'test', 'validation', or 'external: <name>' for headings."""
    if name.startswith(EXTERNAL_PREFIX):
        return "external: " + name[len(EXTERNAL_PREFIX):]
    return SPLIT_LABELS.get(name, name)


# Optional image metadata of a predictions file (from a label file or DICOM headers; older files have none).
METADATA_TEXT_COLUMNS = ("sex", "view", "site")
MAX_METADATA_CHARS = 200  # a sex, view or site is a few characters; more is a damaged cell, cut


def _finite_number(value: Any) -> float:
    try:
        number = float(value)  # a string of 400 digits is inf here, where pandas' parsers overflow
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        return math.nan
    return number if math.isfinite(number) else math.nan


def _numbers(values: pd.Series) -> pd.Series:
    """A column as numbers, NaN where a cell is none (text); an integer too large for a float (a damaged
    cell of 400 digits, which pandas reads as a Python int and cannot convert) reads as NaN too."""
    try:
        return pd.to_numeric(values, errors="coerce")
    except OverflowError:
        return values.map(_finite_number).astype(float)


def _metadata_text(value: Any) -> str | None:
    text = value.strip()[:MAX_METADATA_CHARS] if isinstance(value, str) else ""
    return text or None


def read_predictions(run_dir: Path, split: str) -> pd.DataFrame:
    """Per-image predictions of a set (see `predictions_path`); raises FileNotFoundError/ValueError with
    the file named when missing or unusable. The optional metadata columns are kept when present and never
    refuse a file: `age` as years (text or an infinite number reads as unknown, NaN), `sex`, `view` and `site`
    as text (stripped, cut to MAX_METADATA_CHARS; blank reads as NaN)."""
    path = predictions_path(run_dir, split)
    if not path.exists():
        raise FileNotFoundError(f"No {split} predictions in {run_dir} (the run has not finished "
                                f"evaluating, or the {split} split is empty).")
    try:
        with open_regular_file(path) as f:
            # Metadata as text, checked below: a site "007" stays 007, a column with blanks never turns 1 into
            # "1.0", and an age of 400 digits is no overflow.
            df = pd.read_csv(f, dtype={column: str for column in ("age", *METADATA_TEXT_COLUMNS)})
    except Exception as e:  # pandas raises several parser error types; a FIFO or device: not a regular file
        raise ValueError(f"{path} is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = {"path", "label", "prob"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}.")
    label, prob = _numbers(df["label"]), _numbers(df["prob"])
    if not label.isin([0, 1]).all():
        raise ValueError(f"{path}: the label column must hold 0 or 1 on every row.")
    if not (prob.between(0, 1)).all():
        raise ValueError(f"{path}: the prob column must hold probabilities between 0 and 1 on every row.")
    # Probabilities are float32 values (softmax in float32); older runs wrote them as float32 text, which
    # reads back as another float64. Rounding to float32 restores the exact value the threshold was
    # chosen on, and loses nothing for newer files.
    df["label"], df["prob"] = label.astype(int), prob.astype(np.float32).astype(np.float64)
    paths = df["path"]
    if not paths.map(lambda p: isinstance(p, str) and p.strip() != "").all():
        raise ValueError(f"{path}: the path column must name an image on every row.")
    repeated = paths[paths.duplicated()]
    if len(repeated):  # one image counted twice: every figure would be silently wrong
        raise ValueError(f"{path} lists {display_path(repeated.iloc[0])} more than once ({len(repeated)} repeated "
                         "rows): the file was edited. Evaluate again to rewrite it.")
    if "patient" in df:
        df["patient"] = df["patient"].fillna("").astype(str)
    if "ood_score" in df:  # a distance: a damaged cell (text, negative, infinite) reads as unknown, never shown
        score = _numbers(df["ood_score"])
        df["ood_score"] = score.where(np.isfinite(score) & (score >= 0))
    if "age" in df:
        df["age"] = df["age"].map(_finite_number).astype(float)
    for column in METADATA_TEXT_COLUMNS:
        if column in df:
            df[column] = df[column].map(_metadata_text).astype("str")
    expected = _split_size(Path(run_dir), split)
    if expected is not None and expected != len(df):
        raise ValueError(f"{path} has {len(df)} rows but split.csv lists {expected} {split} images: the file is "
                         f"truncated or was edited. Evaluate the run again to rewrite it.")
    return df


def _split_size(run_dir: Path, split: str) -> int | None:
    """How many images split.csv puts in a run's own split ('val', 'test'); None when unknown."""
    if split not in ("val", "test"):
        return None
    try:
        table = pd.read_csv(run_dir / "split.csv", usecols=["split"])
    except Exception:  # missing or damaged split.csv: nothing to check against (pandas raises several types)
        return None
    return int((table["split"] == split).sum())


def read_config(run_dir: Path) -> dict:
    """config.json as a dict; {} when missing or not a JSON object (the run then shows as damaged fields)."""
    config = read_json(Path(run_dir) / "config.json", {})
    return config if isinstance(config, dict) else {}


def read_report(run_dir: Path) -> dict:
    """report.json as a dict, with the per-split entries dropped unless they are objects."""
    report = read_json(Path(run_dir) / "report.json", {})
    if not isinstance(report, dict):
        return {}
    return {k: _plain_numbers(v) if isinstance(v, dict) else v for k, v in _plain_numbers(report).items()
            if k not in ("val", "test") or isinstance(v, dict)}


def save_threshold(run_dir: Path, threshold: float, chosen_on: str, target: str, rule: str | None = None,
                   value: float | None = None) -> None:
    """Save the run's operating threshold. `target` describes the rule in words; `rule` and `value` are the
    machine-readable rule (e.g. 'recall', 0.95) when one was used."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError("A threshold is a probability between 0 and 1.")
    _write_json_atomic(Path(run_dir) / "threshold.json",
                       {"threshold": float(threshold) + 0.0, "chosen_on": chosen_on, "target": target,
                        "rule": rule or "manual", "value": value, "saved": time.time()})


@dataclass(frozen=True)
class OperatingPoint:
    """The one threshold a run's views use: the saved one, else the one chosen at the end of training."""

    threshold: float
    source: str  # "saved" (threshold.json) or "training" (report.json), "default" without either
    rule: str  # how it was chosen, in words
    chosen_on: str  # the set it was fitted on (val, test, external:...)

    def describe(self) -> str:
        """'0.435 (saved; recall ≥ 0.950 on validation)'."""
        where = set_label(self.chosen_on) if self.chosen_on else "?"
        if self.source == "default":
            return f"{self.threshold:.3f} (default 0.5: the run has no chosen threshold yet)"
        origin = "saved" if self.source == "saved" else "chosen at the end of training"
        return f"{self.threshold:.3f} ({origin}; {self.rule} on {where})"


# A threshold is read as float(value) + 0.0: -0.0 (a valid JSON number) becomes 0.0, so no view shows "-0.000".
def _valid_threshold(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0.0 <= value <= 1.0


def operating_point(run_dir: Path) -> OperatingPoint:
    """The run's operating threshold and how it was chosen. A damaged threshold.json is refused with a
    ValueError naming the file (it is never silently replaced by another threshold)."""
    run_dir = Path(run_dir)
    path = run_dir / "threshold.json"
    if path.exists():
        saved = read_json(path, None)
        if not isinstance(saved, dict) or not _valid_threshold(saved.get("threshold")):
            raise ValueError(f"{path} is damaged: it must hold a threshold between 0 and 1. Save a threshold "
                             "again on the Thresholds page, or delete the file to use the training threshold.")
        return OperatingPoint(float(saved["threshold"]) + 0.0, "saved", str(saved.get("target") or "set by hand"),
                              str(saved.get("chosen_on") or "val"))
    finished = read_status(run_dir).get("state") == "finished"
    raw = read_json(run_dir / "report.json", None)
    if finished and not isinstance(raw, dict):
        # Never fall back to 0.5 without a word: the figures would change under the user.
        raise ValueError(f"{run_dir / 'report.json'} is missing or damaged, so the run's training threshold is "
                         "unknown. Save a threshold on the Thresholds page to use the run.")
    # Read from the file as written: read_report drops a NaN or infinite number, which would read as no threshold.
    if isinstance(raw, dict) and ("threshold" in raw or finished):
        if not _valid_threshold(raw.get("threshold")):
            raise ValueError(f"{run_dir / 'report.json'} is damaged: its threshold is not a probability between 0 "
                             "and 1. Save a threshold on the Thresholds page to use the run.")
        rule = str(read_report(run_dir).get("threshold_rule") or "youden on validation").replace(" on validation", "")
        return OperatingPoint(float(raw["threshold"]) + 0.0, "training", rule.replace("youden", "Youden"), "val")
    return OperatingPoint(0.5, "default", "default", "")


def operating_threshold(run_dir: Path) -> float:
    """The user's saved threshold, else the one chosen on validation at the end of training, else 0.5."""
    return operating_point(run_dir).threshold


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").exists()


# Every name the trainer, the evaluations and the dashboard write at the top of a run folder (see the docstring).
RUN_FILES = frozenset({
    "config.json", "environment.json", "split.csv", "data_report.json", "status.json", "metrics.jsonl", "log.txt",
    "best.safetensors", "last.pt", "predictions_val.csv", "predictions_test.csv", "report.json", "threshold.json",
    "STOP", "process.log", "ood.safetensors"})
EXTERNAL_FILES = frozenset({"predictions.csv", "summary.json"})
# Outputs a user may write into a run folder: `export` (default RUN/model.onnx) and `report --out`.
# Outputs a command may write into a run folder by their default names (export's RUN/model.onnx, a report named
# as report's default): a file of another name there, even one ending .onnx or .html, may be the user's own, so
# delete refuses it and says so.
RUN_OUTPUT_NAMES = frozenset({"model.onnx", "report.html"})
# Files an operating system's file browser leaves in any folder it shows; never anyone's data.
_OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# new_run_dir's names: <YYYYmmdd-HHMMSS>-<arch>-<strategy>[-<name>][-<n>]
RUN_NAME = re.compile(r"\d{8}-\d{6}-[A-Za-z0-9_.-]+")
# Fields every version of TrainConfig has written to config.json; another tool's config.json has not all of them.
_CONFIG_IDENTITY = ("data", "runs_dir", "arch", "strategy")


def _environment_is_ours(path: Path) -> bool:
    """environment.json as the trainer writes it (library versions and the device)."""
    env = read_json(path / "environment.json", None)
    return isinstance(env, dict) and all(key in env for key in ("python", "torch", "torchvision", "device"))


def _split_is_ours(path: Path) -> bool:
    """split.csv whose header is the trainer's."""
    try:
        with open_regular_file(path / "split.csv") as f:
            header = f.readline(4096).decode("utf-8", "replace").strip().split(",")
    except (OSError, ValueError):
        return False
    return {"path", "split", "label", "class_name", "patient"} <= set(header)


def _status_has_known_state(path: Path) -> bool:
    status = read_json(path / "status.json", None)
    return isinstance(status, dict) and status.get("state") in STATES


def _checkpoint_is_ours(path: Path) -> bool:
    """best.safetensors carries the format tag every version of the trainer writes in its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "best.safetensors"), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a missing or damaged file raises several types
        return False
    return str(metadata.get("format", "")).startswith("cxr-workbench/")


def _not_a_run(path: Path) -> str | None:
    """Why `path` is not a run folder of this tool, in words; None when it is one. A run is recognised by
    evidence every version of the trainer leaves, so that a damaged run stays a run: config.json holding a
    training config, or else (unless config.json is another program's) three of: the trainer's folder name, a
    status.json of a known state, a best.safetensors with the trainer's format tag, the trainer's
    environment.json, the trainer's split.csv."""
    shown = display_path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return f"{shown} does not exist"
    except OSError as e:
        return f"{shown} cannot be read ({e.strerror or e})"
    if stat.S_ISLNK(mode):
        return f"{shown} is a symbolic link, not a run folder (give the run folder itself)"
    if not stat.S_ISDIR(mode):
        return f"{shown} is not a folder"
    config = read_json(path / "config.json", None)
    if isinstance(config, dict) and all(key in config for key in _CONFIG_IDENTITY):
        return None
    # An emptied config.json ({}) is a damaged run of ours as much as anything: the other evidence decides.
    if isinstance(config, dict) and config and not any(key in config for key in _CONFIG_IDENTITY):
        return (f"{shown} is not a run of this tool: its config.json is another program's (none of "
                f"{', '.join(_CONFIG_IDENTITY)})")
    evidence = {"its name is not a run name (YYYYmmdd-HHMMSS-arch-strategy)": RUN_NAME.fullmatch(path.name),
                "its status.json holds no state this tool writes": _status_has_known_state(path),
                "it holds no best.safetensors this tool wrote": _checkpoint_is_ours(path),
                "it holds no environment.json this tool wrote": _environment_is_ours(path),
                "it holds no split.csv this tool wrote": _split_is_ours(path)}
    # Three pieces: a name and a status.json alone are what another tool's job folder may have too.
    if sum(bool(found) for found in evidence.values()) >= 3:
        return None
    why = (f"its config.json is not a training config of this tool (it lacks {', '.join(_CONFIG_IDENTITY)})"
           if (path / "config.json").exists() else "it has no config.json")
    return f"{shown} is not a run of this tool: {why}, and " + ", and ".join(
        reason for reason, found in evidence.items() if not found)


def is_run_folder(path: Path) -> bool:
    """A real folder (not a link) that is a run of this tool, damaged runs included (see `_not_a_run`): what
    `list_runs` lists, and what `check_deletable` accepts when nothing foreign was added to it."""
    return _not_a_run(Path(path)) is None


def _our_temporary(name: str, names: frozenset[str]) -> bool:
    """A temporary file this tool's writers leave when killed: '.<file>.<pid>.tmp', '<file>.tmp' or '<stem>.tmp'
    of one of `names` (the trainer's checkpoint writes)."""
    match = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
    base = match.group(1) if match else name[:-len(".tmp")] if name.endswith(".tmp") else None
    return base is not None and (base in names or any(Path(n).stem == base for n in names))


def _foreign_entry(run_dir: Path) -> Path | None:
    """The first entry of a run folder that this tool never writes there (a file of another kind, a link, a
    folder other than external/<name>/); None when there is none."""
    def ours(entry: os.DirEntry, names: frozenset[str], suffixes: tuple[str, ...]) -> bool:
        return entry.name in _OS_CLUTTER or (entry.is_file(follow_symlinks=False) and (
            entry.name in names or entry.name.endswith(suffixes or ("\0",)) or _our_temporary(entry.name, names)))

    with os.scandir(run_dir) as entries:
        for entry in entries:
            if entry.name != EXTERNAL_DIR or not entry.is_dir(follow_symlinks=False):
                if not ours(entry, RUN_FILES | RUN_OUTPUT_NAMES, ()):
                    return Path(entry.path)
                continue
            foreign = _foreign_evaluation_entry(Path(entry.path), ours)
            if foreign is not None:
                return foreign
    return None


def _foreign_evaluation_entry(folder: Path, ours, depth: int = 0) -> Path | None:
    """In external/: evaluation folders holding only the files an evaluation writes; its hidden staging folder
    (external/.staging/, left by a writer killed mid-save) holds evaluation folders too."""
    with os.scandir(folder) as evaluations:
        for evaluation in evaluations:
            if evaluation.name in _OS_CLUTTER:
                continue
            if not evaluation.is_dir(follow_symlinks=False):
                return Path(evaluation.path)
            if evaluation.name == EXTERNAL_STAGING_DIR and depth == 0:
                foreign = _foreign_evaluation_entry(Path(evaluation.path), ours, depth + 1)
            else:
                with os.scandir(evaluation.path) as files:
                    found = next((f for f in files if not ours(f, EXTERNAL_FILES, ())), None)
                foreign = Path(found.path) if found is not None else None
            if foreign is not None:
                return foreign
    return None


def check_deletable(path: str | os.PathLike) -> None:
    """Raise ValueError (one line, saying why; nothing is deleted) unless `path` is provably a run of this tool
    that may be deleted: a real folder recognised as a run (see `_not_a_run`), holding only files this tool
    writes there (anything else would be lost with it), and not queued or training."""
    path = Path(path)
    problem = _not_a_run(path)
    if problem:
        raise ValueError(f"{problem}: nothing deleted.")
    try:
        foreign = _foreign_entry(path)
    except OSError as e:
        raise ValueError(f"{display_path(path)} cannot be listed ({e.strerror or e}): nothing deleted.") from None
    if foreign is not None:
        kind = "folder" if foreign.is_dir() and not foreign.is_symlink() else \
            "link" if foreign.is_symlink() else "file"
        raise ValueError(f"{display_path(path)} holds {display_path(foreign)}, a {kind} this tool never writes in a "
                         "run: move it out first if the folder is a run (nothing deleted).")
    state = read_status(path).get("state")
    if state in ACTIVE_STATES:
        raise ValueError(f"{path.name} is {state}: stop it first (python -m core stop, or Stop on Train), then "
                         "delete it.")


def _owning_run(path: Path) -> Path | None:
    """The run folder a (possibly not yet existing) file would be part of: its folder, or the run of an
    external/<name>/ folder. A folder holding config.json and status.json counts, whatever their content."""
    folder = path.parent.resolve()
    for candidate in (folder, folder.parent, folder.parent.parent):
        if is_run_folder(candidate) or ((candidate / "config.json").exists() and (candidate / "status.json").exists()):
            return candidate
    return None


def check_output_file(out: str | os.PathLike, force: bool = False, suffixes: tuple[str, ...] = (),
                      new_folders: bool = False) -> Path:
    """Check, before any work, that a command may write its output file `out`; raises ValueError (one line naming
    the file and the way out) otherwise. `out` must be a file name in an existing folder (with `new_folders`, in
    folders the caller will create, never under a file); never a folder, a device, pipe or socket (nor a link to
    one); never a run's own file, even with `force`: inside a run folder only a file with the command's own
    `suffixes` (e.g. `export`'s model.onnx) may be written, beside the run's files. An existing file is replaced
    only with `force`. Returns `out` as a Path."""
    out = Path(out)
    shown = display_path(out)
    if out.name in ("", ".", ".."):
        raise ValueError(f"{shown} is a folder: give a file name.")
    folder = out.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise ValueError(f"{display_path(existing)} is not a folder: give a file in a folder.")
    if existing != folder and not new_folders:
        raise ValueError(f"The folder {display_path(folder)} does not exist: give a file in an existing folder.")
    try:
        link_mode: int | None = os.lstat(out).st_mode
    except FileNotFoundError:
        link_mode = None
    except OSError as e:
        raise ValueError(f"{shown} cannot be checked ({e.strerror or e}): nothing written.") from None
    if link_mode is not None:
        try:
            mode = os.stat(out).st_mode
        except OSError:
            mode = link_mode  # a broken link: replacing it loses nothing but the link
        if stat.S_ISDIR(mode):
            raise ValueError(f"{shown} is a folder: give a file name inside it.")
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise ValueError(f"{shown} is not a regular file (a device, pipe or socket): it is never replaced; "
                             "give another file name.")
    run = _owning_run(out)
    if run is not None and not (folder.resolve() == run and out.name.endswith(suffixes) and suffixes
                                and out.name not in RUN_FILES):
        own = f"a new file name ending in {' or '.join(suffixes)} directly in it, or " if suffixes else ""
        raise ValueError(f"{shown} is in the run folder {display_path(run)}, whose own files are never replaced: "
                         f"give {own}another folder.")
    if link_mode is not None and not force:
        raise ValueError(f"{shown} exists: pass --force to replace it (nothing written).")
    return out


def check_writable(folder: Path) -> None:
    """OSError naming `folder` when no file can be created in it (read-only, permissions, a full disk): checked
    before long work whose result would then be lost."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"cannot write into the folder ({e.strerror or e})", str(folder)) from None


def write_file_atomic(out: Path, write: Any) -> None:
    """Call `write(tmp)` on a temporary file beside `out`, then move it onto `out` in one step: a reader never
    sees half a file, and a failed write leaves `out` as it was (the temporary file is removed)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        if e.filename is not None and Path(os.fsdecode(e.filename)) == tmp:  # name the file asked for, not ours
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise
    finally:
        with contextlib.suppress(OSError):  # a read-only folder: there is none to remove
            tmp.unlink(missing_ok=True)


def run_size(run_dir: Path) -> tuple[int, int]:
    """(files, bytes) in a run folder, for a delete confirmation."""
    files = size = 0
    for p in Path(run_dir).rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                files, size = files + 1, size + p.stat().st_size
        except OSError:
            continue
    return files, size


def delete_run(run_dir: Path) -> None:
    """Delete a run folder and everything in it. Refuses (see `check_deletable`) what is not provably a run, a
    run holding files this tool never writes, and a run that is queued or training in a live process (stop it
    first). Raises ValueError or OSError with a message."""
    import shutil

    run_dir = Path(run_dir)
    check_deletable(run_dir)
    try:
        shutil.rmtree(run_dir)
    except OSError as e:
        raise OSError(e.errno, f"could not delete {run_dir} completely ({e.strerror or e}); what is left is "
                               "still in that folder") from None


def list_runs(runs_dir: str | os.PathLike = "checkpoints") -> list[dict]:
    """One summary per run directory, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # deleted meanwhile
            return 0.0

    def listed(p: Path) -> bool:
        # is_run_folder: a run whose config.json is gone is listed (and says so), not silently dropped
        try:
            return has_valid_name(p.name) and is_run_folder(p)
        except OSError:  # unreadable (permissions): listed by a run's name, with the reason, never hiding the rest
            return bool(RUN_NAME.fullmatch(p.name))

    out = []
    try:
        found = [p for p in root.iterdir() if listed(p)]
    except OSError:
        return []
    for d in sorted(found, key=mtime, reverse=True):
        try:
            os.listdir(d)
        except OSError as e:
            out.append({"run": d.name, "path": str(d), "state": "unknown", "arch": None, "strategy": None,
                        "pretrained": None, "epoch": 0, "epochs": None, "best_val_auc": None,
                        "error": f"{display_path(d)} cannot be read ({e.strerror or e})"})
            continue
        cfg, status = read_config(d), read_status(d)
        text = {k: cfg.get(k) if isinstance(cfg.get(k), str) else None for k in ("arch", "strategy")}
        epochs = cfg.get("epochs")
        out.append({
            "run": d.name, "path": str(d), "state": status.get("state"), **text,
            "pretrained": cfg.get("pretrained") if isinstance(cfg.get("pretrained"), bool) else None,
            "epoch": epochs_done(status),  # completed epochs, as Compare and Train count them
            "epochs": epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and 0 < epochs < 2**31
            else None,
            "best_val_auc": status.get("best_val_auc"),
            "error": f"{d / 'config.json'} is missing" if not is_run_dir(d) else
            f"{d / 'config.json'} is damaged (not a training config)"
            if not all(key in cfg for key in _CONFIG_IDENTITY) else
            status.get("error") if status.get("state") in ("failed", "killed", "unknown") or status.get("damaged")
            else None,
        })
    return out
