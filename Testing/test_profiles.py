"""Tests of the preference profile store: updates, locking, atomic writes, refusals, export/import."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from SPASegmentationLib.errors import ProfileError
from SPASegmentationLib.preference import PreferenceMixture
from SPASegmentationLib.profiles import HISTORY_LENGTH, Profile, ProfileStore

FINGERPRINT = "model-abc123"


def make_mixture(seed: int, components: int = 16, latent_dim: int = 64) -> PreferenceMixture:
    """A random but valid unbatched mixture."""
    generator = torch.Generator().manual_seed(seed)
    return PreferenceMixture(
        torch.softmax(torch.randn(components, generator=generator), 0),
        torch.randn(components, latent_dim, generator=generator),
        torch.rand(components, latent_dim, generator=generator) + 0.1,
    )


def temp_files(root: Path) -> list[Path]:
    """Leftover temporary files of atomic writes under ``root``."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _concurrent_worker(root: str, worker: int, n_updates: int) -> None:
    """Run in a spawned process: update the shared profile ``n_updates`` times."""
    store = ProfileStore(Path(root), model_fingerprint=FINGERPRINT, lock_timeout=60.0)
    for i in range(n_updates):
        store.update("alice", "liver tumour", make_mixture(1000 * worker + i, 4, 8), rounds=i)


