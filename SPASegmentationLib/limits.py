"""What SPA accepts, stated once: every place input enters (CLI, profile files, data folders, the HTTP service)
checks against these and names the limit and the fix when it refuses.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_IMAGE_PIXELS = 4096 * 4096  # rows × columns of one 2-D image or slice: `spa segment` peaks at ~3.3 GB here
MAX_VOLUME_VOXELS = 1 << 30  # voxels of a volume read whole (a 512 × 512 × 4096 CT)
MIN_SAMPLES = 4  # N: at least as many samples as candidates shown
MAX_SAMPLES = 512  # N: masks sampled per round (the default is 48; memory grows with N)
MAX_SEED = 2**63 - 1  # seeds are non-negative 64-bit integers
MAX_PROFILE_BYTES = 1 << 20  # a profile file is a few kilobytes; a megabyte is not a profile
MAX_PROFILE_SESSIONS = 10**9  # n_sessions of a profile
MAX_JSON_INTEGER_DIGITS = 18  # integers in profile / state JSON (larger ones are not counts SPA writes)
MAX_JSON_DEPTH = 32  # nesting of a profile / state JSON document
MAX_TRAIN_STEPS = 10**7
MAX_BATCH_SIZE = 4096


def pixels_message(rows: int, columns: int, where: str) -> str | None:
    """Why an image of ``rows`` × ``columns`` is refused, or None when it is within the limit."""
    if rows * columns <= MAX_IMAGE_PIXELS:
        return None
    return (
        f"{where} is {columns}×{rows} pixels, more than SPA's limit of {MAX_IMAGE_PIXELS:,} pixels (4096×4096); "
        "downsample it or crop the region of interest first (the model sees 256×256 anyway)"
    )


def load_json(data: bytes | str, what: str, error: type[Exception], max_bytes: int = MAX_PROFILE_BYTES) -> Any:
    """Parse a JSON document SPA reads (a profile, a session state) within the limits above.

    Refuses, as ``error`` naming ``what``: more than ``max_bytes``, nesting deeper than ``MAX_JSON_DEPTH``,
    integers longer than ``MAX_JSON_INTEGER_DIGITS`` digits, NaN / Infinity and numbers that overflow to them.
    """
    if len(data) > max_bytes:
        raise error(
            f"{what} is {len(data):,} bytes, more than the {max_bytes:,} a valid one can be; is it the right file?"
        )

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
            raise error(f"{what} holds an integer of {len(text.lstrip('-'))} digits; no count SPA writes is that long")
        return int(text)

    def real(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise error(f"{what} holds the number {text[:40]}, too large to be finite")
        return value

    def constant(text: str) -> float:
        raise error(f"{what} holds {text}; SPA writes only finite numbers")

    try:
        payload = json.loads(data, parse_int=integer, parse_float=real, parse_constant=constant)
    except RecursionError:
        raise error(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels; it is not a file SPA wrote") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what} is not valid JSON ({exc})") from exc
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise error(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels; it is not a file SPA wrote")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return payload
