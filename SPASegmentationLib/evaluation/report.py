"""Summaries, tables, plots and the written report of an evaluation run.

The results structure (what an evaluation run produces and :func:`write_report` reads)::

    {
      "kind": "spa-evaluation",
      "seed": int,
      "created": ISO 8601 time,
      "data": {"root": str, "fingerprint": str, "split": str, "cases": [case ids]},
      "model": {free-form: "fingerprint", "backbone", "conditioning", ...},
      "protocol": {"max_rounds": 6, "targets": [0.8, 0.9], "first_prompt": "point" | "box",
                   "preferences": {case_id: [rater names]}},
      "methods": {
        method_name: {
          "label": str,
          "per_case": {
            case_id: {
              "dice": [Dice after round 1, ..., round T],
              "seconds_per_round": float,
              "candidate_diversity": [mean pairwise Dice per round]   (optional),
              "ged": float                                             (optional)
            }
          }
        }
      }
    }

A Dice list shorter than ``max_rounds`` (the user accepted and stopped) is carried forward with
its last value for the per-round curves: the accepted mask stays the result. :func:`write_report`
adds ``"summary"`` (see :func:`summarise`) to every method in the written ``results.json``.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..io.atomic import write_bytes_atomic, write_json_atomic
from ..metrics import NOI_FAIL_VALUE, SIZE_NAMES, failure_rate, mean_ci, rounds_to_reach

RESULTS_KIND = "spa-evaluation"
MOVED_AWAY_TOLERANCE = 1e-9  # a recommendation "moved away" when its Dice to the chosen candidate fell
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
DICE_PLOT_FILE = "dice_vs_round.png"
NOI_PLOT_FILE = "noi.png"


def target_key(target: float) -> str:
    """The JSON key of a Dice target, e.g. 0.8 -> "0.8"."""
    return f"{float(target):g}"


def _interval(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "low", "high"} of ``values`` with a 95 % Student-t interval."""
    mean, low, high = mean_ci(values)
    return {"mean": mean, "low": low, "high": high}


def _padded_dice(case_id: str, dice: Sequence[float], max_rounds: int) -> list[float]:
    """The case's Dice list carried forward to ``max_rounds`` values."""
    values = [float(v) for v in dice]
    if len(values) == 0:
        raise InputError(f"Case {case_id!r} has no Dice values; record the Dice of at least round 1.")
    if len(values) > max_rounds:
        raise InputError(
            f"Case {case_id!r} has {len(values)} rounds but max_rounds is {max_rounds}; "
            "record at most max_rounds Dice values."
        )
    return values + [values[-1]] * (max_rounds - len(values))


