"""Run ``spa serve``: load the model, bind, print one ready line, serve until stopped.

Binds to loopback unless told otherwise; off loopback it needs tokens (``--token`` or ``--users``) and
belongs behind a TLS reverse proxy (README). With port 0 the system picks a free port, which the ready
line reports: one JSON line ``{"spa_serve": "ready", "url": …, "port": …, "model_fingerprint": …}`` on
standard output, printed once the socket is listening (a generated token is in it too).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import TextIO

from ..errors import InputError
from ..profile_db import SQLiteProfileStore
from ..profiles import validate_name
from ..resources import spa_home
from .app import BodyLimit, Service, ServiceLimits, build_app

TOKEN_ENV = "SPA_SERVE_TOKEN"  # how a parent process hands the shared token over without a command line
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_users(path: Path) -> dict[str, str | None]:
    """Team tokens from a file of ``user token`` lines (``#`` comments): token -> user."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"could not read the users file {path} ({exc}); give a text file of 'user token' lines"
        ) from exc
    tokens: dict[str, str | None] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"{path}, line {number}: write 'user token' (two words), got {line!r}")
        user, token = parts
        validate_name(user, "user")
        if len(token) < MIN_TOKEN_LENGTH:
            raise InputError(
                f"{path}, line {number}: the token of {user!r} is shorter than {MIN_TOKEN_LENGTH} characters; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if token in tokens:
            raise InputError(f"{path}, line {number}: this token is given twice; every user needs their own")
        tokens[token] = user
    if not tokens:
        raise InputError(f"the users file {path} names no users; write one 'user token' line per user")
    return tokens


def serve(
    model_path: Path | None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    users_file: Path | None = None,
    profiles_db: Path | None = None,
    device: str = "cpu",
    checkpoint: Path | None = None,
    limits: ServiceLimits | None = None,
    out: TextIO = sys.stdout,
    encoder: str = "auto",
    propagation_encoder: str = "auto",
    round_precision: str = "float32",
) -> None:
    """Load the model and serve it until interrupted (``round_precision``: see ``SPAModel.use_round_precision``)."""
    import uvicorn

    from ..model.build import default_model, load_model

    limits = limits or ServiceLimits()
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the token must have at least {MIN_TOKEN_LENGTH} characters; use a random one")
    tokens: dict[str, str | None] = {} if users_file is None else read_users(users_file)
    generated = None
    if token is None and not tokens:
        if not is_loopback(host):
            raise InputError(
                f"serving on {host} (not loopback) needs tokens: give --users FILE (one token per user) or --token"
            )
        token = generated = secrets.token_urlsafe(32)
    if token is not None:
        tokens[token] = None
    model = default_model(device) if model_path is None else load_model(model_path, checkpoint, device)
    runtime = model.backbone.use_encoder_runtime(encoder, propagation=propagation_encoder)
    model.use_round_precision(round_precision)
    profiles = SQLiteProfileStore(
        profiles_db or spa_home() / "serve" / "profiles.sqlite3",
        model_fingerprint=model.fingerprint(),
        shape=(model.config.n_components, model.config.latent_dim),
    )
    service = Service(model, profiles, tokens, limits)
    app = BodyLimit(build_app(service), limits.max_request_bytes)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: a response's header and body writes must not wait for a delayed ACK (40 ms)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise InputError(f"could not listen on {host}:{port} ({exc}); choose another --port or --host") from exc
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    ready = {
        "spa_serve": "ready",
        "url": f"http://{shown}:{bound}",
        "port": bound,
        "model_fingerprint": model.fingerprint(),
        "encoder": runtime.value,
        "propagation_encoder": model.backbone.propagation_runtime.value,
        "round_precision": model.round_precision.value,
    }
    if generated is not None:
        ready["token"] = generated
    out.write(json.dumps(ready) + "\n")
    out.flush()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
