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

Newer runs (``runner.evaluate`` and ``studies``) also record, and the report then shows:

- per SPA case ``"distribution": {"round_1": {"ged", "sample_diversity", "rater_diversity", "ece",
  "effective_components"}, "last_round": {...}}`` and ``"stopped_at"`` (the round a "stops" user accepted, or None);
- ``"model": {method_name: {"kind": "spa" | "click", "user": {"accuracy", "stops_when_no_better"},
  "tags": {"family", "ablation", "n_samples"}, ...}}`` (one record per method, copies excepted);
- ``"rater_alignment"`` (:func:`.studies.rater_alignment`) and ``"profiles"`` (:func:`.studies.profile_study`).

Methods named ``*_all_rounds`` are copies of another method run on to the last round; the study sections skip them.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import InputError
from ..io.atomic import write_bytes_atomic, write_json_atomic
from ..metrics import NOI_FAIL_VALUE, SIZE_NAMES, failure_rate, mean_ci, rounds_to_reach

RESULTS_KIND = "spa-evaluation"
MOVED_AWAY_TOLERANCE = 1e-9  # a recommendation "moved away" when its Dice to the chosen candidate fell
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
DICE_PLOT_FILE = "dice_vs_round.png"
NOI_PLOT_FILE = "noi.png"
RATER_ALIGNMENT_PLOT_FILE = "rater_alignment.png"
PROFILES_PLOT_FILE = "profiles.png"
ALL_ROUNDS_SUFFIX = "_all_rounds"  # a copy of another method's sessions, run on to the last round
DISTRIBUTION_METRICS = ("ged", "sample_diversity", "rater_diversity", "ece", "effective_components")
SPLIT_SEPARATOR = "|"  # a rater-alignment split key: "a+b|c+d" (a and b included, c and d excluded)


def target_key(target: float) -> str:
    """The JSON key of a Dice target, e.g. 0.8 -> "0.8"."""
    return f"{float(target):g}"


def _interval(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "low", "high"} of ``values`` with a 95 % Student-t interval."""
    mean, low, high = mean_ci(values)
    return {"mean": mean, "low": low, "high": high}


def _carried(values: Sequence[float], length: int) -> list[float]:
    """``values`` carried forward with their last value to ``length``."""
    values = [float(v) for v in values]
    return values + [values[-1]] * (length - len(values))


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
    return _carried(values, max_rounds)


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


def _plotted(
    results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], copies: bool = True
) -> dict[str, Mapping[str, Any]]:
    """The methods the plots show: the oracle user at the protocol's N (the other users and N have their own tables),
    with their keeps-choosing copies when ``copies``."""
    chosen = {}
    for name, summary in summaries.items():
        copy_of = name[: -len("_all_rounds")] if name.endswith("_all_rounds") else None
        if copy_of is not None and not copies:
            continue
        base = copy_of or name
        if base not in results["methods"] or not _is_oracle(results, base):
            continue
        if _is_spa(results, base) and _n_samples(results, base) != results["protocol"].get("n_samples"):
            continue
        chosen[name] = summary
    return chosen or dict(summaries)


def _plot_dice(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Dice-vs-round lines with 95 % CI bands, one per method (bands drawn clipped to [0, 1]); a method's
    keeps-choosing copy is dashed, in its colour, without a band."""
    max_rounds = int(results["protocol"]["max_rounds"])
    rounds = np.arange(1, max_rounds + 1)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    summaries = _plotted(results, summaries)
    colours: dict[str, Any] = {}
    for name, summary in summaries.items():
        curve = summary["dice_per_round"]
        base = name.removesuffix("_all_rounds")
        if base != name and base in colours:
            axes.plot(rounds, curve["mean"], linestyle="--", color=colours[base], label=_label(results, name))
            continue
        line = axes.plot(rounds, curve["mean"], marker="o", label=_label(results, name))[0]
        colours[name] = line.get_color()
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
    summaries = _plotted(results, summaries, copies=False)
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


# ---------------------------------------------------------------- helpers of the study sections


def _finite(values: Iterable[Any]) -> list[float]:
    """The values that are finite numbers (None, NaN and infinity dropped: NaN is None in a written results.json)."""
    kept = []
    for value in values:
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            kept.append(float(value))
    return kept


def _interval_of(values: Iterable[Any]) -> dict[str, float] | None:
    """:func:`_interval` of the finite values; None when there are none."""
    finite = _finite(values)
    return _interval(finite) if finite else None


