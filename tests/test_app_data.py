"""The Data page (views/0_Data.py, the home page of dashboard.py) under AppTest: empty state, bad folders, the real
Kermany tree, and the Kaggle download button when offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import KERMANY_224, page, require_data
from bad_inputs import as_read

import ui
from core.dataset import DatasetError, scan_dataset


def dataset_error(folder: Path) -> str:
    with pytest.raises(DatasetError) as caught:
        scan_dataset(folder)
    return str(caught.value)


def test_empty_state_says_what_to_do(app_env):
    at = page("dashboard.py").run()
    assert not at.exception
    assert at.text_input(key="data_folder_input").value == ""
    assert "Type the folder" in at.info[0].value
    assert any("PNEUMONIA" in m.value for m in at.markdown)  # the expected layout


def test_not_a_dataset_shows_core_message(app_env, tmp_path):
    not_data = tmp_path / "documents"
    not_data.mkdir()
    (not_data / "notes.txt").write_text("no images here")
    at = page("dashboard.py").run()
    at.text_input(key="data_folder_input").input(str(not_data)).run()
    assert not at.exception
    assert [as_read(e.value) for e in at.error] == [dataset_error(not_data)]

    missing = tmp_path / "nowhere"
    at.text_input(key="data_folder_input").input(str(missing)).run()
    assert not at.exception
    assert [as_read(e.value) for e in at.error] == [dataset_error(missing)]


def test_kermany_overview(app_env):
    data = require_data(KERMANY_224)
    at = page("dashboard.py").run()
    at.text_input(key="data_folder_input").input(str(data)).run()
    assert not at.exception
    assert not at.error
    assert "5,856 images" in at.success[0].value
    official, planned = at.dataframe[0].value, at.dataframe[1].value
    assert official.loc["train", "total"] == 5216
    assert official.loc["val"].tolist() == [8, 8, 16]
    assert official.loc["test"].tolist() == [234, 390, 624]
    assert planned.loc["total", "total"] == 5856
    assert planned.loc["test", "total"] == 624  # the official test split is kept as the benchmark
    assert planned.loc["val", "total"] > 16  # validation carved out of train, not the 16 official images
    assert any("2.89 : 1" in m.value for m in at.markdown)  # train imbalance, 3,875 / 1,341
    assert any("170 patient" in w.value for w in at.warning)  # person ids shared by train and test
    assert len(at.get("plotly_chart")) == 2
    assert len(at.get("image")) == 12  # 6 samples per class
    assert [m.value for m in at.markdown].count("none") == 2  # no unreadable, no ignored files
    assert ui.load_settings()["data_folder"] == str(data)  # remembered for the next session


def test_kaggle_download_offline_is_a_message(app_env, monkeypatch):
    import kagglehub

    def offline(handle: str) -> str:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    at = page("dashboard.py").run()
    at.button[0].click().run()
    assert not at.exception
    assert "Download failed: ConnectionError" in as_read(at.error[0].value)
    assert at.text_input(key="data_folder_input").value == ""


def test_kaggle_download_sets_the_folder(app_env, monkeypatch, tmp_path):
    import kagglehub

    data = require_data(KERMANY_224)
    download = tmp_path / "kaggle" / "versions" / "2"
    download.mkdir(parents=True)
    (download / "chest_xray").symlink_to(data, target_is_directory=True)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: str(download))
    at = page("dashboard.py").run()
    at.button[0].click().run()
    assert not at.exception
    assert at.text_input(key="data_folder_input").value == str(download / "chest_xray")
    assert ui.load_settings()["data_folder"] == str(download / "chest_xray")
    assert "5,856 images" in at.success[0].value


def test_folder_names_with_markdown_and_html_and_a_fifo_are_shown_as_text(app_env, tmp_path):
    """Class folder and file names come from disk: shown as written (no link, image or tag rendered), and a
    FIFO among the images is listed as unusable instead of blocking the page."""
    import os

    from bad_inputs import HOSTILE_NAME
    from conftest import write_dataset

    root = write_dataset(tmp_path / "xrays", {"NORMAL": 24, "PNEUMONIA": 24}, splits=None, size=48)
    (root / "PNEUMONIA").rename(root / HOSTILE_NAME)
    os.mkfifo(root / "NORMAL" / "pipe.jpeg")
    at = page("dashboard.py")
    at.default_timeout = 60
    at.run()
    at.text_input(key="data_folder_input").input(str(root)).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    texts = [str(e.value) for kind in ("success", "markdown", "subheader", "caption") for e in getattr(at, kind)]
    assert not [t for t in texts if HOSTILE_NAME in t], "a folder name reached Markdown unescaped"
    assert any(HOSTILE_NAME in as_read(t) for t in at.subheader.values)  # the sample images' heading
    assert any(HOSTILE_NAME in as_read(t) for t in at.success.values)
    for chart in at.get("plotly_chart"):
        assert "<b>bold" not in chart.proto.spec
    unusable = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    assert "not a regular file" in unusable.set_index("path").loc[str(root / "NORMAL" / "pipe.jpeg"), "reason"]


def test_a_label_file_over_a_dicom_folder_gives_patients_metadata_and_left_out_rows(app_env, tmp_path):
    import csv

    import numpy as np
    from conftest import make_xray
    from dicom_files import write_dicom

    images = tmp_path / "rsna"
    rows = []
    for i in range(32):
        write_dicom(images / f"p{i}.dcm", np.asarray(make_xray(40, i % 2, seed=i)), patient=f"p{i}",
                    sex="MF"[i % 2], view="AP" if i < 16 else "PA")
        rows.append([f"p{i}", i % 2])
    rows.append(["gone", 0])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patientId", "Target"], *rows])
    at = page("dashboard.py").run()
    at.text_input(key="data_folder_input").input(str(images)).run()
    at.text_input(key="data_labels").input(str(tmp_path / "labels.csv")).run()
    at.selectbox(key="data_labels_format").select("rsna").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "**32 images**" in at.success[0].value
    text = " ".join(m.value for m in at.markdown)
    assert "32 patients" in text and "patientId" in text
    frames = [d.value for d in at.dataframe]
    assert any(list(f.columns) == ["view position", "images"] and set(f["view position"]) == {"AP", "PA"}
               for f in frames)
    assert any("path" in f.columns and f["path"].astype(str).str.contains("gone").any() for f in frames)
    # The choice is remembered for the Train page.
    assert ui.load_settings()["label_options"]["labels_format"] == "rsna"


def test_the_folder_is_shown_as_typed_and_where_it_leads(app_env, tiny_dataset, tmp_path):
    link = tmp_path / "my-xrays"
    link.symlink_to(tiny_dataset)
    at = page("dashboard.py").run()
    at.text_input(key="data_folder_input").input(str(link)).run()
    assert not at.exception and not at.error
    shown = as_read(at.success[0].value)
    assert f"in {link} (resolved: {tiny_dataset.resolve()})" in shown
    at.text_input(key="data_folder_input").input(str(tiny_dataset.resolve())).run()
    assert "resolved" not in as_read(at.success[0].value)  # said once only where it differs


def test_the_overview_shows_again_after_a_cold_decode(app_env, tiny_dataset, tmp_path, monkeypatch):
    # The first view decodes every image with a progress bar; later views (a rerun, another session) take the
    # cached overview: the bar's updates must not be replayed into a block of the first run.
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cold-cache"))
    first = page("dashboard.py").run()
    first.text_input(key="data_folder_input").input(str(tiny_dataset)).run()
    assert not first.exception
    assert "128 images" in first.success[0].value
    first.run()
    assert not first.exception
    assert "128 images" in first.success[0].value
    second = page("dashboard.py").run()  # a new session: the folder is remembered
    assert not second.exception
    assert "128 images" in second.success[0].value
