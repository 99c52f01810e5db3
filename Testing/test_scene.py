"""The scene package (SPASegmentationLib/scene/) against real MRML (slicer-core): slices as Slicer shows
them, commits, undo, preview, SceneSession."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")

from mrml import (  # noqa: E402
    LPS_DIRECTIONS,
    RAS_DIRECTIONS,
    SAGITTAL_DIRECTIONS,
    add_fiducial,
    add_roi,
    add_segment,
    add_segmentation,
    add_volume,
    app_logic_of,
    segment_array_via_export,
    segment_tag,
    voxel_ras,
)

from SPASegmentationLib.backend import InProcessBackend  # noqa: E402
from SPASegmentationLib.errors import InputError  # noqa: E402
from SPASegmentationLib.scene.geometry import (  # noqa: E402
    ORIENTATIONS,
    box_from_roi,
    ijk_to_ras_matrix,
    pixel_to_ras,
    plane_through,
    ras_to_pixel,
    volume_array,
)
from SPASegmentationLib.scene.overlay import (  # noqa: E402
    CANDIDATE_COLOURS,
    PREVIEW_OUTLINE_PX,
    RECOMMENDED_COLOUR,
    CandidateOverlay,
    removes_colour,
)
from SPASegmentationLib.scene.segments import (  # noqa: E402
    SegmentUndo,
    commit_mask,
    commit_volume_mask,
    read_segment,
    tag_spa_segment,
)
from SPASegmentationLib.scene.session import SceneSession  # noqa: E402
from SPASegmentationLib.session import Round  # noqa: E402

GEOMETRIES = {
    "ras": dict(directions=RAS_DIRECTIONS, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 5.0, 30.0)),
    "lps": dict(directions=LPS_DIRECTIONS, spacing=(0.7, 0.8, 2.5), origin=(120.0, 90.0, -40.0)),
    "sagittal": dict(directions=SAGITTAL_DIRECTIONS, spacing=(0.9, 1.1, 3.0), origin=(-60.0, 100.0, 80.0)),
}
SHAPE = (5, 7, 9)  # (k, j, i): all different so a wrong axis cannot pass
# Unit RAS direction of image +x (column) and +y (row) in each Slicer view (default slice presets).
SCREEN = {
    "axial": (np.array([-1.0, 0, 0]), np.array([0, -1.0, 0])),
    "coronal": (np.array([-1.0, 0, 0]), np.array([0, 0, -1.0])),
    "sagittal": (np.array([0, -1.0, 0]), np.array([0, 0, -1.0])),
}


def labelled_volume(scene, geometry: str):
    values = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)
    return add_volume(scene, values, name=geometry, **GEOMETRIES[geometry]), values


# ----- geometry ------------------------------------------------------------------------------------
def test_slice_presets_match_slicer(mrml_scene):
    """The screen directions assumed here are those of Slicer's own Red/Green/Yellow presets."""
    import slicer

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app_logic_of(mrml_scene))
    logic.SetMRMLScene(mrml_scene)
    node = logic.AddSliceNode("Red")
    for orientation, (right, down) in SCREEN.items():
        node.SetOrientation(orientation.capitalize())
        matrix = node.GetSliceToRAS()
        x_axis = np.array([matrix.GetElement(r, 0) for r in range(3)])
        y_axis = np.array([matrix.GetElement(r, 1) for r in range(3)])
        assert np.allclose(x_axis, right) and np.allclose(y_axis, -down), orientation


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_extracted_image_follows_the_screen(mrml_scene, geometry, orientation):
    volume, values = labelled_volume(mrml_scene, geometry)
    assert np.array_equal(volume_array(volume), values)
    centre = voxel_ras(volume, (2, 3, 4))
    plane = plane_through(volume, orientation, centre)
    image = plane.extract(values)
    right, down = SCREEN[orientation]
    for y, x in [(0, 0), (1, 2), (image.shape[0] - 1, image.shape[1] - 1)]:
        here = np.array(pixel_to_ras(volume, plane, (x, y)))
        step_x = np.array(pixel_to_ras(volume, plane, (x + 1, y))) - here
        step_y = np.array(pixel_to_ras(volume, plane, (x, y + 1))) - here
        assert np.allclose(step_x / np.linalg.norm(step_x), right)
        assert np.allclose(step_y / np.linalg.norm(step_y), down)
        # The pixel value is the voxel at that RAS position.
        kji = np.rint(np.linalg.solve(_ijk_to_ras(volume), [*here, 1.0])[:3][::-1]).astype(int)
        assert image[y, x] == values[tuple(kji)]
    # The slice really is the one through the centre voxel, and insert() inverts extract().
    kji_centre = (2, 3, 4)
    assert plane.index == kji_centre[plane.slice_axis]
    copy = np.zeros_like(values)
    plane.insert(copy, image)
    selector = [slice(None)] * 3
    selector[plane.slice_axis] = plane.index
    assert np.array_equal(copy[tuple(selector)], values[tuple(selector)])
    assert copy.sum() == values[tuple(selector)].sum()


def _ijk_to_ras(volume):
    return ijk_to_ras_matrix(volume)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_fiducial_at_voxel_centre_maps_to_its_pixel(mrml_scene, geometry, orientation):
    volume, values = labelled_volume(mrml_scene, geometry)
    for kji in [(1, 2, 3), (4, 6, 8), (0, 0, 0)]:
        fiducial = add_fiducial(mrml_scene, voxel_ras(volume, kji))
        ras = [0.0, 0.0, 0.0]
        fiducial.GetNthControlPointPositionWorld(0, ras)
        plane = plane_through(volume, orientation, ras)
        x, y = ras_to_pixel(volume, plane, ras)
        assert abs(x - round(x)) < 1e-9 and abs(y - round(y)) < 1e-9
        assert plane.extract(values)[int(round(y)), int(round(x))] == values[kji]
        assert np.allclose(pixel_to_ras(volume, plane, (x, y)), ras)