def summarise(method: Mapping[str, Any], targets: Sequence[float], max_rounds: int) -> dict[str, Any]:
    """Summary of one method over its cases (means with 95 % Student-t intervals).

    Returns {"n_cases", "dice_per_round": {"mean", "low", "high": [per round]},
    "noi": {target: {"mean", "low", "high"}}, "failure_rate": {target: share},
    "seconds_per_round": mean, and when recorded "candidate_diversity" and "ged":
    {"mean", "low", "high"} over cases (diversity first averaged over a case's rounds)}.
    Target keys are strings such as "0.8".
    """
    per_case = method.get("per_case") if isinstance(method, Mapping) else None
    if not per_case:
        raise InputError("The method has no per_case results; run at least one case before summarising.")
    if int(max_rounds) < 1:
        raise InputError(f"max_rounds is {max_rounds}; pass at least 1.")
    if len(targets) == 0:
        raise InputError("No Dice targets were given; pass targets such as [0.8, 0.9].")
    max_rounds = int(max_rounds)
    raw_dice = {}
    for case_id, record in per_case.items():
        if "dice" not in record:
            raise InputError(f"Case {case_id!r} has no 'dice' list; record the Dice of every round.")
        raw_dice[case_id] = list(record["dice"])
    padded = [_padded_dice(case_id, values, max_rounds) for case_id, values in raw_dice.items()]

    by_round = np.asarray(padded, dtype=float)
    lows, means, highs = [], [], []
    for round_index in range(max_rounds):
        mean, low, high = mean_ci(by_round[:, round_index])
        means.append(mean)
        lows.append(low)
        highs.append(high)

    noi = {}
    failures = {}
    for target in targets:
        rounds = [rounds_to_reach(values, target, NOI_FAIL_VALUE) for values in padded]
        noi[target_key(target)] = _interval(rounds)
        failures[target_key(target)] = failure_rate(padded, target)

    seconds = [float(record["seconds_per_round"]) for record in per_case.values() if "seconds_per_round" in record]
    summary: dict[str, Any] = {
        "n_cases": len(padded),
        "dice_per_round": {"mean": means, "low": lows, "high": highs},
        "noi": noi,
        "failure_rate": failures,
        "seconds_per_round": float(np.mean(seconds)) if seconds else None,
    }

    diversity = []
    for record in per_case.values():
        values = [float(v) for v in (record.get("candidate_diversity") or []) if v is not None]
        values = [v for v in values if math.isfinite(v)]
        if values:
            diversity.append(float(np.mean(values)))
    if diversity:
        summary["candidate_diversity"] = _interval(diversity)

    ged = [float(record["ged"]) for record in per_case.values() if record.get("ged") is not None]
    ged = [v for v in ged if math.isfinite(v)]
    if ged:
        summary["ged"] = _interval(ged)

    summary["largest_drop"] = max([0.0] + [means[r] - means[r + 1] for r in range(max_rounds - 1)])
    pairs = [pair for record in per_case.values() for pair in record.get("dice_to_choice") or []]
    if pairs:
        away = sum(after < before - MOVED_AWAY_TOLERANCE for before, after in pairs)
        summary["moved_away"] = {"choices": len(pairs), "rate": away / len(pairs)}
    by_size: dict[str, list[list[float]]] = {}
    for case_id, values in zip(per_case, padded, strict=True):
        if per_case[case_id].get("size"):
            by_size.setdefault(per_case[case_id]["size"], []).append(values)
    summary["by_size"] = {
        size: {"n_cases": len(rows), "dice_per_round": np.asarray(rows).mean(axis=0).tolist()}
        for size, rows in sorted(by_size.items(), key=lambda item: SIZE_NAMES.index(item[0]))
    }
    return summary


def _check_results(results: Mapping[str, Any]) -> None:
    """Raise InputError when ``results`` does not follow the documented structure."""
    if not isinstance(results, Mapping) or results.get("kind") != RESULTS_KIND:
        raise InputError(f"The results are not of kind {RESULTS_KIND!r}; pass the dict an evaluation run produced.")
    for key in ("seed", "data", "model", "protocol", "methods"):
        if key not in results:
            raise InputError(f"The results lack the {key!r} entry; pass the dict an evaluation run produced.")
    protocol = results["protocol"]
    if "max_rounds" not in protocol or "targets" not in protocol:
        raise InputError("The results' protocol lacks 'max_rounds' or 'targets'; record both in the protocol entry.")
    if not results["methods"]:
        raise InputError("The results hold no methods; evaluate at least one method before reporting.")


