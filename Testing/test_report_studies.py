"""Tests of the report's study sections: sample quality, simulated users, ablations, rater alignment, profiles."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from SPASegmentationLib.evaluation.report import write_report
from SPASegmentationLib.metrics import mean_ci

NEW_HEADINGS = (
    "## Distribution quality of the samples",
    "## Simulated users",
    "## Ablations",
    "## Rater alignment",
    "## Profiles",
)
NAN = float("nan")


def quality(ged, sample, rater, ece):
    """One round's distribution-quality record."""
    return {"ged": ged, "sample_diversity": sample, "rater_diversity": rater, "ece": ece}


def spa_cases(dice, stopped=(None, None, None), ged=(0.2, 0.4, 0.3)):
    """Three SPA case records with the given Dice curves, stop rounds and round-1 GED."""
    cases = {}
    for index, case_id in enumerate(("c1", "c2", "c3")):
        cases[case_id] = {
            "dice": dice[index],
            "dice_all_rounds": dice[index],
            "seconds_per_round": 0.5,
            "stopped_at": stopped[index],
            "distribution": {
                "round_1": quality(ged[index], 0.1 * (index + 1), [0.3, 0.5, NAN][index], 0.05 * (index + 1)),
                "last_round": quality(ged[index] / 2, 0.05, [0.3, 0.5, NAN][index], 0.02),
            },
        }
    return cases


def click_cases(dice):
    """Three click-baseline case records."""
    return {cid: {"dice": d, "seconds_per_round": 0.1} for cid, d in zip(("c1", "c2", "c3"), dice, strict=True)}


def record(kind, family, accuracy=1.0, stops=False, ablation=None, n_samples=8):
    """A results["model"] record of one method."""
    tags = {"family": family, "n_samples": n_samples}
    if ablation is not None:
        tags["ablation"] = ablation
    return {"kind": kind, "user": {"accuracy": accuracy, "stops_when_no_better": stops}, "tags": tags}


ORACLE_SPA = [[0.6, 0.85, 0.95], [0.7, 0.8, 0.9], [0.5, 0.7, 0.85]]
P08_SPA = [[0.6, 0.75, 0.9], [0.7, 0.72, 0.8], [0.5, 0.6, 0.7]]


def base_results():
    """An older results dict: two methods on three cases, no study keys."""
    return {
        "kind": "spa-evaluation",
        "seed": 3,
        "created": "2024-01-01T00:00:00+00:00",
        "data": {"root": "/data", "fingerprint": "data-1", "split": "test", "cases": ["c1", "c2", "c3"]},
        "model": {"fingerprint": "model-1", "backbone": "litemedsam"},
        "protocol": {"max_rounds": 3, "targets": [0.8, 0.9], "first_prompt": "point"},
        "methods": {
            "spa": {"label": "SPA", "per_case": click_cases(ORACLE_SPA)},
            "click": {"label": "Clicks", "per_case": click_cases(P08_SPA)},
        },
    }


def study_results():
    """SPA (full, K_g = 1, two other users) and a click baseline, with rater alignment and profiles."""
    methods = {
        "spa": {"label": "SPA full", "per_case": spa_cases(ORACLE_SPA)},
        "spa_kg1": {"label": "SPA K1", "per_case": spa_cases(P08_SPA, ged=(0.5, 0.5, 0.8))},
        "spa_user_p0.8": {"label": "SPA p0.8", "per_case": spa_cases(P08_SPA)},
        "spa_user_stops": {
            "label": "SPA stops",
            "per_case": spa_cases([[0.6, 0.7], [0.7, 0.8, 0.9], [0.5]], stopped=(2, None, 1)),
        },
        "click": {"label": "Clicks", "per_case": click_cases([[0.5, 0.6, 0.7], [0.6, 0.7, 0.8], [0.4, 0.5, 0.6]])},
        "click_user_p0.8": {"label": "Clicks p0.8", "per_case": click_cases([[0.5, 0.6], [0.6, 0.6, 0.6], [0.4]])},
    }
    methods["spa_all_rounds"] = copy.deepcopy(methods["spa"]) | {"label": "SPA full, keeps choosing"}
    alignment_spa = {"a|b": {"c1": {"included": [0.5, 0.7, 0.8], "excluded": [0.6, 0.5, 0.4]}}}
    alignment_click = {
        "a|b": {"c1": {"included": [0.5, 0.6, 0.6], "excluded": [0.5, 0.5, 0.5]}},
        "b|a": {
            "c1": {"included": [0.4, 0.5, 0.6], "excluded": [0.7, 0.7, 0.6]},
            "c2": {"included": [0.6, 0.6, 0.6], "excluded": [0.5, 0.5, 0.5]},
        },
    }
    profile_sequence = {
        "order": ["c1", "c2", "c3"],
        "fresh": {"c1": [0.5, 0.95], "c2": [0.5, 0.7, 0.85], "c3": [0.6, 0.91]},
        "profile": {"c1": [0.5, 0.95], "c2": [0.92], "c3": [0.7, 0.93]},
        "profile_sessions": {"c1": 0, "c2": 1, "c3": 2},
    }
    return {
        "kind": "spa-evaluation",
        "seed": 3,
        "created": "2024-01-01T00:00:00+00:00",
        "data": {"root": "/data", "fingerprint": "data-1", "split": "test", "cases": ["c1", "c2", "c3"]},
        "model": {
            "spa": record("spa", "SPA shipped", ablation="full"),
            "spa_kg1": record("spa", "SPA shipped", ablation="K_g = 1"),
            "spa_user_p0.8": record("spa", "SPA shipped", accuracy=0.8, ablation="full"),
            "spa_user_stops": record("spa", "SPA shipped", stops=True, ablation="full"),
            "click": record("click", "click: LiteMedSAM", n_samples=1),
            "click_user_p0.8": record("click", "click: LiteMedSAM", accuracy=0.8, n_samples=1),
        },
        "protocol": {"max_rounds": 3, "targets": [0.8, 0.9], "first_prompt": "point", "accept_at": 0.9},
        "methods": methods,
        "rater_alignment": {
            "raters": ["a", "b"],
            "cases": ["c1", "c2"],
            "splits": ["a|b", "b|a"],
            "methods": {
                "spa": {"label": "SPA full", "per_split": alignment_spa},
                "click": {"label": "Clicks", "per_split": alignment_click},
            },
        },
        "profiles": {
            "styles": ["strict"],
            "cases": ["c1", "c2", "c3"],
            "accept_at": 0.9,
            "methods": {"spa": {"label": "SPA full", "per_style": {"strict": profile_sequence}}},
        },
    }


