"""DICOM SEG export checked by independent readers: dciodvfy, dcmqi's segimage2itkimage, pydicom, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import SyntheticSeries, ellipsoid, write_ct_series

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.io.dicom_seg import (
    SEGMENTATION_STORAGE,
    Segment,
    export_dicom_seg,
    ijk_to_lps_from_ras,
    ijk_to_lps_from_sitk,
    load_source_series,
)
from SPASegmentationLib.io.terminology import ABNORMAL_STRUCTURE, ANATOMICAL_STRUCTURE, TISSUE, terminology_for

SHAPE = (12, 64, 64)


def _tool(name: str) -> str | None:
    """An executable from PATH or next to this Python (the venv's bin folder)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> SyntheticSeries:
    return write_ct_series(tmp_path_factory.mktemp("ct") / "series", slices=SHAPE[0], rows=SHAPE[1], columns=SHAPE[2])


@pytest.fixture(scope="module")
def ct_image(ct) -> sitk.Image:
    """The series as SimpleITK/GDCM reads it: the geometry masks are defined in."""
    series_id = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(ct.folder))[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ct.folder), series_id))
    return reader.Execute()


@pytest.fixture(scope="module")
def tumour() -> np.ndarray:
    # off-centre, over slices 3..9, asymmetric in k so a reversed slice order would show
    mask = ellipsoid(SHAPE, centre=(6.0, 30.0, 34.0), radii=(3.5, 10.0, 12.0))
    mask[3:5, 25:28, 20:50] = True
    return mask


def dciodvfy_errors(path: Path) -> list[str]:
    tool = _tool("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dcmqi_segments(seg_path: Path, out_dir: Path) -> list[sitk.Image]:
    """The segments of a SEG as dcmqi reads them, one image per segment, by segment number."""
    tool = _tool("segimage2itkimage")
    if tool is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed")
    out_dir.mkdir()
    result = subprocess.run(
        [tool, "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir), "--outputType", "nrrd"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(out_dir.glob("*.nrrd"), key=lambda p: int(p.name.split(".")[0].split("-")[-1]))
    return [sitk.ReadImage(str(f)) for f in files]


def on_ct_grid(segment: sitk.Image, ct_image: sitk.Image) -> np.ndarray:
    """A dcmqi segment image placed voxel-exactly on the CT grid (dcmqi crops to the frames present)."""
    assert segment.GetSpacing() == pytest.approx(ct_image.GetSpacing(), abs=1e-4)
    assert segment.GetDirection() == pytest.approx(ct_image.GetDirection(), abs=1e-6)
    continuous = ct_image.TransformPhysicalPointToContinuousIndex(segment.GetOrigin())
    start = [int(round(c)) for c in continuous]
    assert continuous == pytest.approx(start, abs=1e-3), "dcmqi's grid is not the CT grid"
    array = sitk.GetArrayFromImage(segment) > 0
    full = np.zeros(sitk.GetArrayFromImage(ct_image).shape, dtype=bool)
    i0, j0, k0 = start
    full[k0 : k0 + array.shape[0], j0 : j0 + array.shape[1], i0 : i0 + array.shape[2]] = array
    return full


def test_source_series_is_sorted_like_simpleitk(ct, ct_image):
    series = load_source_series(ct.folder)
    series_id = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(ct.folder))[0]
    gdcm_order = [Path(p).name for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ct.folder), series_id)]
    assert [p.name for p in series.paths] == gdcm_order == [p.name for p in ct.files]
    assert series.shape == SHAPE == sitk.GetArrayFromImage(ct_image).shape
    assert series.series_uid == ct.series_uid


def test_seg_is_valid_and_dcmqi_reads_back_the_exact_voxels(ct, ct_image, tumour, tmp_path):
    assert dciodvfy_errors(ct.files[0]) == []  # the synthetic source itself is valid CT
    seg_path = export_dicom_seg(
        tumour,
        ct.folder,
        tmp_path / "seg.dcm",
        segment_label="Tumour",
        structure="liver tumour",
        model_fingerprint="f00d",
        seed=7,
        content_creator="Doe^Jane",
    )
    assert seg_path == tmp_path / "seg.dcm" and seg_path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"
    assert dciodvfy_errors(seg_path) == []
    segments = dcmqi_segments(seg_path, tmp_path / "dcmqi")
    assert len(segments) == 1
    assert np.array_equal(on_ct_grid(segments[0], ct_image), tumour)


