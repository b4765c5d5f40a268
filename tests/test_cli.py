from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_explains_every_training_option():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--data", "--arch", "--strategy", "--pretrained", "--weights-file", "--epochs",
                   "--batch-size", "--lr", "--schedule", "--image-size", "--augment", "--class-weights",
                   "--device", "--seed", "--preset"):
        assert option in text
    assert cli("--help").returncode == 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import write_dataset

    base = tmp_path_factory.mktemp("cli")
    data = write_dataset(base / "xrays", {"NORMAL": 16, "PNEUMONIA": 24})
    result = cli("train", "--preset", "tiny", "--data", str(data), "--runs-dir", str(base / "runs"),
                 "--image-size", "32", "--decode-workers", "1")
    assert result.returncode == 0, result.stderr
    assert "operating threshold" in result.stdout and "test:" in result.stdout
    assert "Sensitivity (recall)" in result.stdout and "Specificity" in result.stdout
    (run_dir,) = [p for p in (base / "runs").iterdir() if p.is_dir()]
    return run_dir, data


def test_runs_lists_the_run_with_status(trained_run):
    run_dir, _ = trained_run
    out = cli("runs", "--runs-dir", str(run_dir.parent)).stdout
    assert run_dir.name in out and "finished" in out


def test_predict_gives_class_and_probability_and_reports_bad_files(trained_run, tmp_path):
    run_dir, data = trained_run
    image = next((data / "test" / "PNEUMONIA").glob("*.jpeg"))
    fake = tmp_path / "fake.jpeg"
    fake.write_text("hello")
    result = cli("predict", str(run_dir), str(image), str(fake))
    assert result.returncode == 1  # one file failed
    lines = result.stdout.strip().splitlines()
    assert "P(PNEUMONIA) =" in lines[0] and ("NORMAL" in lines[0] or "PNEUMONIA" in lines[0])
    assert "ERROR" in lines[1] and "Not a readable image" in lines[1]



def test_predict_prints_each_file_on_its_own_line_whatever_its_name(trained_run, tmp_path):
    import shutil

    run_dir, data = trained_run
    image = next((data / "test" / "PNEUMONIA").glob("*.jpeg"))
    odd = [tmp_path / "two\nlines.jpeg", tmp_path / "red\x1b[31m.jpeg", tmp_path / "broken\rname.jpeg"]
    for path in odd[:2]:
        shutil.copy(image, path)
    odd[2].write_text("not an image")
    result = cli("predict", str(run_dir), *map(str, odd))
    lines = result.stdout.strip().split("\n")  # then the batch's verdict
    assert len([line for line in lines if line.startswith(str(tmp_path))]) == 3
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert lines[0].startswith(f"{tmp_path}/two\\x0alines.jpeg: ")
    assert lines[1].startswith(f"{tmp_path}/red\\x1b[31m.jpeg: ")
    assert lines[2].startswith(f"{tmp_path}/broken\\x0dname.jpeg: ERROR")


def test_evaluate_prints_every_metric_with_its_interval(trained_run, tmp_path):
    from core.bootstrap import METRIC_KEYS, METRIC_LABELS, format_interval
    from core.operating import run_summary

    run_dir, data = trained_run
    out_csv = tmp_path / "preds.csv"
    result = cli("evaluate", str(run_dir), "--split", "test", "--out", str(out_csv))
    assert result.returncode == 0, result.stderr
    expected = run_summary(run_dir)["sets"]["test"]
    for key in METRIC_KEYS:
        line = next(x for x in result.stdout.splitlines() if x.strip().startswith(METRIC_LABELS[key]))
        assert line.split(METRIC_LABELS[key])[1].strip() == format_interval(expected["metrics"][key])
    assert "bootstrap resamples of patients" in result.stdout and out_csv.exists()
    other = cli("evaluate", str(run_dir), "--data", str(data), "--split", "test", "--name", "again")
    assert other.returncode == 0, other.stderr
    assert "40 images" in other.stdout and (run_dir / "external" / "again" / "predictions.csv").exists()