def _fmt(interval, digits, sign=""):
    """'mean [low, high]' as the report writes it."""
    mean, low, high = interval
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def section(markdown: str, heading: str) -> str:
    """The text of one '## ' section of the report."""
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(paths, results.json as loaded, report.md) of the study results."""
    paths = write_report(study_results(), tmp_path_factory.mktemp("report"))
    loaded = json.loads(paths["results"].read_text(encoding="utf-8"))
    return paths, loaded, paths["report"].read_text(encoding="utf-8")


def test_every_section_is_written_with_its_plots(written):
    paths, _, markdown = written
    for heading in NEW_HEADINGS:
        assert markdown.count(heading) == 1, heading
    assert {"rater_alignment_plot", "profiles_plot"} <= set(paths)
    for key in ("rater_alignment_plot", "profiles_plot"):
        assert paths[key].stat().st_size > 0
        with Image.open(paths[key]) as image:
            image.verify()
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert "rater_alignment.png" in markdown and "profiles.png" in markdown


def test_distribution_quality_summary_and_table(written):
    _, loaded, markdown = written
    quality_summary = loaded["methods"]["spa"]["summary"]["distribution"]
    assert quality_summary["n_cases"] == 3
    ged = mean_ci([0.2, 0.4, 0.3])
    assert quality_summary["round_1"]["ged"]["mean"] == pytest.approx(0.3)
    assert quality_summary["round_1"]["ged"]["low"] == pytest.approx(ged[1])
    assert quality_summary["round_1"]["rater_diversity"]["mean"] == pytest.approx(0.4)  # NaN (one rater) dropped
    assert quality_summary["last_round"]["ged"]["mean"] == pytest.approx(0.15)
    assert "distribution" not in loaded["methods"]["spa_all_rounds"].get("summary", {})
    table = section(markdown, "## Distribution quality of the samples")
    assert "GED² (d = 1 − IoU)" in table
    spa_row = next(line for line in table.splitlines() if line.startswith("| SPA full |"))
    assert f"0.300 [{ged[1]:.3f}, {ged[2]:.3f}]" in spa_row
    assert "SPA p0.8" not in table and "keeps choosing" not in table  # oracle users only, no copies


def test_simulated_users_table_and_stop_round(written):
    _, loaded, markdown = written
    stopped = loaded["methods"]["spa_user_stops"]["summary"]["stopped"]
    assert stopped["n_cases"] == 3 and stopped["n_stopped"] == 2
    assert stopped["round"]["mean"] == pytest.approx(1.5)
    assert "stopped" not in loaded["methods"]["spa"]["summary"]
    table = section(markdown, "## Simulated users")
    rows = [line for line in table.splitlines() if line.startswith("| SPA shipped") or line.startswith("| click")]
    users = [row.split(" | ")[:2] for row in rows]
    assert users == [
        ["| SPA shipped", "oracle"],
        ["| SPA shipped", "p = 0.8"],
        ["| SPA shipped", "stops when no candidate is better"],
        ["| click: LiteMedSAM", "oracle"],
        ["| click: LiteMedSAM", "p = 0.8"],
    ]  # the K_g = 1 ablation (oracle only, not compared with another user) is left out
    stops = rows[2]
    assert "| 0.700 [" in stops  # last-round Dice carried forward: (0.7 + 0.9 + 0.5) / 3
    assert f"| {_fmt(mean_ci([2.0, 1.0]), 2)} (2 of 3) |" in stops
    change = mean_ci([0.9 - 0.95, 0.8 - 0.9, 0.7 - 0.85])
    assert rows[1].endswith(f"| {_fmt(change, 3, '+')} |")
    assert rows[0].endswith("| – |") and rows[3].endswith("| – |")
    click_change = mean_ci([0.6 - 0.7, 0.6 - 0.8, 0.4 - 0.6])
    assert click_change[0] == pytest.approx(-0.5 / 3)
    assert rows[4].endswith(f"| {_fmt(click_change, 3, '+')} |")


def test_ablation_table_lists_the_oracle_spa_methods(written):
    _, _, markdown = written
    table = section(markdown, "## Ablations")
    rows = [line for line in table.splitlines() if line.startswith("| SPA")]
    assert [row.split(" | ")[:3] for row in rows] == [["| SPA full", "full", "8"], ["| SPA K1", "K_g = 1", "8"]]
    assert "0.600 [" in rows[1]  # K1's mean GED² in round 1: (0.5 + 0.5 + 0.8) / 3
    assert "Clicks" not in table and "p0.8" not in table


def test_rater_alignment_summary_and_tables(written):
    _, loaded, markdown = written
    summary = loaded["rater_alignment_summary"]
    spa = summary["spa"]
    assert spa["n_pairs"] == 1
    assert spa["included"]["change"]["mean"] == pytest.approx(0.3)
    assert spa["excluded"]["change"]["mean"] == pytest.approx(-0.2)
    assert spa["included"]["per_round"] == pytest.approx([0.5, 0.7, 0.8])
    assert spa["alignment_gap"]["mean"] == pytest.approx(0.3 - (-0.2))  # towards the included, away from the rest
    click = summary["click"]
    assert click["n_pairs"] == 3
    assert click["included"]["change"]["mean"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    assert click["per_split"]["b|a"]["n_cases"] == 2
    assert click["per_split"]["b|a"]["excluded_change"] == pytest.approx(-0.05)
    assert "b|a" not in spa["per_split"]
    text = section(markdown, "## Rater alignment")
    assert "| SPA full | 1 | 0.500 [0.500, 0.500] | 0.800 [0.800, 0.800] | +0.300 [+0.300, +0.300] |" in text
    assert "| a vs b | +0.300 / -0.200 (1) | +0.100 / +0.000 (1) |" in text
    assert "| b vs a | – | +0.100 / -0.050 (2) |" in text


def test_profiles_summary_and_table(written):
    _, loaded, markdown = written
    strict = loaded["profiles_summary"]["spa"]["per_style"]["strict"]
    assert strict["n_images"] == 2  # the first image is the same both ways
    # c2: fresh never reaches 0.9 (10), profile at round 1; c3: both at round 2
    assert strict["rounds_to_accept"] == {"fresh": [10, 2], "profile": [1, 2]}
    difference = strict["fresh_minus_profile"]["0.9"]
    expected = mean_ci([9.0, 0.0])
    assert difference["mean"] == pytest.approx(4.5)
    assert (difference["low"], difference["high"]) == pytest.approx(expected[1:])
    assert strict["noi"]["0.8"]["fresh"]["mean"] == pytest.approx(2.5)  # rounds 3 and 2
    assert strict["dice_round_1"]["profile"]["mean"] == pytest.approx(0.81)
    assert strict["profile_fewer_rounds"] == pytest.approx(0.5) and strict["profile_more_rounds"] == 0.0
    text = section(markdown, "## Profiles")
    row = next(line for line in text.splitlines() if line.startswith("| SPA full | strict |"))
    assert f"+4.50 [{expected[1]:+.2f}, {expected[2]:+.2f}]" in row
    assert "50.0 % / 0.0 %" in row


def test_a_written_results_file_reports_again(written, tmp_path: Path):
    _, loaded, markdown = written
    again = write_report(loaded, tmp_path)  # NaN came back as null
    second = again["report"].read_text(encoding="utf-8")
    for heading in NEW_HEADINGS:
        assert heading in second
    assert second == markdown


def test_older_results_get_no_study_sections(tmp_path: Path):
    paths = write_report(base_results(), tmp_path)
    assert set(paths) == {"results", "report", "dice_plot", "noi_plot"}
    markdown = paths["report"].read_text(encoding="utf-8")
    for heading in NEW_HEADINGS:
        assert heading not in markdown
    loaded = json.loads(paths["results"].read_text(encoding="utf-8"))
    assert "rater_alignment_summary" not in loaded and "profiles_summary" not in loaded
    assert set(loaded["methods"]["spa"]["summary"]).isdisjoint({"distribution", "stopped"})
    assert not any(path.name in ("rater_alignment.png", "profiles.png") for path in tmp_path.iterdir())


def test_oracle_only_runs_have_no_users_or_ablation_section(tmp_path: Path):
    results = study_results()
    for name in ("spa_kg1", "spa_user_p0.8", "spa_user_stops", "click_user_p0.8"):
        del results["methods"][name], results["model"][name]
    del results["rater_alignment"], results["profiles"]
    markdown = write_report(results, tmp_path)["report"].read_text(encoding="utf-8")
    assert "## Distribution quality of the samples" in markdown
    for heading in ("## Simulated users", "## Ablations", "## Rater alignment", "## Profiles"):
        assert heading not in markdown
