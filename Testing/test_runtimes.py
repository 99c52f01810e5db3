"""Encoder runtimes: the fast paths give PyTorch's embeddings and candidates on the bundled sample and the real
LIDC-IDRI test crops; lossy ones are keyed apart; choices that cannot work are refused with the fix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from SPASegmentationLib.data.detect import open_dataset
from SPASegmentationLib.data.folder import MultiRaterFolder
from SPASegmentationLib.embeddings import EmbeddingCache
from SPASegmentationLib.errors import InputError
from SPASegmentationLib.metrics import dice
from SPASegmentationLib.model import runtimes
from SPASegmentationLib.model.runtimes import EncoderRuntime, resolve_runtime
from SPASegmentationLib.resources import sample_case_dir
from SPASegmentationLib.session import Session
from SPASegmentationLib.simulation.prompts import initial_point

CROPS = Path(__file__).resolve().parent / "data" / "lidc-cimd"


@pytest.fixture(scope="module")
def model():
    """A model of its own (its encoder runtime changes here), the shipped weights."""
    from SPASegmentationLib.model.build import default_model

    return default_model()


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="module")
def cases():
    """The bundled sample and the real test crops, each with the largest rater's first click."""
    sample = sample_case_dir()
    loaded = [MultiRaterFolder(sample.parent).load(sample.name)]
    dataset = open_dataset(CROPS)
    loaded += [dataset.load(case_id) for case_id in dataset.split("test")]
    return [(case.image, initial_point(case.raters, max(case.raters.values(), key=np.sum))) for case in loaded]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _candidates(model, image, point) -> list[np.ndarray]:
    """Candidates of the start and of the round after choosing the last candidate."""
    session = Session(model, image, seed=0)
    rounds = [session.start(point=point)]
    for k in (3,):
        rounds.append(session.choose(min(k, rounds[-1].n_candidates - 1)))
    return [r.candidates for r in rounds]


def _with_runtime(model, runtime, cache):
    model.backbone.use_encoder_runtime(runtime, cache_dir=cache)
    return model


def test_openvino_gives_torchs_embeddings_and_identical_candidates(model, cases, encoder_cache):
    _with_runtime(model, "torch", encoder_cache)
    reference = [(model.encode(image)[0], _candidates(model, image, point)) for image, point in cases]
    try:
        assert _with_runtime(model, "openvino", encoder_cache).backbone.encoder_runtime is EncoderRuntime.OPENVINO
        assert len(cases) == 10  # the sample and nine real crops
        for (image, point), (embedding, candidates) in zip(cases, reference, strict=True):
            fast = model.encode(image)[0]
            assert _cosine(fast, embedding) >= 0.99999
            assert float((fast - embedding).abs().max()) < 1e-3 * float(embedding.abs().max())
            for ours, theirs in zip(_candidates(model, image, point), candidates, strict=True):
                np.testing.assert_array_equal(ours, theirs)
    finally:
        _with_runtime(model, "torch", encoder_cache)


def test_float32_torch_settings_match_eager(model, cases, encoder_cache):
    image = cases[0][0]
    reference = model.encode(image)[0]
    try:
        for runtime in ("torch-channels-last", "onnxruntime"):  # torch-jit: `spa bench --encoders` (25 s to trace)
            _with_runtime(model, runtime, encoder_cache)
            assert _cosine(model.encode(image)[0], reference) >= 0.99999, runtime
            assert model.backbone.embedding_key() == "79d8c9dca6db"  # float32: the cached embeddings are shared
    finally:
        _with_runtime(model, "torch", encoder_cache)


