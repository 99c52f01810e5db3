"""The evidence studies of `spa evaluate`: imperfect users, distribution quality, rater alignment, profiles, the
paper's preset, and the click baseline that learns (on the real LIDC test crops)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.evaluation.protocols import (
    PAPER_TARGETS_LIDC,
    EvaluationPlan,
    ablation_of,
    is_lidc,
    parse_users,
    weights_name,
)
from SPASegmentationLib.evaluation.runner import SimulatedUser
from SPASegmentationLib.evaluation.studies import profile_study, rater_alignment, rater_splits, style_target
from SPASegmentationLib.metrics import expected_calibration_error, sample_diversity
from SPASegmentationLib.model.spa import SPAConfig
from SPASegmentationLib.simulation.choices import imperfect_choice, nearest_candidate, sampled_error_click

CROPS = Path(__file__).resolve().parent / "data" / "lidc-cimd"
CLICK_MODEL = Path(__file__).resolve().parents[1] / "Resources" / "models" / "click_litemedsam.pt"


def disc(radius: float, shape=(40, 40), centre=(20, 20)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(xx - centre[0], yy - centre[1]) < radius


# ---------------------------------------------------------------- the simulated users
def test_an_imperfect_user_picks_the_nearest_candidate_at_the_stated_rate():
    target = disc(8)
    candidates = np.stack([disc(4), disc(8), disc(12), disc(16)])
    rng = np.random.default_rng(0)
    picks = [imperfect_choice(candidates, target, 0.6, rng) for _ in range(4000)]
    assert nearest_candidate(candidates, target) == 1
    assert abs(np.mean(np.equal(picks, 1)) - 0.6) < 0.03
    others = [p for p in picks if p != 1]
    assert set(others) == {0, 2, 3} and all(abs(others.count(k) / len(others) - 1 / 3) < 0.05 for k in (0, 2, 3))
    assert all(imperfect_choice(candidates, target, 1.0, rng) == 1 for _ in range(200))


def test_a_sampled_error_click_lies_in_the_error_and_is_labelled_by_it():
    target, prediction = disc(8), disc(5, centre=(14, 14))
    rng = np.random.default_rng(1)
    for _ in range(200):
        x, y, positive = sampled_error_click(prediction, target, rng, careful_share=0.0)
        row, col = int(y), int(x)
        assert prediction[row, col] != target[row, col] and positive == bool(target[row, col])
    assert sampled_error_click(target, target, rng, careful_share=0.0) is None


def test_users_parse_and_refuse_nonsense():
    assert parse_users("1,0.8,stops") == [
        SimulatedUser(1.0),
        SimulatedUser(0.8),
        SimulatedUser(stops_when_no_better=True),
    ]
    for bad, words in (("1.5", "(0, 1]"), ("often", "not a user"), ("0.8,0.8", "twice")):
        with pytest.raises(InputError, match=words.replace("(", r"\(").replace("]", r"\]")):
            parse_users(bad)


# ---------------------------------------------------------------- distribution quality
def test_sample_diversity_and_calibration_values():
    a, b = disc(6), disc(8)
    overlap = a.sum() / b.sum()  # a lies inside b: IoU = |a| / |b|
    assert sample_diversity([a, a]) == 0.0
    assert sample_diversity([a, b]) == pytest.approx(1 - overlap)
    assert np.isnan(sample_diversity([a]))
    raters = [a, b]  # the raters' mean: 1 inside a, 0.5 in the ring, 0 outside
    calibrated = a * 1.0 + (b & ~a) * 0.5
    assert expected_calibration_error(calibrated, raters) == pytest.approx(0.0, abs=1e-12)
    overconfident = b.astype(float)  # says 1 in the ring where only half the raters mark it
    ring_share = (b & ~a).sum()
    from scipy import ndimage

    region = ndimage.binary_dilation(b, iterations=3).sum()
    assert expected_calibration_error(overconfident, raters) == pytest.approx(0.5 * ring_share / region)


def test_rater_splits_and_styles():
    splits = rater_splits(["d", "a", "c", "b"])
    assert len(splits) == 14 and splits[0] == (("a",), ("b", "c", "d"))
    assert all(set(i).isdisjoint(e) and len(i) + len(e) == 4 for i, e in splits)
    raters = {"a": disc(4), "b": disc(6), "c": disc(8)}
    assert np.array_equal(style_target(raters, "generous"), disc(8))
    assert np.array_equal(style_target(raters, "strict"), disc(4))
    assert np.array_equal(style_target(raters, "majority"), disc(6))
    assert np.array_equal(style_target(raters, "rater:b"), disc(6))
    with pytest.raises(InputError, match="unknown profile style"):
        style_target(raters, "rater:zed")


def test_the_paper_preset_and_ablation_names(shipped_model):
    assert is_lidc(CROPS)
    assert weights_name(None) == weights_name(Path("Resources/models/spa_litemedsam.pt")) == "shipped"
    assert weights_name(Path("output/train/ablation_components1/spa_model.pt")) == "ablation_components1"
    assert weights_name(CLICK_MODEL) == "click_litemedsam"
    assert ablation_of(shipped_model.config) == "full"
    assert ablation_of(SPAConfig(n_components=1, feedback_mask=False)) == "K_g = 1, no mask prompt"
    plan = EvaluationPlan.from_options(data=CROPS, protocol="paper", baselines="none")
    assert plan.targets == PAPER_TARGETS_LIDC and plan.rounds == 6 and plan.n_samples == 48
    assert plan.studies == ["standard", "raters", "profiles"]
    users = sorted((m.user.accuracy, m.user.stops_when_no_better) for m in plan.methods.values())
    assert users == [(0.6, False), (0.8, False), (1.0, False), (1.0, True)]
    assert list(plan.oracle_methods()) == ["spa_token"]
    assert plan.study_cases is None
    capped = EvaluationPlan.from_options(data=CROPS, baselines="none", max_cases=9, study_cases=3)
    assert (capped.max_cases, capped.study_cases) == (9, 3)
    assert EvaluationPlan.from_options(data=CROPS, baselines="none", max_cases=5).study_cases == 5
    with pytest.raises(InputError, match="--study"):
        EvaluationPlan.from_options(data=CROPS, studies="raters,everything", baselines="none")


# ---------------------------------------------------------------- the studies on real crops
def test_rater_alignment_on_real_crops(shipped_model, tmp_path):
    """Every split of the four LIDC readers: the session's target is the included readers' consensus and the
    excluded readers' Dice is recorded beside it, per round."""
    from SPASegmentationLib.evaluation.runner import SpaMethod

    methods = {"spa": SpaMethod("SPA", shipped_model)}
    out = rater_alignment(
        methods, CROPS, "test", seed=0, max_rounds=2, first_prompt="box", n_samples=8, max_cases=2,
        cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    assert out["raters"] == ["label0", "label1", "label2", "label3"] and len(out["splits"]) == 14
    per_split = out["methods"]["spa"]["per_split"]
    assert per_split, "some split of the first two crops has two non-empty consensuses"
    for curves in per_split.values():
        for curve in curves.values():
            assert len(curve["included"]) == len(curve["excluded"]) == 2
            assert all(0.0 <= v <= 1.0 for v in curve["included"] + curve["excluded"])


def test_a_profile_carries_a_users_weights_to_their_next_image(shipped_model, tmp_path):
    """The first image is the same with and without a profile; from the second on, the profile run starts from
    the weights folded from the sessions before it (as the product's profile store folds them)."""
    from SPASegmentationLib.evaluation.runner import SpaMethod

    methods = {"spa": SpaMethod("SPA", shipped_model)}
    out = profile_study(
        methods, CROPS, "test", styles=["generous"], seed=0, max_rounds=2, accept_at=0.99, first_prompt="box",
        n_samples=8, max_cases=3, cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    sequence = out["methods"]["spa"]["per_style"]["generous"]
    first, *later = sequence["order"]
    assert sequence["fresh"][first] == sequence["profile"][first]
    assert [sequence["profile_sessions"][c] for c in sequence["order"]] == list(range(len(sequence["order"])))
    assert later and all(len(sequence["profile"][c]) <= 2 for c in later)


@pytest.mark.skipif(not CLICK_MODEL.is_file(), reason="the trained click baseline is not in Resources/models")
def test_the_learned_click_baseline_improves_with_every_click_on_held_out_images(tmp_path):
    """The click baseline that learns (`make train-clicks`, shipped in Resources/models), on procedural images it never
    saw (generator seed 7; it trained on seed 0's): from a click, its Dice rises over six correction clicks, where
    LiteMedSAM as shipped (trained with boxes only) cannot start from a click at all. (On the nine real LIDC crops it
    does not: the model card says where it breaks.)"""
    from SPASegmentationLib.data.synthetic import write_dataset
    from SPASegmentationLib.evaluation.protocols import run_plan

    write_dataset(tmp_path / "held_out", n_cases=8, seed=7)
    plan = EvaluationPlan.from_options(
        data=tmp_path / "held_out", models=[], click_models=[CLICK_MODEL], baselines="litemedsam", rounds=6,
        split="all", samples="8", targets="0.8,0.9", cache=tmp_path / "cache",
    )  # fmt: skip
    plan.methods = {name: m for name, m in plan.methods.items() if name.startswith("click")}
    written = run_plan(plan, tmp_path / "eval", progress=False)
    results = json.loads(written["results"].read_text(encoding="utf-8"))
    learned = results["methods"]["click_trained_all_rounds"]["summary"]["dice_per_round"]["mean"]
    shipped = results["methods"]["click_litemedsam_all_rounds"]["summary"]["dice_per_round"]["mean"]
    assert learned[5] > learned[0] + 0.02 and learned[1] > learned[0] + 0.02, learned
    assert min(learned[r + 1] - learned[r] for r in range(5)) > -0.01, learned  # no click makes it clearly worse
    assert learned[0] > shipped[0] + 0.3, (learned, shipped)


def test_distribution_quality_counts_the_components_in_use():
    from SPASegmentationLib.evaluation.runner import distribution_quality

    raters = {"a": disc(6), "b": disc(8)}
    samples = np.stack([disc(6), disc(8), disc(7)])
    probability = samples.mean(0)
    even = distribution_quality(samples, probability, raters, np.full(4, 0.25))
    collapsed = distribution_quality(samples, probability, raters, np.array([0.0, 1.0, 0.0, 0.0]))
    assert even["effective_components"] == pytest.approx(4.0) and collapsed["effective_components"] == 1.0
    assert even["ged"] == collapsed["ged"] >= 0.0 and even["rater_diversity"] > 0.0
