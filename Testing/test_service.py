"""``spa serve`` as users meet it: real server processes driven over real HTTP by the SPA client and raw requests.

Servers load the shipped model (a few seconds each); rounds use few samples to keep the suite quick.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import disc_image

from SPASegmentationLib.metrics import dice
from SPASegmentationLib.service.client import LocalService, ServiceError, SPAClient
from SPASegmentationLib.service.protocol import FRAME_MEDIA_TYPE, PlaneSpec, array_digest, encode_frame
from SPASegmentationLib.session import Session

SAMPLES = 8
REPO = Path(__file__).resolve().parents[1]
TEAM = {f"user{n}": f"token-of-user-{n}-0123456789abcdef" for n in range(8)}


def launch(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """Start ``spa serve`` with ``args``; wait for its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "SPASegmentationLib.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
        text=True,
        cwd=REPO,
    )
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"spa serve did not start: {process.stderr.read()}")
    threading.Thread(target=process.stdout.read, daemon=True).start()
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process, json.loads(line)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    """A local server as the Slicer module starts it: loopback, random port and token."""
    home = tmp_path_factory.mktemp("spa_home")
    with LocalService(profiles_db=str(home / "profiles.sqlite3"), env={"SPA_HOME": str(home)}) as service:
        yield service


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    """A team server: one token per user, a 1 MiB request limit and 40 requests a minute per user."""
    home = tmp_path_factory.mktemp("team_home")
    users = home / "users.txt"
    users.write_text("# user token\n" + "".join(f"{u} {t}\n" for u, t in TEAM.items()))
    process, ready = launch(
        [
            "--port",
            "0",
            "--users",
            str(users),
            "--max-request-mb",
            "1",
            "--rate",
            "40",
            "--profiles-db",
            str(home / "p.db"),
        ],
        {"SPA_HOME": str(home), "SPA_SERVE_TOKEN": ""},
    )
    yield ready["url"]
    stop(process)


def member(url: str, n: int) -> SPAClient:
    return SPAClient(url, TEAM[f"user{n}"])


def test_a_remote_session_answers_as_an_in_process_session(local: LocalService, shipped_model) -> None:
    image = disc_image()
    remote = local.client(user="alice").session(image, seed=3, n_samples=SAMPLES)
    here = Session(shipped_model, image, seed=3, n_samples=SAMPLES)
    pairs = [(remote.start(point=(120, 90)), here.start(point=(120, 90)))]
    pairs.append((remote.choose(1), here.choose(1)))
    for theirs, ours in pairs:
        assert theirs.index == ours.index
        assert dice(theirs.recommended, ours.recommended) > 0.99
        assert theirs.candidates.shape == ours.candidates.shape
        np.testing.assert_allclose(theirs.probability, ours.probability, atol=1e-4)  # 1/65535 steps on the wire
        np.testing.assert_allclose(theirs.mixture_weights, ours.mixture_weights, rtol=1e-4, atol=1e-6)
    assert remote.state["choices"] == [1]
    assert remote.start_record["found_box"] == here.start_record()["found_box"]
    assert remote.undo().index == 1


def test_accept_returns_the_mask_and_updates_only_that_users_profile(local: LocalService) -> None:
    image = disc_image(seed=1)
    alice, bob = local.client(user="alice"), local.client(user="bob")
    session = alice.session(image, structure="disc", n_samples=SAMPLES)
    round1 = session.start(point=(120, 90))
    mask = session.accept(2)
    assert np.array_equal(mask, round1.candidates[2])
    assert session.profile == {"user": "alice", "structure": "disc", "n_sessions": 1}
    assert [p["structure"] for p in alice.profiles()] == ["disc"]
    assert bob.profiles() == []
    with pytest.raises(ServiceError) as missing:
        bob.profile("disc")
    assert missing.value.status == 404
    exported = alice.profile("disc")
    assert bob.import_profile("disc", exported)["user"] == "bob"
    bob.delete_profile("disc")
    assert bob.profiles() == []