def _fmt_optional(interval: Mapping[str, float] | None, digits: int, signed: bool = False) -> str:
    """'mean [low, high]' of an interval dict ('+' signs when ``signed``); '–' when there is none."""
    if interval is None:
        return "–"
    if not signed:
        return _fmt_interval(interval["mean"], interval["low"], interval["high"], digits)
    return f"{interval['mean']:+.{digits}f} [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _reported_methods(results: Mapping[str, Any]) -> list[str]:
    """The method names the study sections show: every method but the ``*_all_rounds`` copies."""
    return [name for name in results["methods"] if not name.endswith(ALL_ROUNDS_SUFFIX)]


def _method_record(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """What results["model"] records of one method; {} for older results, whose "model" describes one model."""
    record = (results.get("model") or {}).get(name)
    return record if isinstance(record, Mapping) and "kind" in record else {}


def _tags(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The method's report tags (family, ablation, n_samples); {} when none were recorded."""
    return _method_record(results, name).get("tags") or {}


def _user(results: Mapping[str, Any], name: str) -> tuple[float, bool]:
    """(accuracy, stops_when_no_better) of the method's simulated user; the oracle when none was recorded."""
    user = _method_record(results, name).get("user") or {}
    return float(user.get("accuracy", 1.0)), bool(user.get("stops_when_no_better", False))


def _is_oracle(results: Mapping[str, Any], name: str) -> bool:
    """Whether the method's user is the oracle (accuracy 1, does not stop on their own)."""
    accuracy, stops = _user(results, name)
    return accuracy >= 1.0 and not stops


def _describe_user(accuracy: float, stops: bool) -> str:
    """'oracle', 'p = 0.8' or 'stops when no candidate is better' (with its p when below 1)."""
    if stops:
        return "stops when no candidate is better" + (f", p = {accuracy:g}" if accuracy < 1.0 else "")
    return "oracle" if accuracy >= 1.0 else f"p = {accuracy:g}"


def _is_spa(results: Mapping[str, Any], name: str) -> bool:
    """Whether a method is an SPA one (its record says so; without one, whether it recorded sample quality)."""
    record = _method_record(results, name)
    if record:
        return record["kind"] == "spa"
    return any(case.get("distribution") for case in results["methods"][name]["per_case"].values())


def _family(results: Mapping[str, Any], name: str) -> str:
    """The model or baseline a method is a variant of (its label when no family tag was recorded)."""
    return str(_tags(results, name).get("family") or _label(results, name))


def _n_samples(results: Mapping[str, Any], name: str) -> Any:
    """N, the samples per round of a method (its tag, its record, else the protocol's)."""
    tags = _tags(results, name)
    if tags.get("n_samples") is not None:
        return tags["n_samples"]
    record = _method_record(results, name)
    return record.get("n_samples") if record.get("n_samples") is not None else results["protocol"].get("n_samples")


def _highest_target(results: Mapping[str, Any]) -> str:
    """The key of the highest Dice target."""
    return target_key(max(float(t) for t in results["protocol"]["targets"]))


def _shown_rounds(results: Mapping[str, Any]) -> list[int]:
    """The 0-based rounds the study tables show: round 1, round 3 (or the last when fewer) and the last, each once."""
    last = int(results["protocol"]["max_rounds"]) - 1
    return sorted({0, min(2, last), last})


def _curve_cell(summary: Mapping[str, Any], index: int) -> str:
    """'mean [low, high]' of the Dice curve at one round."""
    curve = summary["dice_per_round"]
    return _fmt_interval(curve["mean"][index], curve["low"][index], curve["high"][index], 3)


# ---------------------------------------------------------------- distribution quality and stopping


def distribution_summary(method: Mapping[str, Any]) -> dict[str, Any] | None:
    """How well a method's N samples match the raters: per round kind ("round_1", "last_round") the cases that
    recorded it and GED², sample diversity, rater diversity and ECE as mean [95 % CI] over cases (NaN dropped per
    metric, None when no value is left). None when no case recorded it."""
    records = [case["distribution"] for case in method["per_case"].values() if case.get("distribution")]
    if not records:
        return None
    summary: dict[str, Any] = {"n_cases": len(records)}
    for kind in ("round_1", "last_round"):
        rounds = [record[kind] for record in records if record.get(kind)]
        if rounds:
            metrics = {key: _interval_of(r.get(key) for r in rounds) for key in DISTRIBUTION_METRICS}
            summary[kind] = {"n_cases": len(rounds), **metrics}
    return summary


def stop_summary(method: Mapping[str, Any]) -> dict[str, Any]:
    """When a "stops" user accepted: {"n_cases", "n_stopped", "round": mean [95 % CI] of the round over the cases
    where they stopped (None when they never did)}."""
    stops = [case.get("stopped_at") for case in method["per_case"].values()]
    stopped = _finite(stops)
    return {"n_cases": len(stops), "n_stopped": len(stopped), "round": _interval_of(stopped)}


def _method_extras(results: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The summary keys a method gets beyond :func:`summarise`: "distribution" and, for a stopping user, "stopped"."""
    method = results["methods"][name]
    extras: dict[str, Any] = {}
    distribution = distribution_summary(method)
    if distribution is not None:
        extras["distribution"] = distribution
    if _user(results, name)[1]:
        extras["stopped"] = stop_summary(method)
    return extras


def _distribution_section(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The distribution-quality table of the SPA methods with the oracle user ([] when none recorded it)."""
    names = [n for n in _reported_methods(results) if _is_oracle(results, n) and "distribution" in summaries.get(n, {})]
    rows = []
    for name in names:
        quality = summaries[name]["distribution"]
        first, last = quality.get("round_1") or {}, quality.get("last_round") or {}
        cells = [_label(results, name), str(first.get("n_cases", 0))]
        cells += [_fmt_optional(first.get(key), 3) for key in DISTRIBUTION_METRICS]
        cells += [_fmt_optional(last.get("ged"), 3), _fmt_optional(last.get("ece"), 3)]
        rows.append(cells)
    if not rows:
        return []
    header = ["Method", "Images", "GED² round 1", "Sample diversity round 1", "Rater diversity", "ECE round 1"]
    header += ["Components in use round 1", "GED² last round", "ECE last round"]
    intro = (
        "How well the N samples of a round match the raters (oracle user; mean [95 % CI] over images). "
        "GED² (d = 1 − IoU) is the squared generalised energy distance between the N samples and the raters' masks; "
        "lower is closer. Sample and rater diversity are the mean 1 − IoU between distinct pairs of samples and of "
        "raters (images with one rater have no rater diversity). ECE is the expected calibration error of the "
        "probability map against the raters' mean (the share of raters marking a pixel), over the pixels near the "
        "structure; lower is better calibrated. Components in use: exp(entropy) of the mixture weights the samples "
        "were drawn from (1: the mixture has collapsed to one Gaussian; K_g: all used equally)."
    )
    return ["## Distribution quality of the samples", "", intro, "", *_table(header, rows), ""]


# ---------------------------------------------------------------- simulated users


def _last_dice(results: Mapping[str, Any], name: str) -> dict[str, float]:
    """The last-round Dice of every case of a method (the accepted curve carried forward)."""
    max_rounds = int(results["protocol"]["max_rounds"])
    per_case = results["methods"][name]["per_case"]
    return {case_id: _padded_dice(case_id, record["dice"], max_rounds)[-1] for case_id, record in per_case.items()}


def _oracle_reference(results: Mapping[str, Any], name: str, family: Sequence[str]) -> str | None:
    """The oracle method of ``family`` that ``name`` is to be compared with: the one recorded with the same settings
    apart from the user, else the family's first oracle method; None when the family has no oracle."""
    oracles = [n for n in family if _is_oracle(results, n)]
    settings = {k: v for k, v in _method_record(results, name).items() if k != "user"}
    for other in oracles:
        if {k: v for k, v in _method_record(results, other).items() if k != "user"} == settings:
            return other
    return oracles[0] if oracles else None


def _change_vs_oracle(results: Mapping[str, Any], name: str, oracle: str | None) -> dict[str, float] | None:
    """Last-round Dice of ``name`` minus the oracle's, mean [95 % CI] of the paired change over shared cases."""
    if oracle is None or oracle == name:
        return None
    mine, reference = _last_dice(results, name), _last_dice(results, oracle)
    return _interval_of(mine[c] - reference[c] for c in mine if c in reference)


def _user_rows_by_family(results: Mapping[str, Any]) -> dict[str, list[tuple[str, str | None]]]:
    """Per family (in order of appearance) the (method, oracle method it is compared with) pairs the users table
    shows: the oracle methods some other user is compared with, first, then every method with another user."""
    groups: dict[str, list[str]] = {}
    for name in _reported_methods(results):
        groups.setdefault(_family(results, name), []).append(name)
    shown = {}
    for family, names in groups.items():
        others = [(n, _oracle_reference(results, n, names)) for n in names if not _is_oracle(results, n)]
        references = {reference for _, reference in others}
        if others:
            shown[family] = [(n, None) for n in names if n in references] + others
    return shown


def _stop_cell(summary: Mapping[str, Any]) -> str:
    """'mean [low, high] (k of n)' of the round a stopping user accepted; '–' for other users."""
    stopped = summary.get("stopped")
    if stopped is None:
        return "–"
    count = f"{stopped['n_stopped']} of {stopped['n_cases']}"
    return f"{_fmt_optional(stopped['round'], 2)} ({count})" if stopped["round"] else f"never ({count})"


def _user_row(
    results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], row: tuple[str, str | None], family: str
) -> list[str]:
    """One row of the simulated-users table: ``row`` is (method, oracle method it is compared with or None)."""
    name, oracle = row
    summary = summaries[name]
    highest = _highest_target(results)
    cells = [family, _describe_user(*_user(results, name))]
    cells += [_curve_cell(summary, index) for index in _shown_rounds(results)]
    cells += [_fmt_optional(summary["noi"][target_key(t)], 2) for t in results["protocol"]["targets"]]
    cells += [f"{100.0 * summary['failure_rate'][highest]:.1f} %", _stop_cell(summary)]
    cells.append(_fmt_optional(_change_vs_oracle(results, name, oracle), 3, signed=True))
    return cells


def _family_cells(results: Mapping[str, Any], family: str, rows: Sequence[tuple[str, str | None]]) -> list[str]:
    """The family column of its rows, with the method name added where two rows share the family and user."""
    users = [_user(results, name) for name, _ in rows]
    return [
        family + (f" ({name})" if users.count(user) > 1 else "") for (name, _), user in zip(rows, users, strict=True)
    ]


def _users_section(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The simulated-users table ([] when every method's user is the oracle)."""
    if all(_is_oracle(results, n) for n in _reported_methods(results)):
        return []
    rows = []
    for family, members in _user_rows_by_family(results).items():
        for row, cell in zip(members, _family_cells(results, family, members), strict=True):
            rows.append(_user_row(results, summaries, row, cell))
    highest = _highest_target(results)
    header = ["Family", "User", *(f"Dice round {index + 1}" for index in _shown_rounds(results))]
    header += [f"NoI@{target_key(t)}" for t in results["protocol"]["targets"]]
    header += [f"Failure@{highest}", "Stopped at round (cases)", "Δ last-round Dice vs oracle"]
    intro = (
        "The same methods with other simulated users: the oracle picks the candidate nearest their target (and "
        "clicks the deepest pixel of the largest error); a user with p < 1 does so with probability p and otherwise "
        "picks another candidate (or clicks anywhere in the error); the user who stops accepts as soon as no candidate "
        "is nearer their target than the recommendation (stopped at round: mean over the images where they did). "
        "Dice and NoI as above, mean [95 % CI] over images; the change "
        "is the paired last-round Dice difference to the same family's oracle (same settings but the user). Families "
        "tried with the oracle only are left out."
    )
    return ["## Simulated users", "", intro, "", *_table(header, rows), ""]


# ---------------------------------------------------------------- ablations


def _ablation_methods(results: Mapping[str, Any]) -> list[str]:
    """The SPA methods with the oracle user when they differ in ablation or N ([] otherwise)."""
    names = [n for n in _reported_methods(results) if _is_spa(results, n) and _is_oracle(results, n)]
    ablations = {str(_tags(results, n).get("ablation")) for n in names}
    sizes = {str(_n_samples(results, n)) for n in names}
    return names if len(names) > 1 and (len(ablations) > 1 or len(sizes) > 1) else []


def _ablation_row(results: Mapping[str, Any], summary: Mapping[str, Any], name: str) -> list[str]:
    """One row of the ablation table."""
    highest = _highest_target(results)
    first = (summary.get("distribution") or {}).get("round_1") or {}
    n_samples = _n_samples(results, name)
    seconds = summary["seconds_per_round"]
    cells = [_label(results, name), str(_tags(results, name).get("ablation") or "–")]
    cells.append("–" if n_samples is None else str(n_samples))
    cells += [_curve_cell(summary, index) for index in _shown_rounds(results)]
    cells += [_fmt_optional(summary["noi"][highest], 2), f"{100.0 * summary['failure_rate'][highest]:.1f} %"]
    cells += [_fmt_optional(first.get("ged"), 3), _fmt_optional(first.get("ece"), 3)]
    cells.append("n/a" if seconds is None else f"{seconds:.3f}")
    return cells


def _ablations_section(results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ablation table ([] unless the SPA methods differ in ablation or N)."""
    names = _ablation_methods(results)
    if not names:
        return []
    highest = _highest_target(results)
    header = ["Method", "Ablation", "N", *(f"Dice round {index + 1}" for index in _shown_rounds(results))]
    header += [f"NoI@{highest}", f"Failure@{highest}", "GED² round 1", "ECE round 1", "s / round"]
    intro = (
        "SPA with parts of the method changed or removed, and with other numbers N of samples per round (oracle "
        "user; mean [95 % CI] over images; GED² and ECE as in the distribution-quality table)."
    )
    rows = [_ablation_row(results, summaries[n], n) for n in names]
    return ["## Ablations", "", intro, "", *_table(header, rows), ""]


# ---------------------------------------------------------------- rater alignment


def _alignment_side(curves: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Round 1, last round, their paired change (mean [95 % CI]) and the mean per round of Dice curves."""
    length = max(len(curve) for curve in curves)
    padded = np.asarray([_carried(curve, length) for curve in curves], dtype=float)
    return {
        "round_1": _interval(padded[:, 0]),
        "last_round": _interval(padded[:, -1]),
        "change": _interval(padded[:, -1] - padded[:, 0]),
        "per_round": padded.mean(axis=0).tolist(),
    }


def _alignment_pairs(entry: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(split key, case record) of every case of every split with both Dice curves recorded."""
    pairs = []
    for key, cases in (entry.get("per_split") or {}).items():
        for record in cases.values():
            if record.get("included") and record.get("excluded"):
                pairs.append((key, record))
    return pairs


def _alignment_method(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """One method's rater-alignment summary (pooled over (split, case) pairs, and per split); None without pairs."""
    pairs = _alignment_pairs(entry)
    if not pairs:
        return None
    per_split: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(key for key, _ in pairs):
        records = [record for k, record in pairs if k == key]
        included = _alignment_side([r["included"] for r in records])
        excluded = _alignment_side([r["excluded"] for r in records])
        per_split[key] = {
            "n_cases": len(records),
            "included_change": included["change"]["mean"],
            "excluded_change": excluded["change"]["mean"],
        }
    included = _alignment_side([r["included"] for _, r in pairs])
    excluded = _alignment_side([r["excluded"] for _, r in pairs])
    # The alignment itself: how much more the session moved towards the included raters than towards the excluded
    # ones, per (split, image). Pooled over every split, round 1 is the same on both sides (each split also appears
    # reversed), so this paired gap is the number that says whether choosing aligns to the chosen raters.
    gaps = []
    for _, record in pairs:
        length = max(len(record["included"]), len(record["excluded"]))
        inc, exc = _carried(record["included"], length), _carried(record["excluded"], length)
        gaps.append((inc[-1] - inc[0]) - (exc[-1] - exc[0]))
    return {
        "label": str(entry.get("label") or ""),
        "n_pairs": len(pairs),
        "included": included,
        "excluded": excluded,
        "alignment_gap": _interval(gaps),
        "per_split": per_split,
    }


def rater_alignment_summary(alignment: Mapping[str, Any]) -> dict[str, Any]:
    """Per method: the Dice to the included and to the excluded raters' consensus at round 1 and the last round and
    the paired change (mean [95 % CI] over (split, case) pairs), the mean per round, and per split the mean changes.
    Methods without any pair are left out."""
    summary = {}
    for name, entry in (alignment.get("methods") or {}).items():
        method = _alignment_method(entry)
        if method is not None:
            summary[name] = method
    return summary


def _split_name(key: str) -> str:
    """'a+b|c' -> 'a+b vs c' (a markdown table cell cannot hold '|')."""
    included, _, excluded = key.partition(SPLIT_SEPARATOR)
    return f"{included} vs {excluded}"


def _split_table(alignment: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    """Rows = splits, a column per method: Δ included / Δ excluded (cases)."""
    keys = list(alignment.get("splits") or [])
    keys += [k for method in summary.values() for k in method["per_split"] if k not in keys]
    keys = list(dict.fromkeys(keys))
    rows = []
    for key in keys:
        cells = [_split_name(key)]
        for method in summary.values():
            entry = method["per_split"].get(key)
            changes = "–" if entry is None else f"{entry['included_change']:+.3f} / {entry['excluded_change']:+.3f}"
            cells.append(changes + ("" if entry is None else f" ({entry['n_cases']})"))
        rows.append(cells)
    return _table(["Included vs excluded raters", *(m["label"] for m in summary.values())], rows)


def _alignment_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the pooled rater-alignment table."""
    rows = []
    for method in summary.values():
        cells = [method["label"], str(method["n_pairs"])]
        for side in ("included", "excluded"):
            values = method[side]
            cells += [_fmt_optional(values["round_1"], 3), _fmt_optional(values["last_round"], 3)]
            cells.append(_fmt_optional(values["change"], 3, signed=True))
        cells.append(_fmt_optional(method["alignment_gap"], 3, signed=True))
        rows.append(cells)
    return rows


def _alignment_section(results: Mapping[str, Any], summary: Mapping[str, Any], plotted: bool) -> list[str]:
    """The rater-alignment tables and plot link ([] when the study was not run)."""
    alignment = results.get("rater_alignment")
    if alignment is None:
        return []
    raters = ", ".join(str(r) for r in alignment.get("raters") or [])
    intro = (
        f"The user's target is the consensus of some of the raters ({raters}; every split into an included and an "
        f"excluded group in turn, {len(alignment.get('cases') or [])} images, oracle user). Per round, the Dice of "
        "the recommendation to the included raters' consensus and to the excluded raters'; choosing should raise "
        "the first and lower the second. Change: last round − round 1, mean [95 % CI] of the paired change; "
        "Δ included − Δ excluded, per (split, image), is the alignment itself (positive: towards the chosen raters)."
    )
    lines = ["## Rater alignment", "", intro, ""]
    if not summary:
        return lines + ["No image had a non-empty consensus on both sides of a split.", ""]
    header = ["Method", "Pairs (split, image)", "Included round 1", "Included last round", "Δ included"]
    header += ["Excluded round 1", "Excluded last round", "Δ excluded", "Δ included − Δ excluded"]
    lines += [*_table(header, _alignment_rows(summary)), ""]
    lines += ["Per split: mean change of the Dice to the included / excluded raters, round 1 → last (images):", ""]
    lines += [*_split_table(alignment, summary), ""]
    if plotted:
        lines += [f"![Dice to the included and excluded raters per round]({RATER_ALIGNMENT_PLOT_FILE})", ""]
    return lines


def _plot_alignment(summary: Mapping[str, Any], path: Path) -> None:
    """Mean Dice per round to the included (solid) and excluded (dashed) raters, one colour per method."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    longest = 1
    for method in summary.values():
        included, excluded = method["included"]["per_round"], method["excluded"]["per_round"]
        rounds = np.arange(1, len(included) + 1)
        line = axes.plot(rounds, included, marker="o", label=f"{method['label']}: included")[0]
        label = f"{method['label']}: excluded"
        axes.plot(rounds, excluded, marker="s", linestyle="--", color=line.get_color(), label=label)
        longest = max(longest, len(included))
    axes.set_xticks(np.arange(1, longest + 1))
    axes.set_xlim(0.8, longest + 0.2)
    axes.set_xlabel("Round")
    axes.set_ylabel("Mean Dice of the recommended mask")
    axes.set_title("Dice to the included (solid) and excluded (dashed) raters")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small", frameon=False)
    _save_figure(figure, path)


# ---------------------------------------------------------------- profiles


def _profile_targets(results: Mapping[str, Any], accept_at: float) -> list[float]:
    """The protocol's targets a profile session can show (those up to accept_at, where it stops), and accept_at."""
    targets = [float(t) for t in results["protocol"]["targets"] if float(t) <= accept_at]
    return sorted(set(targets) | {float(accept_at)})


def _later_images(sequence: Mapping[str, Any]) -> list[str]:
    """The sequence's images after the first (which is the same both ways) with both sessions recorded."""
    fresh, profile = sequence.get("fresh") or {}, sequence.get("profile") or {}
    return [c for c in (sequence.get("order") or [])[1:] if fresh.get(c) and profile.get(c)]


def _style_summary(sequence: Mapping[str, Any], targets: Sequence[float]) -> dict[str, Any] | None:
    """Fresh vs profile on one style's sequence (first image left out); None when no later image was recorded."""
    images = _later_images(sequence)
    if not images:
        return None
    curves = {mode: [sequence[mode][c] for c in images] for mode in ("fresh", "profile")}
    noi = {
        mode: {target_key(t): [rounds_to_reach(c, t, NOI_FAIL_VALUE) for c in curves[mode]] for t in targets}
        for mode in curves
    }
    highest = target_key(max(targets))
    fresh, profile = noi["fresh"][highest], noi["profile"][highest]
    return {
        "n_images": len(images),
        "noi": {key: {mode: _interval(noi[mode][key]) for mode in noi} for key in noi["fresh"]},
        "fresh_minus_profile": {
            key: _interval(np.subtract(noi["fresh"][key], noi["profile"][key])) for key in noi["fresh"]
        },
        "dice_round_1": {mode: _interval([c[0] for c in curves[mode]]) for mode in curves},
        "profile_fewer_rounds": sum(p < f for f, p in zip(fresh, profile, strict=True)) / len(images),
        "profile_more_rounds": sum(p > f for f, p in zip(fresh, profile, strict=True)) / len(images),
        "rounds_to_accept": {"fresh": fresh, "profile": profile},
    }


def profiles_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per method and style: images (the first left out), NoI fresh vs with the profile (mean [95 % CI]), the paired
    difference fresh − profile, Dice at round 1 both ways, the share of images where the profile needed fewer / more
    rounds to accept, and the rounds to accept per image (NOI_FAIL_VALUE when not accepted)."""
    profiles = results["profiles"]
    accept_at = float(profiles.get("accept_at") or max(float(t) for t in results["protocol"]["targets"]))
    targets = _profile_targets(results, accept_at)
    summary: dict[str, Any] = {}
    for name, entry in (profiles.get("methods") or {}).items():
        styles = {}
        for style, sequence in (entry.get("per_style") or {}).items():
            style_summary = _style_summary(sequence, targets)
            if style_summary is not None:
                styles[style] = style_summary
        if styles:
            summary[name] = {"label": str(entry.get("label") or name), "per_style": styles}
    return summary


def _profile_rows(summary: Mapping[str, Any], targets: Sequence[str]) -> list[list[str]]:
    """Rows of the profile table."""
    rows = []
    for method in summary.values():
        for style, entry in method["per_style"].items():
            cells = [method["label"], style, str(entry["n_images"])]
            for key in targets:
                cells += [_fmt_optional(entry["noi"][key]["fresh"], 2), _fmt_optional(entry["noi"][key]["profile"], 2)]
            cells.append(_fmt_optional(entry["fresh_minus_profile"][targets[-1]], 2, signed=True))
            cells += [_fmt_optional(entry["dice_round_1"][mode], 3) for mode in ("fresh", "profile")]
            cells.append(
                f"{100.0 * entry['profile_fewer_rounds']:.1f} % / {100.0 * entry['profile_more_rounds']:.1f} %"
            )
            rows.append(cells)
    return rows


def _profiles_section(results: Mapping[str, Any], summary: Mapping[str, Any], plotted: bool) -> list[str]:
    """The profile table and plot link ([] when the study was not run)."""
    profiles = results.get("profiles")
    if profiles is None:
        return []
    accept_at = float(profiles.get("accept_at") or max(float(t) for t in results["protocol"]["targets"]))
    intro = (
        f"A user of one consistent style segments the {len(profiles.get('cases') or [])} images in turn and accepts "
        f"at Dice ≥ {accept_at:g}. Each session starts fresh (uniform mixture weights) or from the profile folded "
        "from the sessions before it. The first image is the same both ways and is left out. NoI mean [95 % CI] "
        f"({NOI_FAIL_VALUE} when not accepted); fresh − profile is the paired difference in rounds (positive: the "
        "profile saves rounds); the last column is the share of images where the profile needed fewer / more rounds."
    )
    lines = ["## Profiles", "", intro, ""]
    if not summary:
        return lines + ["No style had a second image to compare.", ""]
    keys = [target_key(t) for t in _profile_targets(results, accept_at)]
    header = ["Method", "Style", "Images"]
    header += [f"NoI@{k} {mode}" for k in keys for mode in ("fresh", "profile")]
    header += [f"Fresh − profile @{keys[-1]}", "Dice round 1 fresh", "Dice round 1 profile", "Profile fewer / more"]
    lines += [*_table(header, _profile_rows(summary, keys)), ""]
    if plotted:
        lines += [f"![Rounds to accept along the sequence, fresh vs profile]({PROFILES_PLOT_FILE})", ""]
    return lines


def _running_mean(values: Sequence[float]) -> np.ndarray:
    """The mean of the first k values, for every k."""
    values = np.asarray(values, dtype=float)
    return np.cumsum(values) / np.arange(1, len(values) + 1)


def _plot_profiles(summary: Mapping[str, Any], path: Path) -> None:
    """Per style, the running mean of the rounds to accept along the sequence (from its second image), fresh
    (dashed) vs with the profile (solid), one colour per method."""
    styles = list(dict.fromkeys(style for method in summary.values() for style in method["per_style"]))
    figure = Figure(figsize=(4.2 * len(styles) + 0.6, 4.2))
    colours = [f"C{index % 10}" for index in range(len(summary))]
    for index, style in enumerate(styles):
        axes = figure.add_subplot(1, len(styles), index + 1)
        for colour, method in zip(colours, summary.values(), strict=True):
            entry = method["per_style"].get(style)
            if entry is None:
                continue
            rounds = entry["rounds_to_accept"]
            positions = np.arange(2, len(rounds["fresh"]) + 2)
            axes.plot(positions, _running_mean(rounds["fresh"]), "--", color=colour, label=f"{method['label']}: fresh")
            label = f"{method['label']}: with the profile"
            axes.plot(positions, _running_mean(rounds["profile"]), "-", color=colour, label=label)
        axes.set_title(f"Style: {style}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("Image in the sequence")
        axes.set_ylim(0, NOI_FAIL_VALUE + 0.5)
        axes.grid(True, alpha=0.3)
        if index == 0:
            axes.set_ylabel(f"Rounds to accept, running mean ({NOI_FAIL_VALUE}: not accepted)")
    legend = {}
    for axes in figure.axes:
        legend.update({label: handle for handle, label in zip(*axes.get_legend_handles_labels(), strict=True)})
    figure.legend(
        list(legend.values()),
        list(legend),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        fontsize="small",
        frameon=False,
    )
    _save_figure(figure, path)


# ---------------------------------------------------------------- the study sections together


def _study_summaries(results: Mapping[str, Any]) -> dict[str, Any]:
    """The results.json summaries of the studies that were run: "rater_alignment_summary", "profiles_summary"."""
    studies = {}
    if results.get("rater_alignment") is not None:
        studies["rater_alignment_summary"] = rater_alignment_summary(results["rater_alignment"])
    if results.get("profiles") is not None:
        studies["profiles_summary"] = profiles_summary(results)
    return studies


def _study_plots(studies: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Draw the study plots that have data; returns {"rater_alignment_plot", "profiles_plot": path} of those drawn."""
    paths = {}
    if studies.get("rater_alignment_summary"):
        paths["rater_alignment_plot"] = out_dir / RATER_ALIGNMENT_PLOT_FILE
        _plot_alignment(studies["rater_alignment_summary"], paths["rater_alignment_plot"])
    if studies.get("profiles_summary"):
        paths["profiles_plot"] = out_dir / PROFILES_PLOT_FILE
        _plot_profiles(studies["profiles_summary"], paths["profiles_plot"])
    return paths


def _study_sections(
    results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], studies: Mapping[str, Any]
) -> list[str]:
    """The markdown sections of whatever further evidence the results hold (none for older results)."""
    lines = _distribution_section(results, summaries)
    lines += _users_section(results, summaries)
    lines += _ablations_section(results, summaries)
    alignment = studies.get("rater_alignment_summary") or {}
    lines += _alignment_section(results, alignment, plotted=bool(alignment))
    profiles = studies.get("profiles_summary") or {}
    lines += _profiles_section(results, profiles, plotted=bool(profiles))
    return lines


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


def _report_markdown(
    results: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], studies: Mapping[str, Any]
) -> str:
    """The full markdown report (``studies``: :func:`_study_summaries`)."""
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
        if key == "fingerprint":
            continue
        if isinstance(value, Mapping) and "fingerprint" in value:  # one method's model: the facts that tell it apart
            facts = [f"`{value['fingerprint']}`", str(value.get("kind", "spa"))]
            facts += [
                f"{k} {value[k]}" for k in ("conditioning", "n_components", "sampling", "n_samples") if k in value
            ]
            facts += [f"{k} {value[k]}" for k in ("feedback_mask", "carry_mixture") if value.get(k) is False]
            lines.append(f"- Model of {key}: {', '.join(facts)}")
        else:
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
    lines.extend(_study_sections(results, summaries, studies))
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write results.json (with summaries), report.md, dice_vs_round.png and noi.png to ``out_dir``, and when the
    results hold them the sections and plots of the further studies (rater_alignment.png, profiles.png).

    Returns {"results": path, "report": path, "dice_plot": path, "noi_plot": path} and, when drawn,
    "rater_alignment_plot" and "profiles_plot". A method's summary also gets "distribution" (sample quality) and,
    for a user who stops, "stopped"; results.json gets "rater_alignment_summary" and "profiles_summary" when the
    studies were run.
    """
    _check_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = _all_summaries(results)
    for name in _reported_methods(results):
        summaries[name].update(_method_extras(results, name))
    studies = _study_summaries(results)
    paths = {
        "results": out_dir / RESULTS_FILE,
        "report": out_dir / REPORT_FILE,
        "dice_plot": out_dir / DICE_PLOT_FILE,
        "noi_plot": out_dir / NOI_PLOT_FILE,
    }
    written = copy.deepcopy(dict(results))
    for name, summary in summaries.items():
        written["methods"][name]["summary"] = summary
    written.update(studies)
    write_json_atomic(paths["results"], _json_safe(written))
    _plot_dice(results, summaries, paths["dice_plot"])
    _plot_noi(results, summaries, paths["noi_plot"])
    paths.update(_study_plots(studies, out_dir))
    write_bytes_atomic(paths["report"], _report_markdown(results, summaries, studies).encode("utf-8"))
    return paths
