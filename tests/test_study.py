"""Strategy studies: one fixed split for every arm and seed, launch checks that queue nothing, resuming keeps
finished runs, and the results (per-arm table, paired tests) on tiny generated X-rays."""

from __future__ import annotations

import json
import re
import urllib.error

import pytest
import torch
from conftest import write_dataset

from core import runs
from core.cli import main
from core.config import config_from_preset
from core.model import WeightsUnavailableError
from core.study import (
    arm_config,
    create_study,
    list_studies,
    parse_arms,
    read_study,
    run_study,
    study_progress,
    study_results,
)


def _base(data, runs_dir, **kw):
    options = {"arch": "efficientnet_lite0", "image_size": 32, "device": "cpu", **kw}
    return config_from_preset("tiny", data=str(data), runs_dir=str(runs_dir), **options)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)


def test_arm_configs_share_the_split_and_vary_the_seed(tmp_path):
    base = _base(tmp_path, tmp_path, seed=5)
    frozen = arm_config(base, "frozen", 6, "study-x")
    scratch = arm_config(base, "scratch", 7, "study-x")
    random_init = arm_config(base, "random-init", 5, "study-x")
    assert (frozen.seed, frozen.split_seed, frozen.strategy, frozen.pretrained) == (6, 5, "frozen", True)
    assert (scratch.arch, scratch.pretrained, scratch.strategy, scratch.split_seed) == ("smallcnn", False, "full", 5)
    assert (random_init.arch, random_init.pretrained, random_init.strategy) == ("efficientnet_lite0", False, "full")
    assert frozen.study == "study-x" and frozen.data_split_seed == scratch.data_split_seed == 5
    with pytest.raises(ValueError, match="Unknown study arms"):
        parse_arms("frozen,finetune")


def test_a_study_that_needs_weights_it_cannot_get_queues_nothing(tmp_path, offline):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 8, "PNEUMONIA": 8})
    runs_dir = tmp_path / "runs"
    with pytest.raises(WeightsUnavailableError, match="resnet18"):
        create_study(_base(data, runs_dir, arch="resnet18"), ["frozen", "partial", "full", "scratch"], 3)
    assert not runs_dir.exists() or not any(runs_dir.iterdir())
    # the CLI says so in one line and exits 1, before any folder exists
    assert main(["study", "--data", str(data), "--runs-dir", str(runs_dir), "--arch", "resnet18"]) == 1
    assert main(["train", "--data", str(data), "--runs-dir", str(runs_dir), "--arch", "resnet18"]) == 1
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_study_runs_every_arm_and_seed_on_one_split_and_resumes(tmp_path, capsys):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 24, "PNEUMONIA": 40}, size=40)
    runs_dir = tmp_path / "runs"
    study = create_study(_base(data, runs_dir), ["frozen", "scratch"], 2, command="test")
    assert [s.id for s in list_studies(runs_dir)] == [study.id]
    progress = run_study(study, say=lambda line: None)
    assert progress["finished"] == progress["total"] == 4
    run_dirs = [study.run_dir(arm, seed) for arm, seed in study.plan()]
    assert len({d.name for d in run_dirs}) == 4
    splits = {(d / "split.csv").read_text() for d in run_dirs}
    assert len(splits) == 1  # every arm and seed trained and tested on the same images
    configs = [runs.read_config(d) for d in run_dirs]
    assert sorted((c["arch"], c["seed"]) for c in configs) == [("efficientnet_lite0", 0), ("efficientnet_lite0", 1),
                                                               ("smallcnn", 0), ("smallcnn", 1)]
    assert {c["study"] for c in configs} == {study.id}

    results = study_results(study, n_resamples=200)
    arms = {a["arm"]: a for a in results["arms"]}
    assert arms["frozen"]["runs"] == 2 and arms["frozen"]["trainable"] == 2 * 1280 + 2
    assert arms["scratch"]["init"] == "random" and 0 <= arms["scratch"]["auc"]["mean"] <= 1
    (pair,) = results["pairs"]
    assert (pair["a"], pair["b"]) == ("frozen", "scratch") and pair["p_holm"] == pair["p"]  # one pair: no change
    assert pair["low"] <= pair["difference"] <= pair["high"]

    # Interrupted: one run killed mid-way, one never created. Running again keeps the finished ones.
    killed = study.run_dir("scratch", 1)
    runs.write_status(killed, state="running", pid=None)  # its process gone: read as killed
    dropped = study.runs.pop("frozen/1")
    study.save()
    finished_at = {d.name: runs.read_status(d)["finished"] for d in run_dirs if d.name not in (killed.name, dropped)}
    study = read_study(study.folder)
    assert study_progress(study)["finished"] == 2
    lines: list[str] = []
    run_study(study, say=lines.append)
    assert study_progress(study)["finished"] == 4
    assert any("scratch, seed 1" in line and "(resuming)" in line for line in lines)
    assert {d.name: runs.read_status(d)["finished"] for d in run_dirs if d.name in finished_at} == finished_at
    assert study.run_dir("frozen", 1).name != dropped  # trained again as a new run

    capsys.readouterr()
    assert main(["study", "--show", study.id, "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "4/4 runs finished" in out and "frozen vs scratch" in out and "Holm" in out


def test_a_damaged_study_file_is_named_and_the_others_still_list(tmp_path):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 8, "PNEUMONIA": 8})
    runs_dir = tmp_path / "runs"
    good = create_study(_base(data, runs_dir), ["scratch"], 1)
    bad = runs_dir / "studies" / "study-broken"
    bad.mkdir()
    (bad / "study.json").write_text(json.dumps({"arms": ["frozen"], "seeds": ["x"], "base": {}}))
    listed = list_studies(runs_dir)
    assert good.id in [s.id for s in listed if not isinstance(s, tuple)]
    (name, reason), = [s for s in listed if isinstance(s, tuple)]
    assert name == "study-broken" and "seeds" in reason
    with pytest.raises(ValueError, match="study.json"):
        read_study(runs_dir / "studies" / "nothing-here")
    with pytest.raises(ValueError, match="seeds must be between"):
        create_study(_base(data, runs_dir), ["scratch"], 0)