def test_eight_team_members_at_once_each_keep_their_own_profile(team: str) -> None:
    image = disc_image(seed=2)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            session = member(team, n).session(image, structure="nodule", n_samples=SAMPLES, seed=n)
            session.start(point=(120, 90))
            session.choose(n % 4)
            session.accept()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == []
    for n in range(8):
        listing = member(team, n).profiles()
        assert [(p["structure"], p["n_sessions"]) for p in listing] == [("nodule", 1)]


def test_concurrent_accepts_of_one_user_are_all_counted(team: str) -> None:
    image = disc_image(seed=3)
    client = member(team, 7)
    sessions = [client.session(image, structure="liver", n_samples=SAMPLES, seed=s) for s in range(6)]
    for session in sessions:
        session.start(point=(120, 90))
    threads = [threading.Thread(target=session.accept) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert json.loads(json.dumps(client.profile("liver")))["n_sessions"] == 6


def test_tokens_are_required_and_name_their_user(team: str) -> None:
    assert requests.get(f"{team}/v1/health", timeout=30).json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TEAM["user0"]}):
        response = requests.get(f"{team}/v1/info", headers=headers, timeout=30)
        assert response.status_code == 401 and "token" in response.json()["error"]
    borrowed = {"Authorization": f"Bearer {TEAM['user0']}", "X-SPA-User": "user1"}
    response = requests.get(f"{team}/v1/profiles", headers=borrowed, timeout=30)
    assert response.status_code == 403 and "user0" in response.json()["error"]
    assert member(team, 0).info()["user"] == "user0"


def test_another_users_session_is_not_theirs(team: str) -> None:
    session = member(team, 1).session(disc_image(seed=4), n_samples=SAMPLES)
    session.start(point=(120, 90))
    intruder = member(team, 2)
    with pytest.raises(ServiceError) as refused:
        intruder.request("POST", f"/v1/sessions/{session.session_id}/choose", json={"candidate": 0})
    assert refused.value.status == 404
    assert session.choose(0).index == 2


def test_malformed_and_oversized_requests_get_a_clear_4xx_and_the_server_keeps_serving(team: str) -> None:
    client = member(team, 3)
    session = client.session(disc_image(seed=5), structure="kidney", n_samples=SAMPLES)
    session.start(point=(120, 90))
    session.accept()
    assert session.undo(1).index == 1  # open again
    auth = {"Authorization": f"Bearer {TEAM['user3']}"}
    image = disc_image(seed=6)
    digest = array_digest(image)
    good = encode_frame({}, {"image": image})
    nan_image = image.astype(np.float32)
    nan_image[3, 3] = np.nan
    cases = [
        ("PUT", f"/v1/images/{digest}", {"data": b"GIF89a not a frame"}, 400, "not an SPA frame"),
        ("PUT", f"/v1/images/{digest}", {"data": good[:-10]}, 400, "does not hold the bytes"),
        ("PUT", f"/v1/images/{'0' * 64}", {"data": good}, 400, "hashes to"),
        ("PUT", f"/v1/images/{array_digest(nan_image)}", {"data": encode_frame({}, {"image": nan_image})}, 400, "NaN"),
        ("PUT", f"/v1/images/{digest}", {"data": b"\0" * (2 << 20)}, 413, "limit"),
        ("POST", "/v1/sessions", {"data": b"{not json"}, 422, "not valid"),
        (
            "POST",
            "/v1/sessions",
            {"json": {"image": digest, "start": {"point": [1, 2]}, "n_samples": 10**6}},
            400,
            "limit",
        ),
        ("POST", "/v1/sessions", {"json": {"image": digest, "colour": "red"}}, 422, "colour"),
        ("POST", "/v1/sessions", {"json": {"image": "ab" * 32, "start": {"point": [1, 2]}}}, 404, "upload it"),
        ("POST", f"/v1/sessions/{session.session_id}/choose", {"json": {"candidate": 9}}, 400, "does not exist"),
        ("POST", f"/v1/sessions/{session.session_id}/choose", {"json": {"candidate": "one"}}, 422, "candidate"),
        ("PUT", "/v1/profiles/kidney", {"json": {"kind": "nonsense"}}, 400, "invalid"),
    ]
    for method, path, body, status, words in cases:
        headers = {**auth, "Content-Type": FRAME_MEDIA_TYPE} if "data" in body else auth
        response = requests.request(method, team + path, headers=headers, timeout=60, **body)
        assert response.status_code == status, (path, response.text)
        assert words in response.json()["error"], (path, response.text)
    assert client.profile("kidney")["n_sessions"] == 1  # nothing lost
    assert session.choose(1).index == 2 and session.undo().index == 1  # the session still works


