"""The hostile-user probe of issue 10, each finding as a test: one `spa: error:` line and exit 2, never a traceback,
never a silently wrong result; what is valid but unusual (negative window values) works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from test_cli import one_clear_line, spa
from test_profiles import FINGERPRINT, make_mixture

from SPASegmentationLib.profiles import ProfileStore


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """A small CT-like NRRD with a bright square."""
    values = np.random.default_rng(0).normal(0, 30, (64, 64)).astype(np.int16)
    values[20:44, 20:44] += 200
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    return path


@pytest.mark.parametrize("fill", ["nan", "inf", "all-nan"])
def test_nan_and_infinity_in_nifti_are_refused(tmp_path: Path, fill: str) -> None:
    values = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    if fill == "all-nan":
        values[:] = np.nan
    else:
        values[4:9, 4:9] = np.nan if fill == "nan" else np.inf
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "x.nii.gz"))
    one_clear_line(spa("segment", "x.nii.gz", "--point", "16,16", cwd=tmp_path), "NaN or infinite")


def test_an_image_too_large_is_refused_before_any_work(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4200, 4100), np.uint8)).save(tmp_path / "huge.png")
    one_clear_line(spa("segment", "huge.png", "--point", "5,5", cwd=tmp_path), "4096×4096")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["segment", "{ct}", "--point", "30,30", "--seed", "-1"], "--seed"),
        (["segment", "{ct}", "--point", "30,30", "--device", "foo"], "not a device"),
        (["segment", "{ct}", "--point", "30,30", "--samples", "100000000"], "--samples"),
        (["segment", "{ct}", "--point", "30,30", "--samples", "1"], "outside 4..512"),
        (["segment", "{ct}", "--point", "30,30", "--window=0,inf"], "finite"),
        (["segment", "{ct}", "--point", "30,30", "--window", "240,-160"], "LOW must be below HIGH"),
        (["train", "{ct}", "--batch-size", "0"], "--batch-size"),
        (["train", "{ct}", "--steps", "-5"], "--steps"),
        (["profile", "import", "--fingerprint", "x"], "--file"),
        (["profile", "export", "--user", "a", "--structure", "b", "--fingerprint", "x"], "--file"),
        (["evaluate", "{ct}", "--rounds", "0"], "--rounds"),
        (["serve", "--port", "70000"], "--port"),
    ],
)
def test_bad_arguments_get_one_line(tmp_path: Path, ct: Path, args: list[str], fragment: str) -> None:
    one_clear_line(spa(*[str(ct) if a == "{ct}" else a for a in args], cwd=tmp_path), fragment)


def test_negative_numbers_are_values_not_options(tmp_path: Path, ct: Path) -> None:
    done = spa("segment", str(ct), "--box", "-1,-1,50,50", "--window", "-160,240", "--samples", "4", cwd=tmp_path)
    one_clear_line(done, "outside the image")  # read as a box (it is partly outside), not as an unknown option
    stale = tmp_path / "output" / "segment" / "ct_spa_candidate9.nrrd"  # an earlier run's file: removed
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    done = spa("segment", str(ct), "--point", "30,30", "--window", "-160,240", "--samples", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not stale.exists()
    summary = json.loads(next((tmp_path / "output" / "segment").glob("*_summary.json")).read_text())
    assert summary["session_state"]["window"] == [-160.0, 240.0]


def profile_payload() -> dict:
    store = ProfileStore(Path("/nonexistent"), model_fingerprint=FINGERPRINT)
    from SPASegmentationLib.profiles import fold_session

    return fold_session(None, "alice", "liver", store.model_fingerprint, make_mixture(0, 4, 8), 2, where="-").to_dict()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[" * 100000 + "]" * 100000, "nested deeper"),
        ("{ATTACK}".replace("ATTACK", '"kind": "spa-preference-profile", "weights": [1' + "0" * 400 + "]"), "digits"),
        ('{"n": ' + "9" * 5000 + "}", "digits"),
        ('{"weights": [1e400]}', "too large to be finite"),
        ('{"weights": [NaN]}', "finite numbers"),
    ],
)
def test_profile_files_that_would_break_the_parser_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "bad.json").write_text(text)
    one_clear_line(spa("profile", "import", "--file", "bad.json", "--fingerprint", FINGERPRINT, cwd=tmp_path), fragment)


def test_profiles_out_of_range_are_refused(tmp_path: Path) -> None:
    huge_count = {**profile_payload(), "n_sessions": 10**100}
    (tmp_path / "count.json").write_text(json.dumps(huge_count))
    args = ("--fingerprint", FINGERPRINT)
    one_clear_line(spa("profile", "import", "--file", "count.json", *args, cwd=tmp_path), "digits")
    (tmp_path / "big.json").write_text(json.dumps({**profile_payload(), "padding": "x" * (50 << 20)}))
    one_clear_line(spa("profile", "import", "--file", "big.json", *args, cwd=tmp_path), "bytes")


def test_a_profile_of_another_shape_is_refused_at_import_naming_it(tmp_path: Path, shipped_model) -> None:
    payload = profile_payload()  # 4 components of size 8: not the shipped model's mixture
    payload["model_fingerprint"] = shipped_model.fingerprint()
    (tmp_path / "other.json").write_text(json.dumps(payload))
    one_clear_line(spa("profile", "import", "--file", "other.json", cwd=tmp_path), "other.json")


def test_a_rerun_into_the_same_folder_leaves_nothing_of_the_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("round_3.png", "round_6.png", "summary.json"):
        (out / name).write_bytes(b"from an earlier run")
    (out / "notes.txt").write_text("the user's own file")
    done = spa("demo", "--out", "demo", "--samples", "8", "--rounds", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (
        sorted(p.name for p in out.glob("round_*.png")) == [r["picture"] for r in summary["rounds"]] == ["round_1.png"]
    )
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_a_constant_image_in_evaluate_names_its_case(tmp_path: Path) -> None:
    case = tmp_path / "data" / "case_007"
    case.mkdir(parents=True)
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(case / "image.png")
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(case / "rater_a.png")
    done = spa("evaluate", "data", "--split", "all", "--samples", "4", "--rounds", "1", "--no-baseline", cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("spa: error:")]  # beside the progress bar
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(errors) == 1 and "case_007" in errors[0] and done.stderr.rstrip().endswith(errors[0])


def test_grey_with_alpha_and_palette_pngs_are_read(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).normal(60, 10, (64, 64)).clip(0, 255).astype(np.uint8)
    grey[20:44, 20:44] = 200
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA").save(tmp_path / "la.png")
    done = spa("segment", "la.png", "--point", "32,32", "--samples", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    mask = np.asarray(Image.open(tmp_path / "output" / "segment" / "la_spa_recommended.png")) > 0
    assert mask.shape == (64, 64) and mask[32, 32]


def test_every_option_of_every_command_says_what_it_is_and_its_default() -> None:
    import argparse

    from SPASegmentationLib.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(commands) == 9
    for name, command in commands.items():
        for action in command._actions:
            if "-h" in action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help and len(action.help) > 8, (name, action.dest)
            if action.option_strings and action.default not in (None, False):
                assert "default" in action.help, (name, action.option_strings, action.help)