def test_saved_threshold_reaches_runs_and_evaluate(trained_run, tmp_path, monkeypatch):
    import shutil

    from core import runs
    from core.bootstrap import format_interval
    from core.operating import run_summary

    run_dir, _ = trained_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    runs.save_threshold(copy, 0.321, chosen_on="val", target="recall ≥ 0.990", rule="recall", value=0.99)
    spec = format_interval(run_summary(copy)["sets"]["test"]["metrics"]["specificity"])
    evaluated = cli("evaluate", str(copy)).stdout
    assert "operating threshold 0.321 (saved; recall ≥ 0.990 on validation)" in evaluated
    assert spec in evaluated
    listed = subprocess.run([sys.executable, "-m", "core", "runs"], cwd=ROOT, capture_output=True, text=True,
                            env={**__import__("os").environ, "CXR_RUNS_DIR": str(copy.parent)}).stdout
    assert copy.name in listed and "0.321" in listed and f"spec {spec}" in listed


@pytest.mark.parametrize("args,message", [(["--threshold", "nan"], "--threshold is a probability"),
                                          (["--class-map", "a=b"], "goes with --data"),
                                          (["--split", "nonsense"], "No nonsense predictions")])
def test_bad_evaluate_options_are_clear_errors(trained_run, args, message):
    run_dir, _ = trained_run
    result = cli("evaluate", str(run_dir), *args)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("options,message", [
    (["--data", "nowhere"], "Dataset folder not found"), (["--data", "a-file"], "Not a folder"),
    (["--data", "empty"], "No class folders"), (["--data", "xrays", "--positive-class", "NOPE"],
                                                "Positive class 'NOPE' is not one of the class folders"),
    (["--data", "xrays", "--labels", "missing.csv"], "Label file not found"),
    (["--data", "xrays", "--device", "cuda:999"], "Device 'cuda:999' asked for")])
def test_bad_data_folder_is_a_clear_error_and_leaves_no_run(tiny_dataset, tmp_path, options, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    options = [str(tmp_path / o) if o in ("nowhere", "a-file", "empty", "missing.csv") else
               str(tiny_dataset) if o == "xrays" else o for o in options]
    result = cli("train", "--preset", "tiny", *options, "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # checked before a run folder was made: no failed run left behind



def test_torchrun_commands_for_other_machines_print_without_this_machine_s_gpu_or_data(tmp_path):
    result = cli("train", "--preset", "gpu", "--no-pretrained", "--device", "cuda", "--data", "/data/on/the/cluster",
                 "--runs-dir", str(tmp_path / "runs"), "--torchrun-nodes", "2x8")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("torchrun")]
    assert len(lines) == 2 and all("--nproc-per-node=8" in line and "/data/on/the/cluster" in line for line in lines)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--epochs", "999999999999999999999", "epochs must be between"), ("--epochs", "0", "epochs must be between"),
    ("--max-steps-per-epoch", "-3", "max_steps_per_epoch must be between"),
    ("--aug-flip", "1.5", "aug_flip must be between"), ("--patience", "-1", "patience must be between"),
    ("--lr", "nan", "lr must be a finite number"), ("--lr", "inf", "lr must be a finite number"),
    ("--dropout", "-0.2", "dropout must be between"), ("--batch-size", "0", "batch_size must be between")])
def test_bad_training_options_are_refused_before_anything_starts(tmp_path, capsys, option, value, message):
    from core.cli import main

    runs_dir = tmp_path / "runs"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path), "--runs-dir", str(runs_dir),
                 option, value]) == 1
    assert message in capsys.readouterr().err
    assert not runs_dir.exists()  # no run folder was created


def test_resume_and_stop_refuse_what_they_cannot_do(trained_run, tmp_path, capsys):
    from core import runs
    from core.cli import main

    run_dir, _ = trained_run
    assert main(["resume", str(run_dir)]) == 1
    assert "has finished: there is nothing to resume" in capsys.readouterr().err
    assert runs.read_status(run_dir)["state"] == "finished"  # not marked failed, still listed as finished
    assert main(["stop", str(tmp_path)]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["stop", str(run_dir)]) == 1
    assert "is not training" in capsys.readouterr().err
    assert not (run_dir / "STOP").exists()



