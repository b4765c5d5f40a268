"""Batch prediction (core.batch_predict, `predict --out`): folders, CSV label files and zips give one row per file,
predicted as one-by-one prediction would (same probability to float32 rounding, decision, out-of-distribution
verdict), unreadable and skipped files listed with the reason, zips read in memory within limits, and the CSV
written only where --out allows, before any model is loaded."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_xray
from PIL import Image

from core import batch_predict
from core.batch_predict import collect_inputs, inputs_from_uploads, open_zip, predict_batch
from core.cli import main
from core.predict import MAX_UPLOAD_BYTES, batch_shift, load_run_model, predict_files, predict_image

TOLERANCE = 1e-6  # float32 rounding: a batch of 64 and a batch of one are summed in another order


@pytest.fixture(scope="module")
def loaded(finished_run):
    return load_run_model(finished_run)


def png(size: int = 80, label: int = 0, seed: int = 0) -> bytes:
    out = io.BytesIO()
    make_xray(size, label, seed).save(out, "PNG")
    return out.getvalue()


def colour_photo() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def write_folder(root: Path) -> Path:
    """Images at two depths (PNG, JPEG, one without an extension), a colour photo, a damaged PNG, a text file, a
    text file without an extension, and hidden entries."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "__MACOSX").mkdir()
    (root / "a.png").write_bytes(png(seed=1))
    make_xray(100, 1, seed=2).save(root / "sub" / "b.jpeg")
    (root / "sub" / "deeper" / "c.PNG").write_bytes(png(96, 1, seed=3))
    (root / "scan0004").write_bytes(png(seed=4))  # no extension (as DICOM files often come): tried
    (root / "photo.png").write_bytes(colour_photo())
    (root / "broken.png").write_bytes(png(seed=5)[:60])
    (root / "notes.txt").write_text("not an image")
    (root / "README").write_text("how these were exported\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / ".git" / "x.png").write_bytes(png(seed=6))
    (root / "__MACOSX" / "._a.png").write_bytes(b"junk")
    return root


def by_file(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["file"]).name: r for r in rows}


def test_folder_every_file_is_predicted_unreadable_or_skipped_with_a_reason(loaded, tmp_path):
    folder = write_folder(tmp_path / "xrays")
    with collect_inputs([str(folder)]) as inputs:
        result = predict_batch(loaded, inputs, workers=1)
    rows = by_file(result.rows)
    assert set(rows) == {"a.png", "b.jpeg", "c.PNG", "scan0004", "photo.png", "broken.png"}
    assert [Path(r["file"]).relative_to(folder).as_posix() for r in result.rows] == \
        ["a.png", "broken.png", "photo.png", "scan0004", "sub/b.jpeg", "sub/deeper/c.PNG"]  # sorted, depth first
    assert rows["broken.png"]["error"].startswith("Not a readable image") and rows["broken.png"]["probability"] is None
    assert rows["photo.png"]["applicable"] is False and "colour" in rows["photo.png"]["ood_reason"]
    for name in ("a.png", "b.jpeg", "c.PNG", "scan0004"):
        assert rows[name]["error"] is None and 0.0 <= rows[name]["probability"] <= 1.0, rows[name]
    skipped = {Path(f).name: why for f, why in result.skipped}
    assert set(skipped) == {"notes.txt", "README"} and skipped["README"] == "not an image file (a text file)"
    assert skipped["notes.txt"].startswith("not an image file (.txt; images are ") and ".png" in skipped["notes.txt"]
    assert result.hidden == 3  # .DS_Store, .git/, __MACOSX/: counted, not listed
    frame = result.frame()
    assert list(frame.columns) == ["file", "probability", "decision", "threshold", "applicable", "ood_score",
                                   "ood_reason", "error"]
    assert len(frame) == 8 and frame["error"].str.startswith("skipped: ").sum() == 2
    assert result.counts()["not applicable"] >= 1
    assert len(result.predicted) + len(result.unreadable) == 6


def test_probabilities_equal_one_by_one_prediction_in_processes_and_in_batches(loaded, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):  # enough for the process pool (MIN_FOR_PROCESSES) and several batches
        (folder / f"{i:03d}.png").write_bytes(png(64 + i % 5 * 16, i % 2, seed=i))
    (folder / "061_photo.png").write_bytes(colour_photo())
    (folder / "062_blank.png").write_bytes(_png_of(Image.new("L", (80, 80), 128)))
    files = sorted(str(p) for p in folder.iterdir())
    calls: list[tuple[int, int]] = []
    with collect_inputs([str(folder)]) as inputs:
        result = predict_batch(loaded, inputs, batch_size=16, workers=2, progress=lambda d, t: calls.append((d, t)))
    with collect_inputs([str(folder)]) as inputs:
        inline = predict_batch(loaded, inputs, batch_size=64, workers=1)
    single = [predict_image(loaded, f) for f in files]
    assert [r["file"] for r in result.rows] == files
    for row, same, one in zip(result.rows, inline.rows, single):
        assert abs(row["probability"] - one["prob"]) <= TOLERANCE, (row["file"], row["probability"], one["prob"])
        assert abs(row["probability"] - same["probability"]) <= TOLERANCE
        if abs(one["prob"] - loaded.threshold) > TOLERANCE:
            assert row["decision"] == one["predicted"]
        assert row["applicable"] == one["applicable"] and row["threshold"] == one["threshold"]
        assert row["ood_score"] == pytest.approx(one["ood"]["score"], rel=1e-5)
        assert row["ood_reason"] == (one["ood"]["reason"] or "")
    assert sum(not r["applicable"] for r in result.rows) >= 2  # the photo and the blank image are gated
    assert calls[-1] == (62, 62) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    shift = batch_shift(loaded, predict_files(loaded, files, keep_features=True))
    assert result.shift["n"] == shift["n"] == 62 and result.shift["flagged"] == shift["flagged"]


