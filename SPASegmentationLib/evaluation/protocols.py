"""What one `spa evaluate` run compares and how: the methods (SPA models and their variants, click baselines), the
simulated users, the studies and the protocol's settings, from the command's options or the paper's preset.

``--protocol paper`` is the paper's setting (N = 48, K = 4, 6 rounds, a failure counted as 10 interactions, the
paper's Dice targets for the data: LIDC 0.60 / 0.70 / 0.75, others 0.80 / 0.90 / 0.95) with every study: SPA and its
ablations against the click baselines (LiteMedSAM as shipped, SPA's decoder without its preference parts, and the
trained click models given), users of accuracy 1 / 0.8 / 0.6 and one who stops when no candidate is better, rater
alignment and profiles. Options given on the command line override the preset.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.detect import open_dataset
from ..errors import InputError
from ..limits import MAX_SAMPLES, MIN_SAMPLES
from ..metrics import NOI_FAIL_VALUE
from ..model.build import build_model, default_model, load_model
from ..model.spa import SPAConfig, SPAModel
from ..resources import default_model_path
from ..rounds import DEFAULT_SAMPLES
from ..session import ChoiceAnchor, FocusMode
from ..simulation.prompts import FirstPrompt
from .report import markdown_summary_table, write_report
from .runner import DEFAULT_TARGETS, ORACLE, ClickMethod, Method, SimulatedUser, SpaMethod, evaluate
from .studies import PROFILE_STYLES, profile_study, rater_alignment

PAPER_TARGETS_LIDC = (0.60, 0.70, 0.75)
PAPER_TARGETS_OTHER = (0.80, 0.90, 0.95)
PAPER_SAMPLES = 48
PAPER_ROUNDS = 6
STUDIES = ("standard", "raters", "profiles")
BASELINES = ("litemedsam", "spa", "none")
PRESETS: dict[str, dict[str, str]] = {
    "custom": {"users": "1", "baselines": "litemedsam", "studies": "standard", "samples": str(DEFAULT_SAMPLES)},
    "paper": {
        "users": "1,0.8,0.6,stops",
        "baselines": "litemedsam,spa",
        "studies": ",".join(STUDIES),
        "samples": str(PAPER_SAMPLES),
    },
}
DEFAULT_ROUNDS = 6


def is_lidc(root: Path) -> bool:
    """Whether a dataset holds LIDC nodules (the paper's LIDC targets apply): an LIDC layout, or a folder generated
    from the LIDC readers' contours."""
    dataset = open_dataset(root)
    if dataset.layout.startswith("lidc"):
        return True
    description = Path(root) / "dataset.json"
    if description.is_file():
        try:
            return json.loads(description.read_text(encoding="utf-8")).get("kind") == "lidc-nodules"
        except (OSError, ValueError, AttributeError):
            return False
    return False


def _distinct(text: str, flag: str, parse: Callable[[str], Any]) -> list[Any]:
    """A comma list of settings, each word parsed (``parse`` names what is wrong with one) and named once."""
    values = [parse(word.strip()) for word in text.split(",")]
    if len(set(values)) != len(values):
        raise InputError(f"{flag} {text!r} names a setting twice; list each once")
    return values


def _user(word: str) -> SimulatedUser:
    if word == "stops":
        return SimulatedUser(stops_when_no_better=True)
    try:
        accuracy = float(word)
    except ValueError:
        raise InputError(
            f"--users {word!r} is not a user; use numbers in (0, 1] and/or stops, e.g. 1,0.8,stops"
        ) from None
    if not 0.0 < accuracy <= 1.0:
        raise InputError(f"--users {word!r}: a user's accuracy is a share in (0, 1], e.g. 0.8")
    return SimulatedUser(accuracy=accuracy)


def parse_users(text: str) -> list[SimulatedUser]:
    """``1,0.8,stops`` → the simulated users, each named once."""
    return _distinct(text, "--users", _user)


def _words(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    def word_of(word: str) -> str:
        if word not in allowed:
            raise InputError(f"{flag} {text!r}: use a comma list of {', '.join(allowed)}")
        return word

    return _distinct(",".join(w for w in text.split(",") if w.strip()), flag, word_of)  # blank entries ignored


def _numbers(text: str, flag: str, kind: type, low: float, high: float) -> list[Any]:
    def number_of(word: str) -> Any:
        try:
            value = kind(word)
        except ValueError:
            raise InputError(f"{flag} {text!r} must be comma-separated numbers") from None
        if not low <= value <= high:
            raise InputError(f"{flag} {text!r}: every value must lie in {low:g}..{high:g}")
        return value

    return _distinct(text, flag, number_of)


def ablation_of(config: SPAConfig) -> str:
    """A short name of how a model departs from the full method (paper Table 3), "full" when it does not."""
    changes = []
    if config.n_components != SPAConfig.n_components:
        changes.append(f"K_g = {config.n_components}")
    if config.sampling != SPAConfig.sampling:
        changes.append("moment-matched sampling")
    if not config.feedback_mask:
        changes.append("no mask prompt")
    if not config.carry_mixture:
        changes.append("no mixture update")
    return ", ".join(changes) or "full"


def weights_name(path: Path | None) -> str:
    """How a report names a weights file: "shipped" for the shipped SPA weights, else its training run's folder
    (output/train/balanced/spa_model.pt → balanced), or the file's stem for a file among others (click_litemedsam)."""
    if path is None or Path(path).resolve() == default_model_path().resolve():
        return "shipped"
    path = Path(path)
    return path.stem if path.stem != "spa_model" or not path.parent.name else path.parent.name


def _user_suffix(user: SimulatedUser) -> str:
    if user.stops_when_no_better:
        return "_user_stops"
    return "" if user.accuracy >= 1.0 else f"_user_p{user.accuracy:g}"


@dataclass
class EvaluationPlan:
    """Everything one evaluation run does, resolved from the options (see :meth:`from_options`)."""

    data: Path
    split: str
    methods: dict[str, Method]
    studies: list[str]
    styles: list[str]
    targets: tuple[float, ...]
    rounds: int
    first_prompt: FirstPrompt
    n_samples: int
    max_cases: int | None
    seed: int
    cache: Path
    protocol: str
    study_cases: int | None = None  # rater alignment and profiles on the first this many cases (None: max_cases)

    @classmethod
    def from_options(
        cls,
        *,
        data: Path,
        protocol: str = "custom",
        models: list[Path] | None = None,
        backbone_checkpoint: Path | None = None,
        click_models: list[Path] | None = None,
        baselines: str | None = None,
        anchors: str = "minimal",
        box_search: str = "on",
        focus: str = "clicks",
        samples: str | None = None,
        users: str | None = None,
        studies: str | None = None,
        styles: str | None = None,
        targets: str | None = None,
        rounds: int | None = None,
        first_prompt: str = "point",
        split: str = "test",
        max_cases: int | None = None,
        study_cases: int | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache: Path = Path("output/cache/embeddings"),
    ) -> EvaluationPlan:
        """Resolve the options against the preset and load every model once."""
        if protocol not in PRESETS:
            raise InputError(f"--protocol {protocol!r}: use {', '.join(PRESETS)}")
        preset = PRESETS[protocol]
        user_list = parse_users(users or preset["users"])
        sample_list = _numbers(samples or preset["samples"], "--samples", int, MIN_SAMPLES, MAX_SAMPLES)
        study_list = _words(studies or preset["studies"], "--study", STUDIES)
        if "standard" not in study_list:
            study_list.insert(0, "standard")  # the report is built on it
        baseline_list = _words(baselines or preset["baselines"], "--baseline", BASELINES)
        if "none" in baseline_list and len(baseline_list) > 1:
            raise InputError(f"--baseline {baselines!r}: none cannot be combined with other baselines")
        if targets:
            target_list = tuple(_numbers(targets, "--targets", float, 1e-9, 1.0))
        elif protocol == "paper":
            target_list = PAPER_TARGETS_LIDC if is_lidc(data) else PAPER_TARGETS_OTHER
        else:
            target_list = DEFAULT_TARGETS
        style_list = [w.strip() for w in (styles or ",".join(PROFILE_STYLES)).split(",") if w.strip()]
        anchor_list = _distinct(anchors, "--anchor", lambda w: ChoiceAnchor.parse(w, "--anchor"))
        search_list = _distinct(box_search, "--box-search", _on_off_word)
        focus_list = _distinct(focus, "--focus", lambda w: FocusMode.parse(w, "--focus mode"))

        loaded: list[tuple[str, SPAModel]] = []
        for path in models or [None]:
            model = default_model(device) if path is None else load_model(path, backbone_checkpoint, device)
            loaded.append((weights_name(path), model))
        methods: dict[str, Method] = {}
        several_models = len(loaded) > 1
        for index, (source, model) in enumerate(loaded):
            # The first model meets every user at the first N, and the oracle at every other N; the others (ablations)
            # run with the first user and N only.
            variants_n = sample_list if index == 0 else sample_list[:1]
            variants = [(variants_n[0], u) for u in (user_list if index == 0 else user_list[:1])]
            variants += [(n, user_list[0]) for n in variants_n[1:]]
            for (anchor, search, focus_mode), (n, user) in itertools.product(
                itertools.product(anchor_list, search_list, focus_list), variants
            ):
                name = f"spa_{model.config.conditioning}" + (f"_{index + 1}" if several_models else "")
                name += f"_anchor_{anchor}" if len(anchor_list) > 1 else ""
                name += ("_box_search" if search else "_click_only") if len(search_list) > 1 else ""
                name += f"_focus_{focus_mode}" if len(focus_list) > 1 else ""
                name += f"_n{n}" if len(variants_n) > 1 else ""
                name += _user_suffix(user)
                ablation = ablation_of(model.config)
                label = f"SPA ({model.config.conditioning} conditioning, {source}"
                label += f", {ablation}" if ablation != "full" else ""
                label += f", anchor {anchor}"
                if len(search_list) > 1 or first_prompt == "point":
                    label += ", box search" if search else ", click only"
                label += f", focus {focus_mode}"
                label += f", N = {n}" if n != DEFAULT_SAMPLES or len(variants_n) > 1 else ""
                label += f"; user: {user.describe()}" if user != ORACLE else ""
                label += ")"
                tags = {"family": f"SPA {source}", "ablation": ablation, "n_samples": n, "model_index": index}
                methods[name] = SpaMethod(label, model, anchor, search, focus_mode, user, n, tags)

        click_sources: list[tuple[str, str, SPAModel]] = []
        if "litemedsam" in baseline_list:
            plain = (
                build_model(device=device)
                if backbone_checkpoint is None
                else build_model(loaded[0][1].config, backbone_checkpoint, device)
            )
            click_sources.append(("click_litemedsam", "LiteMedSAM as shipped", plain))
        if "spa" in baseline_list:
            click_sources.append(
                ("click_spa_decoder", f"SPA {loaded[0][0]}'s decoder, no preference parts", loaded[0][1])
            )
        for index, path in enumerate(click_models or []):
            model = load_model(path, backbone_checkpoint, device)
            method = model.training_info.get("train_config", {}).get("method", "spa")
            if method != "clicks":
                raise InputError(
                    f"--click-model {path} was trained with --method {method}, not clicks; pass it with --model, or "
                    "train a click baseline with `spa train --method clicks`"
                )
            suffix = f"_{index + 1}" if len(click_models or []) > 1 else ""
            click_sources.append((f"click_trained{suffix}", f"click model {weights_name(path)}", model))
        click_users = [u for u in user_list if not u.stops_when_no_better] or [ORACLE]
        for base_name, description, model in click_sources:
            for user in click_users:
                label = f"Click refinement ({description}, one click per round"
                label += f"; user: {user.describe(clicks=True)})" if user != ORACLE else ")"
                tags = {"family": f"click: {description}", "n_samples": 1}
                methods[base_name + _user_suffix(user)] = ClickMethod(label, model, user, tags)

        return cls(
            data=data,
            split=split,
            methods=methods,
            studies=study_list,
            styles=style_list,
            targets=target_list,
            rounds=rounds or (PAPER_ROUNDS if protocol == "paper" else DEFAULT_ROUNDS),
            first_prompt=FirstPrompt.parse(first_prompt, "--first-prompt"),
            n_samples=sample_list[0],
            max_cases=max_cases,
            seed=seed,
            cache=cache,
            protocol=protocol,
            study_cases=study_cases if study_cases is not None else max_cases,
        )

    def oracle_methods(self) -> dict[str, Method]:
        """The methods whose user is the oracle and whose N is the first asked for (the studies beyond the standard
        one compare methods, not users)."""
        return {
            name: method
            for name, method in self.methods.items()
            if method.user == ORACLE and (not isinstance(method, SpaMethod) or method.n_samples == self.n_samples)
        }


def _on_off_word(word: str) -> bool:
    if word not in ("on", "off"):
        raise InputError(f"--box-search {word!r} must be on or off (or a comma list of them)")
    return word == "on"


def run_plan(plan: EvaluationPlan, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run every study of the plan and write one report; returns the written paths and the summary table."""
    results = evaluate(
        plan.methods,
        plan.data,
        plan.split,
        seed=plan.seed,
        max_rounds=plan.rounds,
        targets=plan.targets,
        first_prompt=plan.first_prompt,
        n_samples=plan.n_samples,
        max_cases=plan.max_cases,
        cache_dir=plan.cache,
        progress=progress,
    )
    results["protocol"]["name"] = plan.protocol
    results["protocol"]["studies"] = plan.studies
    results["protocol"]["noi_fail_value"] = NOI_FAIL_VALUE
    compared = plan.oracle_methods()
    common = {
        "seed": plan.seed,
        "max_rounds": plan.rounds,
        "first_prompt": plan.first_prompt,
        "n_samples": plan.n_samples,
        "max_cases": plan.study_cases,
        "cache_dir": plan.cache,
        "progress": progress,
    }
    if "raters" in plan.studies:
        results["rater_alignment"] = rater_alignment(compared, plan.data, plan.split, **common)
    if "profiles" in plan.studies:
        spa_first = {
            name: m for name, m in compared.items() if isinstance(m, SpaMethod) and m.tags.get("model_index", 0) == 0
        }
        results["profiles"] = profile_study(
            spa_first, plan.data, plan.split, styles=plan.styles, accept_at=max(plan.targets), **common
        )
    written = write_report(results, out)
    written["summary"] = markdown_summary_table(json.loads(written["results"].read_text(encoding="utf-8")))
    return written
