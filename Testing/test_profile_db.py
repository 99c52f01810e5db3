"""Tests of the team profile store (SQLite, WAL): same profiles as the folder store, no lost concurrent update."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from test_profiles import FINGERPRINT, make_mixture

from SPASegmentationLib.errors import ProfileError
from SPASegmentationLib.profile_db import SQLiteProfileStore
from SPASegmentationLib.profiles import HISTORY_LENGTH, ProfileStore


def _worker(db: str, worker: int, n_updates: int) -> None:
    """Run in a spawned process: update the shared profile ``n_updates`` times."""
    store = SQLiteProfileStore(Path(db), model_fingerprint=FINGERPRINT, timeout=60.0)
    for i in range(n_updates):
        store.update("alice", "liver tumour", make_mixture(1000 * worker + i, 4, 8), rounds=i)


def test_the_database_folds_sessions_exactly_like_the_folder_store(tmp_path: Path) -> None:
    db = SQLiteProfileStore(tmp_path / "team.sqlite3", model_fingerprint=FINGERPRINT)
    folder = ProfileStore(tmp_path / "folder", model_fingerprint=FINGERPRINT)
    for seed in range(5):
        a = db.update("bob", "nodule", make_mixture(seed), rounds=seed)
        b = folder.update("bob", "nodule", make_mixture(seed), rounds=seed)
    assert a.weights == b.weights
    assert db.load("bob", "nodule").n_sessions == 5
    assert db.initial_weights("bob", "nodule").tolist() == pytest.approx(b.weights)
    mode = sqlite3.connect(tmp_path / "team.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_concurrent_updates_from_real_processes_are_all_kept(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    db = tmp_path / "team.sqlite3"
    SQLiteProfileStore(db, model_fingerprint=FINGERPRINT)
    n_workers, n_updates = 4, 15
    processes = [context.Process(target=_worker, args=(str(db), w, n_updates)) for w in range(n_workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    profile = SQLiteProfileStore(db, model_fingerprint=FINGERPRINT).load("alice", "liver tumour")
    total = n_workers * n_updates
    assert profile.n_sessions == total
    assert len(profile.history) == min(total, HISTORY_LENGTH)


def test_each_user_lists_only_their_own_and_import_export_round_trips(tmp_path: Path) -> None:
    db = SQLiteProfileStore(tmp_path / "team.sqlite3", model_fingerprint=FINGERPRINT)
    db.update("alice", "liver", make_mixture(1))
    db.update("bob", "liver", make_mixture(2))
    db.update("bob", "kidney", make_mixture(3))
    assert [(s.user, s.structure) for s in db.list_profiles("bob")] == [("bob", "kidney"), ("bob", "liver")]
    assert len(db.list_profiles()) == 3
    payload = db.export_payload("bob", "liver")
    with pytest.raises(ProfileError, match="already exists"):
        db.import_payload(payload, "alice", "liver")
    imported = db.import_payload(json.loads(json.dumps(payload)), "alice", "liver", overwrite=True)
    assert imported.user == "alice" and imported.weights == payload["weights"]
    db.delete("alice", "liver")
    assert db.load("alice", "liver") is None
    with pytest.raises(ProfileError, match="no preference profile"):
        db.delete("alice", "liver")


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    db = SQLiteProfileStore(tmp_path / "team.sqlite3", model_fingerprint=FINGERPRINT)
    payload = db.update("alice", "liver", make_mixture(1)).to_dict()
    other = SQLiteProfileStore(tmp_path / "team.sqlite3", model_fingerprint="another-model")
    with pytest.raises(ProfileError, match="was made with model"):
        other.load("alice", "liver")
    assert other.list_profiles("alice")[0].error is not None
    with pytest.raises(ProfileError, match="made with model"):
        other.import_payload(payload, "carol")
    with pytest.raises(ProfileError, match="invalid"):
        db.import_payload({**payload, "weights": [1.0]}, "carol")
    with pytest.raises(ProfileError, match="not allowed"):
        db.load("../etc", "liver")
    (tmp_path / "not-a-db.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ProfileError, match="could not open the profile database"):
        SQLiteProfileStore(tmp_path / "not-a-db.sqlite3", model_fingerprint=FINGERPRINT)