def test_too_many_requests_are_refused_with_a_retry_time(team: str) -> None:
    statuses = [
        requests.get(f"{team}/v1/info", headers={"Authorization": f"Bearer {TEAM['user6']}"}, timeout=30)
        for _ in range(45)
    ]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused and int(refused[0].headers["Retry-After"]) >= 1
    assert member(team, 5).info()["user"] == "user5"  # other users are not slowed down


def test_a_session_survives_the_server_being_killed_and_restarted(tmp_path: Path, shipped_model) -> None:
    port, token = free_port(), "restart-test-token-0123456789"
    args = ["--port", str(port), "--profiles-db", str(tmp_path / "p.db")]
    env = {"SPA_HOME": str(tmp_path), "SPA_SERVE_TOKEN": token}
    process, ready = launch(args, env)
    image = disc_image(seed=7)
    try:
        session = SPAClient(ready["url"], token, user="dana").session(image, seed=5, n_samples=SAMPLES)
        session.start(point=(120, 90))
        session.choose(2)
        process.kill()
        process.wait(10)
        process, _ = launch(args, env)
        resumed = session.choose(0)  # the client reopens the session from its state on the new server
    finally:
        stop(process)
    here = Session(shipped_model, image, seed=5, n_samples=SAMPLES)
    here.start(point=(120, 90))
    here.choose(2)
    expected = here.choose(0)
    assert resumed.index == 3 and session.state["choices"] == [2, 0]
    assert dice(resumed.recommended, expected.recommended) > 0.99


def test_propagation_reports_progress_and_can_be_cancelled(local: LocalService) -> None:
    volume = np.stack([disc_image(seed=s, radius=35 - abs(s - 4) * 3) for s in range(9)])
    plane = PlaneSpec(axis=0, index=4)
    client = local.client(user="erin")
    session = client.session(volume, plane=plane, n_samples=SAMPLES)
    session.start(box=(78, 48, 162, 132))
    mask = session.accept()
    seen: list[tuple[int, int]] = []
    result = client.propagate(
        volume, plane, mask, n_samples=SAMPLES, max_slices=2, progress=lambda d, t: seen.append((d, t)) is None
    )
    assert result.status == "done" and 4 in result.masks
    assert set(result.masks) <= {2, 3, 4, 5, 6} and len(result.masks) >= 3
    assert seen[-1][0] == seen[-1][1] and seen[-1][1] > 0
    for index, slice_mask in result.masks.items():
        assert slice_mask.shape == (180, 240) and slice_mask[90, 120], index
    job = client.start_propagation(volume, plane, mask, n_samples=SAMPLES)
    job.cancel()
    cancelled = job.wait()
    assert cancelled.status == "cancelled" and len(cancelled.masks) < 9


def test_the_client_needs_no_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from SPASegmentationLib.service.client import LocalService, SPAClient\n"
        "from SPASegmentationLib.service.protocol import decode_round\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_off_loopback_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "SPASegmentationLib.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "SPA_HOME": str(tmp_path), "SPA_SERVE_TOKEN": ""},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("spa: error:") and "needs tokens" in done.stderr
