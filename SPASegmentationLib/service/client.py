"""The client of ``spa serve``: ``requests`` and numpy only (no torch), for the Slicer module and scripts.

    with LocalService() as service:                   # or SPAClient("https://spa.example.org", token, user=…)
        client = service.client(user="alice")
        session = client.session(image, structure="nodule")
        round1 = session.start(point=(x, y))
        round2 = session.choose(2)
        mask = session.accept()

A :class:`RemoteSession` keeps the session's last state; when the server no longer knows the session
(it restarted, or closed it) or the connection drops, it uploads the image again if needed, reopens
the session from that state (every round is deterministic) and repeats the call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from ..errors import SPAError
from ..rounds import Round
from .protocol import FRAME_MEDIA_TYPE, USER_HEADER, PlaneSpec, array_digest, decode_frame, decode_round, encode_frame

DEFAULT_TIMEOUT_S = 300.0
RECONNECT_S = 30.0  # how long a session waits for a restarted server


class ServiceError(SPAError):
    """The server refused a request (``status`` is the HTTP status) or could not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class SPAClient:
    """One user's connection to an SPA server."""

    def __init__(self, url: str, token: str, user: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self.timeout = timeout
        self._token = token
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {token}"
        if user is not None:
            self._http.headers[USER_HEADER] = user
        self._known_images: set[str] = set()

    def for_user(self, user: str | None) -> SPAClient:
        """The same server and token, acting as ``user`` (a team token refuses any user but its own)."""
        return SPAClient(self.url, self._token, user=user, timeout=self.timeout)

    # ----- plumbing -----
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One HTTP call; ServiceError with the server's message for anything but 2xx."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self._http.request(method, self.url + path, **kwargs)
        except requests.RequestException as exc:
            raise ServiceError(f"the SPA server at {self.url} cannot be reached ({exc}); is it running?") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500] or response.reason
            raise ServiceError(f"SPA server: {message}", response.status_code)
        return response

    # ----- server -----
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health").json()

    def info(self) -> dict[str, Any]:
        """The served model's fingerprint, the device, the acting user and the server's limits."""
        return self.request("GET", "/v1/info").json()

    # ----- images -----
    def upload(self, image: np.ndarray, *, digest: str | None = None, force: bool = False) -> str:
        """Make sure the server holds ``image`` (a 2-D image or a (slices, H, W) volume); return its hash
        (``digest``, when the caller already has it: :func:`~.protocol.array_digest`)."""
        digest = digest or array_digest(image)
        if not force and digest in self._known_images:
            return digest
        try:
            self.request("HEAD", f"/v1/images/{digest}")
        except ServiceError as exc:
            if exc.status != 404:
                raise
            body = encode_frame({}, {"image": np.asarray(image)})
            self.request("PUT", f"/v1/images/{digest}", data=body, headers={"Content-Type": FRAME_MEDIA_TYPE})
        self._known_images.add(digest)
        return digest

    # ----- sessions -----
    def session(
        self,
        image: np.ndarray,
        *,
        plane: PlaneSpec | None = None,
        structure: str | None = None,
        use_profile: bool = True,
        seed: int = 0,
        n_samples: int | None = None,
        window: tuple[float, float] | None = None,
        initial_weights: Sequence[float] | None = None,
        digest: str | None = None,
    ) -> RemoteSession:
        """A session on ``image`` (or on ``plane`` of a volume); nothing is sent until ``start``. ``digest``: the
        image's hash when the caller already has it."""
        settings: dict[str, Any] = {"seed": int(seed), "structure": structure, "use_profile": bool(use_profile)}
        if n_samples is not None:
            settings["n_samples"] = int(n_samples)
        if window is not None:
            settings["window"] = [float(window[0]), float(window[1])]
        if initial_weights is not None:
            settings["initial_weights"] = [float(w) for w in initial_weights]
        image = np.asarray(image)
        return RemoteSession(self, image, digest or array_digest(image), plane, settings)

    # ----- propagation -----
    def propagate(
        self,
        volume: np.ndarray,
        plane: PlaneSpec,
        mask: np.ndarray,
        *,
        progress: Callable[[int, int], bool] | None = None,
        **settings: Any,
    ) -> PropagatedMasks:
        """Carry ``mask`` (on ``plane``) through ``volume`` and wait for it; ``progress(done, total)`` returning
        False cancels (the masks made so far come back). ``settings``: those of :meth:`start_propagation`."""
        job = self.start_propagation(volume, plane, mask, **settings)

        def report(done: int, total: int) -> None:
            if progress is not None and progress(done, total) is False:
                job.cancel()

        return job.wait(report)

    def start_propagation(
        self,
        volume: np.ndarray,
        plane: PlaneSpec,
        mask: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        seed: int = 0,
        n_samples: int | None = None,
        window: tuple[float, float] | None = None,
        max_slices: int | None = None,
        digest: str | None = None,
    ) -> PropagationJob:
        """Start propagating ``mask`` (on ``plane``) through ``volume``; poll or wait on the returned job."""
        meta: dict[str, Any] = {
            "image": self.upload(volume, digest=digest),
            "plane": plane.to_dict(),
            "seed": int(seed),
        }
        if n_samples is not None:
            meta["n_samples"] = int(n_samples)
        if window is not None:
            meta["window"] = [float(window[0]), float(window[1])]
        if max_slices is not None:
            meta["max_slices"] = int(max_slices)
        arrays = {"mask": np.asarray(mask, dtype=bool)}
        if weights is not None:
            arrays["weights"] = np.asarray(weights, dtype=np.float32)
        body = encode_frame(meta, arrays)
        job = self.request("POST", "/v1/propagations", data=body, headers={"Content-Type": FRAME_MEDIA_TYPE}).json()
        return PropagationJob(self, job["job"])

    # ----- profiles (the acting user's own) -----
    def profiles(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/profiles").json()

    def profile(self, structure: str) -> dict[str, Any]:
        """The profile's JSON, as ``spa profile export`` writes it."""
        return self.request("GET", f"/v1/profiles/{structure}").json()

    def import_profile(self, structure: str, payload: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
        return self.request(
            "PUT", f"/v1/profiles/{structure}", params={"overwrite": str(bool(overwrite)).lower()}, json=payload
        ).json()

    def delete_profile(self, structure: str) -> None:
        self.request("DELETE", f"/v1/profiles/{structure}")


class RemoteSession:
    """A session on the server with :class:`~SPASegmentationLib.session.Session`'s verbs; resumes after a restart."""

    def __init__(
        self, client: SPAClient, image: np.ndarray, digest: str, plane: PlaneSpec | None, settings: dict[str, Any]
    ) -> None:
        self.client = client
        self.image = image
        self.digest = digest
        self.plane = plane
        self.settings = settings
        self.session_id: str | None = None
        self.state: dict[str, Any] | None = None  # the last state the server reported
        self.start_record: dict[str, Any] = {}
        self.current: Round | None = None
        self.accepted_weights: np.ndarray | None = None
        self.profile: dict[str, Any] | None = None  # the profile the last accept updated
        self.profile_error: str | None = None  # why the last accept could not update the profile

    def _open(self, opening: dict[str, Any]) -> Round:
        body = {"image": self.client.upload(self.image, digest=self.digest), **self.settings, **opening}
        if self.plane is not None:
            body["plane"] = self.plane.to_dict()
        content = self.client.request("POST", "/v1/sessions", json=body).content
        return self._take(content)

    def _take(self, content: bytes) -> Round:
        round_, meta = decode_round(content)
        self.session_id, self.state, self.start_record = meta["session"], meta["state"], meta.get("start") or {}
        self.current = round_
        return round_

    def _resume(self) -> None:
        """Reopen the session from its last state on a server that lost it (restarted, or closed it)."""
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                self.client.upload(self.image, digest=self.digest, force=True)
                break
            except ServiceError as exc:
                if exc.status != 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        self._open({"state": self.state})

    def _call(self, path: str, body: dict[str, Any]) -> bytes:
        """POST to this session; on a lost session or connection, resume from the state and try once more."""
        if self.session_id is None or self.state is None:
            raise ServiceError("start the session first")
        try:
            return self.client.request("POST", f"/v1/sessions/{self.session_id}/{path}", json=body).content
        except ServiceError as exc:
            if exc.status not in (0, 404):
                raise
        self._resume()
        return self.client.request("POST", f"/v1/sessions/{self.session_id}/{path}", json=body).content

    # ----- Session's verbs -----
    def start(
        self,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        label: bool = True,
    ) -> Round:
        start = {
            "point": None if point is None else [float(v) for v in point],
            "box": None if box is None else [float(v) for v in box],
            "label": bool(label),
        }
        return self._open({"start": start})

    def choose(self, k: int) -> Round:
        return self._take(self._call("choose", {"candidate": int(k)}))

    def undo(self, to_round: int | None = None) -> Round:
        return self._take(self._call("undo", {"to_round": to_round}))

    def accept(self, candidate: int | None = None) -> np.ndarray:
        """The accepted mask; the server updates the user's profile for the session's structure."""
        meta, arrays = decode_frame(self._call("accept", {"candidate": None if candidate is None else int(candidate)}))
        self.state, self.profile, self.profile_error = meta["state"], meta.get("profile"), meta.get("profile_error")
        self.accepted_weights = arrays["weights"]
        return arrays["mask"]

    def close(self) -> None:
        if self.session_id is not None:
            try:
                self.client.request("DELETE", f"/v1/sessions/{self.session_id}")
            except ServiceError:
                pass
            self.session_id = None


class PropagationJob:
    """A propagation running on the server."""

    def __init__(self, client: SPAClient, job_id: str) -> None:
        self.client, self.job_id = client, job_id

    def status(self) -> dict[str, Any]:
        """``{"status": running|done|cancelled|failed, "done": n, "total": n, "error": …}``."""
        return self.client.request("GET", f"/v1/propagations/{self.job_id}").json()

    def cancel(self) -> None:
        self.client.request("DELETE", f"/v1/propagations/{self.job_id}")

    def wait(self, progress: Callable[[int, int], None] | None = None, poll_s: float = 0.2) -> PropagatedMasks:
        """Poll until the job ends; the masks made (also after a cancel)."""
        while True:
            status = self.status()
            if progress is not None:
                progress(status["done"], status["total"])
            if status["status"] != "running":
                break
            time.sleep(poll_s)
        if status["status"] == "failed":
            raise ServiceError(f"the propagation failed: {status['error']}")
        meta, arrays = decode_frame(self.client.request("GET", f"/v1/propagations/{self.job_id}/result").content)
        masks = {int(i): arrays["masks"][n] for n, i in enumerate(arrays["indices"])}
        return PropagatedMasks(masks, meta["stopped"], meta["status"])


@dataclass
class PropagatedMasks:
    masks: dict[int, np.ndarray]  # slice index -> (H, W) bool in the plane's orientation
    stopped: dict[str, str]  # direction -> why it stopped
    status: str  # done | cancelled


class LocalService:
    """``spa serve`` as a child process on loopback, a random port and a random token; stopped on exit.

    ``python`` is the interpreter that has SPA installed (in Slicer: PythonSlicer); the token goes to
    the child through its environment, never its command line.
    """

    def __init__(
        self,
        python: str = sys.executable,
        *,
        model: str | None = None,
        profiles_db: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        import secrets

        self.token = secrets.token_urlsafe(32)
        command = [python, "-m", "SPASegmentationLib.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        if model is not None:
            command += ["--model", model]
        if profiles_db is not None:
            command += ["--profiles-db", profiles_db]
        command += list(extra_args)
        child_env = {**os.environ, **(env or {}), "SPA_SERVE_TOKEN": self.token}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env, text=True, bufsize=1
        )
        self.errors: list[str] = []
        self._stderr = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr.start()
        ready = self._ready_line(startup_timeout)
        self.url: str = ready["url"]
        self.port: int = int(ready["port"])
        self.model_fingerprint: str = ready["model_fingerprint"]

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            self.errors = (self.errors + [line.rstrip()])[-200:]

    def _ready_line(self, timeout: float) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def read() -> None:
            for line in self.process.stdout:
                try:
                    payload = json.loads(line)
                except ValueError:
                    continue
                if isinstance(payload, dict) and payload.get("spa_serve") == "ready":
                    found.update(payload)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            detail = " | ".join(self.errors[-5:]) or "no output"
            raise ServiceError(f"the local SPA server did not start within {timeout:g} s: {detail}")
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()
        return found

    def client(self, user: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> SPAClient:
        return SPAClient(self.url, self.token, user=user, timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (terminate, then kill if it lingers)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
