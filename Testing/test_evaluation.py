"""Tests of the evaluation metrics, the simulated user's fixed inputs and the written report."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.evaluation.report import markdown_summary_table, summarise, write_report
from SPASegmentationLib.metrics import (
    candidate_diversity,
    dice,
    failure_rate,
    generalized_energy_distance,
    iou,
    mean_ci,
    rounds_to_reach,
)
from SPASegmentationLib.simulation.choices import largest_error_click
from SPASegmentationLib.simulation.preferences import consensus, draw_preference, fixed_preferences
from SPASegmentationLib.simulation.prompts import initial_box, initial_point


def box_mask(shape, rows, cols):
    """A bool mask with the inclusive row and column ranges set."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# ---------------------------------------------------------------- metrics


def test_dice_and_iou_values_and_edge_cases():
    a = box_mask((10, 10), (0, 3), (0, 3))  # 16 px
    b = box_mask((10, 10), (2, 5), (0, 3))  # 16 px, 8 shared
    assert dice(a, b) == pytest.approx(2 * 8 / 32)
    assert iou(a, b) == pytest.approx(8 / 24)
    empty = np.zeros((10, 10), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert dice(a, empty) == 0.0
    assert iou(a, empty) == 0.0
    assert dice(a, a) == 1.0
    assert dice(a.astype(np.uint8), a) == 1.0
    with pytest.raises(InputError):
        dice(a, np.zeros((5, 5), dtype=bool))


def test_rounds_to_reach_and_failure_rate():
    assert rounds_to_reach([0.5, 0.79, 0.8, 0.95], 0.8) == 3
    assert rounds_to_reach([0.91], 0.9) == 1
    assert rounds_to_reach([0.5, 0.6], 0.9) == 10
    assert rounds_to_reach([0.5, 0.6], 0.9, fail_value=7) == 7
    lists = [[0.5, 0.85], [0.9], [0.1, 0.2, 0.3], [0.79]]
    assert failure_rate(lists, 0.8) == pytest.approx(2 / 4)
    assert failure_rate(lists, 0.95) == pytest.approx(1.0)
    with pytest.raises(InputError):
        rounds_to_reach([], 0.8)
    with pytest.raises(InputError):
        rounds_to_reach([0.5], 80)
    with pytest.raises(InputError):
        failure_rate([], 0.8)


def test_mean_ci_matches_hand_computation():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    # sd = sqrt(5/3); se = sd / 2; t(0.975, 3 dof) = 3.182446305284263
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0
    assert mean == pytest.approx(2.5)
    assert low == pytest.approx(2.5 - half)
    assert high == pytest.approx(2.5 + half)
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7)
    assert mean_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(InputError):
        mean_ci([])
    with pytest.raises(InputError):
        mean_ci([1.0, float("nan")])


def test_generalized_energy_distance():
    a = box_mask((10, 10), (0, 3), (0, 3))
    b = box_mask((10, 10), (2, 5), (0, 3))
    c = box_mask((10, 10), (6, 9), (6, 9))
    x = 1.0 - 8 / 24  # d(a, b)
    assert generalized_energy_distance([a, b], [a, b]) == pytest.approx(0.0)
    assert generalized_energy_distance([a, b, c], [c, a, b]) == pytest.approx(0.0)
    # one sample a against raters a, b: 2 * x/2 - 0 - (2x)/4 = x/2
    assert generalized_energy_distance([a], [a, b]) == pytest.approx(x / 2)
    assert generalized_energy_distance([c], [a, b]) > 0.5
    # unbiased: the within-set terms leave out the pairs of a mask with itself
    assert generalized_energy_distance([a, b], [a, b], unbiased=True) == pytest.approx(x - x - x)
    empty = np.zeros((10, 10), dtype=bool)
    assert generalized_energy_distance([empty], [empty]) == 0.0
    with pytest.raises(InputError):
        generalized_energy_distance([], [a])
    with pytest.raises(InputError):
        generalized_energy_distance([a], [a, b], unbiased=True)


