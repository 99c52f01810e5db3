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