def _write_study(runs_dir, name="study-20000101-000000", **fields):
    """A study.json written by hand (as a user or a damaged disk might), valid unless `fields` say otherwise."""
    folder = runs_dir / "studies" / name
    folder.mkdir(parents=True, exist_ok=True)
    base = _base(runs_dir, runs_dir).to_dict()
    data = {"id": name, "base": base, "arms": ["frozen", "scratch"], "seeds": [0, 1],
            "runs": {"frozen/0": "run-a", "scratch/0": "run-b"}, "created": 1.0, "command": "test", **fields}
    (folder / "study.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("fields, words", [
    ({"runs": {"frozen/0": "run-a", "scratch/0": "run-a"}}, "mapped to frozen/0 and scratch/0"),
    ({"runs": {"frozen/0": "run-a", "frozen/1": "run-a"}}, "mapped to frozen/0 and frozen/1"),
    ({"runs": {"frozen/0": "../outside"}}, "not a run folder name"),
    ({"runs": {"frozen/0": "/etc"}}, "not a run folder name"),
    ({"runs": {"frozen/0": ".."}}, "not a run folder name"),
    ({"runs": {"frozen/0": 5}}, "not a run folder name"),
    ({"runs": {"frozen/0": "a\nb"}}, "not a run folder name"),
    ({"runs": {"full/0": "run-a"}}, "not '<arm>/<seed>'"),
    ({"runs": {"frozen/00": "run-a"}}, "not '<arm>/<seed>'"),
    ({"runs": ["run-a"]}, "'runs' must map"),
    ({"arms": ["frozen", "frozen"]}, "'arms'"),
    ({"arms": ["finetune"]}, "'arms'"),
    ({"arms": [["frozen"]]}, "'arms'"),
    ({"seeds": [True, 1]}, "'seeds'"),
    ({"seeds": [0, 0]}, "'seeds'"),
    ({"seeds": [1e30]}, "'seeds'"),
    ({"seeds": [10**400]}, "'seeds'"),
    ({"seeds": list(range(21))}, "'seeds'"),
    ({"base": {"epochs": 10**400}}, "base config is damaged"),
    ({"base": {"arch": "smallcnn"}}, "only the 'scratch' arm"),
    ({"base": "x"}, "'base'"),
])
def test_a_damaged_study_file_is_refused_in_one_line_naming_the_field(tmp_path, fields, words):
    if "base" in fields and isinstance(fields["base"], dict):
        fields = {"base": {**_base(tmp_path, tmp_path).to_dict(), **fields["base"]}}
    folder = _write_study(tmp_path / "runs", **fields)
    with pytest.raises(ValueError, match=re.escape(words)) as refused:
        read_study(folder)
    message = str(refused.value)
    assert "study.json" in message and "\n" not in message
    (listed,) = list_studies(tmp_path / "runs")  # Compare lists it with the reason instead of breaking
    assert listed == (folder.name, message)


def test_damaged_optional_fields_read_as_absent(tmp_path):
    study = read_study(_write_study(tmp_path / "runs", created=10**400, command=["x"]))
    assert study.created == 0.0 and study.command == ""
    assert read_study(_write_study(tmp_path / "runs", created=float("nan"))).created == 0.0


def test_a_run_whose_config_is_another_arm_or_seed_is_left_out_of_the_paired_tests(tmp_path, finished_run):
    """A run folder that says it trained something else than the study file claims is never paired."""
    import shutil

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    folder = runs_dir / "studies" / "study-20000101-000000"
    names = {"scratch/0": "run-0", "scratch/1": "run-1", "scratch/2": "run-2"}
    for key, name in names.items():
        shutil.copytree(finished_run, runs_dir / name, ignore=shutil.ignore_patterns("last.pt"))
        seed = int(key.split("/")[1])
        config = {**runs.read_config(runs_dir / name), "study": folder.name, "seed": 0 if name == "run-2" else seed}
        (runs_dir / name / "config.json").write_text(json.dumps(config))
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"base": runs.read_config(finished_run), "arms": ["scratch"],
                                                   "seeds": [0, 1, 2], "runs": names}))
    results = study_results(read_study(folder), n_resamples=50)
    used = [r["run"] for r in results["rows"] if "auc" in r]
    assert used == ["run-0", "run-1"]
    assert any("run-2 is listed as scratch, seed 2" in p and "seed 0" in p for p in results["problems"])

    # A second name for a folder (a link) is not a second run: its config says which run it is.
    (runs_dir / "run-1").rename(runs_dir / "moved")
    (runs_dir / "run-1").symlink_to(runs_dir / "run-0")
    results = study_results(read_study(folder), n_resamples=50)
    assert [r["run"] for r in results["rows"] if "auc" in r] == ["run-0"]