@pytest.mark.parametrize("status", ["", "{not json", '{"state": "exploded"}'])
@pytest.mark.parametrize("last_checkpoint", [True, False])
def test_a_finished_run_with_a_damaged_status_is_never_resumed_over_its_results(trained_run, tmp_path, capsys,
                                                                                status, last_checkpoint):
    import hashlib
    import shutil

    from core import launch
    from core.cli import main

    run_dir, _ = trained_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / "status.json").write_text(status)
    if not last_checkpoint:
        (copy / "last.pt").unlink(missing_ok=True)  # resuming would retrain from epoch 0

    def files() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.iterdir() if p.is_file()}

    before = files()
    assert main(["resume", str(copy)]) == 1
    said = capsys.readouterr().err
    assert "cannot be resumed: its state is unknown" in said and "report.json" in said and "kept" in said
    with pytest.raises(ValueError, match="cannot be resumed: its state is unknown"):
        launch.launch_resume(copy)  # the Train page's Resume
    assert files() == before  # nothing rewritten, status.json included


def test_resuming_a_run_with_a_damaged_config_marks_it_failed_with_the_reason(trained_run, tmp_path, capsys):
    import json
    import shutil

    from core import runs
    from core.cli import main

    run_dir, _ = trained_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["epochs"] = "abc"
    (copy / "config.json").write_text(json.dumps(config))
    runs.write_status(copy, state="stopped")
    assert main(["resume", str(copy)]) == 1
    assert "config.json is damaged" in capsys.readouterr().err
    status = runs.read_status(copy)
    assert status["state"] == "failed" and "epochs must be of type int" in status["error"]


def test_delete_asks_refuses_active_runs_and_removes_only_run_folders(trained_run, tmp_path, capsys, monkeypatch):
    import shutil

    from core import runs
    from core.cli import main

    run_dir, _ = trained_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    assert main(["delete", str(copy)]) == 1  # not a terminal and no --yes: refused, nothing lost
    assert "add --yes" in capsys.readouterr().err and copy.exists()
    assert main(["delete", str(tmp_path)]) == 1
    assert "is not a run of this tool" in capsys.readouterr().err and tmp_path.exists()
    (copy / "notes.txt").write_text("mine")  # a file the tool never writes: refused before asking
    monkeypatch.setattr("builtins.input", lambda prompt: pytest.fail("asked before checking"))
    assert main(["delete", "--yes", str(copy)]) == 1
    assert "notes.txt" in capsys.readouterr().err and (copy / "notes.txt").exists()
    (copy / "notes.txt").unlink()
    runs.write_status(copy, state="running", pid=os.getpid())
    assert main(["delete", "--yes", str(copy)]) == 1
    assert "stop it first" in capsys.readouterr().err and copy.exists()
    runs.write_status(copy, state="stopped")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["delete", str(copy)]) == 0 and copy.exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["delete", str(copy)]) == 0 and not copy.exists()
    assert "Deleted" in capsys.readouterr().out


def test_a_damaged_status_never_breaks_runs_and_names_the_file(trained_run, tmp_path):
    import json
    import shutil

    run_dir, _ = trained_run
    runs_dir = tmp_path / "runs"
    for name, status in {"pid": {"state": "running", "pid": "abc"},
                         "types": {"state": "finished", "epoch": "x", "elapsed": [1], "images_per_s": float("nan")},
                         "state": {"state": 7}, "list": [1, 2]}.items():
        shutil.copytree(run_dir, runs_dir / f"damaged-{name}")
        (runs_dir / f"damaged-{name}" / "status.json").write_text(json.dumps(status))
    shutil.copytree(run_dir, runs_dir / "good")
    result = cli("runs", "--runs-dir", str(runs_dir))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "status.json has damaged fields (epoch, elapsed, images_per_s)" in result.stdout
    assert "status.json is damaged: its state 7" in result.stdout
    assert "status.json is missing or unreadable" in result.stdout
    good = [line for line in result.stdout.splitlines() if line.startswith("good")]
    assert good and "finished" in good[0] and "AUC" in good[0]


