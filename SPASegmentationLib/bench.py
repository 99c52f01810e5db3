"""Speed and memory of SPA on this machine: what ``spa bench`` prints.

Each configuration runs in its own process, so its peak resident memory is its own. Per round
(N samples, K candidates) the real code path is timed stage by stage: generator (prompt encoding
and the mixture), sampling, conditioning and decoding, aggregation, k-means, and the feedback that
turns a choice into the next prompt.
"""

from __future__ import annotations

import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024.0 if platform.system() != "Darwin" else usage / (1024.0 * 1024.0)


def bench_configuration(
    conditioning: str, n_samples: int, repeats: int, device: str, weights: str | None, threads: int | None
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


def _worker(queue: Any, kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", bench_configuration(**kwargs)))
    except Exception as exc:  # reported to the parent, which prints it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_bench(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each configuration in a fresh spawned process; return their reports."""
    context = multiprocessing.get_context("spawn")
    reports = []
    for kwargs in configs:
        queue = context.Queue()
        process = context.Process(target=_worker, args=(queue, kwargs))
        process.start()
        status, payload = queue.get()
        process.join()
        if status != "ok":
            raise RuntimeError(f"benchmark of {kwargs['conditioning']} failed: {payload}")
        reports.append(payload)
    return reports


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
        f"{'conditioning':<12} {'N':>3} {'encode s':>9} {'round s':>8} "
        + " ".join(f"{s[:12]:>12}" for s in stage_names)
        + f" {'peak MB':>8}"
    )
    lines.append(header)
    for r in reports:
        stages = " ".join(f"{r['stages_s'].get(s, float('nan')):12.4f}" for s in stage_names)
        lines.append(
            f"{r['conditioning']:<12} {r['n_samples']:>3} {r['encode_s']:9.3f} {r['round_s']:8.3f} {stages} "
            f"{r['peak_rss_mb']:8.0f}"
        )
    if len(reports) == 2 and reports[0]["round_s"] > 0:
        ratio = reports[1]["round_s"] / reports[0]["round_s"]
        lines.append(f"round-time ratio {reports[1]['conditioning']}/{reports[0]['conditioning']}: {ratio:.1f}×")
    return "\n".join(lines)
