"""Speed and memory of SPA on this machine: what ``spa bench`` prints.

Each configuration runs in its own process, so its peak resident memory is its own. Per round
(N samples, K candidates) the real code path is timed stage by stage: generator (prompt encoding
and the mixture), sampling, conditioning and decoding, aggregation, k-means, and the feedback that
turns a choice into the next prompt.

The service section (``spa bench --service``) measures what a round costs through a local ``spa serve``
(loopback HTTP, binary frames) against the same round in process: one :class:`~.session.Session` and one
:class:`~.service.client.RemoteSession` on the same image, seed, N and prompt take turns choosing.
"""

from __future__ import annotations

import multiprocessing
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch


def _peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024.0 if platform.system() != "Darwin" else usage / (1024.0 * 1024.0)


def bench_configuration(
    conditioning: str,
    n_samples: int,
    repeats: int,
    device: str,
    weights: str | None,
    threads: int | None,
    encoder: str = "auto",
) -> dict[str, Any]:
    """Time encoding and rounds for one conditioning design; run it in a fresh process."""
    if threads:
        torch.set_num_threads(threads)
    from .data.folder import MultiRaterFolder
    from .engine import feedback_prompt, feedback_seed, round_seed, run_model_round, start_prompt
    from .model.build import build_model, load_model
    from .model.spa import SPAConfig
    from .preference import uniform_weights
    from .resources import sample_case_dir
    from .simulation.prompts import initial_point
    from .stages import StageClock

    began = time.perf_counter()
    if weights:
        model = load_model(Path(weights), device=device)
    else:
        model = build_model(SPAConfig(conditioning=conditioning), device=device)
    load_seconds = time.perf_counter() - began
    runtime = model.backbone.use_encoder_runtime(encoder, threads=threads, propagation="same")
    sample = sample_case_dir()
    case = MultiRaterFolder(sample.parent).load(sample.name)
    image = case.image
    encode_times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        embedding, geometry = model.encode(image)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        encode_times.append(time.perf_counter() - t0)
    target = next(iter(case.raters.values()))
    prompt = start_prompt(geometry, point=initial_point(case.raters, target))
    weights_now = uniform_weights(model.config.n_components)
    stage_runs: list[dict[str, float]] = []
    round_times = []
    for index in range(repeats + 1):
        t0 = time.perf_counter()
        with StageClock(model.device) as clock:
            model_round = run_model_round(
                model, embedding, geometry, prompt, weights_now, n_samples, round_seed(0, index)
            )
        t1 = time.perf_counter()
        feedback_prompt(model, model_round, 0, feedback_seed(0, index))
        clock.add("feedback", time.perf_counter() - t1)
        round_times.append(time.perf_counter() - t0)
        stage_runs.append(clock.seconds)
    # The first call of each kind warms caches and allocators; report the rest.
    stages = {k: statistics.median(run[k] for run in stage_runs[1:]) for k in stage_runs[1]}
    return {
        "conditioning": model.config.conditioning.value,
        "n_samples": n_samples,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "encoder": runtime.value,
        "image_shape": list(image.shape),
        "model_load_s": load_seconds,
        "encode_s": statistics.median(encode_times[1:]),
        "encode_first_s": encode_times[0],
        "round_s": statistics.median(round_times[1:]),
        "round_first_s": round_times[0],
        "stages_s": stages,
        "peak_rss_mb": _peak_rss_mb(),
        "model_fingerprint": model.fingerprint(),
    }