def test_data_prints_a_readable_summary_listing_every_bad_file_and_json_on_request(tmp_path):
    import json

    from bad_inputs import write_bad_entries, write_bad_images
    from conftest import write_dataset

    data = write_dataset(tmp_path / "xrays", {"NORMAL": 8, "PNEUMONIA": 8})
    bad = {**write_bad_images(data / "train" / "NORMAL"), **write_bad_entries(data / "train" / "PNEUMONIA")}
    (data / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    result = cli("data", str(data))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "Images per split folder and class:" in result.stdout and "Split training will use" in result.stdout
    assert f"Skipped (unreadable or unusable): {len(bad)}:" in result.stdout
    for path in bad:
        assert path in result.stdout
    assert "Ignored (not image files): 1:" in result.stdout
    as_json = json.loads(cli("data", str(data), "--json").stdout)
    assert len(as_json["unreadable"]) + len(as_json["unusable_entries"]) == len(bad)
    refused = cli("data", str(data), "--val-fraction", "1.5")
    assert refused.returncode == 1 and "between 0 and 1" in refused.stderr
    assert "--val-fraction" in cli("data", "--help").stdout and "leakage" in cli("data", "--help").stdout


def test_output_paths_and_names_the_os_cannot_hold_are_refused_before_the_work(trained_run, tmp_path, capsys):
    from core.cli import main

    run_dir, data = trained_run
    assert main(["evaluate", str(run_dir), "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--out", str(tmp_path / "missing" / "x.csv")]) == 1
    assert "does not exist: give a file in an existing folder" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data", str(data), "--runs-dir", str(tmp_path / "r"),
                 "--name", "x" * 300]) == 1
    assert "name must be at most 64 characters" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data", str(data), "--runs-dir", str(run_dir / "config.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "config.json" in err