def test_seg_attributes_and_frame_order(ct, tumour, tmp_path):
    seg_path = export_dicom_seg(
        tumour,
        [str(p) for p in reversed(ct.files)],
        tmp_path / "seg.dcm",
        structure="liver tumour",
        model_fingerprint="f00d",
        seed=7,
        series_description="SPA tumour",
        content_creator="Doe^Jane",
    )
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ct.study_uid and seg.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert seg.SeriesInstanceUID != ct.series_uid and seg.SeriesDescription == "SPA tumour"
    assert str(seg.ContentCreatorName) == "Doe^Jane"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ct.series_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(
        ct.sop_instance_uids
    )
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC" and segment.SegmentAlgorithmName == "SPA"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ABNORMAL_STRUCTURE.value
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # neoplasm
    assert segment.AnatomicRegionSequence[0].CodeValue == "10200004"  # liver
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (
        algorithm.AlgorithmName == "SPA"
        and "f00d" in algorithm.AlgorithmParameters
        and "7" in algorithm.AlgorithmParameters
    )
    # every frame holds exactly the mask slice of the CT instance it was derived from
    k_of_uid = {uid: k for k, uid in enumerate(ct.sop_instance_uids)}
    frames = seg.pixel_array.reshape(-1, SHAPE[1], SHAPE[2]).astype(bool)
    nonempty = [k for k in range(SHAPE[0]) if tumour[k].any()]
    assert int(seg.NumberOfFrames) == len(nonempty)
    seen = []
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = k_of_uid[uid]
        assert np.array_equal(frame, tumour[k]), f"frame for slice {k} holds another slice"
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in pydicom.dcmread(ct.files[k]).ImagePositionPatient])
        seen.append(k)
    assert sorted(seen) == nonempty


def test_geometry_places_a_reversed_mask_and_refuses_a_shifted_one(ct, ct_image, tumour, tmp_path):
    # the same physical mask stored with its k axis running the other way
    matrix = ijk_to_lps_from_sitk(ct_image)
    reversed_matrix = matrix.copy()
    reversed_matrix[:3, 3] = matrix[:3, :3] @ np.array([0.0, 0.0, SHAPE[0] - 1.0]) + matrix[:3, 3]
    reversed_matrix[:3, 2] = -matrix[:3, 2]
    # given as Slicer gives it: IJKToRAS (RAS = LPS with x and y negated)
    reversed_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ reversed_matrix
    seg_path = export_dicom_seg(
        tumour[::-1].copy(), ct.folder, tmp_path / "rev.dcm", ijk_to_lps=ijk_to_lps_from_ras(reversed_ras)
    )
    assert np.array_equal(on_ct_grid(dcmqi_segments(seg_path, tmp_path / "dq")[0], ct_image), tumour)
    shifted = matrix.copy()
    shifted[:3, 3] += np.array([0.0, 0.0, 1.0])  # 1 mm along the normal: between slices
    with pytest.raises(InputError, match="matches no slice"):
        export_dicom_seg(tumour, ct.folder, tmp_path / "bad.dcm", ijk_to_lps=shifted)
    flipped = matrix.copy()
    flipped[:3, 0] = -matrix[:3, 0]
    with pytest.raises(InputError, match="directions differ"):
        export_dicom_seg(tumour, ct.folder, tmp_path / "bad.dcm", ijk_to_lps=flipped)
    assert not (tmp_path / "bad.dcm").exists()


