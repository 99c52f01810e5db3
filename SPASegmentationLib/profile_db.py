"""A team's preference profiles in one SQLite database: the profile store of ``spa serve``.

Same profiles, same validation and the same running mean (:func:`~.profiles.fold_session`) as the
folder store (:class:`~.profiles.ProfileStore`), for a server that many clients update at once.
The database runs in WAL mode; every read-modify-write is one ``BEGIN IMMEDIATE`` transaction, so
concurrent updates from threads or processes are serialised and none is lost.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import ProfileError
from .limits import load_json
from .preference import PreferenceMixture
from .profiles import Profile, ProfileSummary, check_profile_shape, fold_session, validate_name

DEFAULT_TIMEOUT_S = 30.0
MAX_PROFILE_BYTES = 1 << 20  # a profile is a few kilobytes; anything near this is not one

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    user TEXT NOT NULL,
    structure TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (user, structure)
)
"""


class SQLiteProfileStore:
    """Preference profiles in one SQLite file (WAL), for one model; safe for concurrent threads and processes."""

    def __init__(
        self,
        path: Path,
        *,
        model_fingerprint: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        shape: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ProfileError("model_fingerprint must be a non-empty string; pass the fingerprint of the loaded model")
        self.path = Path(path)
        self.model_fingerprint = model_fingerprint
        self.timeout = timeout
        self.shape = shape  # (mixture components, latent size) of the model; profiles of another shape are refused
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connection() as connection:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise ProfileError(
                f"could not open the profile database {self.path} ({exc}); check that the folder is writable "
                "and the file is an SQLite database made by SPA"
            ) from exc

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection in autocommit mode (transactions are explicit), closed afterwards."""
        connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken at once (BEGIN IMMEDIATE): read-modify-write cannot interleave."""
        with self._connection() as connection:
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise ProfileError(
                    f"timed out after {self.timeout:g} s waiting for the profile database {self.path}; "
                    "another client is writing, try again"
                ) from exc
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _where(self, user: str, structure: str) -> str:
        return f"{user}/{structure} in {self.path}"

    def _parse(self, user: str, structure: str, body: str, *, check_fingerprint: bool = True) -> Profile:
        """The validated profile of one row."""
        where = self._where(user, structure)
        try:
            profile = Profile.from_dict(load_json(body, f"preference profile {where}", ProfileError))
        except ProfileError as exc:
            raise ProfileError(f"preference profile {where} is invalid ({exc}); delete it to start a new one") from exc
        if check_fingerprint and profile.model_fingerprint != self.model_fingerprint:
            raise ProfileError(
                f"preference profile {where} was made with model {profile.model_fingerprint!r} but the loaded model "
                f"is {self.model_fingerprint!r}; serve the model it was made with, or delete the profile"
            )
        return check_profile_shape(profile, self.shape, where) if check_fingerprint else profile

    @staticmethod
    def _row(connection: sqlite3.Connection, user: str, structure: str) -> str | None:
        found = connection.execute(
            "SELECT body FROM profiles WHERE user = ? AND structure = ?", (user, structure)
        ).fetchone()
        return None if found is None else found[0]

    def load(self, user: str, structure: str) -> Profile | None:
        """The profile of ``user`` for ``structure``, or None when there is none."""
        validate_name(user, "user")
        validate_name(structure, "structure")
        with self._connection() as connection:
            body = self._row(connection, user, structure)
        return None if body is None else self._parse(user, structure, body)

    def initial_weights(self, user: str, structure: str) -> torch.Tensor | None:
        """The profile weights to start a session with (float32, shape (K_g,)), or None."""
        profile = self.load(user, structure)
        return None if profile is None else profile.weights_tensor()

    def update(self, user: str, structure: str, mixture: PreferenceMixture, rounds: int | None = None) -> Profile:
        """Fold the mixture of an accepted session into the profile (see :func:`~.profiles.fold_session`)."""
        validate_name(user, "user")
        validate_name(structure, "structure")
        with self._transaction() as connection:
            body = self._row(connection, user, structure)
            existing = None if body is None else self._parse(user, structure, body)
            profile = fold_session(
                existing, user, structure, self.model_fingerprint, mixture, rounds, where=self._where(user, structure)
            )
            self._put(connection, profile)
        return profile

    @staticmethod
    def _put(connection: sqlite3.Connection, profile: Profile) -> None:
        connection.execute(
            "INSERT OR REPLACE INTO profiles (user, structure, body) VALUES (?, ?, ?)",
            (profile.user, profile.structure, json.dumps(profile.to_dict())),
        )

    def delete(self, user: str, structure: str) -> None:
        """Remove a profile, whether it is valid or not."""
        validate_name(user, "user")
        validate_name(structure, "structure")
        with self._transaction() as connection:
            removed = connection.execute(
                "DELETE FROM profiles WHERE user = ? AND structure = ?", (user, structure)
            ).rowcount
        if not removed:
            raise ProfileError(f"there is no preference profile for user {user!r} and structure {structure!r}")

    def list_profiles(self, user: str | None = None) -> list[ProfileSummary]:
        """The profiles of ``user`` (every user's when None), sorted; unusable ones carry ``error``."""
        with self._connection() as connection:
            if user is None:
                rows = connection.execute("SELECT user, structure, body FROM profiles").fetchall()
            else:
                validate_name(user, "user")
                rows = connection.execute(
                    "SELECT user, structure, body FROM profiles WHERE user = ?", (user,)
                ).fetchall()
        summaries = []
        for row_user, structure, body in sorted(rows):
            try:
                profile = self._parse(row_user, structure, body, check_fingerprint=False)
                error = None
                if profile.model_fingerprint != self.model_fingerprint:
                    error = f"made with model {profile.model_fingerprint!r}, not the served {self.model_fingerprint!r}"
                summaries.append(
                    ProfileSummary(
                        row_user,
                        structure,
                        profile.n_sessions,
                        profile.updated,
                        profile.model_fingerprint,
                        self.path,
                        error,
                    )
                )
            except ProfileError as exc:
                summaries.append(ProfileSummary(row_user, structure, None, None, None, self.path, error=str(exc)))
        return summaries

    def export_payload(self, user: str, structure: str) -> dict[str, Any]:
        """The profile's JSON, as the folder store writes it (``spa profile import`` reads it)."""
        profile = self.load(user, structure)
        if profile is None:
            raise ProfileError(f"there is no preference profile for user {user!r} and structure {structure!r}")
        return profile.to_dict()

    def import_payload(
        self, payload: Any, user: str, structure: str | None = None, *, overwrite: bool = False
    ) -> Profile:
        """Add a profile's JSON (made by ``spa profile export``) for ``user``, optionally under another structure."""
        try:
            profile = check_profile_shape(Profile.from_dict(payload), self.shape, "uploaded")
        except ProfileError as exc:
            raise ProfileError(
                f"the uploaded profile is invalid ({exc}); upload a file made by 'spa profile export'"
            ) from exc
        if profile.model_fingerprint != self.model_fingerprint:
            raise ProfileError(
                f"the uploaded profile was made with model {profile.model_fingerprint!r}; this server runs "
                f"{self.model_fingerprint!r}"
            )
        profile.user = validate_name(user, "user")
        profile.structure = validate_name(structure if structure is not None else profile.structure, "structure")
        with self._transaction() as connection:
            if self._row(connection, profile.user, profile.structure) is not None and not overwrite:
                raise ProfileError(
                    f"a preference profile for user {profile.user!r} and structure {profile.structure!r} already "
                    "exists; import with overwrite to replace it, or under another structure name"
                )
            self._put(connection, profile)
        return profile