def test_ras_pixel_round_trip_is_exact(mrml_scene):
    volume, _ = labelled_volume(mrml_scene, "sagittal")
    rng = np.random.default_rng(0)
    plane = plane_through(volume, "coronal", voxel_ras(volume, (2, 3, 4)))
    for _ in range(20):
        xy = tuple(rng.uniform(-0.5, 6.5, 2))
        assert np.allclose(ras_to_pixel(volume, plane, pixel_to_ras(volume, plane, xy)), xy, atol=1e-9)


def test_parent_transform_is_applied(mrml_scene):
    volume, values = labelled_volume(mrml_scene, "lps")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    before = voxel_ras(volume, (1, 2, 3))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    moved = (before[0] + 25.0, before[1], before[2])
    plane = plane_through(volume, "axial", moved)
    x, y = ras_to_pixel(volume, plane, moved)
    assert plane.extract(values)[int(round(y)), int(round(x))] == values[1, 2, 3]


def test_outside_point_and_bad_orientation_are_input_errors(mrml_scene):
    volume, _ = labelled_volume(mrml_scene, "ras")
    with pytest.raises(InputError, match="outside"):
        plane_through(volume, "axial", (0.0, 0.0, 1000.0))
    with pytest.raises(InputError, match="orientation"):
        plane_through(volume, "oblique", (0.0, 0.0, 0.0))


@pytest.mark.parametrize("geometry", ["lps", "sagittal"])
def test_box_from_roi(mrml_scene, geometry):
    volume, _ = labelled_volume(mrml_scene, geometry)
    a, b = voxel_ras(volume, (1, 1, 2)), voxel_ras(volume, (3, 5, 6))
    centre = [(u + v) / 2 for u, v in zip(a, b, strict=True)]
    size = [abs(u - v) for u, v in zip(a, b, strict=True)]
    roi = add_roi(mrml_scene, centre, size)
    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    x0, y0, x1, y1 = box_from_roi(volume, plane, roi)
    corners = [ras_to_pixel(volume, plane, a), ras_to_pixel(volume, plane, b)]
    xs, ys = sorted(c[0] for c in corners), sorted(c[1] for c in corners)
    assert np.allclose([x0, x1], xs) and np.allclose([y0, y1], ys)
    # A huge ROI is clipped to the image.
    big = add_roi(mrml_scene, centre, [1000.0, 1000.0, 1000.0])
    rows, cols = plane.shape
    assert np.allclose(box_from_roi(volume, plane, big), (-0.5, -0.5, cols - 0.5, rows - 0.5))


# ----- commits and undo ----------------------------------------------------------------------------
def _two_segments(scene, geometry="lps"):
    volume, _ = labelled_volume(scene, geometry)
    seg = add_segmentation(scene, volume)
    first = np.zeros(SHAPE, dtype=bool)
    first[1:4, 2:6, 2:7] = True
    other = np.zeros(SHAPE, dtype=bool)
    other[2, 0:4, 0:5] = True  # overlaps `first` on slice 2
    first_id = add_segment(seg, "target", first, volume)
    other_id = add_segment(seg, "other", other, volume)
    return volume, seg, first_id, first, other_id, other


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_commit_mask_changes_only_that_slice_of_that_segment(mrml_scene, orientation):
    volume, seg, target, first, other_id, other = _two_segments(mrml_scene)
    plane = plane_through(volume, orientation, voxel_ras(volume, (2, 3, 4)))
    mask = np.zeros(plane.shape, dtype=bool)
    mask[0:2, 1:4] = True
    commit_mask(seg, target, volume, plane, mask)
    expected = first.copy()
    plane.insert(expected, mask)
    assert np.array_equal(read_segment(seg, target, volume), expected)
    assert np.array_equal(segment_array_via_export(mrml_scene, seg, target, volume), expected)
    assert np.array_equal(segment_array_via_export(mrml_scene, seg, other_id, volume), other)
    # The committed slice seen as Slicer shows it is exactly the mask.
    assert np.array_equal(plane.extract(read_segment(seg, target, volume)), mask)


def test_commit_into_empty_segment_and_wrong_inputs(mrml_scene):
    volume, _ = labelled_volume(mrml_scene, "sagittal")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # no reference geometry yet
    seg.CreateDefaultDisplayNodes()
    segment_id = add_segment(seg, "empty")
    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    mask = np.zeros(plane.shape, dtype=bool)
    mask[1, 2] = True
    commit_mask(seg, segment_id, volume, plane, mask)
    result = read_segment(seg, segment_id, volume)
    assert result.sum() == 1 and plane.extract(result)[1, 2]
    with pytest.raises(InputError, match="does not exist"):
        commit_mask(seg, "nope", volume, plane, mask)
    with pytest.raises(InputError, match="does not fit"):
        commit_mask(seg, segment_id, volume, plane, mask[:-1])


def test_commit_volume_mask_only_touched_planes(mrml_scene):
    volume, seg, target, first, other_id, other = _two_segments(mrml_scene)
    plane = plane_through(volume, "coronal", voxel_ras(volume, (2, 3, 4)))
    new = np.zeros(SHAPE, dtype=bool)
    new[:, :, :] = True  # everything, but only two planes may be written
    touched = [plane.at(1), plane.at(3)]
    commit_volume_mask(seg, target, volume, new, touched)
    expected = first.copy()
    for p in touched:
        p.insert(expected, np.ones(p.shape, dtype=bool))
    assert np.array_equal(read_segment(seg, target, volume), expected)
    assert np.array_equal(read_segment(seg, other_id, volume), other)
    commit_volume_mask(seg, target, volume, np.zeros(SHAPE, dtype=bool))
    assert not read_segment(seg, target, volume).any()