def test_multi_segment_label_map_and_overlapping_dict(ct, ct_image, tumour, tmp_path):
    organ = ellipsoid(SHAPE, centre=(6.0, 30.0, 34.0), radii=(5.0, 20.0, 22.0))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[organ] = 1
    labels[tumour] = 3
    seg_path = export_dicom_seg(
        labels, ct.folder, tmp_path / "multi.dcm", segment_labels={1: "Liver", 3: "Tumour"}, structure="liver"
    )
    assert dciodvfy_errors(seg_path) == []
    seg = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Tumour"]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]
    assert all(s.SegmentAlgorithmType == "SEMIAUTOMATIC" for s in seg.SegmentSequence)
    segments = dcmqi_segments(seg_path, tmp_path / "dq")
    assert len(segments) == 2
    assert np.array_equal(on_ct_grid(segments[0], ct_image), labels == 1)
    assert np.array_equal(on_ct_grid(segments[1], ct_image), labels == 3)
    # overlapping segments from a dict (BINARY SEG allows overlap), each with its own terminology
    dict_path = export_dicom_seg(
        [Segment(organ, "Liver", "liver"), Segment(tumour, "Lesion", "lesion")], ct.folder, tmp_path / "overlap.dcm"
    )
    assert dciodvfy_errors(dict_path) == []
    seg = pydicom.dcmread(dict_path)
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == ["Liver", "Lesion"]
    overlap = dcmqi_segments(dict_path, tmp_path / "dq2")
    assert np.array_equal(on_ct_grid(overlap[0], ct_image), organ)
    assert np.array_equal(on_ct_grid(overlap[1], ct_image), tumour)
    from_mapping = pydicom.dcmread(export_dicom_seg({"A": organ, "B": tumour}, ct.folder, tmp_path / "map.dcm"))
    assert [s.SegmentLabel for s in from_mapping.SegmentSequence] == ["A", "B"]


def test_user_errors_name_the_problem(ct, tumour, tmp_path):
    with pytest.raises(InputError, match=r"12×64×60.*12×64×64"):
        export_dicom_seg(tumour[:, :, :60], ct.folder, tmp_path / "x.dcm")
    with pytest.raises(InputError, match="Segment"):
        export_dicom_seg([tumour], ct.folder, tmp_path / "x.dcm")
    with pytest.raises(InputError, match="empty"):
        export_dicom_seg(np.zeros(SHAPE, dtype=bool), ct.folder, tmp_path / "x.dcm")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputError, match="no DICOM image slices"):
        export_dicom_seg(tumour, empty, tmp_path / "x.dcm")
    with pytest.raises(InputError, match="does not exist"):
        export_dicom_seg(tumour, [*ct.files, tmp_path / "gone.dcm"], tmp_path / "x.dcm")
    mixed = tmp_path / "mixed"
    shutil.copytree(ct.folder, mixed)
    other = write_ct_series(tmp_path / "other", slices=3, rows=8, columns=8)
    shutil.copy(other.files[0], mixed / "zz_other.dcm")
    with pytest.raises(InputError, match="2 DICOM series"):
        export_dicom_seg(tumour, mixed, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    # a SEG written into the series folder does not count as a second series on the next export
    (mixed / "zz_other.dcm").unlink()
    export_dicom_seg(tumour, mixed, mixed / "seg.dcm")
    again = export_dicom_seg(tumour, mixed, mixed / "seg2.dcm")
    assert load_source_series(mixed).shape == SHAPE and again.is_file()


def test_terminology_from_free_text():
    assert terminology_for(None).category == TISSUE and terminology_for("whatever").type == TISSUE
    liver = terminology_for("Liver")
    assert liver.category == ANATOMICAL_STRUCTURE and liver.type.value == "10200004" and liver.region is None
    lesion = terminology_for("kidney lesions")
    assert (
        lesion.category == ABNORMAL_STRUCTURE and lesion.type.meaning == "Lesion" and lesion.region.meaning == "Kidney"
    )
    assert terminology_for("lymph node").type.meaning == "Lymph Node"
    assert terminology_for("bonemarrow").type == TISSUE  # whole words only


def spa(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "SPASegmentationLib.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        env=dict(os.environ, SPA_HOME=str(cwd / "home")),
    )


def test_cli_export_seg_end_to_end(ct, ct_image, tumour, tmp_path):
    mask_image = sitk.GetImageFromArray(tumour.astype(np.uint8))
    mask_image.CopyInformation(ct_image)
    sitk.WriteImage(mask_image, str(tmp_path / "mask.nrrd"))
    result = spa(
        "export-seg",
        "mask.nrrd",
        str(ct.folder),
        "--out",
        "out/seg.dcm",
        "--label",
        "Tumour",
        "--structure",
        "liver tumour",
        "--seed",
        "3",
        "--model-fingerprint",
        "abc",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "1 segment(s)" in result.stdout and ct.series_uid in result.stdout
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Tumour"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert np.array_equal(
        on_ct_grid(dcmqi_segments(tmp_path / "out" / "seg.dcm", tmp_path / "dq")[0], ct_image), tumour
    )
    # user errors: one clear line each
    small = sitk.GetImageFromArray(tumour[:, :, :60].astype(np.uint8))
    small.SetSpacing(ct_image.GetSpacing())
    small.SetOrigin(ct_image.GetOrigin())
    sitk.WriteImage(small, str(tmp_path / "small.nrrd"))
    moved = sitk.Image(mask_image)
    moved.SetOrigin(tuple(np.add(ct_image.GetOrigin(), (5.0, 0.0, 0.0))))
    sitk.WriteImage(moved, str(tmp_path / "moved.nrrd"))
    for mask_name, fragment in (
        ("small.nrrd", "12×64×60"),
        ("moved.nrrd", "matches no slice"),
        ("missing.nrrd", "not a mask file"),
    ):
        failed = spa("export-seg", mask_name, str(ct.folder), "--out", "bad.dcm", cwd=tmp_path)
        assert failed.returncode == 2, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spa: error: ") and fragment in lines[0], failed.stderr
        assert "Traceback" not in failed.stderr
    assert not (tmp_path / "bad.dcm").exists()


def test_sagittal_series_round_trip(tmp_path):
    # rows run anterior→posterior, columns head→feet: slice normal along -x, not the z axis
    sagittal = write_ct_series(
        tmp_path / "sag", slices=6, rows=20, columns=24, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    )
    series_id = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sagittal.folder))[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sagittal.folder), series_id))
    image = reader.Execute()
    mask = ellipsoid(sagittal.shape, centre=(2.0, 10.0, 12.0), radii=(2.5, 6.0, 8.0))
    mask[4, 2:5, 3:9] = True
    seg_path = export_dicom_seg(mask, sagittal.files, tmp_path / "sag.dcm", ijk_to_lps=ijk_to_lps_from_sitk(image))
    assert dciodvfy_errors(seg_path) == []
    assert np.array_equal(on_ct_grid(dcmqi_segments(seg_path, tmp_path / "dq")[0], image), mask)


