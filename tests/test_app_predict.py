"""Predict page (AppTest): renders with and without runs; full-size uploads are scored with Grad-CAM,
non-images and oversized files give an error per file, the operating point is stated and a newly saved
threshold applies at once, a damaged threshold.json is an error, and the overlay's colour map and opacity
can be changed."""

from __future__ import annotations

import re
from pathlib import Path

from app_helpers import ORIGINAL_SUBSET as ORIGINALS
from bad_inputs import as_read
from streamlit.testing.v1 import AppTest

from core import runs
from core.dataset import IMAGE_EXTENSIONS
from core.predict import ACCEPTED_FORMATS, MAX_UPLOAD_BYTES, load_run_model, predict_files

PAGE = str(Path(__file__).resolve().parents[1] / "views" / "5_Predict.py")
TIMEOUT = 120


def shown(element) -> str:
    """An element's text as the reader sees it: file-derived text is Markdown-escaped on the page."""
    return element.value.replace("\\", "")


def original(cls: str = "PNEUMONIA") -> Path:
    """The largest full-size original of a class: the hardest honest upload."""
    return max((ORIGINALS / cls).glob("*.jpeg"), key=lambda p: p.stat().st_size)


def test_no_runs_shows_hint(empty_runs_dir):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "No finished runs" in at.info[0].value


def test_upload_scores_full_size_originals_and_rejects_a_text_file(run_copy):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    uploader = at.file_uploader[0]
    assert uploader.accept_multiple_files
    assert {t.lstrip(".") for t in uploader.allowed_type} == {e.lstrip(".") for e in IMAGE_EXTENSIONS}
    assert {"jpg", "jpeg", "png", "bmp", "tif", "tiff"} <= {t.lstrip(".") for t in uploader.allowed_type}
    assert ACCEPTED_FORMATS in uploader.label
    assert any(f"{MAX_UPLOAD_BYTES // 2**20} MB" in c.value for c in at.caption)
    assert runs.operating_point(run_copy).describe() in as_read(at.markdown[0].value)

    files = [original("PNEUMONIA"), original("NORMAL")]
    uploader.set_value([(p.name, p.read_bytes(), "image/jpeg") for p in files]
                       + [("notes.jpeg", b"not an image, just text\n" * 10, "image/jpeg")]).run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and shown(at.error[0]).startswith("notes.jpeg: Not a readable image")

    expected = predict_files(load_run_model(run_copy), files)
    probs = [m.value for m in at.metric if m.label == "Probability of PNEUMONIA"]
    assert probs == [f"{r['prob']:.3f}" if r["applicable"] else "—" for r in expected]
    captions = [as_read(c) for img in at.image for c in img.captions]
    assert captions[::2] == ["Original"] * 2
    # The 64 px fixture model explains with its 8×8 stage (4×4 was the last one's).
    assert all(re.fullmatch(r"Grad-CAM, 8×8 map from backbone\.stages\.1: (evidence for PNEUMONIA|no evidence for "
                            r"the positive class \(PNEUMONIA\) found; the map is empty)", c) for c in captions[1::2])
    summary = at.dataframe[0].value
    assert list(summary["file"]) == [p.name for p in files] + ["notes.jpeg"]
    assert list(summary["decision"][:2]) == [r["predicted"] for r in expected]


def test_oversized_upload_is_refused(run_copy):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    at.file_uploader[0].set_value(("huge.png", b"\0" * (MAX_UPLOAD_BYTES + 1), "image/png")).run()
    assert not at.exception
    assert shown(at.error[0]).startswith("huge.png: The file is larger than")
    assert not at.image


def test_saved_threshold_applies_without_reloading_the_model(run_copy):  # noqa: F811
    upload = original()
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    at.file_uploader[0].set_value((upload.name, upload.read_bytes(), "image/jpeg")).run()
    runs.save_threshold(run_copy, 1.0, chosen_on="val", target="manual")
    at.run()
    assert not at.exception
    decision = next(m.value for m in at.markdown if m.value.startswith("Decision"))
    assert "threshold 1.000" in decision


def test_damaged_threshold_file_is_an_error_not_another_threshold(run_copy):  # noqa: F811
    (run_copy / "threshold.json").write_text('{"threshold": 7}')
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert "threshold.json is damaged" in at.error[0].value
    assert not at.file_uploader


def test_colour_map_and_opacity_of_the_overlay(run_copy):  # noqa: F811
    upload = original()
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert at.selectbox(key="predict_colour_map").value == "viridis"  # colour-blind safe by default
    at.file_uploader[0].set_value((upload.name, upload.read_bytes(), "image/jpeg")).run()
    original_url, viridis_url = (img.value[0] for img in at.image)
    at.selectbox(key="predict_colour_map").set_value("jet").run()
    original_again, jet_url = (img.value[0] for img in at.image)
    at.slider(key="predict_alpha").set_value(0.7).run()
    assert not at.exception, at.exception
    # Media URLs name the content: the overlay is redrawn, the original is not.
    assert original_again == original_url and len({viridis_url, jet_url, at.image[1].value[0]}) == 3