def test_tag_spa_segment(mrml_scene):
    import slicer

    volume, seg, target, *_ = _two_segments(mrml_scene)
    segment = seg.GetSegmentation().GetSegment(target)
    default = segment.GetTerminology()
    tag_spa_segment(seg, target, None)
    assert segment_tag(segment, "DICOM.SegmentAlgorithmType") == "SEMIAUTOMATIC"
    assert segment_tag(segment, "DICOM.SegmentAlgorithmName") == "SPA"
    assert segment.GetTerminology() == default  # no structure: the user's terminology stays
    tag_spa_segment(seg, target, "liver tumour")
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"
    assert entry.GetTypeObject().GetCodeMeaning() == "Neoplasm"
    assert entry.GetRegionObject().GetCodeValue() == "10200004"
    assert segment.GetTerminology().startswith(
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^"
    )
    tag_spa_segment(seg, target, "liver")
    assert "~SCT^10200004^Liver~" in segment.GetTerminology()


def test_segment_undo_redo(mrml_scene):
    volume, seg, target, first, other_id, other = _two_segments(mrml_scene)
    undo = SegmentUndo(seg)
    assert not undo.undo() and not undo.redo()
    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    undo.save()
    commit_mask(seg, target, volume, plane, np.ones(plane.shape, dtype=bool))
    changed = read_segment(seg, target, volume)
    assert not np.array_equal(changed, first)
    assert undo.undo()
    assert np.array_equal(read_segment(seg, target, volume), first)
    assert np.array_equal(read_segment(seg, other_id, volume), other)
    assert undo.redo()
    assert np.array_equal(read_segment(seg, target, volume), changed)
    assert not undo.redo()


# ----- the preview ---------------------------------------------------------------------------------
def synthetic_round(shape, rng) -> Round:
    recommended = np.zeros(shape, dtype=bool)
    recommended[1:5, 2:7] = True
    candidates = np.repeat(recommended[None], 3, axis=0)
    candidates[0, 1:3, 2:4] = False  # removes a corner
    candidates[1, 0:6, 1:8] = True  # adds a ring
    candidates[2, 5, 2:7] = True  # adds a row
    differences = candidates.astype(np.int8) - recommended.astype(np.int8)
    return Round(
        index=1,
        probability=recommended.astype(np.float32),
        recommended=recommended,
        uncertainty=np.zeros(shape, np.float32),
        candidates=candidates,
        differences=differences,
        candidate_shares=np.full(3, 1 / 3),
        mixture_weights=np.full(4, 0.25),
        seconds=0.0,
    )


def test_overlay_shows_exactly_the_round_and_leaves_user_segmentation_alone(mrml_scene):
    volume, seg, target, first, other_id, other = _two_segments(mrml_scene, "sagittal")
    overlay = CandidateOverlay(mrml_scene, volume)
    assert overlay.node is not seg and overlay.node.GetName() == "SPA preview"
    plane = plane_through(volume, "coronal", voxel_ras(volume, (2, 3, 4)))
    round_ = synthetic_round(plane.shape, np.random.default_rng(0))
    overlay.show(round_, plane)

    def on_slice(segment_id):
        voxels = read_segment(overlay.node, segment_id, volume)
        image = plane.extract(voxels)
        assert voxels.sum() == image.sum()  # nothing outside the shown slice
        return image

    assert np.array_equal(on_slice(overlay.RECOMMENDED_ID), round_.recommended)
    for k in range(4):
        adds, removes = on_slice(overlay.adds_id(k)), on_slice(overlay.removes_id(k))
        if k < 3:
            assert np.array_equal(adds, round_.differences[k] > 0)
            assert np.array_equal(removes, round_.differences[k] < 0)
        else:
            assert not adds.any() and not removes.any()
    segmentation = overlay.node.GetSegmentation()
    display = overlay.node.GetDisplayNode()
    for k, colour in enumerate(CANDIDATE_COLOURS):
        assert segmentation.GetSegment(overlay.adds_id(k)).GetName() == f"Candidate {k + 1} adds"
        assert np.allclose(segmentation.GetSegment(overlay.adds_id(k)).GetColor(), colour)
        assert np.allclose(segmentation.GetSegment(overlay.removes_id(k)).GetColor(), removes_colour(k))
        assert display.GetSegmentVisibility2DFill(overlay.adds_id(k))
        assert not display.GetSegmentVisibility2DFill(overlay.removes_id(k))
        assert display.GetSegmentVisibility2DOutline(overlay.removes_id(k))
    assert np.allclose(segmentation.GetSegment(overlay.RECOMMENDED_ID).GetColor(), RECOMMENDED_COLOUR)
    assert len(set(CANDIDATE_COLOURS + (RECOMMENDED_COLOUR,))) == 5
    # The user's segmentation is untouched.
    assert np.array_equal(read_segment(seg, target, volume), first)
    assert np.array_equal(read_segment(seg, other_id, volume), other)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2

    overlay.set_opacity(0.3)
    assert display.GetOpacity2DFill() == pytest.approx(0.3)
    with pytest.raises(InputError):
        overlay.set_opacity(1.5)

    overlay.clear()
    assert not read_segment(overlay.node, overlay.adds_id(1), volume).any()
    assert overlay.candidate_at(plane, (1, 0)) is None
    node_id = overlay.node.GetID()
    overlay.remove()
    assert mrml_scene.GetNodeByID(node_id) is None


def test_candidate_at_prefers_the_smallest_region(mrml_scene):
    volume, _ = labelled_volume(mrml_scene, "lps")
    overlay = CandidateOverlay(mrml_scene, volume)
    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    round_ = synthetic_round(plane.shape, np.random.default_rng(0))
    overlay.show(round_, plane)
    assert overlay.candidate_at(plane, (2, 1)) == 0  # the removed corner
    assert overlay.candidate_at(plane, (1, 0)) == 1  # only candidate 1 adds the ring
    assert overlay.candidate_at(plane, (3, 5)) == 2  # the row: candidates 1 and 2 add it, 2 is smaller
    assert overlay.candidate_at(plane, (4, 3)) is None  # inside the recommendation, no change
    assert overlay.candidate_at(plane, (100, 100)) is None
    assert overlay.candidate_at(plane.at(0), (1, 0)) is None  # another slice shows nothing


