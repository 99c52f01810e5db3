"""The Slicer module's Logic (SPASegmentation/SPAModuleLib/logic.py) on real MRML against a real ``spa serve``.

The Logic is Qt-free, so it is imported as it is (no stand-ins). It starts the local server the way
the module does (a child process, loopback, random port and token) and drives it over HTTP: segments,
prompts, previews, commits, undo, propagation and DICOM SEG all run on slicer-core's real MRML.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import test_dicom_seg as dicom_checks
from dicom_series import write_ct_series

pytest.importorskip("slicer")

from mrml import add_volume, segment_tag, voxel_ras  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SPASegmentation"))

from SPAModuleLib.logic import LOCAL, REMOTE, SPASegmentationLogic, versionProblem  # noqa: E402

SAMPLES = 16


@pytest.fixture(scope="module")
def connection(tmp_path_factory):
    """The local server as the module starts it (here with this Python instead of PythonSlicer)."""
    folder = tmp_path_factory.mktemp("server")
    settings = {"mode": LOCAL, "python": sys.executable, "profilesDb": folder / "profiles.sqlite3", "user": "alice"}
    connection = SPASegmentationLogic.connect(settings)
    yield connection
    connection.service.stop()


@pytest.fixture
def logic(connection, mrml_scene):
    """A Logic working through the shared local server (not stopped between tests)."""
    logic = SPASegmentationLogic()
    logic.connection, logic.backend = connection, connection.client
    yield logic
    logic.cancelSession()


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


def test_module_logic_workflow_through_the_local_server(logic, mrml_scene, ct_series, tmp_path):
    from SPASegmentationLib.scene.geometry import pixel_to_ras
    from SPASegmentationLib.scene.segments import ALGORITHM_NAME_TAG, ALGORITHM_TYPE_TAG, read_segment

    series, image = ct_series
    volume = volume_from_series(mrml_scene, image)
    assert logic.backendDescription().startswith("local server: cpu, model ")
    assert logic.connection.info["user"] == "alice"

    segmentation, segment_id = logic.addSegment(None, volume, "liver")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"
    prompt = logic.newPromptNode("point")
    centre = organ_centre_ras(volume, series)
    prompt.AddControlPoint(*centre)
    assert logic.newPromptNode("point") is not prompt  # the old prompt markup is replaced
    assert mrml_scene.GetNodeByID(prompt.GetID()) is None
    prompt = logic.newPromptNode("point")
    prompt.AddControlPoint(*centre)

    session, request = logic.prepareStart(
        volume, segmentation, segment_id, prompt, "axial", structure="liver", nSamples=SAMPLES
    )
    assert request.plane.orientation == "axial" and request.point is not None and request.box is None
    first = session.compute_start(request)  # the worker's call: the volume copy and HTTP only
    session.show(first)
    assert logic.currentRound() is first and not logic.canUndoRound()
    assert first.recommended.shape == (64, 64) and 1 <= first.n_candidates <= 4
    organ = session.plane.extract(series.hounsfield > 100)
    assert (first.recommended & organ).sum() > 0.5 * organ.sum()  # the mask covers the clicked organ

    # A click inside a candidate's overlay finds it; outside the volume finds nothing (no traceback).
    k = int(np.argmax([np.count_nonzero(d) for d in first.differences]))
    rows, cols = np.nonzero(first.differences[k])
    hit = logic.candidateAt("axial", pixel_to_ras(volume, session.plane, (cols[0], rows[0])))
    assert hit is not None and first.differences[hit][rows[0], cols[0]] != 0
    assert logic.candidateAt("sagittal", centre) is None
    assert logic.candidateAt("axial", (5000.0, 5000.0, centre[2])) is None
    second = session.choose(hit)
    assert second.index == 2 and logic.canUndoRound()
    assert logic.undoRound().index == 1

    # Accept: the segment gets the mask on that slice only, tagged; the server keeps alice's profile.
    assert logic.accept() is None
    stored = read_segment(segmentation, segment_id, volume)
    assert np.array_equal(session.plane.extract(stored), first.recommended) and stored.sum() == first.recommended.sum()
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    values = {key: segment_tag(segment, key) for key in (ALGORITHM_TYPE_TAG, ALGORITHM_NAME_TAG)}
    assert values[ALGORITHM_TYPE_TAG] == "SEMIAUTOMATIC" and values[ALGORITHM_NAME_TAG] == "SPA"
    assert [(p["structure"], p["n_sessions"]) for p in logic.profiles()] == [("liver", 1)]
    assert logic.currentRound() is None and logic.canUndoAccepted()

    # Slicer's segmentation undo takes the accepted slice back out, redo puts it back.
    assert logic.undoAccepted()
    assert not read_segment(segmentation, segment_id, volume).any()
    assert logic.segmentUndo(segmentation).redo()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), stored)

    # Propagation on the server, with progress, written as one undo step.
    calls = []
    options = SPASegmentationLogic.propagationOptions(3, 8)
    result = session.compute_propagate(progress=lambda done, total: calls.append((done, total)) is None, **options)
    assert calls and session.plane.index in result.masks and len(result.masks) > 1
    assert all(abs(index - session.plane.index) <= 3 for index in result.masks)
    session.apply_propagation(result)
    propagated = read_segment(segmentation, segment_id, volume)
    filled = sorted(int(k) for k in np.flatnonzero(propagated.any(axis=(1, 2))))
    assert filled == sorted(i for i, m in result.masks.items() if m.any())
    logic.undoAccepted()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), stored)
    logic.segmentUndo(segmentation).redo()

    # Profiles: export to a file, import under another structure name, delete.
    exported = logic.exportProfile("liver", tmp_path / "alice_liver.json")
    assert json.loads(exported.read_text())["n_sessions"] == 1
    assert logic.importProfile(exported, structure="spleen")["structure"] == "spleen"
    logic.deleteProfile("spleen")
    assert [p["structure"] for p in logic.profiles()] == ["liver"]

    # DICOM SEG against the source series: valid, and dcmqi reads the same voxels.
    files = logic.exportDicomSeg(segmentation, volume, tmp_path / "seg", referenceSeriesFolder=series.folder)
    seg_path = Path(files[0])
    assert dicom_checks.dciodvfy_errors(seg_path) == []
    dataset = pydicom.dcmread(seg_path)
    assert dataset.SegmentSequence[0].SegmentLabel == "liver"
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    segments = dicom_checks.dcmqi_segments(seg_path, tmp_path / "dcmqi")
    assert np.array_equal(dicom_checks.on_ct_grid(segments[0], image), read_segment(segmentation, segment_id, volume))

    logic.cancelSession()
    assert mrml_scene.GetFirstNodeByName("SPA preview") is None


def test_a_volume_from_the_dicom_database_exports_without_the_slicer_plugin(logic, mrml_scene, ct_series, tmp_path):
    """Slicer 5.8/5.10 without QuantitativeReporting: the series' files come from the DICOM database."""
    series, image = ct_series
    volume = volume_from_series(mrml_scene, image)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(series.sop_instance_uids))
    segmentation, segment_id = logic.addSegment(None, volume, "liver")
    prompt = logic.newPromptNode("point")
    prompt.AddControlPoint(*organ_centre_ras(volume, series))
    session, request = logic.prepareStart(volume, segmentation, segment_id, prompt, "axial", nSamples=SAMPLES)
    session.show(session.compute_start(request))
    logic.accept()
    # The database's own lookup (slicer.dicomDatabase.fileForInstance) answers from its file table.
    table = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: str(f) for f in series.files}
    files = logic.exportDicomSeg(segmentation, volume, tmp_path / "seg", fileForInstance=table.get)
    assert pydicom.dcmread(files[0]).ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    with pytest.raises(ValueError, match="no longer holds every file"):
        logic.exportDicomSeg(segmentation, volume, tmp_path / "seg2", fileForInstance=lambda uid: "")