def _png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_label_csv_relative_paths_from_its_folder_and_the_label_carried(loaded, tmp_path):
    folder = tmp_path / "set"
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "p1.png").write_bytes(png(label=1, seed=1))
    (folder / "imgs" / "n1.png").write_bytes(png(seed=2))
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(png(seed=3))
    (folder / "labels.csv").write_text(f"Image_Path,Label,patient\nimgs/p1.png,PNEUMONIA,7\nimgs/n1.png,NORMAL,8\n"
                                       f"{absolute},NORMAL,9\nimgs/missing.png,NORMAL,10\n ,NORMAL,11\n")
    with collect_inputs([str(folder / "labels.csv")]) as inputs:
        assert inputs.has_labels
        result = predict_batch(loaded, inputs, workers=1)
    rows = by_file(result.rows)
    assert [rows[n]["label"] for n in ("p1.png", "n1.png", "elsewhere.png")] == ["PNEUMONIA", "NORMAL", "NORMAL"]
    assert rows["p1.png"]["file"] == str(folder / "imgs" / "p1.png")
    assert rows["missing.png"]["error"].startswith("Not a file") and rows["missing.png"]["label"] == "NORMAL"
    assert result.skipped == [(f"{folder / 'labels.csv'} line 6", "no image path in this row")]
    assert "label" in result.frame().columns and "label" in result.table().columns


@pytest.mark.parametrize("text,message", [
    ("name,label\na.png,NORMAL\n", "needs a column naming the image"),
    ("", "it is empty"),
])
def test_label_csv_without_a_path_column_or_empty_is_refused_in_one_line(tmp_path, text, message):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        collect_inputs([str(csv)])
    assert "\n" not in str(e.value)


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def test_zip_members_are_read_in_memory_names_never_written_and_bombs_refused(loaded, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    archive = tmp_path / "scans.zip"
    archive.write_bytes(make_zip({
        "NORMAL/a.png": png(seed=1),
        "../escape.png": png(seed=2),  # a name, read as a name: nothing is written anywhere
        "/abs/root.png": png(seed=3),
        "__MACOSX/NORMAL/._a.png": b"resource fork",
        "readme.txt": b"exported by PACS",
        "huge.png": b"\0" * (MAX_UPLOAD_BYTES + 1),  # over the single-upload limit, uncompressed
        "bomb.png": b"\0" * (5 * 2**20),  # 5 MB that compress about 1000:1
        "broken.png": b"PNG? no",
    }))
    with collect_inputs([str(archive)]) as inputs:
        result = predict_batch(loaded, inputs, workers=1)
    rows = by_file(result.rows)
    assert {r["file"] for r in result.rows} == {f"{archive}/NORMAL/a.png", f"{archive}/../escape.png",
                                                f"{archive}//abs/root.png", f"{archive}/broken.png"}
    assert all(rows[n]["error"] is None for n in ("a.png", "escape.png", "root.png"))
    assert rows["broken.png"]["error"].startswith("Not a readable image")
    skipped = {Path(f).name: why for f, why in result.skipped}
    assert skipped["huge.png"].startswith(f"larger than {MAX_UPLOAD_BYTES // 2**20} MB uncompressed")
    assert "like a zip bomb" in skipped["bomb.png"]
    assert skipped["readme.txt"].startswith("not an image file (.txt")
    assert result.hidden == 1
    assert not (tmp_path / "escape.png").exists() and not list(work.iterdir()) and not Path("/abs/root.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans.zip", "work"]


def test_a_member_that_lies_about_its_size_is_never_read_past_it(loaded, tmp_path):
    """A member declaring 1,000 bytes but holding 200,000: reading stops at what it declares and the CRC check
    fails, so it is listed as damaged."""
    data = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    raw = bytearray(make_zip({"liar.png": data}, zipfile.ZIP_STORED))
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    raw[local + 22:local + 26] = (1000).to_bytes(4, "little")
    raw[central + 24:central + 28] = (1000).to_bytes(4, "little")
    with open_zip(bytes(raw), "liar.zip") as inputs:
        assert inputs.items[0].member.file_size == 1000
        result = predict_batch(loaded, inputs, workers=1)
    assert result.rows[0]["error"].startswith("damaged in the zip (BadZipFile: Bad CRC-32")


def test_whole_zip_refused_when_it_declares_too_much_or_too_many(tmp_path, monkeypatch):
    archive = tmp_path / "set.zip"
    archive.write_bytes(make_zip({f"{i}.png": png(seed=i) for i in range(4)}))
    monkeypatch.setattr(batch_predict, "MAX_ZIP_MEMBERS", 3)
    with pytest.raises(ValueError, match="holds 4 entries; at most 3"):
        collect_inputs([str(archive)])
    monkeypatch.setattr(batch_predict, "MAX_ZIP_MEMBERS", 50_000)
    monkeypatch.setattr(batch_predict, "MAX_ZIP_TOTAL_BYTES", 1000)
    with pytest.raises(ValueError, match="uncompressed; at most 0 GB"):
        collect_inputs([str(archive)])
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a readable zip"):
        collect_inputs([str(tmp_path / "fake.zip")])


def test_uploads_images_and_zips_with_a_total_cap(loaded, monkeypatch):
    files = [("x [link](http://a).png", png(seed=1)), ("set.zip", make_zip({"y.png": png(seed=2)})),
             ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1))]
    with inputs_from_uploads(files) as inputs:
        result = predict_batch(loaded, inputs, workers=1)
    assert result.rows[0]["file"] == "x [link](http://a).png" and result.rows[0]["error"] is None
    assert result.rows[1]["file"] == "set.zip/y.png" and result.rows[1]["error"] is None
    assert result.rows[2]["error"] == f"The file is larger than {MAX_UPLOAD_BYTES // 2**20} MB."
    monkeypatch.setattr(batch_predict, "MAX_BATCH_UPLOAD_BYTES", 100)
    with pytest.raises(ValueError, match="at most 0 MB at once"):
        inputs_from_uploads(files[:1])