def test_slice_views_draw_smaller_regions_over_larger_ones(mrml_scene):
    """Nested regions stay visible: larger ones are drawn first, the recommended outline last."""
    volume, _ = labelled_volume(mrml_scene, "lps")
    overlay = CandidateOverlay(mrml_scene, volume)
    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    round_ = synthetic_round(plane.shape, np.random.default_rng(0))
    segmentation = overlay.node.GetSegmentation()

    def drawing_order():
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    overlay.show(round_, plane)
    order = drawing_order()
    assert order[-1] == overlay.RECOMMENDED_ID
    # candidate 2 (k=1) adds a ring larger than candidate 3's row (k=2), which is larger than candidate 1's corner
    assert order.index(overlay.adds_id(1)) < order.index(overlay.adds_id(2)) < order.index(overlay.removes_id(0))
    # A round where the sizes change re-stacks the same segments.
    grown = synthetic_round(plane.shape, None)
    grown.differences[2, :, :] = 1
    overlay.show(grown, plane)
    order = drawing_order()
    assert order.index(overlay.adds_id(2)) < order.index(overlay.adds_id(1)) and order[-1] == overlay.RECOMMENDED_ID
    assert sorted(order) == sorted(drawing_order()) and len(order) == 9
    assert overlay.node.GetDisplayNode().GetSliceIntersectionThickness() == PREVIEW_OUTLINE_PX


# ----- SceneSession with the real model ------------------------------------------------------------
def ellipsoid_volume(scene, shape=(6, 96, 96)):
    """A CT-like volume (LPS geometry) with a bright ellipsoid in the middle."""
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    inside = ((k - 2.5) / 3.2) ** 2 + ((j - 48) / 22) ** 2 + ((i - 44) / 26) ** 2 < 1
    values = (40 + 120 * inside + rng.normal(0, 6, shape)).astype(np.int16)
    volume = add_volume(
        scene, values, spacing=(0.8, 0.8, 2.0), origin=(40.0, 30.0, -10.0), directions=LPS_DIRECTIONS, name="ellipsoid"
    )
    return volume, values, inside


@pytest.fixture
def scene_setup(mrml_scene, untrained_model, tmp_path):
    from SPASegmentationLib.profiles import ProfileStore

    volume, values, inside = ellipsoid_volume(mrml_scene)
    seg = add_segmentation(mrml_scene, volume)
    kept = np.zeros(values.shape, dtype=bool)
    kept[0, 10:20, 10:20] = True  # a slice the session never touches
    target = add_segment(seg, "target", kept, volume)
    other = np.zeros(values.shape, dtype=bool)
    other[3, 40:60, 30:50] = True
    other_id = add_segment(seg, "other", other, volume)
    store = ProfileStore(tmp_path / "profiles", model_fingerprint=untrained_model.fingerprint())
    return dict(
        scene=mrml_scene,
        model=untrained_model,
        volume=volume,
        values=values,
        inside=inside,
        seg=seg,
        target=target,
        kept=kept,
        other_id=other_id,
        other=other,
        store=store,
    )


def BOX_RAS(volume):
    """Two RAS corners of a box around the ellipsoid on slice 3 (the untrained model needs a box)."""
    return voxel_ras(volume, (3, 24, 16)), voxel_ras(volume, (3, 72, 72))


def make_session(s, user="alice", structure="liver", embeddings=None, **kwargs):
    """A SceneSession on the in-process backend (the service's own backend; test_module_logic drives spa serve)."""
    backend = InProcessBackend(s["model"], s["store"], user=user, embeddings=embeddings)
    options = dict(structure=structure, n_samples=8, seed=3)
    options.update(kwargs)
    return SceneSession(s["scene"], backend, s["volume"], s["seg"], s["target"], **options)


def preview_slice(session, segment_id):
    return session.plane.extract(read_segment(session.overlay.node, segment_id, session.volume_node))


def test_scene_session_rounds_accept_and_undo(scene_setup):
    s = scene_setup
    session = make_session(s)
    centre = voxel_ras(s["volume"], (3, 48, 44))
    round1 = session.start("axial", point_ras=centre, box_ras=BOX_RAS(s["volume"]))
    assert session.plane.orientation == "axial" and session.plane.index == 3
    assert np.array_equal(session.session.session.image, session.plane.extract(s["values"]))
    assert session.session.state["start"]["point"] == list(ras_to_pixel(s["volume"], session.plane, centre))
    assert len(set(session.session.state["initial_weights"])) == 1  # no profile yet: uniform
    assert np.array_equal(preview_slice(session, CandidateOverlay.RECOMMENDED_ID), round1.recommended)
    assert round1.recommended.any()
    # Choosing, then undoing a round, shows round 1 again.
    round2 = session.choose(round1.n_candidates - 1)
    assert round2.index == 2
    assert np.array_equal(preview_slice(session, CandidateOverlay.RECOMMENDED_ID), round2.recommended)
    back = session.undo_round()
    assert back.index == 1 and np.array_equal(back.recommended, round1.recommended)
    assert np.array_equal(preview_slice(session, CandidateOverlay.RECOMMENDED_ID), round1.recommended)
    assert session.undo_round() is None
    # Nothing has reached the user's segmentation yet.
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), s["kept"])

    mixture = session.session.session.mixture
    session.accept()
    expected = s["kept"].copy()
    session.plane.insert(expected, round1.recommended)
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), expected)
    assert np.array_equal(read_segment(s["seg"], s["other_id"], s["volume"]), s["other"])
    segment = s["seg"].GetSegmentation().GetSegment(s["target"])
    assert segment_tag(segment, "DICOM.SegmentAlgorithmName") == "SPA"
    assert "^Liver~" in segment.GetTerminology()
    assert not read_segment(session.overlay.node, CandidateOverlay.RECOMMENDED_ID, s["volume"]).any()
    profile = s["store"].load("alice", "liver")
    assert profile.n_sessions == 1 and profile.history[-1]["rounds"] == 1
    assert np.allclose(profile.weights, mixture.weights.numpy() / mixture.weights.numpy().sum(), atol=1e-6)
    # The commit is one undo step of Slicer's segmentation history.
    assert session.undo.undo()
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), s["kept"])
    assert session.undo.redo()
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), expected)

    # The next session of the same user and structure starts from the profile.
    later = make_session(s)
    later.compute_start(later.prepare_start("coronal", point_ras=centre))
    assert np.allclose(later.session.session.initial_weights.numpy(), profile.weights, atol=1e-6)
    later.close()
    session.close()


