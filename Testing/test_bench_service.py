"""``spa bench --service``: rounds through a local ``spa serve`` against the same rounds in process.

The report's structure and sanity only; how fast this machine is, is for the bench to say, not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from SPASegmentationLib.cli import main

SIZE = 128
ROUNDS = 2


def test_the_service_section_reports_what_a_round_through_the_local_service_adds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--service-only", "--samples", "4", "--service-rounds", str(ROUNDS)]
    assert main([*argv, "--service-size", str(SIZE), "--out", str(tmp_path)]) == 0

    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["kind"] == "spa-bench"
    assert payload["reports"] == []  # --service-only: no conditioning configurations
    service = payload["service"]
    assert service["image_shape"] == [SIZE, SIZE]
    assert (service["n_samples"], service["rounds"], service["device"]) == (4, ROUNDS, "cpu")

    per_round = ["local_round_s", "remote_round_s", "local_compute_s", "server_compute_s"]
    assert all(len(service[key]) == ROUNDS for key in per_round)
    assert all(value > 0 for key in per_round for value in service[key])
    # the compute is measured inside the call the wall time is measured around, on either side
    assert all(c <= w for c, w in zip(service["local_compute_s"], service["local_round_s"], strict=True))
    assert all(c <= w for c, w in zip(service["server_compute_s"], service["remote_round_s"], strict=True))

    for key in ["local_round_ms", "remote_round_ms", "local_compute_ms", "server_compute_ms", "ping_ms"]:
        assert service[key] > 0, key
    for key in ["noop_round_trip_ms", "frame_encode_ms", "frame_decode_ms", "service_start_s", "upload_s"]:
        assert service[key] > 0, key
    # a remote round is an HTTP round trip more than the same work in process: what is left beside the compute is
    # positive, and the paired overhead is not below zero by more than the in-process rest's noise
    assert service["remote_outside_compute_ms"] > 0
    assert service["overhead_ms"] > -25.0
    assert service["overhead_min_ms"] <= service["overhead_ms"] <= service["overhead_max_ms"]
    # a round frame holds at least the probability and uncertainty maps as float16
    assert service["frame_bytes"] > 2 * 2 * SIZE * SIZE
    assert service["upload_bytes"] == SIZE * SIZE  # the uint8 sample, resized
    # both sides computed the same rounds (maps in 1/65535 steps on the wire)
    assert service["max_probability_difference"] < 1e-4

    assert service["goal_ms"] == 30.0
    assert service["within_goal"] is (service["added_ms"] <= service["goal_ms"])
    assert service["overhead_within_goal"] is (service["overhead_ms"] <= service["goal_ms"])

    printed = capsys.readouterr().out
    assert "added per round" in printed and "30 ms goal" in printed
    assert f"{service['frame_bytes']:,} bytes" in printed
