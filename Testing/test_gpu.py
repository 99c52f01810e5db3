"""The engine on a CUDA GPU: the same session as on the CPU, training steps, the model worker.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest -q Testing/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import disc_image

from SPASegmentationLib.metrics import dice
from SPASegmentationLib.model.build import build_model
from SPASegmentationLib.model.spa import SPAConfig
from SPASegmentationLib.session import Session
from SPASegmentationLib.training import TrainConfig, TrainingCase, train
from SPASegmentationLib.worker import ModelWorker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_on(device: str):
    torch.manual_seed(0)
    return build_model(SPAConfig()).to(device).eval()


def test_a_session_on_the_gpu_matches_the_cpu():
    image = disc_image()
    rounds = {}
    for device in ("cpu", "cuda"):
        session = Session(model_on(device), image, seed=5, n_samples=16)
        first = session.start(box=(80, 50, 160, 130))
        second = session.choose(0)
        rounds[device] = (first, second)
        assert session.accept().shape == image.shape
    for cpu, gpu in zip(*rounds.values(), strict=True):
        # Same latent draws on both devices; only floating-point order differs.
        assert np.abs(cpu.probability - gpu.probability).max() < 0.02
        assert dice(cpu.recommended, gpu.recommended) > 0.99
        assert cpu.candidates.shape == gpu.candidates.shape


def test_training_runs_on_the_gpu_and_changes_the_trained_parts(tmp_path):
    model = model_on("cuda").train()
    image = disc_image()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    r = np.hypot(xx - 120, yy - 90)
    embedding, geometry = model.encode(image)
    assert embedding.device.type == "cuda"
    cases = [TrainingCase("c0", embedding[0], geometry, {"tight": r < 31, "core": r < 35, "rim": r < 40})]
    before = {k: v.detach().clone() for k, v in model.spa_state_dict().items()}
    run = train(
        model,
        cases,
        tmp_path / "run",
        TrainConfig(steps=3, batch_size=1, rounds=2, n_samples=4, checkpoint_every=3, seed=1),
        progress=False,
    )
    assert run.steps_done == 3 and all(np.isfinite(h["loss"]) for h in run.history)
    after = model.spa_state_dict()
    assert any(not torch.equal(before[k].cpu(), after[k].cpu()) for k in before if k.startswith("generator."))
    assert (tmp_path / "run" / "spa_model.pt").is_file()


def test_the_model_worker_serves_a_gpu_session():
    model = model_on("cuda")
    worker = ModelWorker()
    try:
        session = worker.submit(Session, model, disc_image(), seed=1, n_samples=8).result(timeout=120)
        round_ = worker.submit(session.start, point=(120.0, 90.0)).result(timeout=120)
        assert round_.recommended.shape == (180, 240) and round_.n_candidates >= 1
    finally:
        worker.shutdown()