def test_a_colour_photo_is_flagged_not_a_chest_xray_and_its_decision_not_applicable(run_copy):  # noqa: F811
    import io

    import numpy as np
    from PIL import Image

    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(photo, "PNG")
    xray = original("NORMAL")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    at.file_uploader[0].set_value([("knee [photo](http://x).png", photo.getvalue(), "image/png"),
                                   (xray.name, xray.read_bytes(), "image/jpeg")]).run()
    assert not at.exception, at.exception
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("Not a chest X-ray: the image is in colour") for w in warnings)
    decisions = [m.value for m in at.markdown if m.value.startswith("Decision")]
    assert decisions[0].startswith("Decision: **not applicable**")
    assert at.metric[0].value == "—"  # the photo's probability is not headlined; the sentence gives it
    assert re.search(r"the model alone would say (NORMAL|PNEUMONIA): \d\.\d{3}", decisions[0])
    assert "](http" not in "".join(m.value for m in at.markdown)  # the file name is shown as text, not a link
    summary = at.dataframe[0].value
    assert list(summary["applies"]) == [False, True]
    assert summary["why not"][0].startswith("Not a chest X-ray")
    assert any(c.value.startswith("Like the training data (score") for c in at.caption)


def test_a_run_without_a_score_says_how_to_fit_one(run_copy):  # noqa: F811
    (run_copy / "ood.safetensors").unlink()
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert any("fit-ood" in w.value for w in at.warning)


# ---------------------------------------------------------------- batch mode

BATCH = "A folder, label file or zip (batch)"
SUBMIT = "FormSubmitter:batch_predict-Predict"


def _batch_folder(root: Path, n: int = 50) -> Path:
    """`n` small generated X-rays (enough for the decoding processes), a damaged PNG, a text file and a file named
    like a Markdown link."""
    from conftest import make_xray

    root.mkdir()
    for i in range(n):
        make_xray(72, i % 2, seed=i).save(root / f"img{i:03d}.png")
    make_xray(72, 1, seed=99).save(root / "[click](evil.example) *bold*.png")
    (root / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "notes.txt").write_text("exported from the PACS")
    return root


def _batch_page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    at.radio(key="predict_mode").set_value(BATCH).run()
    return at


def _predict(at: AppTest, path: str) -> None:
    """Type the path and press Predict (a form: its fields are sent with the button)."""
    at.text_input(key="batch_path").set_value(path)
    at.button(key=SUBMIT).click().run()


def test_batch_mode_predicts_a_server_folder_only_when_asked(run_copy, tmp_path):  # noqa: F811
    folder = _batch_folder(tmp_path / "ward")
    at = _batch_page()
    at.text_input(key="batch_path").set_value(str(folder)).run()
    assert not at.exception, at.exception
    assert not at.dataframe  # the path alone starts nothing
    _predict(at, str(folder))
    assert not at.exception, at.exception
    table, left_out = at.dataframe[0].value, at.dataframe[1].value
    assert len(table) == 51 and list(table.columns) == ["probability", "decision", "file", "OOD verdict"]
    loaded = load_run_model(run_copy)
    files = [str(folder / f"img{i:03d}.png") for i in range(50)]
    expected = {r["file"]: r for r in predict_files(loaded, files)}
    shown_rows = table.set_index("file").loc[files]
    assert all(abs(p - expected[f]["prob"]) <= 1e-6 for f, p in shown_rows["probability"].items())
    assert all(d in ("not applicable", expected[f]["predicted"]) for f, d in shown_rows["decision"].items())
    reasons = dict(zip(left_out["file"].map(lambda f: Path(f).name), left_out["reason"]))
    assert set(reasons) == {"damaged.png", "notes.txt"}
    assert reasons["damaged.png"].startswith("Not a readable image")
    assert reasons["notes.txt"].startswith("skipped: not an image file (.txt")
    assert at.markdown[1].value.startswith("51 images predicted at the operating threshold")
    assert "](evil" not in "".join(m.value for m in at.markdown)  # the file name is only in the table, as text
    assert at.get("download_button")[0].label == "Download the CSV"
    at.run()  # any later rerun (a widget, the download) keeps the result
    assert len(at.dataframe[0].value) == 51
    runs.save_threshold(run_copy, 0.99, chosen_on="val", target="manual")
    at.run()
    assert not at.dataframe  # decisions at another threshold: predict again


def test_batch_mode_uploads_images_and_a_zip(run_copy):  # noqa: F811
    import io
    import zipfile

    from conftest import make_xray

    def png(seed: int) -> bytes:
        out = io.BytesIO()
        make_xray(72, seed % 2, seed=seed).save(out, "PNG")
        return out.getvalue()

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("NORMAL/a.png", png(1))
        z.writestr("../b.png", png(2))
        z.writestr("readme.txt", "x")
    at = _batch_page()
    at.file_uploader(key="batch_files").set_value([("one.png", png(3), "image/png"),
                                                   ("set.zip", archive.getvalue(), "application/zip")])
    at.button(key=SUBMIT).click().run()
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["file"]) == ["one.png", "set.zip/NORMAL/a.png", "set.zip/../b.png"]
    assert list(at.dataframe[1].value["file"]) == ["set.zip/readme.txt"]


def test_batch_mode_refuses_a_missing_path_or_nothing_in_one_line(run_copy, tmp_path):  # noqa: F811
    at = _batch_page()
    at.button(key=SUBMIT).click().run()
    assert shown(at.error[0]) == "Give a folder, CSV or zip on the server, or upload files."
    _predict(at, str(tmp_path / "no_such_[folder]"))
    assert not at.exception, at.exception
    assert shown(at.error[0]).startswith(f"{tmp_path / 'no_such_[folder]'}: No such file or directory")
    assert not at.dataframe and not at.get("download_button")
