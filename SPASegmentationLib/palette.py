"""The colours SPA draws with, everywhere: the Okabe–Ito palette (Okabe & Ito 2008), safe for
colour-blind readers. Figures (`evaluation.figures`) and the Slicer preview (`scene`) both use it."""

from __future__ import annotations

OKABE_ITO: dict[str, tuple[int, int, int]] = {
    "orange": (230, 159, 0),
    "sky blue": (86, 180, 233),
    "bluish green": (0, 158, 115),
    "yellow": (240, 228, 66),
    "blue": (0, 114, 178),
    "vermillion": (213, 94, 0),
    "reddish purple": (204, 121, 167),
}


def rgb(name: str) -> tuple[float, float, float]:
    """A palette colour as RGB in [0, 1]."""
    r, g, b = OKABE_ITO[name]
    return (r / 255.0, g / 255.0, b / 255.0)


def hex_colour(name: str) -> str:
    """A palette colour as '#RRGGBB'."""
    return "#{:02X}{:02X}{:02X}".format(*OKABE_ITO[name])


RECOMMENDED = "yellow"  # the recommended mask's outline, in figures and in Slicer
