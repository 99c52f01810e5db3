"""Preference profiles: the adapted mixture of one user for one structure, kept between sessions.

A profile is saved when a user accepts a segmentation and initialises that user's next session for
the same structure. The store keeps one JSON file per (user, structure) at
``<root>/<user>/<structure>.json``. Every write is atomic and every read-modify-write runs under a
cross-process lock, so several SPA processes can share one store. A file that cannot be read is
never overwritten or removed, except by an explicit :meth:`ProfileStore.delete`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import torch

from .errors import ProfileError
from .io.atomic import write_bytes_atomic, write_json_atomic
from .limits import MAX_PROFILE_BYTES, MAX_PROFILE_SESSIONS, load_json
from .preference import PreferenceMixture, check_weights
from .resources import spa_home

PROFILE_KIND = "spa-preference-profile"
SCHEMA_VERSION = 1
RUNNING_MEAN_WINDOW = 20
HISTORY_LENGTH = 50
# the fields of a profile file besides its kind and schema version
PROFILE_FIELDS = (
    "user",
    "structure",
    "model_fingerprint",
    "n_sessions",
    "weights",
    "last_mixture",
    "created",
    "updated",
    "history",
)
DEFAULT_LOCK_TIMEOUT_S = 30.0

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]([A-Za-z0-9 ._\-]{0,62}[A-Za-z0-9_\-])?")
_NAME_RULE = (
    "1-64 characters from letters A-Z/a-z, digits, space, '.', '_' and '-', not starting or ending with '.' or a space"
)


def validate_name(value: object, what: str) -> str:
    """Check a user or structure name, which becomes a folder or file name; return it unchanged."""
    if not isinstance(value, str) or _NAME_PATTERN.fullmatch(value) is None:
        raise ProfileError(f"{what} name {value!r} is not allowed; use {_NAME_RULE}")
    return value


def _now_iso() -> str:
    """The current time as ISO-8601 UTC, e.g. ``2024-05-01T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_iso_time(value: object, what: str) -> str:
    """Check that ``value`` is an ISO-8601 timestamp string."""
    if not isinstance(value, str):
        raise ProfileError(f"{what} must be an ISO-8601 time string, not {value!r}")
    try:
        datetime.fromisoformat(value)
    except ValueError as exc:
        raise ProfileError(f"{what} {value!r} is not an ISO-8601 time") from exc
    return value


