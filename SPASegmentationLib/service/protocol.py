"""The wire format of ``spa serve``: arrays in a compact binary frame, rounds, slice planes, content hashes.

Numpy only (no torch), so the Slicer module's remote mode needs nothing but ``requests`` and numpy.

A frame is ``MAGIC``, a 4-byte little-endian header length, a UTF-8 JSON header and the arrays' bytes
back to back. The header holds free JSON (``meta``) and, per array, its name, dtype, shape and
encoding: boolean masks travel as bits (``numpy.packbits``), everything else as little-endian raw
bytes. Decoding checks every length and dtype before it allocates, so a malformed frame is refused
with a message, never half read. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..rounds import Round, signed_differences

API_VERSION = 1
MAGIC = b"SPA\x01"
FRAME_MEDIA_TYPE = "application/x-spa-frame"
TOKEN_HEADER = "Authorization"  # "Bearer <token>"
USER_HEADER = "X-SPA-User"  # who acts, with a shared (local) token; a team token names its user itself
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAY_DIMS = 4
ALLOWED_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "int32", "uint32", "float16", "float32", "float64")


def _little_endian(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.byteorder in ("<", "|", "=") and np.little_endian else dtype.newbyteorder("<")


def encode_frame(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """One frame holding ``meta`` (plain JSON) and named arrays."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in (arrays or {}).items():
        array = np.asarray(value)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise InputError(f"array {name!r} has dtype {array.dtype}; the SPA protocol carries {ALLOWED_DTYPES}")
        if array.dtype == np.bool_:
            blob = np.packbits(array.reshape(-1)).tobytes()
            encoding = "bits"
        else:
            blob = np.ascontiguousarray(array, dtype=_little_endian(array.dtype)).tobytes()
            encoding = "raw"
        entries.append(
            {
                "name": name,
                "dtype": array.dtype.name,
                "shape": list(array.shape),
                "encoding": encoding,
                "nbytes": len(blob),
            }
        )
        blobs.append(blob)
    header = json.dumps({"meta": meta, "arrays": entries}, allow_nan=False).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blobs])


def decode_frame(data: bytes, *, max_elements: int = 1 << 31) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a frame; InputError naming the problem for anything malformed."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise InputError("the request body is not an SPA frame (wrong magic bytes); send it with the SPA client")
    (header_length,) = struct.unpack("<I", view[len(MAGIC) : len(MAGIC) + 4])
    offset = len(MAGIC) + 4
    if header_length > MAX_HEADER_BYTES or offset + header_length > len(view):
        raise InputError(f"the SPA frame's header claims {header_length} bytes, which the body does not hold")
    try:
        header = json.loads(bytes(view[offset : offset + header_length]).decode("utf-8"))
        meta, entries = header["meta"], header["arrays"]
        if not isinstance(meta, dict) or not isinstance(entries, list):
            raise TypeError("meta must be an object and arrays a list")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"the SPA frame's header is damaged ({exc})") from exc
    offset += header_length
    arrays: dict[str, np.ndarray] = {}
    for entry in entries:
        name, array, offset = _decode_array(view, entry, offset, max_elements)
        arrays[name] = array
    if offset != len(view):
        raise InputError(f"the SPA frame has {len(view) - offset} bytes after its last array; it is damaged")
    return meta, arrays


def _decode_array(view: memoryview, entry: Any, offset: int, max_elements: int) -> tuple[str, np.ndarray, int]:
    """One array of a frame, checked: (name, array, offset after it)."""
    try:
        name, dtype_name, shape, encoding, nbytes = (
            entry["name"],
            entry["dtype"],
            entry["shape"],
            entry["encoding"],
            entry["nbytes"],
        )
        valid = (
            isinstance(name, str)
            and dtype_name in ALLOWED_DTYPES
            and isinstance(shape, list)
            and len(shape) <= MAX_ARRAY_DIMS
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape)
            and encoding in ("bits", "raw")
            and isinstance(nbytes, int)
            and nbytes >= 0
        )
    except (KeyError, TypeError) as exc:
        raise InputError(f"an array entry of the SPA frame is damaged ({exc!r})") from exc
    if not valid:
        raise InputError(f"an array entry of the SPA frame is not valid: {entry!r}")
    elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if elements > max_elements:
        raise InputError(f"array {name!r} has {elements} elements; this server takes at most {max_elements}")
    dtype = np.dtype(dtype_name)
    expected = (elements + 7) // 8 if encoding == "bits" else elements * _little_endian(dtype).itemsize
    if (encoding == "bits") != (dtype == np.bool_) or nbytes != expected or offset + nbytes > len(view):
        raise InputError(f"array {name!r} of the SPA frame does not hold the bytes its header claims")
    blob = view[offset : offset + nbytes]
    if encoding == "bits":
        array = np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=elements).astype(bool).reshape(shape)
    else:
        array = np.frombuffer(blob, dtype=_little_endian(dtype)).astype(dtype, copy=True).reshape(shape)
    return name, array, offset + nbytes


