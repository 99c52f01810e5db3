"""Render SPA's candidate preview in a real Slicer slice view and save the extension screenshot.

    .venv/bin/python Testing/make_screenshot.py [--model WEIGHTS] [--out Resources/Screenshots/candidates.png]

What it shows is what the module shows: the bundled CT sample as an axial volume, a SPA session
started by one click on the structure (shipped model, seed 0), and its first round drawn by
Slicer's own segmentation displayable manager in an off-screen Red view (headless slicer-core). The panel beside
the view is the module's legend; nothing in the view is painted by this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

TESTING = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTING))

from mrml import (  # noqa: E402
    LPS_DIRECTIONS,
    add_colour_tables,
    add_segment,
    add_segmentation,
    add_volume,
    app_logic_of,
    new_scene,
    voxel_ras,
)
from slice_view import OffscreenSliceView  # noqa: E402

from SPASegmentationLib.backend import InProcessBackend  # noqa: E402
from SPASegmentationLib.data.folder import MultiRaterFolder  # noqa: E402
from SPASegmentationLib.io.atomic import write_bytes_atomic  # noqa: E402
from SPASegmentationLib.metrics import dice  # noqa: E402
from SPASegmentationLib.resources import resources_dir, sample_case_dir  # noqa: E402
from SPASegmentationLib.rounds import DEFAULT_SAMPLES  # noqa: E402
from SPASegmentationLib.scene.overlay import CANDIDATE_COLOURS, RECOMMENDED_COLOUR, removes_colour  # noqa: E402
from SPASegmentationLib.scene.session import SceneSession  # noqa: E402
from SPASegmentationLib.simulation.choices import nearest_candidate  # noqa: E402
from SPASegmentationLib.simulation.prompts import initial_point  # noqa: E402

CT_WINDOW = (250.0, 60.0)  # width, level in HU: soft tissue around the sample's structure
VIEW_SIZE = (640, 640)


def render_round_in_slice_view(model, rater: str | None = None, seed: int = 0, samples: int = DEFAULT_SAMPLES):
    """Start a session by one click on the sample in a headless scene; the Red view as RGB and the round shown."""
    sample = sample_case_dir()
    case = MultiRaterFolder(sample.parent).load(sample.name)
    rater = rater or max(sorted(case.raters), key=lambda name: int(case.raters[name].sum()))
    target = case.raters[rater]
    scene = new_scene()
    add_colour_tables(scene)
    import SimpleITK as sitk

    spacing = float(sitk.ReadImage(str(case.image_path)).GetSpacing()[0])
    # LPS directions: image columns run to patient left and rows to posterior, so the Red view shows
    # the array as it is stored (columns left→right on screen, rows top→bottom).
    volume = add_volume(
        scene,
        np.asarray(case.image)[None],
        spacing=(spacing, spacing, 2.5),
        directions=LPS_DIRECTIONS,
        name="CT sample",
    )
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(0)
    display.SetWindowLevel(*CT_WINDOW)
    segmentation = add_segmentation(scene, volume, name="Segmentation")
    segment_id = add_segment(segmentation, "lesion")
    session = SceneSession(
        scene, InProcessBackend(model), volume, segmentation, segment_id, seed=seed, n_samples=samples
    )
    x, y = initial_point(case.raters, target)
    click = voxel_ras(volume, (0, y, x))
    shown = session.start("axial", point_ras=click)
    chosen = nearest_candidate(shown.candidates, target)

    view = OffscreenSliceView(scene, app_logic_of(scene), size=VIEW_SIZE)
    try:
        view.show_volume(volume, "axial")
        rows, cols = np.nonzero(target)
        centre = voxel_ras(volume, (0, (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2))
        extent = max(np.ptp(rows), np.ptp(cols)) * spacing * 1.45
        view.slice_node.SetFieldOfView(extent, extent, view.slice_node.GetFieldOfView()[2])
        view.slice_node.JumpSliceByCentering(*centre)
        pixels = view.render()
    finally:
        view.close()
    info = {
        "rater": rater,
        "chosen": chosen + 1,
        "shown_round": shown.index,
        "shown_dice": dice(shown.recommended, target),
        "n_candidates": shown.n_candidates,
        "model": model.fingerprint(),
    }
    session.close()
    return pixels, shown, info


def compose(pixels: np.ndarray, round_, info: dict) -> bytes:
    """The slice view beside the module's legend, as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(10.8, 6.4), dpi=100, facecolor="#2b2b2b")
    FigureCanvasAgg(figure)
    view_axes = figure.add_axes((0.0, 0.0, 0.5926, 1.0))
    view_axes.imshow(pixels, interpolation="nearest")
    view_axes.set_axis_off()
    view_axes.text(8, 20, "Red (axial)", color="#e05a5a", fontsize=10, weight="bold")
    legend_axes = figure.add_axes((0.6, 0.0, 0.4, 1.0))
    legend_axes.set_axis_off()
    legend_axes.text(
        0.02,
        0.95,
        f"SPA — round {round_.index}",
        color="white",
        fontsize=14,
        weight="bold",
        transform=legend_axes.transAxes,
    )
    legend_axes.text(
        0.02,
        0.895,
        f"one click; a clinician with style '{info['rater']}' would pick {info['chosen']}",
        color="#cccccc",
        fontsize=9.5,
        transform=legend_axes.transAxes,
    )
    handles = [Line2D([], [], color=RECOMMENDED_COLOUR, linewidth=2.5, label="recommended mask (outline)")]
    for k in range(round_.n_candidates):
        adds = int((round_.differences[k] > 0).sum())
        removes = int((round_.differences[k] < 0).sum())
        handles.append(
            Patch(
                facecolor=CANDIDATE_COLOURS[k],
                edgecolor=CANDIDATE_COLOURS[k],
                label=f"candidate {k + 1} adds ({adds} px) — key {k + 1}",
            )
        )
        handles.append(
            Line2D([], [], color=removes_colour(k), linewidth=2.5, label=f"candidate {k + 1} removes ({removes} px)")
        )
    legend = legend_axes.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.0, 0.86),
        frameon=False,
        fontsize=9.5,
        labelcolor="white",
        handlelength=1.8,
    )
    legend.set_in_layout(False)
    legend_axes.text(
        0.02,
        0.08,
        "1–4 or click an overlay: choose   Enter: accept\nEsc: cancel   Ctrl+Z: undo a round",
        color="#cccccc",
        fontsize=9,
        transform=legend_axes.transAxes,
        linespacing=1.6,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor=figure.get_facecolor())
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SPA weights (default: the shipped model)")
    parser.add_argument("--out", default=str(resources_dir() / "Screenshots" / "candidates.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from SPASegmentationLib.model.build import default_model, load_model

    model = load_model(args.model) if args.model else default_model()
    pixels, shown, info = render_round_in_slice_view(model, seed=args.seed)
    if not pixels.any():
        raise SystemExit("off-screen rendering produced a black view; VTK needs EGL or OSMesa here")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, compose(pixels, shown, info))
    print(
        f"written {out}: round {info['shown_round']} (Dice {info['shown_dice']:.3f} to rater '{info['rater']}', "
        f"best candidate {info['chosen']}), {info['n_candidates']} candidates, model {info['model']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