def _worker(queue: Any, function: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", function(**kwargs)))
    except Exception as exc:  # reported to the parent, which prints it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _in_fresh_process(function: Callable[..., dict[str, Any]], kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``function(**kwargs)`` in a freshly spawned process (its own memory peak and thread settings)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(queue, function, kwargs))
    process.start()
    while True:  # a child that dies (killed, out of memory) sends nothing: notice it instead of waiting forever
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(
                    f"benchmark of {what} failed: its process ended with code {process.exitcode}"
                ) from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {what} failed: {payload}")
    return payload


def run_bench(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each configuration in a fresh spawned process; return their reports."""
    return [_in_fresh_process(bench_configuration, kwargs, kwargs["conditioning"]) for kwargs in configs]


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    import os

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_report(reports: list[dict[str, Any]]) -> str:
    """A plain-text table of the reports."""
    lines = []
    stage_names = ["generator", "sampling", "conditioning_and_decoding", "aggregation", "kmeans", "feedback"]
    header = (
        f"{'conditioning':<12} {'N':>3} {'encoder':<14} {'encode s':>9} {'round s':>8} "
        + " ".join(f"{s[:12]:>12}" for s in stage_names)
        + f" {'peak MB':>8}"
    )
    lines.append(header)
    for r in reports:
        stages = " ".join(f"{r['stages_s'].get(s, float('nan')):12.4f}" for s in stage_names)
        lines.append(
            f"{r['conditioning']:<12} {r['n_samples']:>3} {r.get('encoder', 'torch'):<14} {r['encode_s']:9.3f} "
            f"{r['round_s']:8.3f} {stages} "
            f"{r['peak_rss_mb']:8.0f}"
        )
    default = next((r for r in reports if r["conditioning"] == "token" and r["device"] == "cpu"), None)
    if default is not None:
        before = BEFORE_ISSUE_12
        lines.append(
            f"token on the CPU against before issue 12 (encode {before['encode_s']} s, round {before['round_s']} s, "
            f"peak {before['peak_rss_mb']:.0f} MB, N=48): encode ×{default['encode_s'] / before['encode_s']:.2f}, "
            f"round ×{default['round_s'] / before['round_s']:.2f}, "
            f"peak ×{default['peak_rss_mb'] / before['peak_rss_mb']:.2f}"
        )
    if len(reports) == 2 and reports[0]["round_s"] > 0:
        ratio = reports[1]["round_s"] / reports[0]["round_s"]
        lines.append(f"round-time ratio {reports[1]['conditioning']}/{reports[0]['conditioning']}: {ratio:.1f}×")
    return "\n".join(lines)


# ----- the image encoder on each runtime ------------------------------------------------------------------------
# What the issue (12) measured before the fast encoders, on this project's 2-core CPU (torch 2.14.1): the figures
# the main table's ratios are against (--encoders has the noise-free reference: a torch row of the same run).
BEFORE_ISSUE_12 = {"encode_s": 1.35, "round_s": 0.105, "peak_rss_mb": 1650.0}
# `torch-compile` is measured on request only: inductor takes minutes to compile on a small CPU.
DEFAULT_ENCODERS = (
    "torch",
    "torch-channels-last",
    "torch-jit",
    "torch-bf16",
    "torch-int8",
    "onnxruntime",
    "openvino",
    "openvino-bf16",
)


def bench_encoder(runtime: str, repeats: int, threads: int | None, weights: str | None) -> dict[str, Any]:
    """One encoder runtime in a fresh process: build time, encoding time of the bundled sample (median of
    ``repeats`` after a warm-up), the process's peak memory, and what the parent compares with PyTorch's: the
    embedding and the candidates of a start and one choice. The torch run also counts the encoder's FLOPs and
    this CPU's matrix-product peak (float32 and bfloat16)."""
    import numpy as np

    from .data.folder import MultiRaterFolder
    from .errors import InputError
    from .model.build import default_model, load_model
    from .model.runtimes import RUNTIMES, EncoderRuntime, encoder_flops, matmul_peak_gflops, native_bfloat16
    from .resources import sample_case_dir
    from .session import Session
    from .simulation.prompts import initial_point

    if threads:
        torch.set_num_threads(threads)
    model = load_model(Path(weights)) if weights else default_model()
    chosen = EncoderRuntime.parse(runtime, "encoder runtime")
    try:
        began = time.perf_counter()
        model.backbone.use_encoder_runtime(chosen, threads=threads, propagation="same")
        build_seconds = time.perf_counter() - began
    except InputError as exc:  # its package is not installed, or bf16 on a CPU without it
        return {"runtime": runtime, "skipped": str(exc)}
    sample = sample_case_dir()
    case = MultiRaterFolder(sample.parent).load(sample.name)
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        embedding, _ = model.encode(case.image)
        times.append(time.perf_counter() - began)
    session = Session(model, case.image, seed=0)
    first = session.start(point=initial_point(case.raters, max(case.raters.values(), key=np.sum)))
    second = session.choose(first.n_candidates - 1)
    report = {
        "runtime": runtime,
        "precision": RUNTIMES[chosen].precision,
        "threads": torch.get_num_threads(),
        "build_s": build_seconds,
        "encode_s": statistics.median(times[1:]),
        "encode_first_s": times[0],
        "peak_rss_mb": _peak_rss_mb(),
        "embedding": embedding.cpu().numpy(),
        "candidates": [first.candidates, second.candidates],
    }
    if chosen is EncoderRuntime.TORCH:
        report["flops"] = encoder_flops(model.backbone.torch_image_encoder(), model.backbone.image_size)
        report["peak_gflops"] = {"float32": matmul_peak_gflops(torch.float32)}
        if native_bfloat16():
            report["peak_gflops"]["bfloat16"] = matmul_peak_gflops(torch.bfloat16)
    return report


def run_encoder_bench(
    runtimes: list[str], repeats: int, threads: int | None = None, weights: str | None = None
) -> dict[str, Any]:
    """Every runtime in its own fresh process, compared with PyTorch eager (run first): time and its ratio to
    torch's, achieved GFLOP/s and its share of this CPU's matrix-product peak, embedding cosine, whether the
    candidates are identical (and how many pixels differ where not), peak memory."""
    import numpy as np

    order = ["torch"] + [r for r in runtimes if r != "torch"]
    raw = [
        _in_fresh_process(bench_encoder, dict(runtime=r, repeats=repeats, threads=threads, weights=weights), r)
        for r in order
    ]
    reference = raw[0]
    flops = reference["flops"]
    rows = []
    for report in raw:
        row = {k: v for k, v in report.items() if k not in ("embedding", "candidates", "flops", "peak_gflops")}
        if "skipped" not in report:
            a = report["embedding"].astype(np.float64).ravel()
            b = reference["embedding"].astype(np.float64).ravel()
            row["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            pairs = list(zip(report["candidates"], reference["candidates"], strict=True))
            row["candidates_identical"] = all(x.shape == y.shape and np.array_equal(x, y) for x, y in pairs)
            row["candidate_pixels_differing"] = [int((x != y).sum()) if x.shape == y.shape else None for x, y in pairs]
            row["ratio_to_torch"] = report["encode_s"] / reference["encode_s"]
            row["gflops_per_s"] = flops / report["encode_s"] / 1e9
            peak = reference["peak_gflops"].get(report["precision"], reference["peak_gflops"]["float32"])
            row["share_of_peak"] = row["gflops_per_s"] / peak
        rows.append(row)
    return {"flops": flops, "peak_gflops": reference["peak_gflops"], "encoders": rows}


def format_encoder_report(report: dict[str, Any]) -> str:
    """The encoders section as plain text."""
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in report["peak_gflops"].items())
    lines = [
        f"image encoder: {report['flops'] / 1e9:.1f} GFLOP per slice; this CPU's matrix-product peak (GFLOP/s): "
        f"{peaks}",
        f"{'runtime':<20} {'precision':<9} {'build s':>8} {'encode s':>9} {'×torch':>7} {'GFLOP/s':>8} "
        f"{'of peak':>8} {'cosine':>9} {'candidates':>18} {'peak MB':>8}",
    ]
    for row in report["encoders"]:
        if "skipped" in row:
            lines.append(f"{row['runtime']:<20} skipped: {row['skipped']}")
            continue
        same = (
            "identical"
            if row["candidates_identical"]
            else "differ " + "/".join("?" if n is None else str(n) for n in row["candidate_pixels_differing"]) + " px"
        )
        lines.append(
            f"{row['runtime']:<20} {row['precision']:<9} {row['build_s']:8.1f} {row['encode_s']:9.3f} "
            f"{row['ratio_to_torch']:7.2f} {row['gflops_per_s']:8.0f} {row['share_of_peak']:8.0%} "
            f"{row['cosine']:9.6f} {same:>18} {row['peak_rss_mb']:8.0f}"
        )
    return "\n".join(lines)


# ----- 3-D propagation on a CT-sized volume ---------------------------------------------------------------------
PROPAGATION_SLICES = 50
PROPAGATION_SIZE = 512


def bench_volume(size: int = PROPAGATION_SIZE, slices: int = PROPAGATION_SLICES, seed: int = 0) -> tuple[Any, int, Any]:
    """A generated chest-CT-like volume (int16 HU, ``slices`` × ``size`` × ``size``): body, two lungs, and a round
    soft-tissue tube through every slice inside the right lung, drifting a little from slice to slice; returns
    (volume, the middle slice's index, the tube's mask on it). For timing: every slice has the structure."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((rows - 0.5) / 0.42) ** 2 + ((cols - 0.5) / 0.47) ** 2 <= 1.0
    lungs = [((rows - 0.48) / 0.27) ** 2 + ((cols - c) / 0.15) ** 2 <= 1.0 for c in (0.31, 0.69)]
    middle = slices // 2
    chest = np.where(body, 40.0, -1000.0)
    for lung in lungs:
        chest[lung] = -850.0
    volume = np.empty((slices, size, size), dtype=np.int16)
    start_mask = None
    for index in range(slices):
        picture = chest.copy()
        drift = (index - middle) / slices
        centre_r, centre_c = 0.45 + 0.05 * drift, 0.30 + 0.04 * drift
        radius = 0.022 + 0.004 * np.cos(np.pi * drift)
        tube = (rows - centre_r) ** 2 + (cols - centre_c) ** 2 <= radius**2
        picture[tube] = 35.0
        picture += rng.normal(0.0, 15.0, picture.shape)
        volume[index] = np.clip(np.rint(picture), -1024, 3000).astype(np.int16)
        if index == middle:
            start_mask = tube
    return volume, middle, start_mask


def bench_propagation(
    encoder: str = "auto",
    propagation_encoder: str = "auto",
    threads: int | None = None,
    weights: str | None = None,
    size: int = PROPAGATION_SIZE,
    slices: int = PROPAGATION_SLICES,
) -> dict[str, Any]:
    """Propagate the middle slice's mask through :func:`bench_volume` (both directions, every slice) with the
    shipped propagation settings and a progress callback, as the Slicer module runs it; in a fresh process."""
    from .model.build import default_model, load_model
    from .propagation import propagate

    if threads:
        torch.set_num_threads(threads)
    model = load_model(Path(weights)) if weights else default_model()
    model.backbone.use_encoder_runtime(encoder, threads=threads, propagation=propagation_encoder)
    volume, middle, start_mask = bench_volume(size, slices)
    calls = []
    began = time.perf_counter()
    result = propagate(model, volume, middle, start_mask, progress=lambda done, total: calls.append(done) is None)
    seconds = time.perf_counter() - began
    return {
        "encoder": model.backbone.propagation_runtime.value,
        "threads": torch.get_num_threads(),
        "volume_shape": list(volume.shape),
        "slices_with_mask": len(result.masks),
        "stopped": result.stopped,
        "propagate_s": seconds,
        "seconds_per_slice": seconds / max(1, len(calls) - 1),
        "progress_calls": len(calls),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_propagation_bench(**kwargs: Any) -> dict[str, Any]:
    """:func:`bench_propagation` in a fresh spawned process."""
    return _in_fresh_process(bench_propagation, kwargs, "propagation")


def format_propagation_report(report: dict[str, Any]) -> str:
    """The propagation section as plain text."""
    shape = "×".join(str(n) for n in report["volume_shape"])
    return (
        f"propagation through a {shape} volume ({report['encoder']} encoder, {report['threads']} threads): "
        f"{report['propagate_s']:.1f} s for {report['slices_with_mask']} slices with a mask "
        f"({report['seconds_per_slice']:.3f} s per slice; stopped {report['stopped']}), peak "
        f"{report['peak_rss_mb']:.0f} MB"
    )


# ----- the local service: what a round trip through ``spa serve`` adds ----------------------------------------
SERVICE_GOAL_MS = 30.0  # a round through the local service should take at most this much longer than in process
SERVICE_IMAGE_SIZE = 512  # a CT slice's size: round frames grow with the image
SERVICE_ROUNDS = 10
PING_REPEATS = 10


def service_image(size: int = SERVICE_IMAGE_SIZE) -> tuple[Any, tuple[float, float]]:
    """The shipped LIDC sample resized to ``size`` × ``size`` (bilinear) and its first click (x, y)."""
    import numpy as np
    from scipy import ndimage

    from .data.folder import MultiRaterFolder
    from .resources import sample_case_dir
    from .simulation.prompts import initial_point

    sample = sample_case_dir()
    case = MultiRaterFolder(sample.parent).load(sample.name)
    zoom = (size / case.image.shape[0], size / case.image.shape[1])
    image = ndimage.zoom(case.image.astype(np.float32), zoom, order=1)
    image = np.clip(np.rint(image), np.iinfo(case.image.dtype).min, np.iinfo(case.image.dtype).max)
    image = image.astype(case.image.dtype)
    raters = {name: ndimage.zoom(mask.astype(np.uint8), zoom, order=0) > 0 for name, mask in case.raters.items()}
    return image, initial_point(raters, next(iter(raters.values())))


def bench_service(
    n_samples: int,
    rounds: int = SERVICE_ROUNDS,
    size: int = SERVICE_IMAGE_SIZE,
    device: str = "cpu",
    weights: str | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``rounds`` choose() rounds in process and as many through a local ``spa serve``, taking turns.

    Both sessions run on the same model weights, image, seed, N and first click, so every round does the
    same work on both sides (``max_probability_difference`` shows it). Every call is made on one
    :class:`~.worker.ModelWorker` thread, as the Slicer module makes it. The start (the image's encoding) and
    one warm-up round are left out; the two sides take turns going first. Per round the client's wall time
    and the round's compute time (``Round.seconds``, measured where the round ran) are kept. Medians over
    the rounds of the paired differences:

    - ``added_ms``: remote wall − in-process wall, what the service adds to a round as the user waits for it
      (checked against the goal, ``within_goal``);
    - ``overhead_ms``: (remote wall − server compute) − (in-process wall − in-process compute), what
      HTTP, the frames and the server's bookkeeping add, free of the compute's noise
      (``overhead_within_goal``);
    - ``compute_slowdown_ms``: server compute − in-process compute, the same round computed in the
      server (in its request thread) rather than here.

    ``ping_ms`` (a health check) and ``noop_round_trip_ms`` (an undo to the current round: a whole round
    frame back, no model work) are the floor of a request.
    """
    import os
    import sys
    import tempfile

    import numpy as np

    from .embeddings import EmbeddingCache
    from .errors import InputError
    from .model.build import default_model, load_model
    from .service.client import LocalService
    from .service.protocol import decode_round, encode_round
    from .session import Session
    from .worker import ModelWorker

    if rounds < 1:
        raise InputError(f"the service bench needs at least one round, got {rounds}")
    if threads:
        torch.set_num_threads(threads)
    image, point = service_image(size)
    began = time.perf_counter()
    model = load_model(Path(weights), device=device) if weights else default_model(device)
    load_seconds = time.perf_counter() - began

    with tempfile.TemporaryDirectory(prefix="spa-bench-service-") as home:
        env = {"SPA_HOME": home}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        began = time.perf_counter()
        service = LocalService(
            sys.executable,
            model=weights,
            profiles_db=os.path.join(home, "profiles.sqlite3"),
            extra_args=["--device", device],
            env=env,
        )
        service_start_seconds = time.perf_counter() - began
        # every session call runs on one model worker thread, as the Slicer module makes them (in process or not)
        worker = ModelWorker("SPA bench worker")

        def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return worker.submit(fn, *args, **kwargs).result()

        try:
            if service.model_fingerprint != model.fingerprint():
                raise RuntimeError(
                    f"the local service serves model {service.model_fingerprint}, this process {model.fingerprint()}"
                )
            client = service.client(user="bench")
            t0 = time.perf_counter()
            client.upload(image)
            upload_seconds = time.perf_counter() - t0
            remote = client.session(image, seed=seed, n_samples=n_samples, use_profile=False)
            here = Session(model, image, seed=seed, n_samples=n_samples, embeddings=EmbeddingCache(model))

            t0 = time.perf_counter()
            call(here.start, point=point)
            local_start_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            call(remote.start, point=point)
            remote_start_seconds = time.perf_counter() - t0

            local_wall, local_compute, remote_wall, remote_compute = [], [], [], []
            largest_difference = 0.0
            for index in range(rounds + 1):  # round 0 (the first choice) warms up both sides
                k = index % min(here.current.n_candidates, remote.current.n_candidates)
                timed: dict[str, tuple[float, Any]] = {}
                # take turns going first, so that neither side always runs right after the other
                order = (("here", here), ("remote", remote)) if index % 2 == 0 else (("remote", remote), ("here", here))
                for name, session in order:
                    t0 = time.perf_counter()
                    round_ = call(session.choose, k)
                    timed[name] = (time.perf_counter() - t0, round_)
                (local_s, ours), (remote_s, theirs) = timed["here"], timed["remote"]
                if theirs.index != ours.index or theirs.probability.shape != ours.probability.shape:
                    raise RuntimeError(f"the remote round {theirs.index} is not the in-process round {ours.index}")
                largest_difference = max(largest_difference, float(np.abs(theirs.probability - ours.probability).max()))
                if index == 0:
                    continue
                local_wall.append(local_s)
                local_compute.append(ours.seconds)
                remote_wall.append(remote_s)
                remote_compute.append(theirs.seconds)

            # requests without model work: a ping, and a no-op undo (to the current round) that carries a whole
            # round frame back, as a choice does: the floor of a round trip
            ping_times, noop_times = [], []
            for _ in range(PING_REPEATS):
                t0 = time.perf_counter()
                call(client.health)
                ping_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                call(remote.undo, remote.current.index)
                noop_times.append(time.perf_counter() - t0)

            # the reply frame of the last round as the server makes it, from the round as computed (full
            # precision: the in-process one; the client's copy was quantised on the wire): its size, and what it
            # costs to encode (the server's share of the serialisation) and to decode (the client's)
            meta = {"session": remote.session_id, "state": remote.state, "start": remote.start_record}
            encode_times, decode_times = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                frame = encode_round(here.current, meta)
                t1 = time.perf_counter()
                decode_round(frame)
                decode_times.append(time.perf_counter() - t1)
                encode_times.append(t1 - t0)
            remote.close()
        finally:
            worker.shutdown()
            service.stop()

    def ms(values: list[float]) -> float:
        return 1000.0 * statistics.median(values)

    pairs = list(zip(remote_wall, remote_compute, local_wall, local_compute, strict=True))
    added = [rw - lw for rw, _, lw, _ in pairs]
    overheads = [(rw - rc) - (lw - lc) for rw, rc, lw, lc in pairs]
    added_ms, overhead_ms = ms(added), ms(overheads)
    return {
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "n_samples": n_samples,
        "rounds": rounds,
        "seed": seed,
        "image_shape": list(image.shape),
        "image_dtype": image.dtype.name,
        "point": [float(v) for v in point],
        "model_fingerprint": model.fingerprint(),
        "model_load_s": load_seconds,
        "service_start_s": service_start_seconds,
        "upload_s": upload_seconds,
        "upload_bytes": int(image.nbytes),
        "local_start_s": local_start_seconds,
        "remote_start_s": remote_start_seconds,
        "local_round_ms": ms(local_wall),
        "remote_round_ms": ms(remote_wall),
        "added_ms": added_ms,
        "local_compute_ms": ms(local_compute),
        "server_compute_ms": ms(remote_compute),
        "compute_slowdown_ms": ms([rc - lc for _, rc, _, lc in pairs]),
        "local_outside_compute_ms": ms([w - c for w, c in zip(local_wall, local_compute, strict=True)]),
        "remote_outside_compute_ms": ms([w - c for w, c in zip(remote_wall, remote_compute, strict=True)]),
        "overhead_ms": overhead_ms,
        "overhead_min_ms": 1000.0 * min(overheads),
        "overhead_max_ms": 1000.0 * max(overheads),
        "ping_ms": ms(ping_times),
        "noop_round_trip_ms": ms(noop_times),
        "frame_bytes": len(frame),
        "frame_encode_ms": ms(encode_times),
        "frame_decode_ms": ms(decode_times),
        "max_probability_difference": largest_difference,
        "local_round_s": local_wall,
        "remote_round_s": remote_wall,
        "local_compute_s": local_compute,
        "server_compute_s": remote_compute,
        "goal_ms": SERVICE_GOAL_MS,
        "within_goal": bool(added_ms <= SERVICE_GOAL_MS),
        "overhead_within_goal": bool(overhead_ms <= SERVICE_GOAL_MS),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_service_bench(**kwargs: Any) -> dict[str, Any]:
    """:func:`bench_service` in a fresh spawned process."""
    return _in_fresh_process(bench_service, kwargs, "the local service")


def format_service_report(report: dict[str, Any]) -> str:
    """The service section as plain text."""
    shape = "×".join(str(n) for n in report["image_shape"])
    goal = report["goal_ms"]

    def verdict(ok: bool) -> str:
        return f"within the {goal:g} ms goal" if ok else f"OVER the {goal:g} ms goal"

    return "\n".join(
        [
            f"local service: {report['rounds']} rounds each way on a {shape} {report['image_dtype']} image, "
            f"N={report['n_samples']}, {report['device']}, {report['threads']} threads",
            f"  round in process  {report['local_round_ms']:8.1f} ms  (compute {report['local_compute_ms']:.1f} ms)",
            f"  round via service {report['remote_round_ms']:8.1f} ms  "
            f"(server compute {report['server_compute_ms']:.1f} ms)",
            f"  added per round            {report['added_ms']:+8.1f} ms  {verdict(report['within_goal'])}",
            f"    transport and frames     {report['overhead_ms']:+8.1f} ms  {verdict(report['overhead_within_goal'])} "
            f"(rounds {report['overhead_min_ms']:+.1f} … {report['overhead_max_ms']:+.1f})",
            f"    slower compute in server {report['compute_slowdown_ms']:+8.1f} ms",
            f"  ping {report['ping_ms']:.1f} ms; no-op round trip {report['noop_round_trip_ms']:.1f} ms; "
            f"round frame {report['frame_bytes']:,} bytes (encode {report['frame_encode_ms']:.1f} ms, "
            f"decode {report['frame_decode_ms']:.1f} ms)",
        ]
    )


# ----- the GPU: rounds in each precision, and SAM ViT-B at 1024² ------------------------------------------------
# issue 12's goals for a GPU round (N = 48, K = 4, CUDA-synchronised); concat is the paper's conditioning
GPU_ROUND_GOAL_MS = {"token": 10.0, "concat": 25.0}


def random_sam_checkpoint(path: Path, spec: Any = None, seed: int = 0) -> Path:
    """A SAM-format checkpoint (image encoder, prompt encoder, mask decoder) with random weights, of ViT shape
    ``spec`` (ViT-B by default): for timing a backbone whose real weights are not on the machine (the arithmetic
    does not depend on the values)."""
    from .model.backbone import VIT_B, Backbone, BackboneInfo, _prompt_and_decoder, sam_vit_encoder

    spec = spec or VIT_B
    torch.manual_seed(seed)
    encoder = sam_vit_encoder(spec)
    embedding = spec.image_size // spec.patch_size
    prompt_encoder, mask_decoder = _prompt_and_decoder(spec.image_size, embedding)
    info = BackboneInfo("sam_vit_b", spec.image_size, embedding, "", "", "sam")
    torch.save(Backbone(encoder, prompt_encoder, mask_decoder, info).state_dict(), path)
    return path


def _timed_rounds(model: Any, embedding: Any, geometry: Any, prompt: Any, n_samples: int, repeats: int) -> dict:
    """``repeats`` rounds after two warm-ups, each timed to its end on the device (a round ends by copying its
    candidates to the host; CUDA is synchronised as well): the median, and the last round for comparisons."""
    from .engine import round_seed, run_model_round
    from .preference import uniform_weights

    weights = uniform_weights(model.config.n_components)
    times, last = [], None
    for index in range(repeats + 2):
        began = time.perf_counter()
        last = run_model_round(model, embedding, geometry, prompt, weights, n_samples, round_seed(0, 1))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        if index >= 2:
            times.append(time.perf_counter() - began)
    return {"round_ms": 1000.0 * statistics.median(times), "round": last}


def _precision_rows(model: Any, embedding: Any, geometry: Any, prompt: Any, n_samples: int, repeats: int) -> list:
    """The round in each precision the device has, against the float32 round of the same seed: time, the largest
    difference of the mean probability, Dice of the recommendation, whether the candidates are identical."""
    import numpy as np

    from .metrics import dice
    from .model.spa import RoundPrecision

    precisions = [RoundPrecision.FLOAT32, RoundPrecision.BFLOAT16]
    if model.device.type == "cuda":
        precisions.append(RoundPrecision.FLOAT16)
    rows, reference = [], None
    for precision in precisions:
        model.use_round_precision(precision)
        timed = _timed_rounds(model, embedding, geometry, prompt, n_samples, repeats)
        ours = timed.pop("round")
        reference = reference or ours
        threshold = model.config.recommend_threshold
        rows.append(
            {
                "precision": precision.value,
                "round_ms": timed["round_ms"],
                "max_probability_difference": float(np.abs(ours.mean_probability - reference.mean_probability).max()),
                "recommendation_dice": dice(
                    ours.mean_probability >= threshold, reference.mean_probability >= threshold
                ),
                "candidates_identical": bool(
                    ours.clusters.masks.shape == reference.clusters.masks.shape
                    and np.array_equal(ours.clusters.masks, reference.clusters.masks)
                ),
            }
        )
    model.use_round_precision(RoundPrecision.FLOAT32)
    return rows


def bench_gpu(
    n_samples: int = 48,
    repeats: int = 20,
    device: str = "cuda",
    weights: str | None = None,
    vit_checkpoint: str | None = None,
    vit_spec: dict | None = None,
    conditionings: tuple[str, ...] = tuple(GPU_ROUND_GOAL_MS),
) -> dict[str, Any]:
    """What issue 12 asks of a GPU, in one fresh process: per conditioning (default with the shipped weights, the
    paper's), the image encoding and a round (N samples, K = 4) in float32, bfloat16 and float16, CUDA-synchronised,
    with each half-precision round's accuracy against float32 and the float32 round's stages; then SAM ViT-B at
    1024² (``vit_checkpoint``, else random weights of the same shape: the timing is the same) encoding and rounds.
    Runs on the CPU too (bfloat16 only): the tests check it there."""
    from .data.folder import MultiRaterFolder
    from .engine import round_seed, run_model_round, start_prompt
    from .model.backbone import ViTSpec
    from .model.build import build_model, load_model
    from .model.spa import SPAConfig
    from .preference import uniform_weights
    from .resources import default_model_path, sample_case_dir
    from .simulation.prompts import initial_point
    from .stages import StageClock

    sample = sample_case_dir()
    case = MultiRaterFolder(sample.parent).load(sample.name)
    point = initial_point(case.raters, max(case.raters.values(), key=lambda m: int(m.sum())))

    def measure(model: Any, image: Any, click: tuple[float, float]) -> dict[str, Any]:
        encodes = []
        for _ in range(repeats + 2):
            began = time.perf_counter()
            embedding, geometry = model.encode(image)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            encodes.append(time.perf_counter() - began)
        prompt = start_prompt(geometry, point=click)
        rows = _precision_rows(model, embedding, geometry, prompt, n_samples, repeats)
        uniform = uniform_weights(model.config.n_components)
        with StageClock(model.device) as clock:
            run_model_round(model, embedding, geometry, prompt, uniform, n_samples, round_seed(0, 1))
        return {
            "encode_ms": 1000.0 * statistics.median(encodes[2:]),
            "precisions": rows,
            "stages_ms": {k: 1000.0 * v for k, v in clock.seconds.items()},
        }

    report: dict[str, Any] = {"device": device, "n_samples": n_samples, "repeats": repeats, "conditionings": {}}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for conditioning in conditionings:
        shipped = weights or (str(default_model_path()) if default_model_path().is_file() else None)
        if conditioning == "token" and shipped:
            model = load_model(Path(shipped), device=device)
        else:
            model = build_model(SPAConfig(conditioning=conditioning), device=device)
        entry = measure(model, case.image, point)
        entry["model_fingerprint"] = model.fingerprint()
        entry["goal_ms"] = GPU_ROUND_GOAL_MS[conditioning]
        entry["within_goal"] = bool(entry["precisions"][0]["round_ms"] <= entry["goal_ms"])
        report["conditionings"][conditioning] = entry
        del model
    import tempfile

    spec = ViTSpec.from_dict(vit_spec) if vit_spec else None
    with tempfile.TemporaryDirectory(prefix="spa-bench-vit-") as folder:
        checkpoint = Path(vit_checkpoint) if vit_checkpoint else random_sam_checkpoint(Path(folder) / "vit.pth", spec)
        config = SPAConfig(backbone="sam_vit_b", vit_spec=vit_spec)
        model = build_model(config, backbone_checkpoint=checkpoint, device=device)
        side = model.backbone.image_size
        image = (
            torch.nn.functional.interpolate(
                torch.from_numpy(case.image.astype("float32"))[None, None], size=(side, side), mode="bilinear"
            )[0, 0]
            .numpy()
            .astype(case.image.dtype)
        )
        scale = side / case.image.shape[0]
        entry = measure(model, image, (point[0] * scale, point[1] * scale))
        entry["checkpoint"] = str(vit_checkpoint) if vit_checkpoint else "random weights (timing only)"
        entry["image_size"] = side
        report["vit_b"] = entry
    report["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return report


def run_gpu_bench(**kwargs: Any) -> dict[str, Any]:
    """:func:`bench_gpu` in a fresh spawned process."""
    return _in_fresh_process(bench_gpu, kwargs, "the GPU")


def format_gpu_report(report: dict[str, Any]) -> str:
    """The GPU section as plain text."""
    lines = [
        f"{report.get('gpu', report['device'])}: N={report['n_samples']}, K=4, median of {report['repeats']} "
        "rounds (synchronised)",
        f"{'model':<10} {'encode ms':>9} {'precision':<9} {'round ms':>8} {'goal':>6} {'max |Δp|':>9} "
        f"{'Dice':>6} {'candidates':>10}",
    ]
    entries = list(report["conditionings"].items()) + [("ViT-B " + str(report["vit_b"]["image_size"]), report["vit_b"])]
    for name, entry in entries:
        for index, row in enumerate(entry["precisions"]):
            goal = entry.get("goal_ms")
            verdict = "" if goal is None or index else ("ok" if row["round_ms"] <= goal else "OVER")
            lines.append(
                f"{name if index == 0 else '':<10} {format(entry['encode_ms'], '9.1f') if index == 0 else '':>9} "
                f"{row['precision']:<9} {row['round_ms']:8.2f} {verdict:>6} {row['max_probability_difference']:9.4f} "
                f"{row['recommendation_dice']:6.3f} {'identical' if row['candidates_identical'] else 'differ':>10}"
            )
    first, entry = next(iter(report["conditionings"].items()))
    lines.append(
        f"{first} float32 round by stage (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in entry["stages_ms"].items())
    )
    if report.get("peak_gpu_mb") is not None:
        lines.append(f"peak GPU memory {report['peak_gpu_mb']:.0f} MB")
    return "\n".join(lines)