def test_scene_session_accepts_a_candidate_as_shown(scene_setup):
    s = scene_setup
    session = make_session(s)
    round1 = session.start("axial", point_ras=voxel_ras(s["volume"], (3, 48, 44)), box_ras=BOX_RAS(s["volume"]))
    k = round1.n_candidates - 1
    session.accept(k)
    expected = s["kept"].copy()
    session.plane.insert(expected, round1.candidates[k])
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), expected)
    assert np.array_equal(session.accepted_mask, round1.candidates[k])


def test_scene_session_cancel_and_roi_start(scene_setup):
    s = scene_setup
    from SPASegmentationLib.embeddings import EmbeddingCache

    lookup = EmbeddingCache(s["model"])
    session = make_session(s, user=None, structure=None, embeddings=lookup)
    before_ids = s["seg"].GetSegmentation().GetNumberOfSegments()
    a, b = voxel_ras(s["volume"], (2, 26, 18)), voxel_ras(s["volume"], (2, 70, 70))
    roi = add_roi(
        s["scene"],
        [(u + v) / 2 for u, v in zip(a, b, strict=True)],
        [abs(u - v) + 0.1 for u, v in zip(a, b, strict=True)],
    )
    round_ = session.start("axial", roi_node=roi)
    assert session.plane.index == 2
    x0, y0, x1, y1 = session.session.state["start"]["box"]
    assert x0 < x1 and y0 < y1
    with pytest.raises(InputError):
        session.start("axial")
    session.cancel()
    assert session.session is None
    assert not read_segment(session.overlay.node, CandidateOverlay.RECOMMENDED_ID, s["volume"]).any()
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), s["kept"])
    assert s["seg"].GetSegmentation().GetNumberOfSegments() == before_ids
    with pytest.raises(InputError, match="no SPA segmentation"):
        session.accept()
    assert round_.recommended.shape == session.plane.shape
    # The same slice again reuses the cached embedding and gives the same round.
    again = session.start("axial", roi_node=roi)
    assert len(lookup) == 1 and np.array_equal(again.probability, round_.probability)


def test_scene_session_propagation(scene_setup):
    s = scene_setup
    session = make_session(s, user=None, structure=None)
    with pytest.raises(InputError, match="accept"):
        session.compute_propagate()
    session.start("axial", point_ras=voxel_ras(s["volume"], (3, 48, 44)), box_ras=BOX_RAS(s["volume"]))
    session.accept()
    assert session.accepted_mask.any()
    after_accept = read_segment(s["seg"], s["target"], s["volume"])
    calls = []
    result = session.compute_propagate(progress=lambda done, total: calls.append((done, total)) or True, max_slices=1)
    assert calls and set(result.masks) == {2, 3, 4}  # one slice each way (max_slices=1)
    assert result.stopped == {"forward": "max slices", "backward": "max slices"}
    assert 3 in result.masks and np.array_equal(result.masks[3], session.accepted_mask)
    session.apply_propagation(result)
    written = read_segment(s["seg"], s["target"], s["volume"])
    expected = after_accept.copy()
    for index, mask in result.masks.items():
        session.plane.at(index).insert(expected, mask)
    assert np.array_equal(written, expected)
    assert np.array_equal(read_segment(s["seg"], s["other_id"], s["volume"]), s["other"])
    assert session.undo.undo()
    assert np.array_equal(read_segment(s["seg"], s["target"], s["volume"]), after_accept)
    session.close()


