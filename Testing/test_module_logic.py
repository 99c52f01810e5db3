"""The Slicer module's own Logic (SPASegmentation/SPASegmentation.py) on real MRML, headless.

slicer-core has MRML but not the Slicer application framework, so the three framework names the
module imports at load time (``qt``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``) are given minimal stand-ins here. Everything the Logic does to the
scene (segments, markups, previews, commits, undo, propagation, DICOM SEG) runs on slicer-core's
real MRML and the shipped model; the widget (Qt) is not exercised.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import test_dicom_seg as dicom_checks
from dicom_series import write_ct_series
from mrml import add_volume, segment_tag, voxel_ras

MODULE_PY = Path(__file__).resolve().parents[1] / "SPASegmentation" / "SPASegmentation.py"


class _ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.parent = parent


def _framework_stand_ins() -> dict[str, types.ModuleType]:
    """Modules of the Slicer application that slicer-core lacks, reduced to what importing the module needs."""
    qt = types.ModuleType("qt")
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {}))
    scripted.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda *args, **kwargs: None
    wrapper.WithinRange = lambda *args, **kwargs: None
    return {"qt": qt, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper}


@pytest.fixture(scope="module")
def module():
    """SPASegmentation.py loaded as Slicer would load it (framework names stood in)."""
    stand_ins = _framework_stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("SPASegmentation", MODULE_PY)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        yield loaded
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    """A DICOM CT series (12 × 64 × 64, organ in the middle) and the SimpleITK image of it."""
    series = write_ct_series(tmp_path_factory.mktemp("ct") / "series", slices=12, rows=64, columns=64)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series.folder)))
    return series, reader.Execute()


def volume_from_series(scene, image: sitk.Image):
    """The series as Slicer's DICOM reader puts it in a scene (LPS file geometry → RAS)."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = lps_to_ras @ np.asarray(image.GetDirection()).reshape(3, 3)
    origin = lps_to_ras @ np.asarray(image.GetOrigin())
    return add_volume(
        scene, sitk.GetArrayFromImage(image), spacing=image.GetSpacing(), origin=origin, directions=direction, name="CT"
    )


def organ_centre_ras(volume, series) -> tuple[float, float, float]:
    """RAS of the organ's centre voxel (on a whole slice)."""
    k, j, i = (float(np.mean(axis)) for axis in np.nonzero(series.hounsfield > 100))
    return voxel_ras(volume, (round(k), j, i))