def test_candidate_diversity():
    a = box_mask((10, 10), (0, 3), (0, 3))
    b = box_mask((10, 10), (2, 5), (0, 3))
    c = box_mask((10, 10), (6, 9), (6, 9))
    assert candidate_diversity([a, b, c]) == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert candidate_diversity([a, a]) == 1.0
    assert math.isnan(candidate_diversity([a]))
    assert math.isnan(candidate_diversity([]))


# ---------------------------------------------------------------- protocol


def overlapping_raters():
    """Four raters sharing a core square, each with its own extra strip."""
    shape = (20, 20)
    core = box_mask(shape, (6, 13), (6, 13))
    return {
        "r1": core | box_mask(shape, (2, 5), (6, 13)),
        "r2": core | box_mask(shape, (14, 17), (6, 13)),
        "r3": core | box_mask(shape, (6, 13), (2, 5)),
        "r4": core | box_mask(shape, (6, 13), (14, 17)),
    }


def test_draw_preference_is_uniform_over_subsets():
    raters = overlapping_raters()
    rng = np.random.default_rng(123)
    draws = 3000
    counts = {}
    for _ in range(draws):
        subset, target = draw_preference(raters, rng)
        assert target.any()
        counts[tuple(subset)] = counts.get(tuple(subset), 0) + 1
    names = sorted(raters)
    all_subsets = {c for k in range(1, 5) for c in itertools.combinations(names, k)}
    assert set(counts) == all_subsets
    expected = draws / 15
    chi_square = sum((n - expected) ** 2 / expected for n in counts.values())
    assert chi_square < 36.12  # 14 degrees of freedom, p = 0.001


def test_draw_preference_is_deterministic_and_consensus_is_majority():
    raters = overlapping_raters()
    first = [draw_preference(raters, np.random.default_rng(7))[0] for _ in range(3)]
    again = [draw_preference(raters, np.random.default_rng(7))[0] for _ in range(3)]
    assert first == again
    reordered = dict(reversed(list(raters.items())))
    assert draw_preference(reordered, np.random.default_rng(7))[0] == first[0]
    subset, target = draw_preference(raters, np.random.default_rng(7))
    assert np.array_equal(target, consensus(raters, subset))
    # three raters: a pixel marked by two of them is kept, by one of them dropped
    three = consensus(raters, ["r1", "r2", "r3"])
    assert three[8, 8] and not three[3, 8]
    # two raters: mean 0.5 is kept, so the union
    assert np.array_equal(consensus(raters, ["r1", "r2"]), raters["r1"] | raters["r2"])
    with pytest.raises(InputError):
        consensus(raters, ["nobody"])


def test_draw_preference_redraws_empty_consensus_and_falls_back():
    shape = (12, 12)
    disjoint = {
        "a": box_mask(shape, (0, 1), (0, 1)),
        "b": box_mask(shape, (4, 6), (4, 6)),
        "c": box_mask(shape, (8, 11), (8, 11)),
    }
    rng = np.random.default_rng(0)
    for _ in range(300):
        subset, target = draw_preference(disjoint, rng)
        assert subset != ["a", "b", "c"]  # a third each: empty consensus, redrawn
        assert target.any()
    # find a generator whose first draw is the full set, then allow one try only
    for seed in range(200):
        if int(np.random.default_rng(seed).integers(1, 8)) == 7:
            break
    subset, target = draw_preference(disjoint, np.random.default_rng(seed), max_tries=1)
    assert subset == ["c"]  # the largest rater (16 px)
    assert np.array_equal(target, disjoint["c"])
    tied = {"b": disjoint["b"], "a": box_mask(shape, (0, 2), (0, 2)), "c": box_mask(shape, (9, 11), (9, 11))}
    assert draw_preference(tied, np.random.default_rng(seed), max_tries=1)[0] == ["a"]  # 9 px each: first name
    empty = {"a": np.zeros(shape, dtype=bool), "b": np.zeros(shape, dtype=bool)}
    with pytest.raises(InputError):
        draw_preference(empty, np.random.default_rng(0))