# ---------------------------------------------------------------- the command line

def test_cli_mixed_sources_to_csv_with_summary(finished_run, tmp_path, capsys):
    folder = write_folder(tmp_path / "xrays")
    (tmp_path / "list.csv").write_text("file,label\nxrays/a.png,NORMAL\n")
    (tmp_path / "more.zip").write_bytes(make_zip({"z.png": png(seed=9)}))
    single = tmp_path / "one.jpg"
    make_xray(90, 1, seed=10).save(single, "JPEG")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(finished_run), str(folder), str(tmp_path / "list.csv"), str(tmp_path / "more.zip"),
                 str(single), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["file", "label", "probability", "decision", "threshold", "applicable",
                                   "ood_score", "ood_reason", "error"]
    assert len(table) == 6 + 1 + 1 + 1 + 2  # folder files tried, CSV row, zip member, single file, 2 skipped
    assert table.loc[table["file"] == str(tmp_path / "xrays" / "a.png"), "label"].tolist() == ["", "NORMAL"]
    predicted = table[table["error"] == ""]
    assert len(predicted) == 8 and set(predicted["decision"]) <= {"NORMAL", "PNEUMONIA"}
    loaded = load_run_model(finished_run)
    expected = predict_image(loaded, single)["prob"]
    assert abs(float(table.loc[table["file"] == str(single), "probability"].iloc[0]) - expected) <= TOLERANCE
    assert printed.startswith(f"8 images predicted at the operating threshold {loaded.threshold:.3f}: ")
    assert "1 unreadable, 2 skipped" in printed and f"predictions written to {out}" in printed
    assert "unreadable: " in printed and "broken.png" in printed


def test_cli_refuses_an_existing_out_before_loading_the_model(finished_run, tmp_path, capsys, monkeypatch):
    folder = write_folder(tmp_path / "xrays")
    out = tmp_path / "predictions.csv"
    out.write_text("the user's own file\n")
    loads: list[str] = []
    import core.predict

    monkeypatch.setattr(core.predict, "load_run_model", lambda *a, **k: loads.append("loaded"))
    assert main(["predict", str(finished_run), str(folder), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_text() == "the user's own file\n" and not loads
    assert main(["predict", str(finished_run), str(folder), "--out", str(finished_run / "best.safetensors"),
                 "--force"]) == 1
    assert "run folder" in capsys.readouterr().err and not loads
    assert main(["predict", str(finished_run), str(tmp_path / "nowhere"), "--out", str(tmp_path / "new.csv")]) == 1
    assert "No such file or directory" in capsys.readouterr().err and not loads
    monkeypatch.undo()
    assert main(["predict", str(finished_run), str(folder), "--out", str(out), "--force"]) == 0
    assert pd.read_csv(out)["file"].str.endswith("a.png").any()


def test_cli_exit_1_when_nothing_could_be_predicted(finished_run, tmp_path, capsys):
    empty = tmp_path / "texts"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    out = tmp_path / "out.csv"
    assert main(["predict", str(finished_run), str(empty), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Nothing to predict") and err.count("\n") == 1 and not out.exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["predict", str(finished_run), str(broken), "--out", str(out), "--json"]) == 1
    summary = capsys.readouterr().out
    assert '"predicted": 0' in summary
    assert pd.read_csv(out)["error"].iloc[0].startswith("Not a readable image")
