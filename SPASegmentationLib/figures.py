"""Pictures of a round as the user sees it: the recommended mask and the four candidates.

Colours come from the Okabe–Ito palette (safe for colour-blind readers) and are the same everywhere
SPA draws: recommended = yellow outline, added pixels = blue, removed pixels = vermillion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .io.atomic import write_bytes_atomic
from .model.preprocess import normalise_intensity
from .palette import RECOMMENDED, hex_colour, rgb
from .session import Round

RECOMMENDED_COLOUR = hex_colour(RECOMMENDED)
ADDED_COLOUR = hex_colour("blue")
REMOVED_COLOUR = hex_colour("vermillion")
TARGET_COLOUR = hex_colour("bluish green")
BOX_COLOUR = hex_colour("orange")
ADDED_RGB = rgb("blue")
REMOVED_RGB = rgb("vermillion")


def display_image(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Any image → (H, W, 3) float RGB in [0, 1] for display."""
    unit = normalise_intensity(image, window=window)
    return np.repeat(unit[..., None], 3, axis=-1) if unit.ndim == 2 else unit


def _crop_box(
    masks: Sequence[np.ndarray], shape: tuple[int, int], margin: float = 0.35, minimum: int = 32
) -> tuple[slice, slice]:
    from scipy import ndimage

    union = np.zeros(shape, dtype=bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    # Frame the structure, not stray specks: keep components of at least 5 % of the largest.
    labels, count = ndimage.label(union)
    if count > 1:
        sizes = ndimage.sum(union, labels, range(1, count + 1))
        union = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    half = max(rows[-1] - rows[0], cols[-1] - cols[0], minimum) * (0.5 + margin)
    cy, cx = (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2
    r0, r1 = int(max(0, cy - half)), int(min(shape[0], cy + half + 1))
    c0, c1 = int(max(0, cx - half)), int(min(shape[1], cx + half + 1))
    return slice(r0, r1), slice(c0, c1)


def _overlay(rgb: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float], alpha: float) -> np.ndarray:
    out = rgb.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour)
    return out


def render_round(
    image: np.ndarray,
    round_: Round,
    path: Path,
    *,
    title: str = "",
    chosen: int | None = None,
    target: np.ndarray | None = None,
    points: Sequence[tuple[float, float, bool]] = (),
    box: tuple[float, float, float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Save one PNG of a round: recommended mask, then each candidate's added/removed pixels.

    ``points`` are the user's clicks (x, y, positive); ``box`` (x0, y0, x1, y1) the box prompt, drawn dotted.
    """
    rgb = display_image(image, window)
    masks = [round_.recommended, *round_.candidates] + ([target] if target is not None else [])
    if box is not None:
        box_mask = np.zeros(round_.recommended.shape, dtype=bool)
        height, width = box_mask.shape
        x0, y0, x1, y1 = box
        box_mask[
            int(np.clip(np.floor(y0), 0, height - 1)) : int(np.clip(np.ceil(y1), 0, height - 1)) + 1,
            int(np.clip(np.floor(x0), 0, width - 1)) : int(np.clip(np.ceil(x1), 0, width - 1)) + 1,
        ] = True
        masks.append(box_mask)
    rows, cols = _crop_box(masks, round_.recommended.shape)
    n = round_.n_candidates
    figure = Figure(figsize=(3.2 * (n + 1), 3.9), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n + 1)
    extent = (cols.start - 0.5, cols.stop - 0.5, rows.stop - 0.5, rows.start - 0.5)

    def outline(ax, mask, colour, width=1.6, style="solid"):
        if mask[rows, cols].any() and not mask[rows, cols].all():
            ax.contour(
                np.arange(cols.start, cols.stop),
                np.arange(rows.start, rows.stop),
                mask[rows, cols].astype(float),
                levels=[0.5],
                colors=[colour],
                linewidths=width,
                linestyles=style,
            )

    ax = axes[0]
    ax.imshow(rgb[rows, cols], extent=extent, interpolation="nearest")
    outline(ax, round_.recommended, RECOMMENDED_COLOUR, 2.0)
    if target is not None:
        outline(ax, target, TARGET_COLOUR, 1.4, "dashed")
    if box is not None:
        x0, y0, x1, y1 = box
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color=BOX_COLOUR, lw=1.2, ls=":")
    for x, y, positive in points:
        ax.plot(
            [x],
            [y],
            marker="+" if positive else "x",
            color="#56B4E9" if positive else "#CC79A7",
            markersize=10,
            mew=2.5,
        )
    ax.set_title(f"Recommended (round {round_.index})", fontsize=10)
    for k in range(n):
        ax = axes[k + 1]
        shown = _overlay(rgb, round_.differences[k] > 0, ADDED_RGB, 0.75)
        shown = _overlay(shown, round_.differences[k] < 0, REMOVED_RGB, 0.75)
        ax.imshow(shown[rows, cols], extent=extent, interpolation="nearest")
        outline(ax, round_.recommended, RECOMMENDED_COLOUR, 1.0)
        added, removed = int((round_.differences[k] > 0).sum()), int((round_.differences[k] < 0).sum())
        label = f"Candidate {k + 1}  ({round_.candidate_shares[k]:.0%} of samples)\n+{added} px  −{removed} px"
        ax.set_title(label, fontsize=9, fontweight="bold" if chosen == k else "normal")
        if chosen == k:
            for spine in ax.spines.values():
                spine.set_edgecolor("#000000")
                spine.set_linewidth(4)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Line2D([], [], color=RECOMMENDED_COLOUR, lw=2, label="recommended mask"),
        Patch(color=ADDED_COLOUR, label="candidate adds"),
        Patch(color=REMOVED_COLOUR, label="candidate removes"),
    ]
    if box is not None:
        handles.append(Line2D([], [], color=BOX_COLOUR, lw=1.2, ls=":", label="box prompt"))
    if target is not None:
        handles.append(Line2D([], [], color=TARGET_COLOUR, lw=1.4, ls="--", label="simulated clinician's target"))
    if chosen is not None:
        handles.append(Patch(facecolor="white", edgecolor="black", lw=3, label=f"chosen: candidate {chosen + 1}"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.82, bottom=0.1, wspace=0.04)
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)