def _check_int(value: object, what: str, minimum: int, maximum: int = MAX_PROFILE_SESSIONS) -> int:
    """Check that ``value`` is an integer (not a bool) from ``minimum`` to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ProfileError(f"{what} must be an integer from {minimum} to {maximum}, not {value!r}")
    return value


def check_profile_shape(profile: Profile, shape: tuple[int, int] | None, where: str) -> Profile:
    """Refuse a profile whose mixture does not fit the model: ``shape`` = (components, latent size)."""
    if shape is None:
        return profile
    mixture = profile.last_mixture
    found = (len(profile.weights), mixture.latent_dim)
    if found != tuple(shape) or mixture.n_components != shape[0]:
        raise ProfileError(
            f"preference profile {where} has {found[0]} components of size {found[1]} but the model's mixture has "
            f"{shape[0]} of size {shape[1]}; it was not made with this model: delete it (`spa profile delete`) "
            "or import a profile made with this model"
        )
    return profile


def _check_weights(value: object) -> list[float]:
    """Check the stored mixture weights (JSON numbers, finite, >= 0, summing to 1); return them unchanged."""
    if not isinstance(value, list) or not value:
        raise ProfileError("weights must be a non-empty list of numbers")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ProfileError(f"weights must be finite numbers >= 0, found {item!r}")
    check_weights(value, sums_to_one=True, what="weights", error=ProfileError)
    return [float(item) for item in value]


def _mixture_from_payload(payload: object) -> PreferenceMixture:
    """Rebuild a mixture from its JSON form bit-exactly (no renormalisation), after validating it."""
    if not isinstance(payload, dict):
        raise ProfileError("last_mixture must be an object with weights, means and stds")
    PreferenceMixture.from_dict(payload)  # validation only; it renormalises, which would change bits
    return PreferenceMixture(
        torch.tensor(payload["weights"], dtype=torch.float32),
        torch.tensor(payload["means"], dtype=torch.float32),
        torch.tensor(payload["stds"], dtype=torch.float32),
    )


def _check_history(value: object) -> list[dict[str, Any]]:
    """Check the session history: a list of {"time": ISO string, "rounds": int >= 0 or null}."""
    if not isinstance(value, list) or len(value) > HISTORY_LENGTH:
        raise ProfileError(f"history must be a list of at most {HISTORY_LENGTH} entries")
    history: list[dict[str, Any]] = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"time", "rounds"}:
            raise ProfileError(f"history entries must be objects with 'time' and 'rounds', found {entry!r}")
        rounds = entry["rounds"]
        if rounds is not None:
            _check_int(rounds, "history rounds", 0)
        history.append({"time": _check_iso_time(entry["time"], "history time"), "rounds": rounds})
    return history


@dataclass
class Profile:
    """One user's adapted preference for one structure, as stored in its JSON file."""

    user: str
    structure: str
    model_fingerprint: str
    n_sessions: int
    weights: list[float]
    last_mixture: PreferenceMixture
    created: str
    updated: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def weights_tensor(self) -> torch.Tensor:
        """The profile's mixture weights as a float32 tensor of shape (K_g,)."""
        return torch.tensor(self.weights, dtype=torch.float32)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to the profile file."""
        return {
            "kind": PROFILE_KIND,
            "schema_version": SCHEMA_VERSION,
            "user": self.user,
            "structure": self.structure,
            "model_fingerprint": self.model_fingerprint,
            "n_sessions": self.n_sessions,
            "weights": [float(w) for w in self.weights],
            "last_mixture": self.last_mixture.to_dict(),
            "created": self.created,
            "updated": self.updated,
            "history": [{"time": e["time"], "rounds": e["rounds"]} for e in self.history],
        }

    @classmethod
    def from_dict(cls, payload: object) -> Profile:
        """Rebuild and validate a profile written by :meth:`to_dict`; ProfileError says what is wrong."""
        if not isinstance(payload, dict):
            raise ProfileError("a profile must be a JSON object")
        if payload.get("kind") != PROFILE_KIND:
            raise ProfileError(f"'kind' is {payload.get('kind')!r}, expected {PROFILE_KIND!r}")
        version = payload.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise ProfileError(f"schema_version is {version!r}, this version of SPA reads {SCHEMA_VERSION}")
        missing = [key for key in PROFILE_FIELDS if key not in payload]
        if missing:
            raise ProfileError(f"missing field(s) {', '.join(missing)}")
        fingerprint = payload["model_fingerprint"]
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ProfileError("model_fingerprint must be a non-empty string")
        weights = _check_weights(payload["weights"])
        mixture = _mixture_from_payload(payload["last_mixture"])
        if len(weights) != mixture.n_components:
            raise ProfileError(f"weights have {len(weights)} components but last_mixture has {mixture.n_components}")
        return cls(
            user=validate_name(payload["user"], "user"),
            structure=validate_name(payload["structure"], "structure"),
            model_fingerprint=fingerprint,
            n_sessions=_check_int(payload["n_sessions"], "n_sessions", 1),
            weights=weights,
            last_mixture=mixture,
            created=_check_iso_time(payload["created"], "created"),
            updated=_check_iso_time(payload["updated"], "updated"),
            history=_check_history(payload["history"]),
        )


def fold_session(
    existing: Profile | None,
    user: str,
    structure: str,
    model_fingerprint: str,
    mixture: PreferenceMixture,
    rounds: int | None,
    *,
    where: str,
) -> Profile:
    """The profile after one more accepted session: ``existing`` (None: a new profile) with ``mixture`` folded in.

    The weights become a running mean over at most the last 20 sessions:
    ``w <- w + (w_new - w) / min(n_sessions, 20)``, renormalised. ``where`` names the profile in messages.
    Every profile store updates through this one function.
    """
    validate_name(user, "user")
    validate_name(structure, "structure")
    if rounds is not None:
        _check_int(rounds, "rounds", 0)
    if mixture.weights.dim() != 1:
        raise ProfileError("update needs the mixture of one image; select it from the batch with mixture.select(i)")
    new_payload = mixture.to_dict()
    PreferenceMixture.from_dict(new_payload)  # validates: finite, on the simplex, stds > 0
    new_mixture = _mixture_from_payload(new_payload)
    new_weights = [float(w) for w in new_payload["weights"]]
    now = _now_iso()
    entry = {"time": now, "rounds": rounds}
    if existing is None:
        total = sum(new_weights)
        return Profile(
            user=user,
            structure=structure,
            model_fingerprint=model_fingerprint,
            n_sessions=1,
            weights=[w / total for w in new_weights],
            last_mixture=new_mixture,
            created=now,
            updated=now,
            history=[entry],
        )
    if len(existing.weights) != len(new_weights):
        raise ProfileError(
            f"preference profile {where} has {len(existing.weights)} mixture components but the "
            f"session's mixture has {len(new_weights)}; delete the profile to start a new one"
        )
    n_sessions = existing.n_sessions + 1
    step = min(n_sessions, RUNNING_MEAN_WINDOW)
    moved = [w + (w_new - w) / step for w, w_new in zip(existing.weights, new_weights, strict=True)]
    total = sum(moved)
    existing.weights = [w / total for w in moved]
    existing.n_sessions = n_sessions
    existing.last_mixture = new_mixture
    existing.updated = now
    existing.history = (existing.history + [entry])[-HISTORY_LENGTH:]
    return existing


@dataclass
class ProfileSummary:
    """One line of :meth:`ProfileStore.list_profiles`; ``error`` is set when the profile cannot be used."""

    user: str
    structure: str
    n_sessions: int | None
    updated: str | None
    model_fingerprint: str | None
    path: Path
    error: str | None = None


class ProfileStore:
    """The folder of preference profiles, one JSON file per (user, structure), for one model."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        model_fingerprint: str,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        shape: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ProfileError("model_fingerprint must be a non-empty string; pass the fingerprint of the loaded model")
        self.root = Path(root) if root is not None else spa_home() / "profiles"
        self.model_fingerprint = model_fingerprint
        self.lock_timeout = lock_timeout
        self.shape = shape  # (mixture components, latent size) of the model; profiles of another shape are refused

    # ----- paths and locking -----

    def path_for(self, user: str, structure: str) -> Path:
        """The file of one profile (validates both names)."""
        return self.root / validate_name(user, "user") / f"{validate_name(structure, 'structure')}.json"

    def _lock(self, path: Path) -> filelock.FileLock:
        """The cross-process lock guarding read-modify-write of ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(path) + ".lock", timeout=self.lock_timeout)

    def _acquire(self, lock: filelock.FileLock, path: Path) -> None:
        """Take ``lock``, turning a timeout into a ProfileError."""
        try:
            lock.acquire()
        except filelock.Timeout as exc:
            raise ProfileError(
                f"timed out after {self.lock_timeout:g} s waiting for the lock on profile {path}; "
                "another SPA process is updating it, so wait for it to finish and try again"
            ) from exc

    # ----- reading -----

    def _parse(self, path: Path, data: bytes, *, check_fingerprint: bool) -> Profile:
        """Validate the bytes of a profile file; every refusal names the file."""
        untouched = (
            "the file was left untouched; remove it with `spa profile delete` (ProfileStore.delete) or by deleting "
            "the file, or replace it with a good copy"
        )
        try:
            payload = load_json(data, f"preference profile {path}", ProfileError)
        except ProfileError as exc:
            raise ProfileError(f"{exc}; {untouched}") from exc
        if isinstance(payload, dict) and payload.get("kind") == PROFILE_KIND:
            version = payload.get("schema_version")
            if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
                raise ProfileError(
                    f"preference profile {path} has schema version {version}, newer than the supported "
                    f"{SCHEMA_VERSION}; upgrade SPASegmentationLib to use it (the file was left untouched)"
                )
        try:
            profile = Profile.from_dict(payload)
        except ProfileError as exc:
            raise ProfileError(f"preference profile {path} is invalid ({exc}); {untouched}") from exc
        if check_fingerprint and profile.model_fingerprint != self.model_fingerprint:
            raise ProfileError(
                f"preference profile {path} was made with model {profile.model_fingerprint!r} but the loaded "
                f"model is {self.model_fingerprint!r}; load the model it was made with, or delete the profile "
                "and let a new one be created for this model"
            )
        return check_profile_shape(profile, self.shape, str(path)) if check_fingerprint else profile

    def _read_file(self, path: Path, *, check_fingerprint: bool) -> Profile:
        """Read and validate one profile file (its size first: a huge file is refused unread)."""
        try:
            size = path.stat().st_size
            if size > MAX_PROFILE_BYTES:
                raise ProfileError(
                    f"preference profile {path} is {size:,} bytes, more than the {MAX_PROFILE_BYTES:,} a profile can "
                    "be; it is not a profile SPA wrote (the file was left untouched)"
                )
            data = path.read_bytes()
        except OSError as exc:
            raise ProfileError(
                f"could not read preference profile {path} ({exc}); check that it exists and is readable"
            ) from exc
        return self._parse(path, data, check_fingerprint=check_fingerprint)

    def _read_stored(self, user: str, structure: str, path: Path, *, check_fingerprint: bool = True) -> Profile:
        """Read a profile of this store and check that its names match its place in the store."""
        profile = self._read_file(path, check_fingerprint=check_fingerprint)
        if profile.user != user or profile.structure != structure:
            raise ProfileError(
                f"preference profile {path} holds user {profile.user!r} and structure {profile.structure!r}, "
                "which do not match its location; the file was left untouched, move it back or delete it"
            )
        return profile

    def _write(self, path: Path, profile: Profile) -> None:
        """Write a profile atomically, turning an OS failure into a ProfileError."""
        try:
            write_json_atomic(path, profile.to_dict())
        except OSError as exc:
            raise ProfileError(
                f"could not write preference profile {path} ({exc}); the previous file is unchanged, "
                "check free disk space and write permission and try again"
            ) from exc

    def load(self, user: str, structure: str) -> Profile | None:
        """The profile of ``user`` for ``structure``, or None when there is none."""
        path = self.path_for(user, structure)
        if not path.exists():
            return None
        return self._read_stored(user, structure, path)

    def initial_weights(self, user: str, structure: str) -> torch.Tensor | None:
        """The profile weights to start a session with (float32, shape (K_g,)), or None."""
        profile = self.load(user, structure)
        return None if profile is None else profile.weights_tensor()

    # ----- writing -----

    def update(self, user: str, structure: str, mixture: PreferenceMixture, rounds: int | None = None) -> Profile:
        """Fold the final mixture of an accepted session into the profile (creating it if absent; see
        :func:`fold_session`)."""
        path = self.path_for(user, structure)
        lock = self._lock(path)
        self._acquire(lock, path)
        try:
            existing = self._read_stored(user, structure, path) if path.exists() else None
            profile = fold_session(existing, user, structure, self.model_fingerprint, mixture, rounds, where=str(path))
            self._write(path, profile)
            return profile
        finally:
            lock.release()

    def delete(self, user: str, structure: str) -> None:
        """Remove a profile, whether it is valid or not."""
        path = self.path_for(user, structure)
        lock = self._lock(path)
        self._acquire(lock, path)
        try:
            if not path.exists():
                raise ProfileError(
                    f"there is no preference profile for user {user!r} and structure {structure!r} at {path}; "
                    "check the names with `spa profile list` (ProfileStore.list_profiles)"
                )
            try:
                path.unlink()
            except OSError as exc:
                raise ProfileError(
                    f"could not delete preference profile {path} ({exc}); check write permission"
                ) from exc
        finally:
            lock.release()

    # ----- listing, export and import -----

    def list_profiles(self) -> list[ProfileSummary]:
        """Every profile in the store, sorted by user then structure; unusable ones carry ``error``."""
        summaries: list[ProfileSummary] = []
        if not self.root.is_dir():
            return summaries
        for user_dir in self.root.iterdir():
            if not user_dir.is_dir() or _NAME_PATTERN.fullmatch(user_dir.name) is None:
                continue
            for path in user_dir.glob("*.json"):
                structure = path.name[: -len(".json")]
                if not path.is_file() or _NAME_PATTERN.fullmatch(structure) is None:
                    continue
                summaries.append(self._summarise(user_dir.name, structure, path))
        summaries.sort(key=lambda s: (s.user, s.structure))
        return summaries

    def _summarise(self, user: str, structure: str, path: Path) -> ProfileSummary:
        """The listing line of one file; a file that load() would refuse gets its message as ``error``."""
        try:
            profile = self._read_stored(user, structure, path, check_fingerprint=False)
        except ProfileError as exc:
            return ProfileSummary(user, structure, None, None, None, path, error=str(exc))
        error = None
        if profile.model_fingerprint != self.model_fingerprint:
            try:
                self._read_stored(user, structure, path)
            except ProfileError as exc:
                error = str(exc)
        return ProfileSummary(
            user, structure, profile.n_sessions, profile.updated, profile.model_fingerprint, path, error
        )

    def export(self, user: str, structure: str, destination: str | Path) -> Path:
        """Copy a validated profile to ``destination`` (a file, or a folder to put it in: an existing one, or a
        path ending in a separator, which is created); return the file."""
        path = self.path_for(user, structure)
        if not path.exists():
            raise ProfileError(
                f"there is no preference profile for user {user!r} and structure {structure!r} at {path}; "
                "check the names with `spa profile list` (ProfileStore.list_profiles)"
            )
        data = path.read_bytes()
        self._parse(path, data, check_fingerprint=False)
        folder = isinstance(destination, str) and destination.endswith(("/", os.sep))
        destination = Path(destination)
        if folder or destination.is_dir():
            destination = destination / f"{user}__{structure}.json"
        try:
            write_bytes_atomic(destination, data)
        except OSError as exc:
            raise ProfileError(
                f"could not export the profile to {destination} ({exc}); check that the folder is writable"
            ) from exc
        return destination

    def import_profile(
        self,
        source: Path,
        user: str | None = None,
        structure: str | None = None,
        overwrite: bool = False,
    ) -> Profile:
        """Add a profile file made by :meth:`export`, optionally under another user or structure name."""
        source = Path(source)
        profile = self._read_file(source, check_fingerprint=True)
        profile.user = validate_name(user if user is not None else profile.user, "user")
        profile.structure = validate_name(structure if structure is not None else profile.structure, "structure")
        path = self.path_for(profile.user, profile.structure)
        lock = self._lock(path)
        self._acquire(lock, path)
        try:
            if path.exists() and not overwrite:
                raise ProfileError(
                    f"a preference profile for user {profile.user!r} and structure {profile.structure!r} "
                    f"already exists at {path}; import with --overwrite (overwrite=True) to replace it, or under "
                    "another --user/--structure"
                )
            self._write(path, profile)
        finally:
            lock.release()
        return profile