def _all_summaries(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Summary of every method, keyed by method name."""
    protocol = results["protocol"]
    return {
        name: summarise(method, protocol["targets"], protocol["max_rounds"])
        for name, method in results["methods"].items()
    }


def _label(results: Mapping[str, Any], name: str) -> str:
    """The display label of a method (its name when no label was recorded)."""
    return str(results["methods"][name].get("label") or name)


def _fmt_interval(mean: float, low: float, high: float, digits: int) -> str:
    """'mean [low, high]' with ``digits`` decimals."""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _tables(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The Dice-per-round table and the NoI / failure-rate table, in markdown."""
    max_rounds = int(results["protocol"]["max_rounds"])
    targets = [target_key(t) for t in results["protocol"]["targets"]]
    lines = ["Dice of the recommended mask after each round, mean [95 % CI] over images:", ""]
    lines.append("| Method | " + " | ".join(f"Round {r}" for r in range(1, max_rounds + 1)) + " |")
    lines.append("|---|" + "---|" * max_rounds)
    for name, summary in summaries.items():
        curve = summary["dice_per_round"]
        cells = [_fmt_interval(curve["mean"][r], curve["low"][r], curve["high"][r], 3) for r in range(max_rounds)]
        lines.append(f"| {_label(results, name)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Rounds to reach each Dice target (NoI, mean [95 % CI], {NOI_FAIL_VALUE} when never reached) "
        f"and share of images that never reach it within {max_rounds} rounds:"
    )
    lines.append("")
    header = ["Method"] + [f"NoI@{t}" for t in targets] + [f"Failure@{t}" for t in targets] + ["s / round"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---|" * (len(header) - 1))
    for name, summary in summaries.items():
        cells = [_label(results, name)]
        for t in targets:
            n = summary["noi"][t]
            cells.append(_fmt_interval(n["mean"], n["low"], n["high"], 2))
        for t in targets:
            cells.append(f"{100.0 * summary['failure_rate'][t]:.1f} %")
        seconds = summary["seconds_per_round"]
        cells.append("n/a" if seconds is None else f"{seconds:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(_breakdown(results, summaries))
    return "\n".join(lines) + "\n"


def _breakdown(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Where a method breaks: by structure size (share of the image), how often the recommendation after a
    choice moved away from the chosen candidate, and the largest fall of the mean Dice between two rounds."""
    max_rounds = int(results["protocol"]["max_rounds"])
    last = max_rounds - 1
    third = min(2, last)
    lines = [
        f"By structure size (small < 1 % of the image, medium < 10 %, large), mean Dice at rounds 1 → {third + 1} "
        f"→ {max_rounds} (cases); how often the recommendation after a choice moved away from the chosen candidate "
        "(Dice to it fell); the largest fall of the mean Dice from one round to the next:",
        "",
        "| Method | small | medium | large | moved away from the choice | largest fall |",
        "|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        cells = [_label(results, name)]
        for size in SIZE_NAMES:
            entry = summary.get("by_size", {}).get(size)
            if entry is None:
                cells.append("–")
                continue
            curve = entry["dice_per_round"]
            cells.append(f"{curve[0]:.3f} → {curve[third]:.3f} → {curve[last]:.3f} ({entry['n_cases']})")
        moved = summary.get("moved_away")
        cells.append("–" if moved is None else f"{100.0 * moved['rate']:.1f} % of {moved['choices']}")
        cells.append(f"{summary['largest_drop']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_summary_table(results: Mapping[str, Any]) -> str:
    """The two markdown tables (Dice per round; NoI and failure rate per target) of ``results``."""
    _check_results(results)
    return _tables(results, _all_summaries(results))


def _save_figure(figure: Figure, path: Path) -> None:
    """Render ``figure`` to PNG with the Agg backend and write it atomically."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")  # keeps legends below the axes
    write_bytes_atomic(path, buffer.getvalue())


def _plot_dice(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Dice-vs-round lines with 95 % CI bands, one per method (bands drawn clipped to [0, 1])."""
    max_rounds = int(results["protocol"]["max_rounds"])
    rounds = np.arange(1, max_rounds + 1)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    for name, summary in summaries.items():
        curve = summary["dice_per_round"]
        line = axes.plot(rounds, curve["mean"], marker="o", label=_label(results, name))[0]
        low = np.clip(curve["low"], 0.0, 1.0)
        high = np.clip(curve["high"], 0.0, 1.0)
        axes.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xticks(rounds)
    axes.set_xlim(0.8, max_rounds + 0.2)
    lowest = min(min(s["dice_per_round"]["low"]) for s in summaries.values())
    axes.set_ylim(max(0.0, lowest - 0.05), 1.01)
    axes.set_xlabel("Round")
    axes.set_ylabel("Dice of the recommended mask")
    axes.set_title("Dice per round (mean and 95 % CI over images)")
    axes.grid(True, alpha=0.3)
    # Below the axes: with several methods a legend inside would hide the curves.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small", frameon=False)
    _save_figure(figure, path)


def _plot_noi(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Grouped bars: NoI per Dice target (groups) per method (bars), 95 % CI error bars drawn
    clipped to [1, fail value] (the tables and JSON keep the unclipped interval)."""
    targets = [target_key(t) for t in results["protocol"]["targets"]]
    names = list(summaries)
    positions = np.arange(len(targets))
    width = 0.8 / len(names)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    for index, name in enumerate(names):
        noi = [summaries[name]["noi"][t] for t in targets]
        means = np.array([n["mean"] for n in noi])
        low = np.clip([n["low"] for n in noi], 1.0, NOI_FAIL_VALUE)
        high = np.clip([n["high"] for n in noi], 1.0, NOI_FAIL_VALUE)
        errors = np.array([np.maximum(means - low, 0.0), np.maximum(high - means, 0.0)])
        offsets = positions - 0.4 + width * (index + 0.5)
        axes.bar(offsets, means, width=width, yerr=errors, capsize=4, label=_label(results, name))
    axes.axhline(NOI_FAIL_VALUE, color="grey", linestyle="--", linewidth=1, label=f"never reached ({NOI_FAIL_VALUE})")
    axes.set_xticks(positions)
    axes.set_xticklabels([f"Dice ≥ {t}" for t in targets])
    axes.set_ylim(0, NOI_FAIL_VALUE + 1)
    axes.set_xlabel("Dice target")
    axes.set_ylabel("Rounds to reach the target (NoI)")
    axes.set_title("Rounds to reach each Dice target (mean and 95 % CI, lower is better)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small", frameon=False)
    _save_figure(figure, path)


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _preference_lines(results: Mapping[str, Any]) -> list[str]:
    """Markdown lines counting the stored preference subsets by size."""
    preferences = results["protocol"].get("preferences") or {}
    if not preferences:
        return ["- Preference subsets: none stored."]
    sizes: dict[int, int] = {}
    for subset in preferences.values():
        sizes[len(subset)] = sizes.get(len(subset), 0) + 1
    parts = [f"{count} of {size} rater{'s' if size > 1 else ''}" for size, count in sorted(sizes.items())]
    return [f"- Preference subsets: {len(preferences)} stored ({', '.join(parts)})."]


def _report_markdown(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The full markdown report."""
    data = results["data"]
    model = results["model"]
    protocol = results["protocol"]
    lines = ["# SPA evaluation report", ""]
    lines.append(f"- Seed: {results['seed']}")
    lines.append(f"- Created: {results.get('created', 'unknown')}")
    lines.append(
        f"- Data: {data.get('root', 'unknown')} (split {data.get('split', 'unknown')}, "
        f"{len(data.get('cases', []))} cases), fingerprint `{data.get('fingerprint', 'unknown')}`"
    )
    raters = data.get("raters")
    if raters:
        lines.append(
            f"- Raters: {raters['cases']} case(s) read; {raters['single_rater']} with a single rater, "
            f"{raters['with_empty_rater']} with at least one empty rater mask ({raters['empty_rater_masks']} empty "
            f"masks in all), {raters['all_raters_empty']} where no rater marked anything (not evaluated)"
        )
    if "fingerprint" in model:  # one model; several are listed by method below
        lines.append(f"- Model fingerprint: `{model['fingerprint']}`")
    for key, value in model.items():
        if key != "fingerprint":
            lines.append(f"- Model {key}: {value}")
    targets = ", ".join(target_key(t) for t in protocol["targets"])
    lines.append(
        f"- Protocol: at most {protocol['max_rounds']} rounds, Dice targets {targets}, "
        f"first prompt {protocol.get('first_prompt', 'unknown')}"
    )
    lines.extend(_preference_lines(results))
    lines.append("")
    lines.append("## Results")
    lines.append("")
    lines.append(_tables(results, summaries))
    lines.append(f"![Dice per round]({DICE_PLOT_FILE})")
    lines.append("")
    lines.append(f"![Rounds to reach each target]({NOI_PLOT_FILE})")
    lines.append("")
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write results.json (with summaries), report.md, dice_vs_round.png and noi.png to ``out_dir``.

    Returns {"results": path, "report": path, "dice_plot": path, "noi_plot": path}.
    """
    _check_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = _all_summaries(results)
    paths = {
        "results": out_dir / RESULTS_FILE,
        "report": out_dir / REPORT_FILE,
        "dice_plot": out_dir / DICE_PLOT_FILE,
        "noi_plot": out_dir / NOI_PLOT_FILE,
    }
    written = copy.deepcopy(dict(results))
    for name, summary in summaries.items():
        written["methods"][name]["summary"] = summary
    write_json_atomic(paths["results"], _json_safe(written))
    _plot_dice(results, summaries, paths["dice_plot"])
    _plot_noi(results, summaries, paths["noi_plot"])
    write_bytes_atomic(paths["report"], _report_markdown(results, summaries).encode("utf-8"))
    return paths
