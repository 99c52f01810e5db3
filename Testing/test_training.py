"""Training with simulated users: it learns, it is seeded, and it resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import disc_image

from SPASegmentationLib.model.build import build_model, load_model
from SPASegmentationLib.model.spa import SPAConfig
from SPASegmentationLib.training import TrainConfig, TrainingCase, train


@pytest.fixture(scope="module")
def cases():
    """Two images with three raters of distinct styles (tight, core, generous)."""
    torch.manual_seed(0)
    model = build_model(SPAConfig())
    out = []
    for i, (cx, cy) in enumerate([(120, 90), (100, 100)]):
        image = disc_image(centre=(cx, cy), seed=i)
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        r = np.hypot(xx - cx, yy - cy)
        embedding, geometry = model.encode(image)
        out.append(TrainingCase(f"c{i}", embedding[0], geometry, {"tight": r < 31, "core": r < 35, "rim": r < 40}))
    return out


def fresh_model():
    torch.manual_seed(0)
    return build_model(SPAConfig())


CONFIG = dict(batch_size=2, rounds=2, n_samples=4, checkpoint_every=2, log_every=1, seed=4)


def test_training_resumes_to_exactly_the_same_weights(tmp_path, cases, monkeypatch):
    straight = fresh_model()
    train(straight, cases, tmp_path / "straight", TrainConfig(steps=4, **CONFIG), progress=False)

    import SPASegmentationLib.training as training

    real_step, calls = training.training_step, []

    def dies_at_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed after the step-2 checkpoint
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "training_step", dies_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), cases, tmp_path / "resumed", TrainConfig(steps=4, **CONFIG), progress=False)
    monkeypatch.setattr(training, "training_step", real_step)
    resumed = fresh_model()  # a new process starts from scratch and finds the checkpoint
    run = train(resumed, cases, tmp_path / "resumed", TrainConfig(steps=4, **CONFIG), progress=False)
    assert run.steps_done == 4
    for key, value in straight.spa_state_dict().items():
        assert torch.allclose(value, resumed.spa_state_dict()[key], atol=1e-6), key
    assert (tmp_path / "resumed" / "train_log.jsonl").read_text().count("\n") == 4
    loaded = load_model(tmp_path / "resumed" / "spa_model.pt")
    assert loaded.fingerprint() == resumed.fingerprint()
    assert loaded.training_info["steps"] == 4


def test_training_reduces_the_loss(tmp_path, cases):
    model = fresh_model()
    run = train(
        model,
        cases,
        tmp_path / "run",
        TrainConfig(steps=12, lr=1e-3, **{**CONFIG, "checkpoint_every": 100}),
        progress=False,
    )
    first = np.mean([h["aggregate_bce"] for h in run.history[:3]])
    last = np.mean([h["aggregate_bce"] for h in run.history[-3:]])
    assert last < first * 0.9
    # The image encoder stays pretrained (its embeddings are cached); the decoder trains.
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.image_encoder."))
    assert all(p.requires_grad for n, p in model.named_parameters() if "mask_decoder.transformer" in n)


def test_head_only_training_keeps_the_decoder_transformer_pretrained(tmp_path, cases):
    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "mask_decoder.transformer" in n}
    train(model, cases, tmp_path / "run", TrainConfig(steps=2, deep_rounds=False, **CONFIG), progress=False)
    # Unchanged up to the float16 rounding every saved SPA model gets.
    assert all(torch.equal(p, before[n].half().float()) for n, p in model.named_parameters() if n in before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in before)


def test_a_small_structure_is_also_learned_in_its_focus_window(tmp_path):
    """focus_crops adds each small structure's case a second time, as the window a session segments it in (the
    same crop, intensity scale and embedding), and leaves large structures and empty cases alone."""
    import SimpleITK as sitk

    from SPASegmentationLib.embeddings import EmbeddingCache
    from SPASegmentationLib.model.preprocess import focus_window, intensity_window
    from SPASegmentationLib.training import load_training_cases

    small = disc_image(height=200, width=200, centre=(60, 140), radius=5.0)
    large = disc_image(height=200, width=200, centre=(100, 100), radius=45.0, seed=1)
    yy, xx = np.mgrid[:200, :200]

    def write_case(folder, image, raters):
        folder.mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "image.nrrd"))
        for name, mask in raters.items():
            sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8) * 255), str(folder / f"rater_{name}.png"))

    write_case(
        tmp_path / "data" / "small", small, {"a": np.hypot(xx - 60, yy - 140) < 5, "b": np.hypot(xx - 61, yy - 140) < 7}
    )
    write_case(tmp_path / "data" / "large", large, {"a": np.hypot(xx - 100, yy - 100) < 45})
    model = fresh_model()
    plain, _ = load_training_cases(tmp_path / "data", "all", model, tmp_path / "cache", progress=False)
    both, _ = load_training_cases(tmp_path / "data", "all", model, tmp_path / "cache", progress=False, focus_crops=True)
    assert len(plain) == 2 and all(c.focus is None for c in plain)
    assert [(c.case_id, c.focus is not None) for c in both] == [("large", False), ("small", False), ("small", True)]
    crop = both[-1]
    assert crop.focus == focus_window((55, 134, 67, 146), 200, 200)  # around everything the raters marked
    assert (
        crop.raters["b"].shape == (crop.focus.height, crop.focus.width)
        and crop.raters["b"].sum() == (np.hypot(xx - 61, yy - 140) < 7).sum()
    )
    assert (crop.geometry.height, crop.geometry.width) == (crop.focus.height, crop.focus.width)
    expected = EmbeddingCache(model, folder=tmp_path / "cache").get(crop.focus.crop(small), intensity_window(small))
    assert torch.allclose(crop.embedding, expected[0].cpu())


def test_the_click_baseline_trains_the_decoder_and_leaves_the_preference_parts(tmp_path, cases):
    """spa train --method clicks: SAM-style iterative clicks teach the plain decoder (the clicked rounds improve on
    the first), the generator and conditioning stay as built, and the weights file says it is a click model."""
    model = fresh_model()
    before = {k: v.clone() for k, v in model.spa_state_dict().items()}
    config = TrainConfig(steps=6, batch_size=2, rounds=4, log_every=1, seed=1, method="clicks", decoder_lr=1e-4)
    run = train(model, cases, tmp_path / "clicks", config, progress=False)
    after = model.spa_state_dict()
    untouched = [k for k in before if k.startswith(("generator.", "conditioning."))]
    assert all(torch.equal(before[k].half().float(), after[k]) for k in untouched)  # saved as float16, nothing more
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.mask_decoder."))
    assert all(h["dice_last"] >= h["dice_first"] for h in run.history[-3:])  # clicks fix what the first round missed
    loaded = load_model(tmp_path / "clicks" / "spa_model.pt")
    assert loaded.training_info["train_config"]["method"] == "clicks"


def test_the_ablation_switches_reach_training_and_sessions(tmp_path, cases):
    """No mask prompt: the feedback prompt carries the point alone; no mixture update: round 2's generator gets the
    session's initial weights, so a collapsed round-1 mixture does not carry over."""
    from SPASegmentationLib.engine import feedback_prompt, next_weights, run_model_round, start_prompt
    from SPASegmentationLib.preference import uniform_weights

    model = build_model(SPAConfig(feedback_mask=False, carry_mixture=False))
    case = cases[0]
    prompt = start_prompt(case.geometry, (120, 90))
    first = run_model_round(model, case.embedding[None], case.geometry, prompt, uniform_weights(16), 8, seed=1)
    follow = feedback_prompt(model, first, 0, seed=2)
    assert follow.mask is None
    initial = uniform_weights(16)
    assert next_weights(model, first.mixture.weights, initial) is initial
    shipped_like = build_model(SPAConfig())
    assert next_weights(shipped_like, first.mixture.weights, initial) is first.mixture.weights
    with_mask = feedback_prompt(shipped_like, first, 0, seed=2)
    assert with_mask.mask is not None and with_mask.points == follow.points  # the same feedback but for the mask
    run = train(
        model,
        cases,
        tmp_path / "ablation",
        TrainConfig(steps=2, batch_size=2, rounds=2, n_samples=4, log_every=1, seed=3),
        progress=False,
    )
    assert run.steps_done == 2
    reloaded = load_model(tmp_path / "ablation" / "spa_model.pt")
    assert reloaded.config.feedback_mask is False and reloaded.config.carry_mixture is False