def test_update_creates_then_moves_weights(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    assert store.load("alice", "liver tumour") is None
    assert store.initial_weights("alice", "liver tumour") is None

    first, second = make_mixture(1), make_mixture(2)
    profile = store.update("alice", "liver tumour", first, rounds=3)
    assert (tmp_path / "alice" / "liver tumour.json").is_file()
    assert profile.n_sessions == 1
    w1 = first.weights.double()
    assert torch.allclose(torch.tensor(profile.weights, dtype=torch.float64), w1 / w1.sum(), atol=1e-12)

    profile = store.update("alice", "liver tumour", second, rounds=5)
    assert profile.n_sessions == 2
    w2 = second.weights.double()
    expected = w1 + (w2 - w1) / 2
    expected = expected / expected.sum()
    assert torch.allclose(torch.tensor(profile.weights, dtype=torch.float64), expected, atol=1e-7)
    assert [entry["rounds"] for entry in profile.history] == [3, 5]

    loaded = store.load("alice", "liver tumour")
    assert loaded is not None
    assert loaded.n_sessions == 2
    assert loaded.weights == profile.weights
    assert loaded.created <= loaded.updated
    # the last mixture round-trips bit-exactly through JSON
    assert torch.equal(loaded.last_mixture.weights, second.weights)
    assert torch.equal(loaded.last_mixture.means, second.means)
    assert torch.equal(loaded.last_mixture.stds, second.stds)

    initial = store.initial_weights("alice", "liver tumour")
    assert initial is not None and initial.dtype == torch.float32
    assert torch.allclose(initial, expected.float())

    payload = json.loads((tmp_path / "alice" / "liver tumour.json").read_text())
    assert payload["kind"] == "spa-preference-profile"
    assert payload["schema_version"] == 1
    assert payload["model_fingerprint"] == FINGERPRINT
    assert Profile.from_dict(payload).to_dict() == payload


def test_running_mean_window_caps_at_twenty(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    for seed in range(25):
        before = store.load("bob", "kidney")
        mixture = make_mixture(seed, 4, 8)
        after = store.update("bob", "kidney", mixture)
        if before is None:
            continue
        step = min(after.n_sessions, 20)
        old = torch.tensor(before.weights, dtype=torch.float64)
        moved = old + (mixture.weights.double() - old) / step
        assert torch.allclose(torch.tensor(after.weights, dtype=torch.float64), moved / moved.sum(), atol=1e-7)
    final = store.load("bob", "kidney")
    assert final is not None and final.n_sessions == 25
    assert abs(sum(final.weights) - 1.0) < 1e-9


def test_concurrent_updates_from_real_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    n_workers, n_updates = 4, 15
    processes = [
        context.Process(target=_concurrent_worker, args=(str(tmp_path), worker, n_updates))
        for worker in range(n_workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0

    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    profile = store.load("alice", "liver tumour")
    assert profile is not None
    total = n_workers * n_updates
    assert profile.n_sessions == total
    assert len(profile.history) == min(total, HISTORY_LENGTH)
    assert temp_files(tmp_path) == []


def test_failed_write_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    store.update("alice", "liver", make_mixture(1, 4, 8))
    path = store.path_for("alice", "liver")
    before = path.read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ProfileError, match="could not write"):
        store.update("alice", "liver", make_mixture(2, 4, 8))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    loaded = store.load("alice", "liver")
    assert loaded is not None and loaded.n_sessions == 1


def test_corrupt_file_is_reported_and_never_overwritten(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    store.update("alice", "liver", make_mixture(1, 4, 8))
    store.update("bob", "spleen", make_mixture(2, 4, 8))
    path = store.path_for("alice", "liver")
    corrupt = path.read_bytes()[:100]
    path.write_bytes(corrupt)

    with pytest.raises(ProfileError) as info:
        store.load("alice", "liver")
    assert str(path) in str(info.value)
    assert "untouched" in str(info.value)
    with pytest.raises(ProfileError) as info:
        store.update("alice", "liver", make_mixture(3, 4, 8))
    assert str(path) in str(info.value)
    assert path.read_bytes() == corrupt

    listing = store.list_profiles()
    assert [(s.user, s.structure) for s in listing] == [("alice", "liver"), ("bob", "spleen")]
    assert listing[0].error is not None and str(path) in listing[0].error
    assert listing[0].n_sessions is None
    assert listing[1].error is None and listing[1].n_sessions == 1
    assert listing[1].model_fingerprint == FINGERPRINT

    store.delete("alice", "liver")
    assert not path.exists()
    assert store.load("alice", "liver") is None
    with pytest.raises(ProfileError, match="no preference profile"):
        store.delete("alice", "liver")


def test_invalid_content_is_refused(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    store.update("alice", "liver", make_mixture(1, 4, 8))
    path = store.path_for("alice", "liver")
    payload = json.loads(path.read_text())
    payload["weights"] = [0.9, 0.9, 0.1, 0.1]
    path.write_text(json.dumps(payload))
    before = path.read_bytes()
    with pytest.raises(ProfileError, match="sum to 1"):
        store.update("alice", "liver", make_mixture(2, 4, 8))
    assert path.read_bytes() == before


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    store.update("alice", "liver", make_mixture(1, 4, 8))
    path = store.path_for("alice", "liver")
    payload = json.loads(path.read_text())
    payload["schema_version"] = 2
    path.write_text(json.dumps(payload))
    with pytest.raises(ProfileError, match="newer than the supported 1"):
        store.load("alice", "liver")


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    other = ProfileStore(tmp_path / "other", model_fingerprint="model-old999")
    other.update("alice", "liver", make_mixture(1, 4, 8))

    store = ProfileStore(tmp_path / "other", model_fingerprint=FINGERPRINT)
    with pytest.raises(ProfileError) as info:
        store.load("alice", "liver")
    assert "model-old999" in str(info.value) and FINGERPRINT in str(info.value)
    with pytest.raises(ProfileError, match="model-old999"):
        store.update("alice", "liver", make_mixture(2, 4, 8))
    [summary] = store.list_profiles()
    assert summary.model_fingerprint == "model-old999" and summary.error is not None

    exported = other.export("alice", "liver", tmp_path / "exported.json")
    fresh = ProfileStore(tmp_path / "fresh", model_fingerprint=FINGERPRINT)
    with pytest.raises(ProfileError) as info:
        fresh.import_profile(exported)
    assert "model-old999" in str(info.value) and FINGERPRINT in str(info.value)
    assert fresh.list_profiles() == []


def test_export_import_round_trip_and_overwrite(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "a", model_fingerprint=FINGERPRINT)
    store.update("alice", "liver", make_mixture(1))
    original = store.update("alice", "liver", make_mixture(2), rounds=4)
    (tmp_path / "out").mkdir()
    exported = store.export("alice", "liver", tmp_path / "out")
    assert exported.parent == tmp_path / "out"
    assert exported.read_bytes() == store.path_for("alice", "liver").read_bytes()

    fresh = ProfileStore(tmp_path / "b", model_fingerprint=FINGERPRINT)
    imported = fresh.import_profile(exported)
    loaded = fresh.load("alice", "liver")
    assert loaded is not None
    assert loaded.to_dict() == original.to_dict() == imported.to_dict()
    assert torch.equal(loaded.last_mixture.means, original.last_mixture.means)

    renamed = fresh.import_profile(exported, user="carol", structure="liver tumour")
    assert renamed.user == "carol"
    assert fresh.load("carol", "liver tumour") is not None

    fresh.update("alice", "liver", make_mixture(3))
    with pytest.raises(ProfileError, match="--overwrite"):
        fresh.import_profile(exported)
    after_refusal = fresh.load("alice", "liver")
    assert after_refusal is not None and after_refusal.n_sessions == 3
    fresh.import_profile(exported, overwrite=True)
    replaced = fresh.load("alice", "liver")
    assert replaced is not None and replaced.n_sessions == 2


@pytest.mark.parametrize("bad", ["../x", "", ".hidden", "a/b", " lead", "x" * 65, "a\\b", "tail."])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    with pytest.raises(ProfileError, match="letters"):
        store.update(bad, "liver", make_mixture(1, 4, 8))
    with pytest.raises(ProfileError, match="structure name"):
        store.load("alice", bad)
    assert list(tmp_path.iterdir()) == []


def test_good_names_are_accepted(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, model_fingerprint=FINGERPRINT)
    for name in ["a", "Dr. Smith", "liver_tumour-2", "x" * 64]:
        store.update(name, name, make_mixture(1, 4, 8))
    assert len(store.list_profiles()) == 4


def test_default_root_is_under_spa_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPA_HOME", str(tmp_path))
    store = ProfileStore(model_fingerprint=FINGERPRINT)
    assert store.root == tmp_path / "profiles"