def test_fixed_preferences_are_stable_per_case():
    cases = {f"case{i:03d}": ["r1", "r2", "r3", "r4"] for i in range(20)}
    first = fixed_preferences(cases, seed=5)
    assert first == fixed_preferences(cases, seed=5)
    more = dict(cases)
    more["new_case"] = ["r1", "r2", "r3", "r4"]
    more_first = {"zzz": ["r1", "r2"], **more}
    extended = fixed_preferences(more_first, seed=5)
    for case_id in cases:
        assert extended[case_id] == first[case_id]
    other_seed = fixed_preferences(cases, seed=6)
    assert other_seed != first
    for subset in first.values():
        assert subset and set(subset) <= {"r1", "r2", "r3", "r4"}
    # with masks the first draw is the same subset as with names only (no empty consensus here)
    raters = overlapping_raters()
    with_masks = fixed_preferences({case_id: raters for case_id in cases}, seed=5)
    assert with_masks == first
    with pytest.raises(InputError):
        fixed_preferences(cases, seed=-1)


def deepest_depth(region):
    """Brute force: for each region pixel, the distance to the nearest pixel outside (border included)."""
    padded = np.pad(region, 1)
    outside = np.argwhere(~padded)
    depth = np.zeros(padded.shape)
    for r, c in np.argwhere(padded):
        depth[r, c] = np.sqrt(((outside - [r, c]) ** 2).sum(axis=1)).min()
    return depth[1:-1, 1:-1]


def test_initial_point_is_deepest_in_all_rater_region():
    raters = overlapping_raters()
    target = consensus(raters, ["r1", "r2"])
    x, y = initial_point(raters, target)
    all_region = np.logical_and.reduce(list(raters.values())) & target
    assert all_region[int(y), int(x)]
    depth = deepest_depth(all_region)
    assert depth[int(y), int(x)] == pytest.approx(depth.max())
    # hand case: one 5 x 5 square at rows 3..7, cols 10..14 -> centre (x=12, y=5)
    square = box_mask((12, 20), (3, 7), (10, 14))
    assert initial_point({"a": square, "b": square | box_mask((12, 20), (0, 1), (0, 1))}, square) == (12.0, 5.0)
    # ties go to the lowest row, then column: a 2 x 2 square
    small = box_mask((6, 6), (2, 3), (2, 3))
    assert initial_point({"a": small}, small) == (2.0, 2.0)


def test_initial_point_falls_back_to_target():
    shape = (12, 12)
    raters = {"a": box_mask(shape, (0, 2), (0, 2)), "b": box_mask(shape, (6, 10), (6, 10))}
    target = raters["b"]
    assert initial_point(raters, target) == (8.0, 8.0)
    with pytest.raises(InputError):
        initial_point(raters, np.zeros(shape, dtype=bool))


def test_initial_box():
    target = box_mask((20, 30), (4, 9), (10, 20))
    assert initial_box(target) == (10.0, 4.0, 20.0, 9.0)
    assert initial_box(target, margin_px=5) == (5.0, 0.0, 25.0, 14.0)
    assert initial_box(target, margin_px=50) == (0.0, 0.0, 29.0, 19.0)
    jittered = initial_box(target, rng=np.random.default_rng(1), jitter_px=2.0)
    assert jittered == initial_box(target, rng=np.random.default_rng(1), jitter_px=2.0)
    assert all(abs(j - b) <= 2.0 for j, b in zip(jittered, (10.0, 4.0, 20.0, 9.0), strict=True))
    with pytest.raises(InputError):
        initial_box(target, jitter_px=2.0)


def test_largest_error_click_picks_larger_region_with_label():
    shape = (30, 30)
    target = box_mask(shape, (0, 9), (0, 9))
    # missed 3 x 3 corner (9 px) and an extra 5 x 5 blob (25 px): negative click at the blob centre
    prediction = target & ~box_mask(shape, (0, 2), (0, 2))
    prediction |= box_mask(shape, (20, 24), (15, 19))
    assert largest_error_click(prediction, target) == (17.0, 22.0, False)
    # missed 5 x 5 block (25 px) and an extra 3 x 3 blob (9 px): positive click in the missed block
    prediction = target & ~box_mask(shape, (3, 7), (3, 7))
    prediction |= box_mask(shape, (20, 22), (20, 22))
    assert largest_error_click(prediction, target) == (5.0, 5.0, True)
    assert largest_error_click(target, target) is None
    x, y, positive = largest_error_click(np.zeros(shape, dtype=bool), target)
    assert positive and target[int(y), int(x)]