def test_segment_undo_through_segment_editor_logic(mrml_scene):
    """SPA's commits can share the Segment Editor's undo stack (one undo button for both)."""
    import slicer

    volume, seg, target, first, other_id, other = _two_segments(mrml_scene)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(mrml_scene)
    editor.SetSegmentEditorNode(mrml_scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(seg)
    editor.SetSourceVolumeNode(volume)
    undo = SegmentUndo(seg, editor_logic=editor)
    assert not undo.can_undo
    plane = plane_through(volume, "sagittal", voxel_ras(volume, (2, 3, 4)))
    undo.save()
    commit_mask(seg, target, volume, plane, np.zeros(plane.shape, dtype=bool))
    changed = read_segment(seg, target, volume)
    assert not np.array_equal(changed, first) and editor.CanUndo()
    assert undo.undo() and np.array_equal(read_segment(seg, target, volume), first)
    assert undo.redo() and np.array_equal(read_segment(seg, target, volume), changed)


@pytest.mark.parametrize("geometry", ["lps", "sagittal"])
def test_extracted_image_is_what_slicer_renders(mrml_scene, geometry):
    """Independent check: Slicer's own slice view (rendered off-screen) shows plane.extract()'s image."""
    from mrml import add_colour_tables
    from slice_view import OffscreenSliceView

    add_colour_tables(mrml_scene)
    rng = np.random.default_rng(1)
    values = rng.choice(np.array([100, 400, 700, 1000], dtype=np.int16), size=(6, 8, 10))
    volume = add_volume(mrml_scene, values, directions=GEOMETRIES[geometry]["directions"], spacing=(1.0, 1.0, 1.0))
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(0)
    display.SetWindowLevel(1400, 700)
    display.SetInterpolate(0)
    view = OffscreenSliceView(mrml_scene, app_logic_of(mrml_scene), size=(240, 240))
    try:
        for orientation in ORIENTATIONS:
            ras = voxel_ras(volume, (2, 5, 3))
            view.show_volume(volume, orientation)
            view.jump_to(ras)
            grey = view.render()[..., 0].astype(float)
            if not grey.any():
                pytest.skip("off-screen rendering is not available on this machine")
            plane = plane_through(volume, orientation, ras)
            image = plane.extract(values)
            rows, cols = np.nonzero(grey > 0)
            top, left = rows.min(), cols.min()
            height, width = rows.max() - top + 1, cols.max() - left + 1
            ys = (top + (np.arange(image.shape[0]) + 0.5) * height / image.shape[0]).astype(int)
            xs = (left + (np.arange(image.shape[1]) + 0.5) * width / image.shape[1]).astype(int)
            sampled = grey[np.ix_(ys, xs)]
            assert np.abs(sampled - image / 1400.0 * 255.0).max() <= 2.0, orientation
    finally:
        view.close()


def test_preview_is_drawn_in_slicer_slice_view(mrml_scene):
    """The preview node shows in a real slice view with its colours, and clear() removes it from the view."""
    from mrml import add_colour_tables
    from slice_view import OffscreenSliceView

    add_colour_tables(mrml_scene)
    volume = add_volume(mrml_scene, np.full((6, 8, 10), 100, dtype=np.int16), directions=LPS_DIRECTIONS)
    volume.GetDisplayNode().SetAutoWindowLevel(0)
    volume.GetDisplayNode().SetWindowLevel(1400, 700)
    view = OffscreenSliceView(mrml_scene, app_logic_of(mrml_scene), size=(240, 240))
    try:
        ras = voxel_ras(volume, (2, 5, 3))
        view.show_volume(volume, "axial")
        view.jump_to(ras)
        before = view.render()
        if not before.any():
            pytest.skip("off-screen rendering is not available on this machine")
        overlay = CandidateOverlay(mrml_scene, volume)
        plane = plane_through(volume, "axial", ras)
        overlay.show(synthetic_round(plane.shape, None), plane)
        shown = view.render()
        colours = {tuple(c) for c in shown.reshape(-1, 3).tolist()}
        for expected in (RECOMMENDED_COLOUR, CANDIDATE_COLOURS[1], CANDIDATE_COLOURS[2], removes_colour(0)):
            rgb = tuple(int(round(255 * c)) for c in expected)
            assert any(max(abs(a - b) for a, b in zip(rgb, c, strict=True)) <= 2 for c in colours), expected
        # Showing a round where candidate 2 changes nothing must erase its old drawing.
        smaller = synthetic_round(plane.shape, None)
        smaller.differences[2] = 0
        overlay.show(smaller, plane)
        replaced = view.render()
        fresh = CandidateOverlay(mrml_scene, volume, name="fresh")
        overlay.node.GetDisplayNode().SetVisibility(False)
        fresh.show(smaller, plane)
        assert np.array_equal(replaced, view.render())
        fresh.remove()
        overlay.node.GetDisplayNode().SetVisibility(True)
        overlay.clear()
        assert np.array_equal(view.render(), before)
    finally:
        view.close()


def test_scene_session_candidate_at_ras(mrml_scene):
    """A click (RAS) on the shown slice finds the candidate drawn there; other slices find none."""
    volume, _ = labelled_volume(mrml_scene, "sagittal")
    seg = add_segmentation(mrml_scene, volume)
    target = add_segment(seg, "target")
    session = SceneSession(mrml_scene, None, volume, seg, target)  # no model call in this test
    assert session.candidate_at_ras(voxel_ras(volume, (2, 3, 4))) is None
    session.plane = plane_through(volume, "coronal", voxel_ras(volume, (2, 3, 4)))
    round_ = synthetic_round(session.plane.shape, None)
    session.show(round_)
    for (x, y), expected in [((2, 1), 0), ((1, 0), 1), ((3, 5), 2), ((4, 3), None)]:
        ras = pixel_to_ras(volume, session.plane, (x, y))
        assert session.candidate_at_ras(ras) == expected
        assert session.candidate_at_ras(pixel_to_ras(volume, session.plane.at(0), (x, y))) is None
    session.close()
    assert mrml_scene.GetFirstNodeByName("SPA preview") is None


# ----- Slicer 5.8 and 5.10+ terminology --------------------------------------------------------------
def parses_like_slicer_58(serialized: str) -> bool:
    """The checks Slicer 5.8.1's vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry makes: seven
    "~" fields, a context name, a non-empty category and a type that are "scheme^value^meaning" triples."""
    fields = serialized.split("~")
    if len(fields) != 7 or not fields[0] or fields[1] == "^^":
        return False
    return all(len(fields[i].split("^")) == 3 for i in (1, 2, 3, 5, 6))


def test_terminology_with_slicer_510_api(mrml_scene):
    """Slicer 5.10+ (slicer-core here): vtkSegment.SetTerminology/HasTerminology and the Region* entry names."""
    import slicer

    from SPASegmentationLib.scene.segments import (
        REGION_CONTEXT,
        segment_has_terminology,
        set_entry_region,
        set_segment_terminology,
        terminology_string,
    )

    volume, seg, target, *_ = _two_segments(mrml_scene)
    segment = seg.GetSegmentation().GetSegment(target)
    assert hasattr(segment, "SetTerminology") and hasattr(slicer.vtkSlicerTerminologyEntry(), "GetRegionObject")
    serialized = terminology_string("liver tumour")
    assert parses_like_slicer_58(serialized)
    set_segment_terminology(segment, serialized)
    assert segment.GetTerminology() == serialized and segment_has_terminology(segment)
    set_segment_terminology(segment, "")
    assert not segment_has_terminology(segment)
    entry = slicer.vtkSlicerTerminologyEntry()
    set_entry_region(entry, REGION_CONTEXT, None)
    assert entry.GetRegionContextName() == REGION_CONTEXT


def test_terminology_with_slicer_58_api(mrml_scene):
    """The Slicer 5.8 branch (the "TerminologyEntry" tag, Anatomic* entry names), called directly on real objects
    (slicer-core still has the 5.8 names, deprecated): it writes the same string, in the format 5.8 parses."""
    import slicer
    import vtk

    from SPASegmentationLib.io.terminology import terminology_for
    from SPASegmentationLib.scene.segments import (
        REGION_CONTEXT,
        TERMINOLOGY_CONTEXT,
        segment_has_terminology,
        segment_has_terminology_tag,
        set_entry_region_anatomic,
        set_segment_terminology_tag,
        terminology_string,
    )

    terms = terminology_for("liver tumour")
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    for target, code in ((entry.GetCategoryObject(), terms.category), (entry.GetTypeObject(), terms.type)):
        target.SetCodingSchemeDesignator(code.scheme_designator)
        target.SetCodeValue(code.value)
        target.SetCodeMeaning(code.meaning)
    set_entry_region_anatomic(entry, REGION_CONTEXT, terms.region)
    serialized = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)
    assert serialized == terminology_string("liver tumour")

    volume, seg, target, *_ = _two_segments(mrml_scene)
    segment = seg.GetSegmentation().GetSegment(target)
    set_segment_terminology_tag(segment, serialized)
    tag = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", tag) and str(tag) == serialized
    assert parses_like_slicer_58(str(tag))
    assert str(tag) == (
        f"{TERMINOLOGY_CONTEXT}~SCT^49755003^Morphologically Abnormal Structure~SCT^108369006^Neoplasm~^^~"
        f"{REGION_CONTEXT}~SCT^10200004^Liver~^^"
    )
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(str(tag), parsed)
    assert parsed.GetRegionObject().GetCodeMeaning() == "Liver"
    assert segment_has_terminology_tag(segment) and segment_has_terminology(segment)
    set_segment_terminology_tag(segment, "")
    assert not segment_has_terminology_tag(segment) and not segment_has_terminology(segment)


