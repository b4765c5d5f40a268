"""Subgroups: Kermany's groups from file names, image metadata (age bands, sex, view position, site), a user's
CSV matched by path or file name, and metrics with intervals per group."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest

from core.subgroups import (
    MAX_GROUP_TEXT,
    MAX_GROUPS_PER_COLUMN,
    groups_from_csv,
    kermany_groups,
    metadata_groups,
    prepare_subgroups,
    set_groups,
    subgroup_table,
)

PATHS = pd.Series(["/d/test/PNEUMONIA/person1_bacteria_1.jpeg", "/d/test/PNEUMONIA/person2_virus_3.jpeg",
                   "/d/test/NORMAL/IM-0001-0001.jpeg", "/d/test/NORMAL/NORMAL2-IM-0007-0001.jpeg",
                   "/d/test/NORMAL/other.png"])


def test_kermany_groups_from_file_names():
    groups = kermany_groups(PATHS)
    assert groups["pneumonia subtype"].tolist()[:2] == ["bacterial", "viral"]
    assert pd.isna(groups["pneumonia subtype"][2])
    assert groups["normal series"].tolist()[2:4] == ["IM-", "NORMAL2-IM-"]
    assert pd.isna(groups["normal series"][4])
    assert kermany_groups(pd.Series(["/x/a.png", "/x/b.png"])).empty


def test_groups_csv_by_path_then_file_name(tmp_path):
    csv = tmp_path / "groups.csv"
    pd.DataFrame({"filename": ["person1_bacteria_1.jpeg", "/d/test/NORMAL/other.png"],
                  "sex": ["F", "M"], "site": ["A", "B"]}).to_csv(csv, index=False)
    groups = groups_from_csv(PATHS, csv)
    assert groups["sex"].tolist()[0] == "F" and groups["site"].tolist()[4] == "B"
    assert groups["sex"].isna().sum() == 3
    assert list(groups_from_csv(PATHS, csv, ["site"]).columns) == ["site"]


@pytest.mark.parametrize("content,message", [("a,b\n1,2\n", "needs a column naming the image"),
                                             ("path,sex\n/nowhere.png,F\n", "No image of this set")])
def test_bad_groups_csv_says_why(tmp_path, content, message):
    csv = tmp_path / "groups.csv"
    csv.write_text(content)
    with pytest.raises(ValueError, match=message):
        groups_from_csv(PATHS, csv)
    with pytest.raises(ValueError, match="Cannot read"):
        groups_from_csv(PATHS, tmp_path / "missing.csv")


def test_subgroup_table_rates_with_intervals():
    rng = np.random.default_rng(0)
    n = 200
    labels = np.r_[np.ones(120, int), np.zeros(80, int)]
    names = [f"person{i}_{'bacteria' if i % 2 else 'virus'}_1.jpeg" for i in range(120)] + \
            [f"{'IM' if i % 2 else 'NORMAL2-IM'}-{i:04d}-0001.jpeg" for i in range(80)]
    probs = np.clip(labels * 0.5 + rng.normal(0.25, 0.15, n), 0, 1)
    table = subgroup_table(prepare_subgroups(labels, probs, None, kermany_groups(pd.Series(names))), 0.5)
    row = table.set_index(["grouping", "group"])
    bacterial = row.loc[("pneumonia subtype", "bacterial")]
    assert bacterial["images"] == 60 and bacterial["positives"] == 60
    expected = ((probs[:120] >= 0.5)[1::2]).mean()
    assert bacterial["sensitivity"]["value"] == pytest.approx(expected)
    assert bacterial["sensitivity"]["low"] <= expected <= bacterial["sensitivity"]["high"]
    assert np.isnan(bacterial["specificity"]["value"])  # no negatives in a pneumonia subtype
    im = row.loc[("normal series", "IM-")]
    assert im["negatives"] == 40 and 0 <= im["specificity"]["value"] <= 1


def test_groups_csv_rows_without_a_path_are_skipped(tmp_path):
    csv = tmp_path / "groups.csv"
    csv.write_text("path,site\n,A\n/d/test/NORMAL/other.png,B\n")
    assert groups_from_csv(PATHS, csv)["site"].tolist()[4] == "B"


def test_a_path_listed_twice_with_different_groups_is_refused_naming_it(tmp_path):
    csv = tmp_path / "groups.csv"
    csv.write_text("path,site\n/d/test/NORMAL/other.png,A\n/d/test/NORMAL/other.png,B\n"
                   "/d/test/NORMAL/IM-0001-0001.jpeg,A\n")
    with pytest.raises(ValueError, match="more than once with different groups") as refused:
        groups_from_csv(PATHS, csv)
    assert "/d/test/NORMAL/other.png" in str(refused.value) and "\n" not in str(refused.value)


def test_identical_duplicate_rows_are_counted_once_with_a_note(tmp_path):
    csv = tmp_path / "groups.csv"
    csv.write_text("path,site\n/d/test/NORMAL/other.png,A\n/d/test/NORMAL/other.png,A\n,B\n")
    groups = groups_from_csv(PATHS, csv)
    assert groups["site"].tolist()[4] == "A"
    assert groups.attrs["notes"] == ["1 row without a path skipped",
                                     "1 repeated row (same path, same groups) counted once"]


def test_one_file_name_in_two_folders_with_different_groups_is_refused_when_matched_by_name(tmp_path):
    csv = tmp_path / "groups.csv"
    csv.write_text("path,site\n/a/other.png,A\n/b/other.png,B\n")
    with pytest.raises(ValueError, match="files of the same name in different folders.*other.png"):
        groups_from_csv(PATHS, csv)
    csv.write_text("path,site\n/a/other.png,A\n/b/other.png,B\n/d/test/NORMAL/other.png,C\n")
    assert groups_from_csv(PATHS, csv)["site"].tolist()[4] == "C"  # its full path decides


@pytest.mark.parametrize("content, words", [
    (b"", "it is empty"),
    (b"   \n\n", "it is empty"),
    (b"\x00\xff\xfe garbage \x89PNG" * 20, "binary"),
    (b"path,site\n/d/x.png,\xff\xfe\n", "not UTF-8"),
    (b"site,sex\nA,F\n", "needs a column naming the image"),
    (b"path\n/d/test/NORMAL/other.png\n", "group columns"),
    (b"path,site\n,A\n", "lists no image"),
    (b'path,site\n"/d/x.png,A\n', "Cannot read"),
    (("path,id\n" + "".join(f"/d/{i}.png,{i}\n" for i in range(500))).encode(), "500 distinct values"),
    (("path," + ",".join(f"c{i}" for i in range(30)) + "\n/d/x.png" + ",a" * 30 + "\n").encode(), "30 group columns"),
])
def test_a_bad_groups_file_is_refused_in_one_line(tmp_path, content, words):
    csv = tmp_path / "groups.csv"
    csv.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(words)) as refused:
        groups_from_csv(PATHS, csv)
    assert "\n" not in str(refused.value) and str(csv) in str(refused.value)


def test_a_huge_groups_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import core.subgroups as subgroups

    monkeypatch.setattr(subgroups, "MAX_GROUPS_CSV_BYTES", 1000)
    csv = tmp_path / "groups.csv"
    csv.write_text("path,site\n" + "/d/test/NORMAL/other.png,A\n" * 100)
    with pytest.raises(ValueError, match="a groups CSV is at most"):
        groups_from_csv(PATHS, csv)


def test_a_groups_path_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "groups.csv"
    os.mkfifo(fifo)  # opening a FIFO for reading would wait for a writer forever
    for path in (fifo, tmp_path, "/dev/zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            groups_from_csv(PATHS, path)


# ---------------------------------------------------------------- image metadata


def test_age_bands_at_their_edges():
    ages = [0, 4, 4.99, 5, 17, 17.5, 18, 39, 40, 64, 65, 119.9, 120]
    bands = metadata_groups(pd.DataFrame({"age": ages}))["age band"].tolist()
    assert bands == ["0-4", "0-4", "0-4", "5-17", "5-17", "5-17", "18-39", "18-39", "40-64", "40-64", "65+", "65+",
                     "65+"]


@pytest.mark.parametrize("age", ["abc", "045Y", "", None, float("nan"), float("inf"), -1, -0.5, 120.5, 1e30,
                                 "1" + "0" * 400, [4]])
def test_an_age_that_is_no_age_is_unknown(age):
    groups = metadata_groups(pd.DataFrame({"age": [age, 30]}, dtype=object))
    assert groups["age band"].tolist() == ["unknown", "18-39"]


def test_blank_metadata_is_the_group_unknown_and_a_column_without_a_known_value_is_no_grouping():
    frame = pd.DataFrame({"age": [None, None, None], "sex": ["F", "", None], "view": [" ", None, float("nan")],
                          "site": ["a", "a", "b"]})
    groups = metadata_groups(frame)
    assert list(groups.columns) == ["sex", "site"]  # no age, no view: nothing known
    assert groups["sex"].tolist() == ["F", "unknown", "unknown"]
    assert metadata_groups(pd.DataFrame({"path": ["/x.png"]})).empty  # a file written before the metadata


def test_metadata_groups_come_in_a_readers_order_with_unknown_last():
    frame = pd.DataFrame({"age": [70, None, 3, 30, 10], "view": ["PA", None, "AP", "LL", "AP"]})
    labels = np.array([1, 0, 1, 0, 1])
    subgroups = prepare_subgroups(labels, np.linspace(0, 1, 5), None, metadata_groups(frame))
    assert [(g.grouping, g.group) for g in subgroups] == [
        ("age band", "0-4"), ("age band", "5-17"), ("age band", "18-39"), ("age band", "65+"),
        ("age band", "unknown"), ("view position", "AP"), ("view position", "LL"), ("view position", "PA"),
        ("view position", "unknown")]


def test_metadata_text_is_cleaned_and_cut():
    long = "x" * 10_000
    hostile = "F\x1b[31m\u202e\n[link](http://x)"
    groups = metadata_groups(pd.DataFrame({"sex": [long, hostile, "  M  "]}))
    shown = groups["sex"].tolist()
    assert len(shown[0]) == MAX_GROUP_TEXT and shown[0].endswith("…")
    assert shown[1] == "F [31m [link](http://x)"  # no control character reaches a terminal; shown as text
    assert shown[2] == "M"


def test_a_metadata_column_with_more_values_than_a_grouping_is_left_out_and_said_so():
    many = pd.DataFrame({"site": [f"s{i}" for i in range(MAX_GROUPS_PER_COLUMN + 1)],
                         "sex": ["F", "M"] * ((MAX_GROUPS_PER_COLUMN + 1) // 2) + ["F"]})
    groups = metadata_groups(many)
    assert list(groups.columns) == ["sex"]
    assert groups.attrs["notes"] == [f"Image metadata: site has {MAX_GROUPS_PER_COLUMN + 1} distinct values, more than "
                                     f"a grouping has ({MAX_GROUPS_PER_COLUMN}): left out"]
    assert list(metadata_groups(many.iloc[1:])["site"].cat.categories)[-1] == "unknown"  # 100 values: kept


def test_set_groups_combines_file_names_metadata_and_a_groups_csv(tmp_path):
    frame = pd.DataFrame({"path": PATHS, "age": [3, 30, 70, None, 8], "sex": ["F", "M", "F", "M", ""]})
    groups = set_groups(frame)
    assert list(groups.columns) == ["pneumonia subtype", "normal series", "age band", "sex"]
    csv = tmp_path / "groups.csv"
    csv.write_text("path,site,sex\n/d/test/NORMAL/other.png,B\x1b,X\n/d/test/NORMAL/other.png,B\x1b,X\n")
    combined = set_groups(frame, csv)
    assert list(combined.columns) == ["pneumonia subtype", "normal series", "age band", "site", "sex"]
    assert combined["site"].tolist()[4] == "B" and pd.isna(combined["site"][0])  # not named: in no group of it
    assert combined.attrs["notes"] == ["Groups CSV: 1 repeated row (same path, same groups) counted once",
                                       "Groups CSV: its column 'sex' replaces the automatic grouping of that name"]
    assert set_groups(pd.DataFrame({"path": ["/x/a.png"]})).shape == (1, 0)


def test_subgroup_intervals_resample_patients_not_images():
    # 40 patients with 5 images each, all of one patient predicted alike: resampling patients widens the interval.
    patients = np.repeat([f"p{i}" for i in range(40)], 5)
    labels = np.ones(200, int)
    probs = np.repeat(np.where(np.arange(40) % 2, 0.9, 0.1), 5)
    frame = pd.DataFrame({"view": ["PA"] * 200})
    by_patient, by_image = (subgroup_table(prepare_subgroups(labels, probs, p, metadata_groups(frame)), 0.5)
                            .iloc[0]["sensitivity"] for p in (patients, None))
    assert by_patient["value"] == by_image["value"] == 0.5
    assert by_patient["high"] - by_patient["low"] > 1.5 * (by_image["high"] - by_image["low"])