# ---------------------------------------------------------------- report


def make_results():
    """Two methods on three cases; method B stopped early on case c1."""
    return {
        "kind": "spa-evaluation",
        "seed": 42,
        "created": "2024-01-01T00:00:00+00:00",
        "data": {"root": "/data/lidc", "fingerprint": "data-abc123", "split": "test", "cases": ["c1", "c2", "c3"]},
        "model": {"fingerprint": "model-def456", "backbone": "medsam-lite", "conditioning": "film"},
        "protocol": {
            "max_rounds": 3,
            "targets": [0.8, 0.9],
            "first_prompt": "point",
            "preferences": {"c1": ["r1"], "c2": ["r1", "r3"], "c3": ["r1", "r2", "r3", "r4"]},
        },
        "methods": {
            "spa": {
                "label": "SPA (full)",
                "per_case": {
                    "c1": {
                        "dice": [0.7, 0.85, 0.95],
                        "seconds_per_round": 0.2,
                        "candidate_diversity": [0.8, 0.6, 0.7],
                        "ged": 0.3,
                    },
                    "c2": {
                        "dice": [0.9, 0.92, 0.93],
                        "seconds_per_round": 0.4,
                        "candidate_diversity": [0.9, float("nan")],
                        "ged": 0.1,
                    },
                    "c3": {"dice": [0.5, 0.6, 0.7], "seconds_per_round": 0.3, "candidate_diversity": [], "ged": 0.2},
                },
            },
            "clicks": {
                "label": "Click refinement",
                "per_case": {
                    "c1": {"dice": [0.85], "seconds_per_round": 0.1},
                    "c2": {"dice": [0.6, 0.7, 0.75], "seconds_per_round": 0.1},
                    "c3": {"dice": [0.4, 0.82, 0.91], "seconds_per_round": 0.1},
                },
            },
        },
    }