def test_resume_without_its_checkpoint_says_it_restarts(run_copy):
    from core import runs

    runs.write_status(run_copy, state="stopped")
    (run_copy / "last.pt").unlink(missing_ok=True)
    result = cli("resume", str(run_copy), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "last.pt (the checkpoint to resume from) is missing: training restarts from epoch 0" in result.stderr
    assert "restarts from epoch 0" in runs.log_tail(run_copy, 200)


def test_train_lists_the_files_it_skipped_and_refuses_an_unknown_device(tmp_path):
    from bad_inputs import write_bad_images
    from conftest import write_dataset

    data = write_dataset(tmp_path / "xrays", {"NORMAL": 12, "PNEUMONIA": 12})
    bad = write_bad_images(data / "train" / "NORMAL")
    refused = cli("train", "--data", str(data), "--device", "bogus", "--runs-dir", str(tmp_path / "runs"))
    assert refused.returncode == 1 and "device must be auto, cpu, cuda, cuda:N or mps, not 'bogus'" in refused.stderr
    result = cli("train", "--data", str(data), "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"skipped {len(bad)} unreadable or unusable files" in result.stdout
    for path in bad:
        assert path in result.stdout


# ------------------------------------------------ external evaluations: nothing lost or overwritten

@pytest.fixture
def cli_run(trained_run, tmp_path) -> Path:
    """A private copy of the CLI's trained run, for tests that write evaluations into it."""
    import shutil

    run_dir, _ = trained_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def site(root: Path, per_folder: dict[str, int], per_patient: int = 1) -> Path:
    from conftest import make_xray

    for k, (folder, n) in enumerate(per_folder.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            make_xray(32, int("pneumonia" in folder.lower()), seed=100 * k + i).save(
                root / folder / f"person{8000 + 100 * k + i // per_patient}_virus_{i}.png")
    return root


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def saved(run_dir: Path, name: str) -> tuple[bytes, bytes]:
    folder = run_dir / "external" / name
    return (folder / "predictions.csv").read_bytes(), (folder / "summary.json").read_bytes()


def test_evaluate_data_replaces_only_with_replace_and_says_where_it_saved(cli_run, tmp_path, capsys):
    from core.cli import main

    hosp_a = site(tmp_path / "hospA" / "images", {"NORMAL": 3, "PNEUMONIA": 3})
    hosp_b = site(tmp_path / "hospB" / "images", {"NORMAL": 2, "PNEUMONIA": 2})
    assert main(["evaluate", str(cli_run), "--data", str(hosp_a)]) == 0
    assert "External evaluation 'images'" in capsys.readouterr().out
    kept = saved(cli_run, "images")
    assert main(["evaluate", str(cli_run), "--data", str(hosp_a)]) == 1
    assert "already evaluated as 'images'" in one_error_line(capsys)
    assert main(["evaluate", str(cli_run), "--data", str(hosp_b), "--name", "images"]) == 1
    assert "--replace" in one_error_line(capsys) and saved(cli_run, "images") == kept
    assert main(["evaluate", str(cli_run), "--data", str(hosp_b)]) == 0
    out = capsys.readouterr().out
    assert "Saved as 'images-2'" in out and "4 images" in out and saved(cli_run, "images") == kept
    assert main(["evaluate", str(cli_run), "--data", str(hosp_b), "--name", "images", "--replace"]) == 0
    assert "4 images" in capsys.readouterr().out and saved(cli_run, "images") != kept
    for name, message in (("x" * 300, "300 characters long: at most 64"), ("my site", "'my_site', say")):
        assert main(["evaluate", str(cli_run), "--data", str(hosp_a), "--name", name]) == 1
        assert message in one_error_line(capsys)
    assert main(["evaluate", str(cli_run), "--replace"]) == 1
    assert "--replace goes with --data" in one_error_line(capsys)


@pytest.mark.parametrize("options, message", [
    (["--refit-threshold", "recall:1.5"], "between 0 and 1, not 1.5"),
    (["--refit-threshold", "recall:abc"], "is not a number"),
    (["--refit-threshold", "youden", "--refit-fraction", "2"], "strictly between 0 and 1"),
    (["--refit-fraction", "0.3"], "--refit-fraction goes with --refit-threshold"),
    (["--class-map", "NORMAL=NORMAL", "--class-map-file", "x.csv"], "not both"),
    (["--groups", "missing.csv"], "no such file"),
])
def test_refused_options_leave_the_saved_evaluation_untouched(cli_run, tmp_path, capsys, options, message):
    from core.cli import main

    folder = site(tmp_path / "site", {"NORMAL": 3, "PNEUMONIA": 3})
    assert main(["evaluate", str(cli_run), "--data", str(folder)]) == 0
    kept = saved(cli_run, "site")
    capsys.readouterr()
    assert main(["evaluate", str(cli_run), "--data", str(folder), "--replace", *options]) == 1
    assert message in one_error_line(capsys)
    assert saved(cli_run, "site") == kept


def test_refit_with_the_evaluation_is_one_write(cli_run, tmp_path, capsys):
    from core import external
    from core.cli import main

    small = site(tmp_path / "small" / "site", {"NORMAL": 1, "PNEUMONIA": 1})
    folder = site(tmp_path / "site", {"NORMAL": 10, "PNEUMONIA": 10}, per_patient=2)
    assert main(["evaluate", str(cli_run), "--data", str(folder)]) == 0
    kept = saved(cli_run, "site")
    capsys.readouterr()
    assert main(["evaluate", str(cli_run), "--data", str(small), "--name", "site", "--replace",
                 "--refit-threshold", "youden"]) == 1
    assert "too few to split" in one_error_line(capsys) and saved(cli_run, "site") == kept
    assert main(["evaluate", str(cli_run), "--data", str(folder), "--replace", "--refit-threshold",
                 "specificity:0.8", "--refit-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("Threshold re-picked on") == 1
    assert out.index("Specificity") < out.index("Threshold re-picked on")  # after the metrics, as before
    assert external.read_external(cli_run, "site")["refit"]["rule"] == "specificity"


def test_nasty_folder_names_are_mapped_with_the_suggested_map_or_a_file(cli_run, tmp_path, capsys):
    import csv
    import shlex

    from core.cli import main
    from core.external import parse_class_map, quote_map_name

    folder = site(tmp_path / "site", {"No findings, adults": 2, " Pneumonia=yes ": 2})
    assert main(["evaluate", str(cli_run), "--data", str(folder)]) == 1
    err = one_error_line(capsys)
    [argument] = shlex.split(err.split("--class-map ", 1)[1].split(", or --class-map-file")[0])
    placeholder = "<NORMAL|PNEUMONIA|ignore>"
    wanted = {"No findings, adults": "NORMAL", " Pneumonia=yes ": "PNEUMONIA"}
    assert parse_class_map(argument) == {name: placeholder for name in wanted}
    filled = argument
    for name, cls in wanted.items():  # what a user does: fill in each placeholder
        filled = filled.replace(f"{quote_map_name(name)}={placeholder}", f"{quote_map_name(name)}={cls}")
    assert main(["evaluate", str(cli_run), "--data", str(folder), "--class-map", filled]) == 0
    assert '"No findings, adults" -> NORMAL' in capsys.readouterr().out
    with open(tmp_path / "map.csv", "w", newline="") as f:
        csv.writer(f).writerows([["No findings, adults", "NORMAL"], [" Pneumonia=yes ", "PNEUMONIA"]])
    assert main(["evaluate", str(cli_run), "--data", str(folder), "--class-map-file", str(tmp_path / "map.csv"),
                 "--name", "from-file"]) == 0
    assert "4 images (NORMAL 2, PNEUMONIA 2)" in capsys.readouterr().out


def test_a_cut_short_external_set_is_refused_by_evaluate(cli_run, tmp_path, capsys):
    from core.cli import main

    folder = site(tmp_path / "site", {"NORMAL": 3, "PNEUMONIA": 3})
    assert main(["evaluate", str(cli_run), "--data", str(folder)]) == 0
    path = cli_run / "external" / "site" / "predictions.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))
    capsys.readouterr()
    assert main(["evaluate", str(cli_run), "--split", "site"]) == 1
    assert "has 3 rows but summary.json counts 6 images" in one_error_line(capsys)


def test_report_and_export_keep_an_existing_file_unless_forced(cli_run, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "report.html"
    out.write_text("mine")
    assert main(["report", str(cli_run), "--out", str(out)]) == 1
    assert "--force" in one_error_line(capsys) and out.read_text() == "mine"
    assert main(["report", str(cli_run), "--out", str(out), "--force"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") or "<html" in out.read_text()[:500]
    model = tmp_path / "model.onnx"
    model.write_text("mine")
    assert main(["export", str(cli_run), "--out", str(model)]) == 1
    assert "--force" in one_error_line(capsys) and model.read_text() == "mine"
    assert main(["export", str(cli_run), "--out", str(model), "--force"]) == 0
    assert "parity with PyTorch: max |difference|" in capsys.readouterr().out


def test_fit_ood_fits_an_older_run_and_asks_before_fitting_again(trained_run, tmp_path, capsys):
    import shutil

    from core.cli import main

    run_dir = tmp_path / trained_run[0].name
    shutil.copytree(trained_run[0], run_dir)
    (run_dir / "ood.safetensors").unlink()
    assert main(["fit-ood", str(run_dir), "--device", "cpu"]) == 0
    assert "validation images pass" in capsys.readouterr().out and (run_dir / "ood.safetensors").exists()
    before = (run_dir / "ood.safetensors").read_bytes()
    assert main(["fit-ood", str(run_dir)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert (run_dir / "ood.safetensors").read_bytes() == before
    assert main(["fit-ood", str(run_dir), "--force", "--device", "cpu"]) == 0
    assert main(["fit-ood", str(tmp_path)]) == 1 and "not a run directory" in capsys.readouterr().err



def test_fit_ood_on_a_run_it_cannot_write_to_says_so_before_any_work(trained_run, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    from core import ood, runs
    from core.cli import main

    run_dir = tmp_path / trained_run[0].name
    shutil.copytree(trained_run[0], run_dir)
    (run_dir / "ood.safetensors").unlink()

    def read_only(*args, **kwargs):  # what a read-only folder answers to a user without root's override
        raise OSError(errno.EROFS, "Read-only file system", str(run_dir / ".write-check-x"))

    monkeypatch.setattr(runs.tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(ood, "fit_run_detector", lambda *a: pytest.fail("fitted although nothing could be saved"))
    assert main(["fit-ood", str(run_dir), "--device", "cpu"]) == 1
    said = capsys.readouterr().err
    assert f"cannot write into the folder (Read-only file system): {run_dir}" in said
    assert "unexpected" not in said and not (run_dir / "ood.safetensors").exists()


def test_predict_says_when_a_decision_does_not_apply(trained_run, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from core.cli import main

    run_dir, data = trained_run
    photo = tmp_path / "knee.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8), "RGB").save(photo)
    xray = next((data / "test" / "NORMAL").glob("*.jpeg"))
    assert main(["predict", str(run_dir), str(photo), str(xray)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{photo}: NOT APPLICABLE (") and "the image is in colour" in lines[0]
    assert "training data (score" in lines[1]
    assert main(["predict", str(run_dir), str(photo), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["applicable"] is False and result["ood"]["gate"].startswith("Not a chest X-ray")
    assert isinstance(result["ood"]["score"], float) and isinstance(result["ood"]["threshold"], float)


def test_evaluate_says_first_when_a_set_is_ranked_no_better_than_chance(run_copy, capsys):
    from conftest import rank_at_chance

    from core.cli import main
    from core.operating import run_summary

    rank_at_chance(run_copy)
    auc = run_summary(run_copy)["sets"]["test"]["metrics"]["auc"]
    assert auc["low"] <= 0.5 <= auc["high"]
    assert main(["evaluate", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("WARNING: The model does not rank test's images better than chance")
    assert "split by the model's own verdict on each image" in out