# ----- labelmaps as Slicer's DICOM SEG export reads them ---------------------------------------------
def stored_labelmap_on_volume_grid(segmentation_node, segment_id, shape):
    """A segment's own stored labelmap (what QuantitativeReporting's isSegmentEmpty reads, by the array name
    "ImageScalars"), placed on the volume's grid; its geometry must be the volume's (no transforms)."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    array = image.GetPointData().GetArray("ImageScalars")
    assert array is not None, "no point-data array named ImageScalars: DICOM SEG export takes the segment for empty"
    extent = image.GetExtent()
    dims = image.GetDimensions()
    values = vtk_to_numpy(array).reshape(dims[2], dims[1], dims[0]) == segment.GetLabelValue()
    out = np.zeros(shape, dtype=bool)
    out[extent[4] : extent[5] + 1, extent[2] : extent[3] + 1, extent[0] : extent[1] + 1] = values
    return out


def test_committed_labelmaps_have_image_scalars(mrml_scene):
    volume, _ = labelled_volume(mrml_scene, "lps")
    seg = add_segmentation(mrml_scene, volume)
    first, second, third = add_segment(seg, "first"), add_segment(seg, "second"), add_segment(seg, "third")
    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    mask = np.zeros(plane.shape, dtype=bool)
    mask[1:4, 2:6] = True
    commit_mask(seg, first, volume, plane, mask)
    commit_mask(seg, second, volume, plane, mask)  # overlaps the first: Slicer moves it to its own layer
    expected = np.zeros(SHAPE, dtype=bool)
    plane.insert(expected, mask)
    assert np.array_equal(stored_labelmap_on_volume_grid(seg, first, SHAPE), expected)
    assert np.array_equal(stored_labelmap_on_volume_grid(seg, second, SHAPE), expected)
    volume_mask = np.zeros(SHAPE, dtype=bool)
    volume_mask[0:2, 3:5, 1:8] = True
    commit_volume_mask(seg, third, volume, volume_mask)
    assert np.array_equal(stored_labelmap_on_volume_grid(seg, third, SHAPE), volume_mask)
    # The preview's labelmaps are built the same way.
    overlay = CandidateOverlay(mrml_scene, volume)
    round_ = synthetic_round(plane.shape, None)
    overlay.show(round_, plane)
    recommended = np.zeros(SHAPE, dtype=bool)
    plane.insert(recommended, round_.recommended)
    assert np.array_equal(stored_labelmap_on_volume_grid(overlay.node, overlay.RECOMMENDED_ID, SHAPE), recommended)


# ----- a volume under a linear transform ---------------------------------------------------------------
def segment_voxels_in_volume(segmentation_node, segment_id, volume):
    """The (k, j, i) volume voxels a segment covers in world space: its stored labelmap's voxel centres taken
    through the segmentation's own parent transform to world, then into the volume's IJK (they must land on
    voxel centres)."""
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    extent, dims = image.GetExtent(), image.GetDimensions()
    if extent[1] < extent[0]:
        return set()
    values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    k, j, i = np.nonzero(values)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    image_to_node = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_node)
    node_to_world = np.eye(4)
    if segmentation_node.GetParentTransformNode() is not None:
        matrix = vtk.vtkMatrix4x4()
        segmentation_node.GetParentTransformNode().GetMatrixTransformToWorld(matrix)
        node_to_world = _as_array(matrix)
    world = node_to_world @ _as_array(image_to_node) @ ijk
    volume_ijk = np.linalg.solve(ijk_to_ras_matrix(volume), world)[:3]
    assert np.allclose(volume_ijk, np.rint(volume_ijk), atol=1e-6), "segment voxels are off the volume's voxel centres"
    return {(int(c), int(b), int(a)) for a, b, c in np.rint(volume_ijk).T}


def _as_array(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def rigid_transform(scene, degrees_z, degrees_x, shift):
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(*shift)
    transform.RotateZ(degrees_z)
    transform.RotateX(degrees_x)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def mask_voxels(plane, mask):
    """The (k, j, i) voxels of a slice mask."""
    ys, xs = np.nonzero(mask)
    return {tuple(int(round(v)) for v in plane.array_index_of((x, y))) for x, y in zip(xs, ys, strict=True)}


@pytest.mark.parametrize("segmentation_transform", ["none", "same", "other"])
def test_transformed_volume_click_preview_and_commit(mrml_scene, segmentation_transform):
    """A volume under a rotation + translation: a world click lands on its voxel, the preview sits under the
    volume's transform and shows the round where the volume is, and a commit lies at the right world place
    whatever transform the segmentation is under."""
    volume, values = labelled_volume(mrml_scene, "lps")
    moved = rigid_transform(mrml_scene, 20.0, 10.0, (12.0, -7.0, 30.0))
    volume.SetAndObserveTransformNodeID(moved.GetID())
    seg = add_segmentation(mrml_scene)
    if segmentation_transform == "same":
        seg.SetAndObserveTransformNodeID(moved.GetID())
    elif segmentation_transform == "other":
        seg.SetAndObserveTransformNodeID(rigid_transform(mrml_scene, -15.0, 5.0, (-3.0, 8.0, 2.0)).GetID())
    target = add_segment(seg, "target")

    # A click at the world position of a voxel centre picks that voxel.
    kji = (2, 3, 4)
    world = ijk_to_ras_matrix(volume) @ np.array([kji[2], kji[1], kji[0], 1.0])
    local = voxel_ras(volume, kji)
    assert not np.allclose(world[:3], local, atol=1.0)
    plane = plane_through(volume, "axial", world[:3])
    assert plane.index == kji[plane.slice_axis]
    x, y = ras_to_pixel(volume, plane, world[:3])
    assert np.allclose((x, y), plane.pixel_of(kji), atol=1e-9)
    assert plane.extract(values)[int(round(y)), int(round(x))] == values[kji]
    # A ROI drawn in world space around two voxels covers both on the slice.
    corners = [ijk_to_ras_matrix(volume) @ np.array([i, j, 2, 1.0]) for i, j in ((2, 1), (6, 5))]
    roi = add_roi(mrml_scene, (corners[0][:3] + corners[1][:3]) / 2, np.abs(corners[0][:3] - corners[1][:3]))
    x0, y0, x1, y1 = box_from_roi(volume, plane, roi)
    for corner in corners:
        cx, cy = ras_to_pixel(volume, plane, corner[:3])
        assert x0 - 1e-6 <= cx <= x1 + 1e-6 and y0 - 1e-6 <= cy <= y1 + 1e-6

    # The preview is under the volume's transform and shows the round on the volume's voxels.
    overlay = CandidateOverlay(mrml_scene, volume)
    assert overlay.node.GetTransformNodeID() == moved.GetID()
    round_ = synthetic_round(plane.shape, None)
    overlay.show(round_, plane)
    shown = segment_voxels_in_volume(overlay.node, overlay.RECOMMENDED_ID, volume)
    assert shown == mask_voxels(plane, round_.recommended)

    # A committed mask lies on those voxels in world space.
    commit_mask(seg, target, volume, plane, round_.recommended)
    assert segment_voxels_in_volume(seg, target, volume) == mask_voxels(plane, round_.recommended)
    assert np.array_equal(plane.extract(read_segment(seg, target, volume)), round_.recommended)


def test_preview_follows_a_volume_moved_under_a_transform(mrml_scene):
    volume, _ = labelled_volume(mrml_scene, "ras")
    overlay = CandidateOverlay(mrml_scene, volume)
    assert overlay.node.GetTransformNodeID() is None
    moved = rigid_transform(mrml_scene, 0.0, 0.0, (5.0, 0.0, 0.0))
    volume.SetAndObserveTransformNodeID(moved.GetID())
    plane = plane_through(volume, "axial", ijk_to_ras_matrix(volume)[:3, 3])
    round_ = synthetic_round(plane.shape, None)
    overlay.show(round_, plane)
    assert overlay.node.GetTransformNodeID() == moved.GetID()
    assert segment_voxels_in_volume(overlay.node, overlay.RECOMMENDED_ID, volume) == mask_voxels(
        plane, round_.recommended
    )


# ----- segments reaching beyond the volume -----------------------------------------------------------
def test_segment_partly_outside_the_volume(mrml_scene):
    """A segment painted beyond the volume's grid reads as its part inside; commits keep the part outside."""
    import slicer
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    volume, _ = labelled_volume(mrml_scene, "sagittal")
    seg = add_segmentation(mrml_scene, volume)
    target = add_segment(seg, "target")
    extent = (-3, 4, 2, 9, 1, 2)  # i from -3, j up to 9: beyond the volume's 0..8 and 0..6
    painted = np.ones((2, 8, 8), dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    image.GetPointData().SetScalars(numpy_to_vtk(painted.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, seg, target, logic.MODE_REPLACE)
    everywhere = {(k, j, i) for k in (1, 2) for j in range(2, 10) for i in range(-3, 5)}
    assert segment_voxels_in_volume(seg, target, volume) == everywhere

    inside = np.zeros(SHAPE, dtype=bool)
    inside[1:3, 2:7, 0:5] = True
    assert np.array_equal(read_segment(seg, target, volume), inside)

    plane = plane_through(volume, "axial", voxel_ras(volume, (2, 3, 4)))
    mask = np.zeros(plane.shape, dtype=bool)
    commit_mask(seg, target, volume, plane, mask)  # erase one slice inside the volume
    erased = plane.extract(np.ones(SHAPE, dtype=bool))
    plane.insert(inside, mask)
    erased_voxels = mask_voxels(plane, erased)
    assert np.array_equal(read_segment(seg, target, volume), inside)
    assert segment_voxels_in_volume(seg, target, volume) == everywhere - erased_voxels

    commit_volume_mask(seg, target, volume, np.zeros(SHAPE, dtype=bool))
    assert not read_segment(seg, target, volume).any()
    outside = {v for v in everywhere if not all(0 <= c < n for c, n in zip(v, SHAPE, strict=True))}
    assert segment_voxels_in_volume(seg, target, volume) == outside