def hand_interval(values, t_quantile):
    """Mean and Student-t interval computed by hand."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile * sd / math.sqrt(n)
    return mean, mean - half, mean + half


T2 = 4.302652729911275  # Student-t 0.975 quantile, 2 degrees of freedom


def test_summarise_matches_hand_computation():
    results = make_results()
    spa = summarise(results["methods"]["spa"], [0.8, 0.9], 3)
    assert spa["n_cases"] == 3
    for r, values in enumerate(([0.7, 0.9, 0.5], [0.85, 0.92, 0.6], [0.95, 0.93, 0.7])):
        mean, low, high = hand_interval(values, T2)
        assert spa["dice_per_round"]["mean"][r] == pytest.approx(mean)
        assert spa["dice_per_round"]["low"][r] == pytest.approx(low)
        assert spa["dice_per_round"]["high"][r] == pytest.approx(high)
    assert spa["noi"]["0.8"]["mean"] == pytest.approx((2 + 1 + 10) / 3)
    assert spa["noi"]["0.9"]["mean"] == pytest.approx((3 + 1 + 10) / 3)
    assert spa["noi"]["0.8"]["low"] == pytest.approx(hand_interval([2, 1, 10], T2)[1])
    assert spa["failure_rate"] == {"0.8": pytest.approx(1 / 3), "0.9": pytest.approx(1 / 3)}
    assert spa["seconds_per_round"] == pytest.approx(0.3)
    # diversity: per-case means 0.7 and 0.9 (NaN dropped, empty case skipped)
    assert spa["candidate_diversity"]["mean"] == pytest.approx(0.8)
    assert spa["ged"]["mean"] == pytest.approx(0.2)

    clicks = summarise(results["methods"]["clicks"], [0.8, 0.9], 3)
    # c1 stopped after round 1: 0.85 carried forward
    assert clicks["dice_per_round"]["mean"] == pytest.approx(
        [(0.85 + 0.6 + 0.4) / 3, (0.85 + 0.7 + 0.82) / 3, (0.85 + 0.75 + 0.91) / 3]
    )
    assert clicks["noi"]["0.8"]["mean"] == pytest.approx((1 + 10 + 2) / 3)
    assert clicks["noi"]["0.9"]["mean"] == pytest.approx((10 + 10 + 3) / 3)
    assert clicks["failure_rate"]["0.9"] == pytest.approx(2 / 3)
    assert "candidate_diversity" not in clicks and "ged" not in clicks
    with pytest.raises(InputError):
        summarise({"per_case": {"c1": {"dice": [0.1, 0.2, 0.3, 0.4]}}}, [0.8], 3)
    with pytest.raises(InputError):
        summarise({"per_case": {}}, [0.8], 3)


def test_write_report_produces_all_files(tmp_path: Path):
    results = make_results()
    paths = write_report(results, tmp_path / "report")
    assert set(paths) == {"results", "report", "dice_plot", "noi_plot"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert "summary" not in results["methods"]["spa"]  # the input is left unchanged

    loaded = json.loads(paths["results"].read_text(encoding="utf-8"))
    assert loaded["kind"] == "spa-evaluation" and loaded["seed"] == 42
    assert loaded["protocol"]["preferences"]["c2"] == ["r1", "r3"]
    spa_summary = loaded["methods"]["spa"]["summary"]
    assert spa_summary["dice_per_round"]["mean"][0] == pytest.approx(0.7)
    assert spa_summary["noi"]["0.8"]["mean"] == pytest.approx(13 / 3)
    assert spa_summary["failure_rate"]["0.9"] == pytest.approx(1 / 3)
    assert loaded["methods"]["clicks"]["summary"]["noi"]["0.9"]["mean"] == pytest.approx(23 / 3)
    assert loaded["methods"]["spa"]["per_case"]["c2"]["candidate_diversity"][1] is None  # NaN -> null

    markdown = paths["report"].read_text(encoding="utf-8")
    for expected in (
        "# SPA evaluation report",
        "Seed: 42",
        "data-abc123",
        "model-def456",
        "SPA (full)",
        "Click refinement",
        "Round 3",
        "NoI@0.8",
        "Failure@0.9",
        "0.700 [",
        "33.3 %",
        "3 stored",
        "dice_vs_round.png",
        "noi.png",
    ):
        assert expected in markdown, expected

    for key in ("dice_plot", "noi_plot"):
        pixels = mpimg.imread(paths[key])
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
        rgb = pixels[..., :3]
        assert rgb.std() > 0.05
        assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20


def test_markdown_summary_table_has_the_three_tables():
    results = make_results()
    text = markdown_summary_table(results)
    assert text.count("| Method |") == 3  # Dice per round; NoI and failures; where it breaks
    assert "SPA (full)" in text and "Click refinement" in text
    assert "NoI@0.9" in text and "Round 1" in text and "moved away from the choice" in text
    with pytest.raises(InputError):
        markdown_summary_table({"kind": "other"})


def test_summary_breaks_results_down_by_size_and_choice():
    results = make_results()
    spa = results["methods"]["spa"]["per_case"]
    spa["c1"].update(size="small", dice_to_choice=[[0.5, 0.6], [0.6, 0.55]])  # the second choice moved away
    spa["c2"].update(size="small", dice_to_choice=[[0.7, 0.7]])
    spa["c3"].update(size="large", dice_to_choice=[])
    summary = summarise(results["methods"]["spa"], [0.8], 3)
    assert summary["moved_away"] == {"choices": 3, "rate": pytest.approx(1 / 3)}
    assert list(summary["by_size"]) == ["small", "large"]  # small, medium, large order; medium absent
    assert summary["by_size"]["small"]["n_cases"] == 2
    assert summary["by_size"]["small"]["dice_per_round"] == pytest.approx([0.8, 0.885, 0.94])
    assert summary["largest_drop"] == 0.0
    falling = summarise({"per_case": {"a": {"dice": [0.9, 0.7, 0.75]}}}, [0.8], 3)
    assert falling["largest_drop"] == pytest.approx(0.2) and "moved_away" not in falling
