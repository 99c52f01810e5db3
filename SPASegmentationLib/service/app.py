"""The HTTP application of ``spa serve``: one model and its embedding cache, sessions, propagations, profiles.

Every route but ``/v1/health`` needs a token (``Authorization: Bearer <token>``). A *team* token names
its user, who then sees and changes only their own sessions and profiles; the *shared* token of a
local server lets the client name the user (``X-SPA-User``). Images are uploaded once and cached by
content hash; sessions and propagations refer to them. Model work runs one job at a time under one
lock (a propagation lets other requests in between its slices). Every refusal is a 4xx with
``{"error": "<what is wrong and how to fix it>"}``; the server keeps serving.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..backend import BackendSession, InProcessBackend
from ..embeddings import EmbeddingCache
from ..errors import InputError, ProfileError, SPAError
from ..limits import MAX_SAMPLES, MAX_VOLUME_VOXELS, MIN_SAMPLES, load_json, pixels_message
from ..model.spa import SPAModel
from ..profile_db import SQLiteProfileStore
from ..profiles import validate_name
from ..rounds import DEFAULT_SAMPLES
from .protocol import (
    API_VERSION,
    FRAME_MEDIA_TYPE,
    USER_HEADER,
    PlaneSpec,
    array_digest,
    decode_frame,
    encode_frame,
    encode_round,
)

log = logging.getLogger("spa.serve")

LOCAL_USER = "local"


@dataclass(frozen=True)
class ServiceLimits:
    """What one server accepts; every limit is refused with a 4xx that names it."""

    max_request_bytes: int = 1 << 30  # a request body (a volume upload is the largest)
    max_image_elements: int = MAX_VOLUME_VOXELS  # voxels of one uploaded image
    image_cache_bytes: int = 4 << 30  # uploaded images kept (least recently used go first)
    requests_per_minute: int = 6000  # per user
    sessions_per_user: int = 16  # open sessions per user (the least recently used is closed first)
    max_samples: int = MAX_SAMPLES  # N, samples per round
    propagations_per_user: int = 2  # running at once

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# ----- request bodies (JSON) --------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StartBody(_Strict):
    point: list[float] | None = Field(None, min_length=2, max_length=2)
    box: list[float] | None = Field(None, min_length=4, max_length=4)
    label: bool = True


class SessionBody(_Strict):
    """Open a session on an uploaded image (a 2-D image, or a plane of a volume) and answer its first round."""

    image: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")
    plane: dict[str, Any] | None = None
    start: StartBody | None = None
    state: dict[str, Any] | None = None  # a session state to resume instead of a start
    seed: int = Field(0, ge=0, le=2**63 - 1)
    n_samples: int = Field(DEFAULT_SAMPLES, ge=1)
    window: list[float] | None = Field(None, min_length=2, max_length=2)
    structure: str | None = None
    use_profile: bool = True
    initial_weights: list[float] | None = None


class ChooseBody(_Strict):
    candidate: int = Field(ge=0)


class UndoBody(_Strict):
    to_round: int | None = Field(None, ge=1)


class AcceptBody(_Strict):
    candidate: int | None = Field(None, ge=0)


# ----- what the server holds --------------------------------------------------------------------------------
@dataclass
class HostedSession:
    owner: str
    session: BackendSession
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class PropagationJob:
    owner: str
    done: int = 0
    total: int = 0
    status: str = "running"  # running | done | cancelled | failed
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Any = None


class ImageStore:
    """Uploaded images by content hash, least recently used dropped first beyond a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, digest: str, image: np.ndarray) -> None:
        with self._lock:
            self._images[digest] = image
            self._images.move_to_end(digest)
            while sum(a.nbytes for a in self._images.values()) > self.budget and len(self._images) > 1:
                self._images.popitem(last=False)

    def get(self, digest: str) -> np.ndarray:
        with self._lock:
            image = self._images.get(digest)
            if image is None:
                raise HTTPException(
                    404, f"image {digest[:12]}… is not on this server; upload it again (PUT /v1/images)"
                )
            self._images.move_to_end(digest)
            return image

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._images