def test_blank_sop_uids_are_taken_from_the_file_meta_and_blank_series_uids_refused(ct, ct_image, tumour, tmp_path):
    """As anonymisers leave real series (TotalSegmentator's example_ct_dicom): SOP Class/Instance UIDs blank in the
    dataset but kept in the file meta are repaired and said so; Study/Series UIDs blank everywhere are refused."""
    blanked = tmp_path / "blanked"
    shutil.copytree(ct.folder, blanked)
    for path in blanked.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPClassUID, ds.SOPInstanceUID = "", ""
        ds.save_as(path, enforce_file_format=True)
    mask_image = sitk.GetImageFromArray(tumour.astype(np.uint8))
    mask_image.CopyInformation(ct_image)
    sitk.WriteImage(mask_image, str(tmp_path / "mask.nrrd"))
    result = spa("export-seg", "mask.nrrd", str(blanked), "--out", "seg.dcm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "blank SOPClassUID" in result.stdout and "blank SOPInstanceUID" in result.stdout
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(ct.sop_instance_uids)
    for path in blanked.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = ""
        ds.save_as(path, enforce_file_format=True)
    failed = spa("export-seg", "mask.nrrd", str(blanked), "--out", "seg2.dcm", cwd=tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("spa: error:") and "SeriesInstanceUID" in failed.stderr
    assert not (tmp_path / "seg2.dcm").exists()


def test_segment_on_a_dicom_series_writes_a_dicom_seg(ct, ct_image, tmp_path):
    k = ct.shape[0] // 2
    rows, cols = np.nonzero(ct.hounsfield[k] > 100)
    point = f"{int(cols.mean())},{int(rows.mean())}"
    result = spa(
        "segment", str(ct.folder), "--slice", str(k), "--point", point, "--samples", "8", "--accept", "2",
        "--user", "alice", "--structure", "liver", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "output" / "segment"
    [seg_path] = list(out.glob("*.seg.dcm"))
    assert not [p for p in out.iterdir() if p.suffix == ".dcm" and not p.name.endswith(".seg.dcm")]
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    assert labels[:2] == ["liver (recommended)", "liver (accepted)"] and labels[2].startswith("liver (candidate 1")
    assert dciodvfy_errors(seg_path) == []
    segments = dcmqi_segments(seg_path, tmp_path / "dq")
    recommended = on_ct_grid(segments[0], ct_image)
    assert recommended[k].any() and not np.delete(recommended, k, axis=0).any()  # only the segmented slice
    summary = json.loads(next(out.glob("*_summary.json")).read_text())
    assert summary["outputs"]["dicom_seg"].endswith(".seg.dcm")