def array_digest(array: np.ndarray) -> str:
    """The content hash of an image: SHA-256 of its dtype, shape and little-endian bytes (hex)."""
    array = np.asarray(array)
    digest = hashlib.sha256(f"{array.dtype.name}{list(array.shape)}".encode())
    digest.update(np.ascontiguousarray(array, dtype=_little_endian(array.dtype)).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class PlaneSpec:
    """Which 2-D image of a (k, j, i) volume a session works on, oriented as the viewer shows it."""

    axis: int  # numpy axis held fixed
    index: int
    transpose: bool = False  # the remaining two axes swapped (rows come from the later numpy axis)
    flip_rows: bool = False
    flip_cols: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "index": self.index,
            "transpose": self.transpose,
            "flip_rows": self.flip_rows,
            "flip_cols": self.flip_cols,
        }

    @classmethod
    def from_dict(cls, payload: Any) -> PlaneSpec:
        """Read :meth:`to_dict`; InputError when it is not a plane."""
        if not isinstance(payload, dict) or set(payload) - {"axis", "index", "transpose", "flip_rows", "flip_cols"}:
            raise InputError(f"a slice plane is {{axis, index, transpose, flip_rows, flip_cols}}, got {payload!r}")
        axis, index = payload.get("axis"), payload.get("index")
        flags = [payload.get(key, False) for key in ("transpose", "flip_rows", "flip_cols")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (axis, index)) or not all(
            isinstance(flag, bool) for flag in flags
        ):
            raise InputError(f"a slice plane needs integer axis and index and true/false flags, got {payload!r}")
        return cls(axis, index, *flags)

    def extract(self, volume: np.ndarray) -> np.ndarray:
        """The plane's (rows, cols) image of ``volume`` (a copy); InputError when it lies outside."""
        if volume.ndim != 3:
            raise InputError(f"a slice plane needs a 3-D volume; this image has shape {volume.shape}")
        if not 0 <= self.axis < 3 or not 0 <= self.index < volume.shape[self.axis]:
            raise InputError(f"slice {self.index} along axis {self.axis} is outside the volume of shape {volume.shape}")
        image = np.take(volume, self.index, axis=self.axis)
        if self.transpose:
            image = image.T
        if self.flip_rows:
            image = image[::-1, :]
        if self.flip_cols:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)


MAP_LEVELS = 65535  # probability and uncertainty maps (both within [0, 1]) travel as uint16 steps of 1/65535


def _quantised(values: np.ndarray) -> np.ndarray:
    # uint16 rather than float16: converting real probability maps (full of tiny values) to float16 is slow
    return np.rint(np.clip(values, 0.0, 1.0) * MAP_LEVELS).astype(np.uint16)


def encode_round(round_: Round, meta: dict[str, Any]) -> bytes:
    """A round as one frame (maps in 1/65535 steps, masks as bits; the differences are rebuilt on arrival);
    ``meta`` travels beside it."""
    return encode_frame(
        {
            **meta,
            "round": {
                "index": round_.index,
                "seconds": round_.seconds,
                "anchor_weight": round_.anchor_weight,
            },
        },
        {
            "probability": _quantised(round_.probability),
            "uncertainty": _quantised(round_.uncertainty),
            "recommended": round_.recommended.astype(bool),
            "candidates": round_.candidates.astype(bool),
            "candidate_shares": np.asarray(round_.candidate_shares, dtype=np.float32),
            "mixture_weights": np.asarray(round_.mixture_weights, dtype=np.float32),
        },
    )


def decode_round(data: bytes) -> tuple[Round, dict[str, Any]]:
    """The :class:`Round` of a frame and the frame's other meta."""
    meta, arrays = decode_frame(data)
    try:
        info = meta.pop("round")
        recommended, candidates = arrays["recommended"], arrays["candidates"]
        round_ = Round(
            index=int(info["index"]),
            probability=arrays["probability"].astype(np.float32) / MAP_LEVELS,
            recommended=recommended,
            uncertainty=arrays["uncertainty"].astype(np.float32) / MAP_LEVELS,
            candidates=candidates,
            differences=signed_differences(candidates, recommended),
            candidate_shares=arrays["candidate_shares"],
            mixture_weights=arrays["mixture_weights"],
            seconds=float(info["seconds"]),
            anchor_weight=float(info["anchor_weight"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the SPA frame does not hold a round ({exc!r})") from exc
    return round_, meta