def test_module_logic_refuses_what_it_cannot_do(logic, mrml_scene, ct_series, tmp_path):
    series, image = ct_series
    volume = volume_from_series(mrml_scene, image)
    segmentation, _ = logic.addSegment(None, volume, "liver")
    with pytest.raises(ValueError, match="Reference series"):
        logic.exportDicomSeg(segmentation, volume, tmp_path / "seg")
    with pytest.raises(ValueError, match="empty"):
        logic.exportDicomSeg(segmentation, volume, tmp_path / "seg", referenceSeriesFolder=series.folder)
    with pytest.raises(RuntimeError, match="connect to the SPA server"):
        SPASegmentationLogic().startSession(volume, segmentation, "x")
    with pytest.raises(ValueError, match="no round to accept"):
        logic.accept()
    with pytest.raises(ValueError, match="token"):
        SPASegmentationLogic.connect({"mode": REMOTE, "url": "https://spa.example.org", "token": ""})
    with pytest.raises(ValueError, match="must start with https://"):
        SPASegmentationLogic.connect({"mode": REMOTE, "url": "spa.example.org", "token": "x" * 20})


def test_the_minimum_slicer_version_is_stated() -> None:
    assert versionProblem((5, 8)) is None and versionProblem((5, 12)) is None
    assert "needs 3D Slicer 5.8 or newer" in versionProblem((5, 6))


def test_remote_mode_needs_no_torch_in_slicers_python(connection, tmp_path):
    """Slicer's Python with torch made unimportable: the Logic connects to the running server and segments."""
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
sys.path[:0] = [{str(ROOT / "Testing")!r}, {str(ROOT / "SPASegmentation")!r}]
import numpy as np
from mrml import add_volume, installed_scene, voxel_ras
from SPAModuleLib.logic import REMOTE, SPASegmentationLogic
with installed_scene() as scene:
    k, j, i = np.mgrid[0:6, 0:64, 0:64]
    values = np.where(((i - 32) / 14.0) ** 2 + ((j - 30) / 10.0) ** 2 <= 1.0, 200, 20).astype(np.int16)
    volume = add_volume(scene, values, name="CT")
    logic = SPASegmentationLogic()
    logic.useConnection(logic.connect({{"mode": REMOTE, "url": {connection.client.url!r},
                                        "token": {connection.service.token!r}, "user": "bob"}}))
    segmentation, segment_id = logic.addSegment(None, volume, "blob")
    prompt = logic.newPromptNode("box")
    session = logic.startSession(volume, segmentation, segment_id, structure="blob", nSamples=8)
    session.start("axial", box_ras=(voxel_ras(volume, (3, 16, 14)), voxel_ras(volume, (3, 44, 50))))
    logic.accept()
    print("profiles", [p["structure"] for p in logic.profiles()], "torch" in sys.modules and sys.modules["torch"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("profiles ['blob'] None")
