"""External data page (AppTest): a folder with other class names is mapped, evaluated and listed; its metrics,
warnings, re-picked threshold and deletion; bad folders, unmapped folders and damaged evaluations are errors
on the page, never exceptions."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest
from conftest import evaluate_training_copies, make_xray
from streamlit.testing.v1 import AppTest

from core import external, runs

PAGE = str(Path(__file__).resolve().parents[1] / "views" / "6_External.py")
TIMEOUT = 120  # the first run in a process imports torch


def site_folder(root: Path, per_folder: dict[str, int], size: int = 1024) -> Path:
    """Full-size PNGs in folders named as another site names them; two images per patient."""
    for k, (folder, n) in enumerate(per_folder.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            make_xray(size, int(folder == "Pneumonia"), seed=zlib.crc32(f"{folder}{i}".encode())).save(
                root / folder / f"person{7000 + 100 * k + i // 2}_virus_{i}.png")
    return root


def open_page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def map_key(root: Path, folder: str) -> str:
    return f"ext_map:{root.resolve()}:{folder}"


def plain(markdown: str) -> str:
    """The text a reader sees in an element whose file text was escaped for Markdown."""
    return re.sub(r"\\(.)", r"\1", markdown)


def test_no_runs_shows_hint(empty_runs_dir):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "No finished runs" in at.info[0].value


def test_evaluate_a_mapped_folder_reopen_refit_and_delete(run_copy, tmp_path):
    root = site_folder(tmp_path / "Site B", {"No_findings": 4, "Pneumonia": 4})
    at = open_page()
    assert "None yet" in at.info[0].value
    at.text_input(key="ext_folder").set_value(str(root)).run()
    assert not at.exception, at.exception
    # 'Pneumonia' matches the run's PNEUMONIA case-insensitively; 'No_findings' waits for a choice.
    assert at.selectbox(key=map_key(root, "Pneumonia")).value == "PNEUMONIA"
    assert at.selectbox(key=map_key(root, "No_findings")).value is None
    assert at.selectbox(key=map_key(root, "No_findings")).options == ["NORMAL", "PNEUMONIA", "ignore"]
    assert at.text_input(key=f"ext_name:{root.resolve()}:all").value == "Site_B"

    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    assert "No_findings" in plain(at.error[0].value)  # nothing evaluated until every folder has a class
    assert not (run_copy / "external").exists()

    at.selectbox(key=map_key(root, "No_findings")).set_value("NORMAL").run()
    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert "Evaluated 8 images as 'Site_B'" in plain(at.success[0].value)
    assert runs.read_predictions(run_copy, "external:Site_B")["source_class"].value_counts().to_dict() == {
        "No_findings": 4, "Pneumonia": 4}

    listed = at.dataframe[0].value
    assert list(listed["name"]) == ["Site_B"] and list(listed["images"]) == [8]
    assert at.selectbox(key="ext_open").value == "Site_B"
    counts = at.dataframe[1].value
    assert dict(zip(counts["folder"], counts["class"])) == {"No_findings": "NORMAL", "Pneumonia": "PNEUMONIA"}
    metrics = at.dataframe[2].value
    metrics = metrics.set_index("metric")["all images"]
    assert "AUC" in metrics.index and metrics["Sensitivity (recall)"].count("[") == 1
    assert any("rarely transfers to another site" in w.value for w in at.warning)
    assert any("Thresholds" in i.value and "external: Site_B" in plain(i.value) for i in at.info)

    at.selectbox(key="ext_refit_rule").set_value("recall").run()
    at.number_input(key="ext_refit_value:recall").set_value(0.75).run()
    at.button(key="ext_refit").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    refit = external.read_external(run_copy, "Site_B")["refit"]
    assert refit["rule"] == "recall" and refit["value"] == pytest.approx(0.75)
    both = at.dataframe[-1].value
    assert list(both.columns) == ["metric", f"at {refit['operating_threshold']:.3f} (operating)",
                                  f"at {refit['threshold']:.3f} (re-picked)"]

    at.button(key="ext_delete").click().run()
    assert (run_copy / "external" / "Site_B").is_dir()
    assert "Delete the evaluation 'Site_B'" in plain(at.warning[-1].value)
    at.button(key="ext_delete_yes").click().run()
    assert not at.exception, at.exception
    assert not (run_copy / "external" / "Site_B").exists()
    assert external.list_external(run_copy) == []
    assert any("None yet" in i.value for i in at.info)


def test_split_folders_offer_a_split_choice(run_copy, tmp_path):
    root = tmp_path / "chest_xray"
    for split in ("train", "test"):
        site_folder(root / split, {"NORMAL": 2, "Pneumonia": 2}, size=64)
    at = open_page()
    at.text_input(key="ext_folder").set_value(str(root)).run()
    split = at.radio(key=f"ext_split:{root.resolve()}")
    assert split.options == ["all", "train", "test"] and split.value == "all"
    split.set_value("test").run()
    assert at.text_input(key=f"ext_name:{root.resolve()}:test").value == "chest_xray-test"
    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    summary = external.read_external(run_copy, "chest_xray-test")
    assert summary["split"] == "test" and summary["n"] == 4


def test_bad_folder_and_damaged_evaluation_are_errors_not_exceptions(run_copy, tmp_path):
    at = open_page()
    at.text_input(key="ext_folder").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception, at.exception
    assert "Folder not found" in plain(at.error[0].value)

    damaged = run_copy / "external" / "old"
    damaged.mkdir(parents=True)
    (damaged / "summary.json").write_text("[1, 2")
    at = open_page()
    assert "damaged" in plain(at.error[0].value)
    assert at.dataframe[0].value["status"].tolist() == ["damaged"]
    at.button(key="ext_delete").click().run()
    at.button(key="ext_delete_yes").click().run()
    assert not at.exception, at.exception
    assert not damaged.exists()


def test_a_saved_evaluation_is_replaced_only_after_ticking_replace(run_copy, tmp_path):
    root = site_folder(tmp_path / "site", {"NORMAL": 2, "Pneumonia": 2}, size=64)
    at = open_page()
    at.text_input(key="ext_folder").set_value(str(root)).run()
    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    saved = run_copy / "external" / "site" / "summary.json"
    kept, kept_inode = saved.read_bytes(), saved.stat().st_ino
    at.run()  # the next interaction
    # The same name again: a warning and an unticked box; Evaluate alone replaces nothing.
    assert any("An evaluation named 'site' exists" in plain(w.value) for w in at.warning)
    assert at.checkbox(key="ext_replace:site").value is False
    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    assert any("tick 'Replace the evaluation site'" in plain(e.value) for e in at.error)
    assert saved.read_bytes() == kept and saved.stat().st_ino == kept_inode
    at.checkbox(key="ext_replace:site").check().run()
    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    # Replaced: a new file moved into place (its content may match to the second of its timestamp).
    assert saved.stat().st_ino != kept_inode
    # A name that would have to change is refused with the one it could be, not changed silently.
    at.text_input(key=f"ext_name:{root.resolve()}:all").set_value("my site").run()
    assert any("'my_site', say" in plain(e.value) for e in at.error)


def test_file_text_is_shown_as_text_never_as_markdown(run_copy, tmp_path):
    root = site_folder(tmp_path / "site", {"NORMAL": 2, "Pneumonia": 2}, size=64)
    external.evaluate_external(run_copy, str(root), device="cpu", refit=None)
    path = run_copy / "external" / "site" / "summary.json"
    summary = json.loads(path.read_text())
    injected = "![tracker](http://attacker.example/pixel.png) [click](http://attacker.example) <img src=x> **bold**"
    summary.update(warnings=[injected], root=injected, created=injected, n=1e30)
    path.write_text(json.dumps(summary))
    at = open_page()
    assert not at.exception, at.exception
    rendered = [e.value for kind in ("markdown", "caption", "warning", "error", "info", "success")
                for e in getattr(at, kind)]
    shown = [v for v in rendered if "attacker" in v]
    assert shown, rendered
    for value in shown:
        # Every Markdown character of the file's text is escaped: no image, link, HTML or bold is made of it.
        for made_of_it in (r"(?<!\\)\]\(", r"(?<!\\)<img", r"(?<!\\)\*\*bold"):
            assert not re.search(made_of_it, value), value
    assert any(injected in plain(v) for v in shown)
    assert not any("1e+30" in v or "1e30" in v for v in rendered)  # a number out of range is not shown


def test_a_label_file_over_a_flat_folder_is_evaluated_without_a_class_map(run_copy, tmp_path):
    images = tmp_path / "nih" / "images"
    images.mkdir(parents=True)
    rows = [["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]]
    for i in range(10):
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"
        make_xray(256, i % 2, seed=i).save(images / name)
        rows.append([name, "Pneumonia" if i % 2 else "No Finding", str(i // 2 + 1), str(20 + 9 * i), "MF"[i % 2],
                     "AP" if i < 5 else "PA"])
    rows.append(["00000009_000.png", "Effusion", "9", "50", "F", "PA"])  # listed, not silently dropped
    (tmp_path / "nih" / "Data_Entry_2017.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    at = open_page()
    at.text_input(key="ext_folder").set_value(str(images)).run()
    at.text_input(key="ext_labels").set_value(str(tmp_path / "nih" / "Data_Entry_2017.csv")).run()
    at.selectbox(key="ext_labels_format").set_value("nih").run()
    assert not at.exception, at.exception
    assert not [s for s in at.selectbox if s.key and s.key.startswith("ext_map:")]  # no class map to fill
    at.button(key="ext_evaluate").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert "Evaluated 10 images as 'images'" in plain(at.success[0].value)
    saved = runs.read_predictions(run_copy, "external:images")
    assert set(saved["view"]) == {"AP", "PA"} and saved["patient"].nunique() == 5
    assert any("Labels: label file" in plain(m.value) for m in at.markdown)


def in_page_order(node):
    """Every element below `node`, depth first: the order a reader meets them on the page."""
    for child in getattr(node, "children", {}).values():
        yield child
        yield from in_page_order(child)


def test_the_run_s_own_images_are_said_to_be_so_before_any_number(run_copy, tmp_path):
    evaluate_training_copies(run_copy, tmp_path / "copies")
    at = open_page()
    elements = list(in_page_order(at.main))
    said = [i for i, e in enumerate(elements) if e.type == "warning" and "byte-identical" in plain(e.value)]
    metrics = [i for i, e in enumerate(elements) if e.type == "dataframe" and "metric" in e.value.columns]
    assert len(said) == 1 and metrics and said[0] < metrics[0]
    # No "another site" to transfer a threshold to: these are the run's own images.
    assert not any("rarely transfers to another site" in e.value for e in elements if e.type == "warning")
