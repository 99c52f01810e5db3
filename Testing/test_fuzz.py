"""Property-based fuzzing of everything a user hands SPA: command lines, image files, profile JSON, data folders.

The property everywhere: a valid result, or a clear refusal (exit 2 with one ``spa: error:`` line; an
``SPAError`` in Python) — never a traceback, never a corrupted or lost file. ``make test`` runs a small example
budget (``SPA_FUZZ_EXAMPLES``, 12 per test); ``make fuzz`` runs the long one (≥ 10 000 examples in all).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_profiles import FINGERPRINT, make_mixture

from SPASegmentationLib import cli
from SPASegmentationLib.errors import SPAError
from SPASegmentationLib.io.images import read_image
from SPASegmentationLib.model.preprocess import prepare_image
from SPASegmentationLib.profiles import PROFILE_FIELDS, ProfileStore, fold_session

EXAMPLES = int(os.environ.get("SPA_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 50,  # the quick run is the same every time; `make fuzz` explores
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ReachedHeavyWork(Exception):
    """Raised instead of loading a model or starting a long job: the arguments were all accepted."""


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch):
    """Commands run for real up to the point where a model would load or a long job would start."""

    def stop(*args, **kwargs):
        raise ReachedHeavyWork

    monkeypatch.setattr(cli, "_load_model", stop)
    monkeypatch.setattr("SPASegmentationLib.model.build.build_model", stop)
    monkeypatch.setattr("SPASegmentationLib.service.server.serve", stop)
    monkeypatch.setattr("SPASegmentationLib.bench.run_bench", stop)
    monkeypatch.setattr("SPASegmentationLib.bench.bench_service", stop)
    monkeypatch.setattr("SPASegmentationLib.data.synthetic.write_dataset", stop)


def options_of(command: str) -> list[argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and "-h" not in a.option_strings]


HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", "-1", "0", "1", "4", "-160,240", "0,inf", "nan", "1e400", "9" * 400, "1,2", "1,2,3,4", "x"]),
    st.sampled_from(["-5,-5,3", ",", "1,,2", " 1 , 2 ", "１,２", "../../etc/passwd", "a b", "cuda:99", "mps", "auto"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(string.printable, max_size=12),
)
COMMANDS = ["demo", "segment", "profile", "train", "evaluate", "bench", "generate-data", "export-seg", "serve"]


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    argv = [command]
    if command in ("segment", "train", "evaluate", "generate-data"):
        argv.append(draw(st.sampled_from(["missing.png", "{tmp}", "{img}", "-x"])))
    if command == "profile":
        argv.append(draw(st.sampled_from(["list", "show", "export", "import", "delete", "bogus"])))
    if command == "export-seg":
        argv += ["missing.nrrd", "{tmp}"]
    for action in draw(st.lists(st.sampled_from(options_of(command)), max_size=4)):
        argv.append(action.option_strings[-1])
        if action.nargs != 0:
            argv.append(draw(HOSTILE_TEXT))
    if command == "profile" and draw(st.booleans()):
        argv += ["--fingerprint", FINGERPRINT]
    return argv


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    values = np.random.default_rng(0).normal(60, 10, (32, 32)).clip(0, 255).astype(np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(values).save(path)
    return path


@FUZZ
@given(argv=command_lines())
def test_any_command_line_is_accepted_or_refused_in_one_line(
    argv: list[str], tmp_path: Path, small_image: Path, no_heavy_work, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPA_HOME", str(tmp_path / "home"))
    argv = [{"{tmp}": str(tmp_path), "{img}": str(small_image)}.get(a, a) for a in argv]
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except ReachedHeavyWork:
        return  # every argument was accepted
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    if status == 0:
        return
    assert status == 2, (argv, status, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("spa: error:"), (argv, err)


IMAGE_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64]


@st.composite
def image_files(draw, folder: Path) -> Path:
    dtype = draw(st.sampled_from(IMAGE_DTYPES))
    shape = draw(
        st.one_of(
            st.tuples(st.integers(1, 40), st.integers(1, 40)),
            st.tuples(st.integers(1, 4), st.integers(1, 24), st.integers(1, 24)),
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(0, 1000, shape)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = values.clip(info.min, info.max)
    values = values.astype(dtype)
    if np.issubdtype(dtype, np.floating) and draw(st.booleans()):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if draw(st.booleans()):
        values[...] = values.flat[0]  # constant
    suffix = draw(st.sampled_from([".nrrd", ".nii.gz", ".mha", ".png", ".tif"]))
    path = Path(tempfile.mkdtemp(dir=folder)) / f"image{suffix}"
    image = sitk.GetImageFromArray(values)
    image.SetSpacing([draw(st.floats(0.01, 10.0)) for _ in range(values.ndim)])
    try:
        sitk.WriteImage(image, str(path))
    except RuntimeError:
        path.write_bytes(draw(st.binary(max_size=256)))  # a format that cannot hold it: garbage with its name
    if draw(st.integers(0, 9)) == 0 and path.exists():
        data = path.read_bytes()
        path.write_bytes(data[: draw(st.integers(0, len(data)))])  # truncated
    return path


@FUZZ
@given(data=st.data(), slice_index=st.one_of(st.none(), st.integers(-2, 5)))
def test_any_image_file_is_read_and_prepared_or_refused(data, slice_index, tmp_path: Path) -> None:
    path = data.draw(image_files(tmp_path))
    try:
        loaded = read_image(path, slice_index)
        array = loaded.array
        assert array.ndim in (2, 3) and array.size > 0
        assert array.dtype.kind in "biuf" and (array.dtype.kind != "f" or np.isfinite(array).all())
        tensor, geometry = prepare_image(array, 256)
        assert tensor.shape == (1, 3, 256, 256) and bool(torch_isfinite(tensor))
        assert (geometry.height, geometry.width) == array.shape[:2]
    except SPAError as exc:
        assert str(exc), "a refusal must say why"


def torch_isfinite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@st.composite
def profile_documents(draw) -> str:
    """A valid profile with some fields replaced, removed or added, or any JSON at all, or broken text."""
    payload = fold_session(None, "alice", "liver", FINGERPRINT, make_mixture(0, 4, 8), 2, where="-").to_dict()
    kind = draw(st.sampled_from(["mutated", "any", "text"]))
    if kind == "any":
        return json.dumps(draw(JSON_VALUES))
    if kind == "text":
        return draw(st.text(max_size=200))
    fields = ("kind", "schema_version", *PROFILE_FIELDS)
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3)):
        if draw(st.booleans()):
            payload[field] = draw(JSON_VALUES)
        else:
            payload.pop(field, None)
    return json.dumps(payload)


@FUZZ
@given(document=profile_documents(), overwrite=st.booleans())
def test_any_profile_file_is_imported_or_refused_and_nothing_is_lost(
    document: str, overwrite: bool, tmp_path: Path
) -> None:
    store = ProfileStore(tmp_path / "profiles", model_fingerprint=FINGERPRINT, shape=(4, 8))
    kept = store.update("alice", "liver", make_mixture(1, 4, 8), rounds=1)
    before = store.path_for("alice", "liver").read_bytes()
    (tmp_path / "upload.json").write_text(document)
    try:
        imported = store.import_profile(tmp_path / "upload.json", user="alice", structure="liver", overwrite=overwrite)
    except SPAError as exc:
        assert str(exc)
        assert store.path_for("alice", "liver").read_bytes() == before  # untouched
        assert store.load("alice", "liver").weights == kept.weights
    else:
        assert overwrite and store.load("alice", "liver").weights == imported.weights
    assert not [p for p in (tmp_path / "profiles").rglob("*") if ".tmp" in p.name]


@st.composite
def data_folders(draw, root: Path) -> Path:
    """A folder of cases with images and rater masks of random sizes and kinds, some missing, some garbage."""
    folder = Path(tempfile.mkdtemp(prefix="data", dir=root))
    for case in range(draw(st.integers(0, 3))):
        case_dir = folder / draw(st.sampled_from([f"case{case}", f"c {case}", f".hidden{case}", f"case{case}.png"]))
        if case_dir.suffix:
            case_dir.write_bytes(b"not a folder")
            continue
        case_dir.mkdir(exist_ok=True)
        shape = (draw(st.integers(1, 20)), draw(st.integers(1, 20)))
        if draw(st.integers(0, 4)):
            Image.fromarray(np.random.default_rng(case).integers(0, 255, shape).astype(np.uint8)).save(
                case_dir / "image.png"
            )
        for rater in draw(st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True)):
            mask_shape = shape if draw(st.integers(0, 3)) else (shape[0] + 1, shape[1])
            mask = np.random.default_rng(case + 7).random(mask_shape) > draw(st.floats(0.0, 1.0))
            Image.fromarray(mask.astype(np.uint8) * 255).save(case_dir / f"rater_{rater}.png")
        if draw(st.integers(0, 5)) == 0:
            (case_dir / "rater_z.png").write_bytes(b"garbage")
    if draw(st.integers(0, 3)) == 0:
        (folder / "splits.json").write_text(json.dumps(draw(JSON_VALUES)))
    return folder


@FUZZ
@given(data=st.data(), split=st.sampled_from(["all", "train", "test", "validation"]))
def test_any_data_folder_is_read_or_refused(data, split: str, tmp_path: Path) -> None:
    from SPASegmentationLib.data.detect import open_dataset

    folder = data.draw(data_folders(tmp_path))
    try:
        dataset = open_dataset(folder)
        for case_id in dataset.split(split):
            case = dataset.load(case_id)
            assert case.image.ndim in (2, 3)
            assert all(mask.shape == case.image.shape[:2] and mask.dtype == bool for mask in case.raters.values())
    except SPAError as exc:
        assert str(exc)