class RateLimiter:
    """At most ``per_minute`` requests per user in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._times: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._times.setdefault(user, deque())
            while times and now - times[0] > 60.0:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = max(1, math.ceil(60.0 - (now - times[0])))
                raise HTTPException(
                    429,
                    f"more than {self.per_minute} requests in a minute from user {user!r}; wait {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            times.append(now)


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes with 413, by its Content-Length before reading it, and
    while reading it when it does not say."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = _json_error(413, self.message)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)

    @property
    def message(self) -> str:
        return f"the request body is larger than this server's limit of {self.limit} bytes; send less"


# ----- the application --------------------------------------------------------------------------------------
class Service:
    """The state behind the routes: model, caches, sessions, propagations, profiles, tokens."""

    def __init__(
        self,
        model: SPAModel,
        profiles: SQLiteProfileStore,
        tokens: dict[str, str | None],
        limits: ServiceLimits | None = None,
        embedding_capacity: int = 64,
    ) -> None:
        if not tokens:
            raise InputError("the server needs at least one token; give --token or --users")
        self.model = model
        self.profiles = profiles
        self.tokens = dict(tokens)
        self.limits = limits = limits or ServiceLimits()
        self.backend = InProcessBackend(model, profiles, embeddings=EmbeddingCache(model, capacity=embedding_capacity))
        self.images = ImageStore(limits.image_cache_bytes)
        self.rate = RateLimiter(limits.requests_per_minute)
        self.model_lock = threading.Lock()
        self._lock = threading.Lock()
        self.sessions: dict[str, HostedSession] = {}
        self.jobs: dict[str, PropagationJob] = {}

    # ----- who is asking -----
    def user_of(self, request: Request) -> str:
        """The acting user of a request (401 without a known token), rate-limited."""
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        user: str | None = None
        known = False
        for token, token_user in self.tokens.items():
            if scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.encode()):
                known, user = True, token_user
        if not known:
            raise HTTPException(
                401,
                "missing or wrong token; send 'Authorization: Bearer <token>' with the server's token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if user is None:  # the shared token of a local server: the client says who acts
            user = request.headers.get(USER_HEADER) or LOCAL_USER
        named = request.headers.get(USER_HEADER)
        if named is not None and named != user:
            raise HTTPException(403, f"this token belongs to user {user!r}, not {named!r}")
        try:
            validate_name(user, "user")
        except ProfileError as exc:
            raise HTTPException(400, str(exc)) from exc
        self.rate.check(user)
        return user

    # ----- sessions -----
    def hosted(self, user: str, session_id: str) -> HostedSession:
        with self._lock:
            hosted = self.sessions.get(session_id)
        if hosted is None or hosted.owner != user:
            raise HTTPException(
                404,
                f"session {session_id} is not open on this server (it was closed, or the server restarted); "
                "open it again from its state",
            )
        hosted.last_used = time.monotonic()
        return hosted

    def add_session(self, hosted: HostedSession) -> str:
        session_id = uuid.uuid4().hex
        with self._lock:
            mine = sorted((h.last_used, key) for key, h in self.sessions.items() if h.owner == hosted.owner)
            for _, key in mine[: max(0, len(mine) - self.limits.sessions_per_user + 1)]:
                del self.sessions[key]
            self.sessions[session_id] = hosted
        return session_id

    def open_session(self, user: str, body: SessionBody) -> tuple[str, HostedSession]:
        """Build a session from the request (new, or resumed from a state) and run it up to its current round."""
        if not MIN_SAMPLES <= body.n_samples <= self.limits.max_samples:
            raise InputError(
                f"n_samples {body.n_samples} is outside this server's limits {MIN_SAMPLES}..{self.limits.max_samples}"
            )
        if (body.start is None) == (body.state is None):
            raise InputError("open a session with either a start prompt or a saved state")
        image = self.images.get(body.image)
        plane = None if body.plane is None else PlaneSpec.from_dict(body.plane)
        backend = self.backend.for_user(user)
        with self.model_lock:
            if body.state is not None:
                session = backend.restore(
                    image, body.state, plane=plane, structure=body.structure, use_profile=body.use_profile
                )
            else:
                session = backend.session(
                    image,
                    plane=plane,
                    structure=body.structure,
                    use_profile=body.use_profile,
                    seed=body.seed,
                    n_samples=body.n_samples,
                    window=None if body.window is None else (float(body.window[0]), float(body.window[1])),
                    initial_weights=None
                    if body.initial_weights is None
                    else np.asarray(body.initial_weights, dtype=np.float32),
                )
                start = body.start
                session.start(
                    point=None if start.point is None else tuple(start.point),
                    box=None if start.box is None else tuple(start.box),
                    label=start.label,
                )
        hosted = HostedSession(user, session)
        return self.add_session(hosted), hosted

    def round_reply(self, session_id: str, hosted: HostedSession) -> Response:
        session = hosted.session
        meta = {"session": session_id, "state": session.state, "start": session.start_record}
        return Response(encode_round(session.current, meta), media_type=FRAME_MEDIA_TYPE)

    def accept(self, hosted: HostedSession, candidate: int | None) -> Response:
        session = hosted.session
        with self.model_lock:
            mask = session.accept(candidate)  # the owner's profile for the structure takes the mixture
        meta = {"state": session.state, "profile": session.profile, "profile_error": session.profile_error}
        arrays = {"mask": mask, "weights": session.accepted_weights}
        return Response(encode_frame(meta, arrays), media_type=FRAME_MEDIA_TYPE)

    # ----- propagation -----
    def start_propagation(self, user: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
        with self._lock:
            running = sum(1 for j in self.jobs.values() if j.owner == user and j.status == "running")
        if running >= self.limits.propagations_per_user:
            raise HTTPException(429, f"{running} propagations of yours are running; wait for one or cancel it")
        allowed = {"image", "plane", "seed", "n_samples", "window", "max_slices", "weights"}
        unknown = set(meta) - allowed
        if unknown:
            raise InputError(f"unknown propagation setting(s) {sorted(unknown)}; known: {sorted(allowed)}")
        if "mask" not in arrays:
            raise InputError("a propagation needs the accepted start mask as the array 'mask'")
        volume = self.images.get(str(meta.get("image", "")))
        plane = PlaneSpec.from_dict(meta.get("plane"))
        plane.extract(volume)  # checks the plane against the volume
        backend = self.backend.for_user(user)
        n_samples = int(meta.get("n_samples", DEFAULT_SAMPLES))
        if not MIN_SAMPLES <= n_samples <= self.limits.max_samples:
            raise InputError(f"n_samples must be {MIN_SAMPLES}..{self.limits.max_samples}, got {n_samples}")
        window = meta.get("window")
        weights = arrays.get("weights")
        job = PropagationJob(owner=user)
        job_id = uuid.uuid4().hex
        with self._lock:
            self.jobs[job_id] = job

        def progress(done: int, total: int) -> bool:
            job.done, job.total = done, total
            self.model_lock.release()  # let other users' rounds in between slices
            self.model_lock.acquire()
            return not job.cancel.is_set()

        def run() -> None:
            try:
                with self.model_lock:
                    job.result = backend.propagate(
                        volume,
                        plane,
                        arrays["mask"],
                        weights=weights,
                        seed=int(meta.get("seed", 0)),
                        n_samples=n_samples,
                        window=None if not window else (float(window[0]), float(window[1])),
                        max_slices=meta.get("max_slices"),
                        progress=progress,
                    )
                job.status = "cancelled" if job.cancel.is_set() else "done"
            except SPAError as exc:
                job.status, job.error = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 - reported to the client; the server keeps serving
                log.exception("propagation failed")
                job.status, job.error = "failed", f"internal error ({type(exc).__name__}: {exc})"

        threading.Thread(target=run, name=f"spa-propagation-{job_id[:8]}", daemon=True).start()
        return job_id

    def job(self, user: str, job_id: str) -> PropagationJob:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None or job.owner != user:
            raise HTTPException(404, f"propagation {job_id} is not known to this server; start it again")
        return job


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _frame_body(request: Request, service: Service) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    data = await request.body()
    return decode_frame(data, max_elements=service.limits.max_image_elements)


def build_app(service: Service) -> FastAPI:
    """The FastAPI application serving ``service``."""
    app = FastAPI(title="SPA", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(SPAError)
    async def spa_error(_: Request, exc: SPAError) -> JSONResponse:
        return _json_error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return _json_error(422, f"the request is not valid: {problems}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _json_error(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps serving")

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "api": API_VERSION}

    @app.get("/v1/info")
    def info(request: Request) -> dict[str, Any]:
        user = service.user_of(request)
        return {
            "api": API_VERSION,
            "version": __version__,
            "user": user,
            "model_fingerprint": service.model.fingerprint(),
            "device": str(service.model.device),
            "limits": service.limits.to_dict(),
        }

    @app.api_route("/v1/images/{digest}", methods=["GET", "HEAD"])
    def has_image(digest: str, request: Request) -> Response:
        service.user_of(request)
        if digest not in service.images:
            raise HTTPException(404, f"image {digest[:12]}… is not on this server; upload it (PUT /v1/images)")
        return Response(status_code=204)

    @app.put("/v1/images/{digest}")
    async def put_image(digest: str, request: Request) -> dict[str, Any]:
        service.user_of(request)
        meta, arrays = await _frame_body(request, service)
        image = arrays.get("image")
        if image is None or image.ndim not in (2, 3) or image.dtype == np.bool_:
            raise InputError("upload one numeric array named 'image' of 2 (H, W) or 3 (slices, H, W) dimensions")
        planes = [image.shape] if image.ndim == 2 else [image.shape[1:], image.shape[::2], image.shape[:2]]
        for rows, columns in planes:
            problem = pixels_message(int(rows), int(columns), "a plane of the uploaded image")
            if problem:
                raise InputError(problem)
        if not np.isfinite(image).all():
            raise InputError("the image holds NaN or infinite values; fix or mask them before uploading")
        actual = await run_in_threadpool(array_digest, image)
        if actual != digest:
            raise InputError(f"the uploaded image hashes to {actual}, not {digest}; upload it to its own hash")
        service.images.put(digest, image)
        return {"image": digest, "shape": list(image.shape), "dtype": image.dtype.name}

    @app.post("/v1/sessions")
    def open_session(body: SessionBody, request: Request) -> Response:
        user = service.user_of(request)
        session_id, hosted = service.open_session(user, body)
        return service.round_reply(session_id, hosted)

    @app.post("/v1/sessions/{session_id}/choose")
    def choose(session_id: str, body: ChooseBody, request: Request) -> Response:
        hosted = service.hosted(service.user_of(request), session_id)
        with service.model_lock:
            hosted.session.choose(body.candidate)
        return service.round_reply(session_id, hosted)

    @app.post("/v1/sessions/{session_id}/undo")
    def undo(session_id: str, body: UndoBody, request: Request) -> Response:
        hosted = service.hosted(service.user_of(request), session_id)
        hosted.session.undo(body.to_round)
        return service.round_reply(session_id, hosted)

    @app.post("/v1/sessions/{session_id}/accept")
    def accept(session_id: str, body: AcceptBody, request: Request) -> Response:
        user = service.user_of(request)
        return service.accept(service.hosted(user, session_id), body.candidate)

    @app.get("/v1/sessions/{session_id}/state")
    def state(session_id: str, request: Request) -> dict[str, Any]:
        return service.hosted(service.user_of(request), session_id).session.state

    @app.delete("/v1/sessions/{session_id}")
    def close(session_id: str, request: Request) -> Response:
        service.hosted(service.user_of(request), session_id)
        with service._lock:
            service.sessions.pop(session_id, None)
        return Response(status_code=204)

    @app.post("/v1/propagations")
    async def start_propagation(request: Request) -> dict[str, Any]:
        user = service.user_of(request)
        meta, arrays = await _frame_body(request, service)
        return {"job": service.start_propagation(user, meta, arrays)}

    @app.get("/v1/propagations/{job_id}")
    def propagation(job_id: str, request: Request) -> dict[str, Any]:
        job = service.job(service.user_of(request), job_id)
        return {"status": job.status, "done": job.done, "total": job.total, "error": job.error}

    @app.get("/v1/propagations/{job_id}/result")
    def propagation_result(job_id: str, request: Request) -> Response:
        job = service.job(service.user_of(request), job_id)
        if job.status == "running":
            raise HTTPException(409, "the propagation is still running; poll its status until it is done")
        if job.result is None:
            raise HTTPException(409, f"the propagation has no result ({job.status}: {job.error})")
        result = job.result
        indices = sorted(result.masks)
        masks = np.stack([result.masks[i] for i in indices]) if indices else np.zeros((0, 0, 0), bool)
        meta = {"status": job.status, "stopped": result.stopped, "start_index": result.start_index}
        arrays = {"indices": np.asarray(indices, dtype=np.int32), "masks": masks}
        return Response(encode_frame(meta, arrays), media_type=FRAME_MEDIA_TYPE)

    @app.delete("/v1/propagations/{job_id}")
    def cancel_propagation(job_id: str, request: Request) -> dict[str, Any]:
        job = service.job(service.user_of(request), job_id)
        job.cancel.set()
        return {"status": job.status}

    @app.get("/v1/profiles")
    def list_profiles(request: Request) -> list[dict[str, Any]]:
        user = service.user_of(request)
        return [
            {"structure": s.structure, "n_sessions": s.n_sessions, "updated": s.updated, "error": s.error}
            for s in service.profiles.list_profiles(user)
        ]

    @app.get("/v1/profiles/{structure}")
    def get_profile(structure: str, request: Request) -> dict[str, Any]:
        user = service.user_of(request)
        try:
            return service.profiles.export_payload(user, structure)
        except ProfileError as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.put("/v1/profiles/{structure}")
    async def put_profile(structure: str, request: Request, overwrite: bool = False) -> dict[str, Any]:
        user = service.user_of(request)
        payload = load_json(await request.body(), "the uploaded profile", InputError)
        profile = await run_in_threadpool(
            service.profiles.import_payload, payload, user, structure, overwrite=overwrite
        )
        return {"user": profile.user, "structure": profile.structure, "n_sessions": profile.n_sessions}

    @app.delete("/v1/profiles/{structure}")
    def delete_profile(structure: str, request: Request) -> Response:
        user = service.user_of(request)
        try:
            service.profiles.delete(user, structure)
        except ProfileError as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(status_code=204)

    return app