def test_module_logic_workflow_on_real_mrml(module, mrml_scene, shipped_model, ct_series, tmp_path):
    from SPASegmentationLib.scene.geometry import pixel_to_ras
    from SPASegmentationLib.scene.segments import ALGORITHM_NAME_TAG, ALGORITHM_TYPE_TAG, read_segment

    series, image = ct_series
    volume = volume_from_series(mrml_scene, image)
    logic = module.SPASegmentationLogic()
    logic.setModel(shipped_model, profileFolder=tmp_path / "profiles")
    assert logic.deviceDescription() == "cpu"

    segmentation, segment_id = logic.addSegment(None, volume, "liver")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"
    prompt = logic.newPromptNode("point")
    centre = organ_centre_ras(volume, series)
    prompt.AddControlPoint(*centre)
    assert logic.newPromptNode("point") is not prompt  # the old prompt markup is replaced
    assert mrml_scene.GetNodeByID(prompt.GetID()) is None
    prompt = logic.newPromptNode("point")
    prompt.AddControlPoint(*centre)

    session, orientation, kwargs = logic.prepareStart(
        volume, segmentation, segment_id, prompt, user="alice", structure="liver", nSamples=16
    )
    assert orientation == "axial" and kwargs == {"point_ras": centre}
    first = session.compute_start(orientation, **kwargs)
    session.show(first)
    assert logic.currentRound() is first and not logic.canUndoRound()
    assert first.recommended.shape == (64, 64) and 1 <= first.n_candidates <= 4
    # The recommended mask covers the clicked organ on that slice.
    plane = session.plane
    organ = plane.extract(series.hounsfield > 100)
    assert (first.recommended & organ).sum() > 0.5 * organ.sum()

    # A click inside a candidate's overlay finds it; choosing gives round 2; undo returns to round 1.
    k = int(np.argmax([np.count_nonzero(d) for d in first.differences]))
    rows, cols = np.nonzero(first.differences[k])
    hit = logic.candidateAt("axial", pixel_to_ras(volume, plane, (cols[0], rows[0])))
    assert hit is not None and first.differences[hit][rows[0], cols[0]] != 0
    assert logic.candidateAt("sagittal", centre) is None
    second = session.choose(hit)
    assert second.index == 2 and logic.canUndoRound()
    assert logic.undoRound().index == 1

    # Accept: the segment gets the mask on that slice only, tagged, and the profile is written.
    logic.accept()
    stored = read_segment(segmentation, segment_id, volume)
    assert np.array_equal(plane.extract(stored), first.recommended) and stored.sum() == first.recommended.sum()
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    values = {key: segment_tag(segment, key) for key in (ALGORITHM_TYPE_TAG, ALGORITHM_NAME_TAG)}
    assert values[ALGORITHM_TYPE_TAG] == "SEMIAUTOMATIC" and values[ALGORITHM_NAME_TAG] == "SPA"
    assert logic.profileStore.initial_weights("alice", "liver") is not None
    assert logic.currentRound() is None and logic.canUndoAccepted()

    # Slicer's segmentation undo takes the accepted slice back out, redo puts it back.
    assert logic.undoAccepted()
    assert not read_segment(segmentation, segment_id, volume).any()
    assert logic.segmentUndo(segmentation).redo()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), stored)

    # Propagation with the panel's settings reaches the neighbouring slices of the organ, as one undo step.
    options = module.SPASegmentationLogic.propagationOptions(3, 8)
    result = session.compute_propagate(**options)
    assert set(result.masks) and all(abs(index - plane.index) <= 3 for index in result.masks)
    session.apply_propagation(result)
    propagated = read_segment(segmentation, segment_id, volume)
    assert plane.index in result.masks and len(result.masks) > 1  # the start slice and at least one neighbour
    filled = sorted(int(k) for k in np.flatnonzero(propagated.any(axis=(1, 2))))
    assert filled == sorted(i for i, m in result.masks.items() if m.any())
    for index, mask in result.masks.items():
        assert np.array_equal(plane.at(index).extract(propagated), mask)
    logic.undoAccepted()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), stored)
    logic.segmentUndo(segmentation).redo()

    # DICOM SEG of the accepted segment against the source series: valid, and dcmqi reads the same voxels.
    files = logic.exportDicomSeg(segmentation, volume, tmp_path / "seg", referenceSeriesFolder=series.folder)
    assert len(files) == 1
    seg_path = Path(files[0])
    assert dicom_checks.dciodvfy_errors(seg_path) == []
    dataset = pydicom.dcmread(seg_path)
    assert dataset.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert dataset.SegmentSequence[0].SegmentLabel == "liver"
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    segments = dicom_checks.dcmqi_segments(seg_path, tmp_path / "dcmqi")
    assert np.array_equal(dicom_checks.on_ct_grid(segments[0], image), read_segment(segmentation, segment_id, volume))

    logic.cancelSession()
    assert mrml_scene.GetFirstNodeByName("SPA preview") is None


def test_module_logic_refuses_to_export_nothing_or_without_a_series(
    module, mrml_scene, shipped_model, ct_series, tmp_path
):
    series, image = ct_series
    volume = volume_from_series(mrml_scene, image)
    logic = module.SPASegmentationLogic()
    logic.setModel(shipped_model, profileFolder=tmp_path / "profiles")
    segmentation, _ = logic.addSegment(None, volume, "liver")
    with pytest.raises(ValueError, match="Reference series"):
        logic.exportDicomSeg(segmentation, volume, tmp_path / "seg")
    with pytest.raises(ValueError, match="empty"):
        logic.exportDicomSeg(segmentation, volume, tmp_path / "seg", referenceSeriesFolder=series.folder)
    with pytest.raises(RuntimeError, match="load the model"):
        module.SPASegmentationLogic().startSession(volume, segmentation, "x")
