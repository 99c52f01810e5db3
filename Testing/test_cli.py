"""The `spa` command end to end, in real subprocesses: outputs, and one clear line per user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import disc_image


def spa(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPA_HOME=str(cwd / "home"), **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "SPASegmentationLib.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
    )


def one_clear_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spa: error: "), result.stderr
    assert "Traceback" not in result.stderr and fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def nrrd_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("img")
    image = sitk.GetImageFromArray(disc_image())
    image.SetSpacing((0.7, 0.8))
    image.SetOrigin((-12.0, 30.0))
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    return folder / "ct.nrrd"


def test_segment_writes_masks_in_the_input_geometry_and_updates_the_profile(tmp_path, nrrd_image):
    result = spa(
        "segment",
        str(nrrd_image),
        "--point",
        "120,90",
        "--choose",
        "1,2",
        "--accept",
        "1",
        "--anchor",
        "minimal",
        "--user",
        "alice",
        "--structure",
        "lesion",
        "--out",
        "out",
        "--samples",
        "16",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    recommended = sitk.ReadImage(str(tmp_path / "out" / "ct_spa_recommended.nrrd"))
    assert recommended.GetSpacing() == pytest.approx((0.7, 0.8)) and recommended.GetOrigin() == pytest.approx(
        (-12.0, 30.0)
    )
    mask = sitk.GetArrayFromImage(recommended) > 0
    assert mask.shape == (180, 240) and mask[90, 120] and not mask[5, 5]
    summary = json.loads((tmp_path / "out" / "ct_spa_summary.json").read_text())
    assert summary["rounds"] == 3 and summary["choices"] == [1, 2] and summary["profile"]["n_sessions"] == 1
    # The box search ran; inside this large uniform disc no small box shows an edge, so the click alone was used,
    # on the whole image: in a window around the click its mask runs out of the window on every side.
    assert summary["session_state"]["box_search"] is True and summary["found_box"] is None
    assert summary["session_state"]["focus"] == "clicks" and summary["focus_window"] is None
    accepted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ct_spa_accepted.nrrd"))) > 0
    candidate = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ct_spa_candidate1.nrrd"))) > 0
    assert np.array_equal(accepted, candidate) and summary["accepted"] == "candidate 1"
    assert summary["session_state"]["accepted_candidate"] == 0 and summary["session_state"]["anchor"] == "minimal"
    assert (tmp_path / "out" / summary["preview"].split("/")[-1]).is_file()
    listed = spa("profile", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "alice\tlesion\t1 session(s)" in listed.stdout
    exported = spa("profile", "export", "--user", "alice", "--structure", "lesion", "--file", "p.json", cwd=tmp_path)
    assert exported.returncode == 0 and json.loads((tmp_path / "p.json").read_text())["user"] == "alice"
    again = spa("profile", "import", "--file", "p.json", cwd=tmp_path)
    one_clear_line(again, "--overwrite")
    # a folder, named with a trailing slash and not there yet, gets the profile inside it
    into = spa("profile", "export", "--user", "alice", "--structure", "lesion", "--file", "shared/dir/", cwd=tmp_path)
    assert into.returncode == 0 and (tmp_path / "shared" / "dir" / "alice__lesion.json").is_file()
    one_clear_line(spa("profile", "export", "--user", "alice", "--structure", "lesion", cwd=tmp_path), "--file FILE")
    one_clear_line(spa("profile", "import", cwd=tmp_path), "needs --file FILE")
    one_clear_line(spa("profile", "delete", "--user", "alice", cwd=tmp_path), "--structure NAME")
    assert spa("profile", "delete", "--user", "alice", "--structure", "lesion", cwd=tmp_path).returncode == 0
    one_clear_line(spa("profile", "show", "--user", "alice", "--structure", "lesion", cwd=tmp_path), "no profile")


def test_a_corrupt_profile_is_reported_and_kept(tmp_path, nrrd_image):
    assert (
        spa(
            "segment",
            str(nrrd_image),
            "--point",
            "120,90",
            "--user",
            "bob",
            "--structure",
            "liver",
            "--samples",
            "8",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    path = next((tmp_path / "home" / "profiles").rglob("liver.json"))
    path.write_text("{ not json")
    result = spa(
        "segment",
        str(nrrd_image),
        "--point",
        "120,90",
        "--user",
        "bob",
        "--structure",
        "liver",
        "--samples",
        "8",
        cwd=tmp_path,
    )
    one_clear_line(result, str(path.name))
    assert path.read_text() == "{ not json"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["segment", "missing.png", "--point", "1,1"], "missing.png"),
        (["segment", "{img}", "--point", "900,10"], "outside the image"),
        (["segment", "{img}", "--point", "1"], "2 comma-separated numbers"),
        (["segment", "{img}"], "--point"),
        (["segment", "{img}", "--point", "120,90", "--choose", "9"], "does not exist"),
        (["segment", "{img}", "--point", "120,90", "--choose", "x"], "--choose"),
        (["segment", "{img}", "--point", "120,90", "--accept", "7"], "--accept"),
        (["segment", "{img}", "--point", "120,90", "--user", "a"], "--structure"),
        (["segment", "{img}", "--point", "120,90", "--model", "nope.pt"], "nope.pt"),
        (["segment", "{img}", "--point", "120,90", "--model", "{corrupt}"], "corrupt"),
        (["segment", "{const}", "--point", "3,3"], "constant"),
        (["segment", "{vol}", "--point", "3,3"], "--slice"),
        (["train", "nowhere"], "nowhere"),
    ],
)
def test_user_errors_print_one_clear_line(tmp_path, nrrd_image, args, fragment):
    (tmp_path / "corrupt.pt").write_bytes(b"not a model")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 20), 7, np.int16)), str(tmp_path / "const.nrrd"))
    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 20, 20))), str(tmp_path / "vol.nii.gz")
    )
    names = {"{img}": str(nrrd_image), "{corrupt}": "corrupt.pt", "{const}": "const.nrrd", "{vol}": "vol.nii.gz"}
    one_clear_line(spa(*[names.get(a, a) for a in args], cwd=tmp_path), fragment)


def test_demo_writes_one_picture_per_round_and_a_summary(tmp_path):
    result = spa("demo", "--out", "demo", "--samples", "24", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    rounds = summary["rounds"]
    assert 1 <= len(rounds) <= 6 and summary["model_fingerprint"] and summary["data_fingerprint"]
    for r in rounds:
        picture = tmp_path / "demo" / r["picture"]
        assert picture.is_file() and picture.stat().st_size > 20_000
        assert f"round {r['round']}: Dice {r['dice']:.3f}" in result.stdout
    assert summary["session_state"]["kind"] == "spa-session"
    # The default sample is the real LIDC nodule crop; the click became a box around the nodule.
    assert summary["sample"] == "lidc_nodule" and "lidc_nodule (128×128)" in result.stdout
    x0, y0, x1, y1 = summary["found_box"]
    assert x0 < summary["first_point"][0] < x1 and y0 < summary["first_point"][1] < y1 and x1 - x0 < 40
    # Choosing never moves the recommendation away from the clinician's style.
    assert rounds[-1]["dice"] >= rounds[0]["dice"] > 0.8


def test_demo_runs_on_the_procedural_sample_too(tmp_path):
    result = spa("demo", "--sample", "synthetic", "--rounds", "2", "--out", "demo", "--samples", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["sample"] == "demo_case" and len(summary["rounds"]) <= 2


def test_generate_train_evaluate_end_to_end(tmp_path):
    assert spa("generate-data", "data", "--cases", "6", "--seed", "2", cwd=tmp_path).returncode == 0
    train_args = ["train", "data", "--out", "run", "--steps", "2", "--batch-size", "2", "--samples", "4"]
    train_args += ["--rounds", "2", "--cache", "cache"]
    trained = spa(*train_args, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "spa_model.pt").is_file() and (tmp_path / "run" / "train_log.jsonl").is_file()
    # The same seed gives the same weights, whether the embedding cache was cold (first run) or warm (this one).
    again = spa(*train_args[:3], "run_again", *train_args[4:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    fingerprints = [
        json.loads((tmp_path / run / "training.json").read_text())["fingerprint"] for run in ("run", "run_again")
    ]
    assert fingerprints[0] == fingerprints[1]
    evaluated = spa(
        "evaluate",
        "data",
        "--model",
        "run/spa_model.pt",
        "--rounds",
        "3",
        "--samples",
        "8",
        "--first-prompt",
        "box",
        "--out",
        "eval",
        "--cache",
        "cache",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["methods"]) == {
        "spa_token",
        "click_litemedsam",
        "spa_token_all_rounds",
        "click_litemedsam_all_rounds",
    }
    per_case = results["methods"]["spa_token"]["per_case"]
    assert len(per_case) == 1 and all(len(r["dice"]) == 3 for r in per_case.values())
    assert results["data"]["fingerprint"] and results["model"]["spa_token"]["fingerprint"]
    assert "NoI@0.8" in evaluated.stdout and (tmp_path / "eval" / "dice_vs_round.png").is_file()


def test_evaluate_compares_the_box_search_with_the_click_alone_on_real_crops(tmp_path):
    """From a point on a real nodule, the shipped model's answer to the click alone covers the surrounding vessels;
    the box search finds the nodule."""
    crops = Path(__file__).resolve().parent / "data" / "lidc-cimd"
    evaluated = spa(
        "evaluate", str(crops), "--split", "test", "--max-cases", "2", "--rounds", "2", "--samples", "8",
        "--first-prompt", "point", "--box-search", "on,off", "--no-baseline", "--targets", "0.6,0.7",
        "--out", "eval", "--cache", "cache", cwd=tmp_path,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model"]["spa_token_box_search"]["box_search"] is True
    assert results["model"]["spa_token_click_only"]["box_search"] is False
    searched = results["methods"]["spa_token_box_search"]["per_case"]["testing/23"]["dice_all_rounds"]
    alone = results["methods"]["spa_token_click_only"]["per_case"]["testing/23"]["dice_all_rounds"]
    assert searched[0] > 0.6 > 0.3 > alone[0]
    bad = spa("evaluate", str(crops), "--box-search", "maybe", "--out", "eval2", cwd=tmp_path)
    assert bad.returncode == 2 and "--box-search 'maybe' must be on or off" in bad.stderr


def test_evaluate_compares_the_focus_window_with_the_whole_image_on_real_crops(tmp_path):
    """From a box around a small real nodule, --focus all records its focus window per case; the default (clicks)
    and off keep a given box on the whole image."""
    crops = Path(__file__).resolve().parent / "data" / "lidc-cimd"
    evaluated = spa(
        "evaluate", str(crops), "--split", "test", "--max-cases", "2", "--rounds", "2", "--samples", "8",
        "--first-prompt", "box", "--focus", "all,clicks", "--no-baseline", "--targets", "0.6,0.7",
        "--out", "eval", "--cache", "cache", cwd=tmp_path,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model"]["spa_token_focus_all"]["focus"] == "all"
    assert results["model"]["spa_token_focus_clicks"]["focus"] == "clicks"
    focused = results["methods"]["spa_token_focus_all"]["per_case"]["testing/23"]
    whole = results["methods"]["spa_token_focus_clicks"]["per_case"]["testing/23"]
    window = focused["focus_window"]
    assert whole["focus_window"] is None and window["width"] == window["height"] < 96
    assert (
        focused["dice_all_rounds"][0] > 0.6
        and "focus" in evaluated.stdout + (tmp_path / "eval" / "report.md").read_text()
    )
    bad = spa("evaluate", str(crops), "--focus", "both", "--out", "eval2", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown --focus mode 'both'" in bad.stderr
    twice = spa("evaluate", str(crops), "--focus", "clicks,off,clicks", "--out", "eval3", cwd=tmp_path)
    assert twice.returncode == 2 and "--focus 'clicks,off,clicks' names a setting twice" in twice.stderr


def test_evaluate_reads_the_real_lidc_crops_and_compares_anchors(tmp_path):
    """Real CT with empty rater masks, in the layout it ships in; two loop designs side by side."""
    crops = Path(__file__).resolve().parent / "data" / "lidc-cimd"
    evaluated = spa(
        "evaluate", str(crops), "--split", "test", "--max-cases", "2", "--rounds", "3", "--samples", "8",
        "--first-prompt", "box", "--anchor", "none,minimal", "--no-baseline", "--targets", "0.6,0.7",
        "--out", "eval", "--cache", "cache", cwd=tmp_path,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["data"]["layout"] == "lidc-crops" and results["data"]["cases"] == ["testing/12", "testing/23"]
    assert results["data"]["raters"] == {
        "cases": 2, "single_rater": 0, "with_empty_rater": 1, "empty_rater_masks": 3, "all_raters_empty": 0,
    }  # fmt: skip
    assert {results["model"][m]["anchor"] for m in ("spa_token_anchor_none", "spa_token_anchor_minimal")} == {
        "none",
        "minimal",
    }
    anchored = results["methods"]["spa_token_anchor_minimal"]["per_case"]
    assert all(after >= before for rec in anchored.values() for before, after in rec["dice_to_choice"])
    assert all(rec["size"] == "small" for rec in anchored.values())
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "1 with at least one empty rater mask" in report and "moved away from the choice" in report