def test_lossy_runtimes_stay_within_their_tolerance_and_are_cached_apart(model, cases, encoder_cache):
    references = [model.encode(image)[0] for image, _ in cases]
    image, point = cases[1]
    reference = _candidates(model, image, point)
    lossy = "openvino-bf16" if runtimes.native_bfloat16() else "torch-bf16"
    try:
        _with_runtime(model, lossy, encoder_cache)
        assert model.backbone.embedding_key() == "79d8c9dca6db-bfloat16"
        cache = EmbeddingCache(model)
        assert cache.key(image).backbone == "79d8c9dca6db-bfloat16"
        for (other, _), embedding in zip(cases, references, strict=True):
            assert 0.99 <= _cosine(model.encode(other)[0], embedding) < 0.99999  # measured 0.993-0.998
        for ours, theirs in zip(_candidates(model, image, point)[:1], reference[:1], strict=True):
            assert ours.shape == theirs.shape
            assert min(dice(a, b) for a, b in zip(ours, theirs, strict=True)) >= 0.9
        _with_runtime(model, "torch-int8", encoder_cache)
        assert model.backbone.embedding_key() == "79d8c9dca6db-int8"
    finally:
        _with_runtime(model, "torch", encoder_cache)
    assert EmbeddingCache(model).key(image).backbone == "79d8c9dca6db"


def test_converted_graphs_are_cached_on_disk_and_reused(model, encoder_cache, monkeypatch):
    import openvino

    _with_runtime(model, "openvino", encoder_cache)
    folders = [p for p in encoder_cache.iterdir() if p.name.startswith("openvino-") and "." not in p.name]
    assert folders and all((f / "encoder.xml").is_file() and (f / "encoder.bin").is_file() for f in folders)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    try:
        _with_runtime(model, "openvino", encoder_cache)  # reads the cache: no conversion
        # a fresh cache folder has nothing to read: the conversion is attempted
        with pytest.raises(AssertionError, match="cached graph"):
            _with_runtime(model, "openvino", encoder_cache / "empty")
        assert not any((encoder_cache / "empty").glob("openvino-*/encoder.xml"))  # nothing half-written is left
    finally:
        _with_runtime(model, "torch", encoder_cache)


def test_auto_picks_openvino_on_the_cpu_and_torch_elsewhere(monkeypatch):
    assert resolve_runtime("auto", "cpu") is EncoderRuntime.OPENVINO
    assert resolve_runtime("auto", "cuda") is EncoderRuntime.TORCH
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert resolve_runtime("auto", "cpu") is EncoderRuntime.TORCH


def test_unusable_runtimes_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(InputError, match="CPU only; use --encoder torch"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(InputError, match="unknown encoder runtime 'tensorrt'"):
        resolve_runtime("tensorrt", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(InputError, match="needs onnxruntime and onnx: pip install 'onnxruntime==1.31.1'"):
        resolve_runtime("onnxruntime", "cpu")
    # OpenVINO reads the encoder's ONNX export: without onnx, auto falls back to PyTorch and openvino says why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert resolve_runtime("auto", "cpu") is EncoderRuntime.TORCH
    with pytest.raises(InputError, match=r"needs openvino and onnx: pip install .*'onnx==1.23.2' \(or SPASeg"):
        resolve_runtime("openvino", "cpu")
    monkeypatch.setattr(runtimes, "native_bfloat16", lambda: False)
    with pytest.raises(InputError, match="no native bfloat16"):
        runtimes.compile_encoder(torch.nn.Conv2d(3, 4, 1), 8, "openvino-bf16", weights_key="x")


def test_flops_and_peak_are_counted():
    layer = torch.nn.Conv2d(3, 8, 1, bias=False)
    assert runtimes.encoder_flops(layer, 16) == 2 * 3 * 8 * 16 * 16
    assert runtimes.matmul_peak_gflops(size=256, repeats=2) > 1.0


def test_the_encoder_cache_folder_can_be_moved(monkeypatch, tmp_path):
    monkeypatch.setenv("SPA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPA_ENCODER_CACHE", raising=False)
    assert runtimes.default_cache_dir() == tmp_path / "home" / "cache" / "encoders"
    monkeypatch.setenv("SPA_ENCODER_CACHE", str(tmp_path / "shared"))
    assert runtimes.default_cache_dir() == tmp_path / "shared"
