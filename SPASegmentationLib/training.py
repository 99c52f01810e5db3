"""Training with simulated users (paper Algorithm 1), on this machine's CPU or a GPU.

Each step, for a batch of training images:
1. the target is one plausible preference: the mean of a random non-empty subset of the image's
   raters, binarised at 0.5 (the same draw the evaluation uses);
2. the first prompt comes from the target — a point drawn uniformly from the region all raters agree
   on (paper) or a box around the target with jitter (LiteMedSAM style), mixed by ``first_prompt``;
3. for up to ``rounds`` rounds: the generator gives the mixture, N latents are drawn, N masks decoded;
   the loss is BCE (pos_weight 2) of the aggregated probability, plus a best-of-N term (the sample
   nearest the target), plus MSE of the mixture weights to their E-step target; the simulated user
   then picks the candidate nearest the target and its feedback becomes the next prompt.

The image encoder is frozen and its embeddings cached on disk, so training never re-encodes an image.
The decoder's upscaling and mask head train in every round; its transformer and the prompt encoder
through one round per step (see ``TrainConfig.deep_first_round_probability``).
The click baseline (``TrainConfig.method`` ``clicks``) trains the same decoder parts on the same data and budget the
SAM way instead: per round one prediction, its loss, then a correction click drawn from the error and the previous
logits as the mask prompt (:func:`click_training_step`); the preference parts are not used.
Training resumes from ``<out>/checkpoint.pt``; every source of randomness is seeded.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .data.dataset import RaterStatistics
from .data.detect import open_dataset
from .embeddings import EmbeddingCache
from .engine import (
    feedback_prompt,
    model_point_of_cell,
    next_weights,
    sample_round,
    start_prompt,
    summarise_round,
    valid_probabilities,
)
from .enums import TextEnum
from .errors import DataError
from .io.atomic import write_bytes_atomic, write_json_atomic
from .metrics import dice
from .model.preprocess import FocusWindow, ImageGeometry, focus_window, intensity_window
from .model.spa import DEEP_DECODER_PREFIXES, TRAINED_DECODER_PREFIXES, SPAModel
from .preference import balance_loss, e_step_weights, uniform_weights
from .simulation.choices import nearest_candidate, sampled_error_click
from .simulation.preferences import draw_preference
from .simulation.prompts import FirstPrompt, initial_box, training_first_prompt


class TrainMethod(TextEnum):
    """What a training run teaches: SPA's preference loop, or the click baseline (SAM-style iterative clicks)."""

    SPA = "spa"
    CLICKS = "clicks"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the weights file)."""

    steps: int = 1500
    batch_size: int = 4
    rounds: int = 6
    n_samples: int = 24
    n_candidates: int = 4
    lr: float = 3e-4
    decoder_lr: float = 3e-5
    weight_decay: float = 1e-4
    pos_weight: float = 2.0
    best_of_n_weight: float = 1.5
    pi_weight: float = 1.0
    e_step_temperature: float = 0.05
    # Against a collapsed mixture (every image's weight on one component, so K_g, the mixture update and profiles stop
    # mattering): the E-step's prior mixed with this share of the uniform one, and the weight of a load-balancing term
    # (preference.balance_loss). Both 0 reproduce the shipped model's recipe.
    e_step_prior_floor: float = 0.0
    balance_weight: float = 0.0
    first_prompt: FirstPrompt = FirstPrompt.MIXED  # point, box or mixed (half each)
    # One round per step also trains the decoder transformer and prompt encoder ("deep"): the first
    # round with this probability (it teaches the first prompt), else a random later round (it teaches
    # the feedback prompts). 0 disables it: only the decoder's upscaling and mask head train.
    deep_first_round_probability: float = 0.5
    deep_rounds: bool = True
    seed: int = 0
    checkpoint_every: int = 25
    log_every: int = 5
    grad_clip: float = 1.0
    # Small structures are also learned in the magnified window inference uses (Session's focus window): each such
    # case is added a second time, cropped to preprocess.focus_window around all its raters' marks.
    focus_crops: bool = False
    method: TrainMethod = TrainMethod.SPA
    # The click baseline's correction clicks: this share at the deepest pixel of the largest error region (as the
    # evaluation's user clicks), the rest uniformly anywhere in the error (as SAM trains).
    careful_click_share: float = 0.5

    def __post_init__(self) -> None:
        self.first_prompt = FirstPrompt.parse(self.first_prompt, "first prompt")
        self.method = TrainMethod.parse(self.method, "training method")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, as the weights file records it."""
        return asdict(self) | {"first_prompt": self.first_prompt.value, "method": self.method.value}


@dataclass
class TrainingCase:
    """A training image reduced to what training needs: its embedding, geometry and raters."""

    case_id: str
    embedding: torch.Tensor  # (C, e, e) float32
    geometry: ImageGeometry
    raters: dict[str, np.ndarray]  # image-size bool masks
    focus: FocusWindow | None = None  # the case is this window of its image (the focus view), not the whole image


def load_training_cases(
    root: Path, split: str, model: SPAModel, cache_dir: Path, progress: bool = True, focus_crops: bool = False
) -> tuple[list[TrainingCase], RaterStatistics]:
    """Read a dataset's split (any layout ``open_dataset`` knows) and make sure every image's embedding is
    cached. Cases where no rater marked anything teach nothing and are left out (counted in the statistics).
    With ``focus_crops`` a small structure's case is also added as its focus window (see :func:`focus_case`)."""
    from tqdm import tqdm

    dataset = open_dataset(root)
    case_ids = dataset.split(split)
    if not case_ids:
        raise DataError(f"split {split!r} of {root} has no cases; add cases or fix splits.json")
    cache = EmbeddingCache(model, folder=cache_dir)
    cases = []
    statistics = RaterStatistics()
    for case_id in tqdm(case_ids, desc=f"embeddings ({split})", disable=not progress, unit="img"):
        case = dataset.load(case_id)
        statistics.add(case)
        if not any(mask.any() for mask in case.raters.values()):
            continue
        embedding = cache.get(case.image)
        cases.append(TrainingCase(case_id, embedding[0].cpu(), model.geometry_of(case.image), case.raters))
        focused = focus_case(case_id, case.image, case.raters, model, cache) if focus_crops else None
        if focused is not None:
            cases.append(focused)
        cache.clear()  # training keeps its own copy; the cache is only its disk
    if not cases:
        raise DataError(f"split {split!r} of {root} has no case where a rater marked a structure; nothing to learn")
    return cases, statistics


def focus_case(
    case_id: str, image: np.ndarray, raters: dict[str, np.ndarray], model: SPAModel, cache: EmbeddingCache
) -> TrainingCase | None:
    """The case as a session sees it in its focus window around everything the raters marked (the whole image's
    intensity scale, as :class:`~SPASegmentationLib.session.Session` crops it); None when the structure is too
    large for a window."""
    marked = np.logical_or.reduce([np.asarray(mask, dtype=bool) for mask in raters.values()])
    window = focus_window(initial_box(marked), image.shape[0], image.shape[1])
    if window is None:
        return None
    crop = window.crop(image)
    embedding = cache.get(crop, intensity_window(image))
    cropped = {name: window.crop(np.asarray(mask, dtype=bool)) for name, mask in raters.items()}
    return TrainingCase(case_id, embedding[0].cpu(), model.geometry_of(crop), cropped, focus=window)


def _target_in_model_frame(case: TrainingCase, target: np.ndarray, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ≥ 0.5 on the low-resolution grid, validity mask of that grid)."""
    soft = case.geometry.mask_to_model(target, side)
    valid = torch.zeros(side, side)
    rows, cols = case.geometry.valid_shape_at(side)
    valid[:rows, :cols] = 1.0
    return (soft >= 0.5).float(), valid


def _masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Mean BCE over valid pixels; logits (..., h, w), target/valid broadcastable."""
    loss = F.binary_cross_entropy_with_logits(
        logits, target.expand_as(logits), pos_weight=torch.tensor(pos_weight, device=logits.device), reduction="none"
    )
    return (loss * valid).sum((-2, -1)) / valid.sum((-2, -1)).clamp_min(1.0)


def _probability_bce(
    probability: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float
) -> torch.Tensor:
    """BCE of a probability map (the aggregate of N samples), pos_weight on the foreground term."""
    p = probability.clamp(1e-6, 1 - 1e-6)
    loss = -(pos_weight * target * torch.log(p) + (1 - target) * torch.log(1 - p))
    return (loss * valid).sum((-2, -1)) / valid.sum((-2, -1)).clamp_min(1.0)


def set_trainable(model: SPAModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the backbone except the decoder parts SPA trains; return the decoder's trainable parameters."""
    prefixes = TRAINED_DECODER_PREFIXES + DEEP_DECODER_PREFIXES if config.deep_rounds else TRAINED_DECODER_PREFIXES
    decoder_params = []
    for name, parameter in model.named_parameters():
        if name.startswith("backbone."):
            trainable = name.startswith(prefixes)
            parameter.requires_grad_(trainable)
            if trainable:
                decoder_params.append(parameter)
    return decoder_params


def _draw_batch(
    model: SPAModel, cases: list[TrainingCase], config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, list, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch's embeddings (B, C, e, e), first prompts, and per case a drawn preference on the mask grid: the targets
    (a list, CPU) and stacked with their validity masks (B, m, m) on the model's device."""
    device = model.device
    side = model.backbone.mask_size
    embeddings = torch.stack([c.embedding for c in cases]).to(device)
    targets, valids, prompts = [], [], []
    for case in cases:
        _, target = draw_preference(case.raters, rng)
        first = training_first_prompt(case.raters, target, config.first_prompt, rng)
        prompts.append(start_prompt(case.geometry, **first))
        t, v = _target_in_model_frame(case, target, side)
        targets.append(t)
        valids.append(v)
    return embeddings, prompts, targets, torch.stack(targets).to(device), torch.stack(valids).to(device)


def training_step(
    model: SPAModel,
    cases: list[TrainingCase],
    config: TrainConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> dict[str, float]:
    """One optimisation step's forward and backward over a batch (gradients accumulate per round)."""
    device = model.device
    side = model.backbone.mask_size
    batch = len(cases)
    embeddings, prompts, targets, target, valid = _draw_batch(model, cases, config, rng)
    target, valid = target.unsqueeze(1), valid.unsqueeze(1)  # (B, 1, m, m)
    initial_weights = uniform_weights(model.config.n_components, batch).to(device)
    weights = initial_weights
    if rng.random() < config.deep_first_round_probability or config.rounds == 1:
        deep_round = 0
    else:
        deep_round = int(rng.integers(1, config.rounds))
    totals = {
        "loss": 0.0,
        "aggregate_bce": 0.0,
        "best_bce": 0.0,
        "pi_mse": 0.0,
        "balance": 0.0,
        "dice_first": 0.0,
        "dice_last": 0.0,
    }
    for round_index in range(config.rounds):
        deep = config.deep_rounds and round_index == deep_round
        sampled = sample_round(
            model, embeddings, prompts, weights, config.n_samples, generator, trainable_transformer=deep
        )
        mixture, logits = sampled.mixture, sampled.logits  # logits (B, N, m, m)
        probability = torch.sigmoid(logits).mean(1, keepdim=True)
        aggregate_loss = _probability_bce(probability, target, valid, config.pos_weight).mean()
        per_sample = _masked_bce(logits, target, valid, config.pos_weight)  # (B, N)
        best_loss = per_sample.min(1).values.mean()
        pi_target = e_step_weights(
            mixture.weights, sampled.component, per_sample, config.e_step_temperature, config.e_step_prior_floor
        )
        # MSE as in the paper, scaled by K_g² so that it is O(1) for weights of order 1/K_g.
        pi_loss = F.mse_loss(mixture.weights, pi_target) * model.config.n_components**2
        spread = balance_loss(mixture.weights)
        loss = aggregate_loss + config.best_of_n_weight * best_loss + config.pi_weight * pi_loss
        loss = (loss + config.balance_weight * spread) / config.rounds
        loss.backward()
        totals["loss"] += float(loss.detach())
        totals["aggregate_bce"] += float(aggregate_loss.detach()) / config.rounds
        totals["best_bce"] += float(best_loss.detach()) / config.rounds
        totals["pi_mse"] += float(pi_loss.detach()) / config.rounds
        totals["balance"] += float(spread.detach()) / config.rounds
        with torch.no_grad():
            recommended = (probability >= model.config.recommend_threshold).cpu().numpy()[:, 0]
            goals = target.cpu().numpy()[:, 0] > 0.5
            inside = valid.cpu().numpy()[:, 0] > 0.5
            round_dice = float(np.mean([dice(r[v], g[v]) for r, g, v in zip(recommended, goals, inside, strict=True)]))
            if round_index == 0:
                totals["dice_first"] = round_dice
            totals["dice_last"] = round_dice
            if round_index == config.rounds - 1:
                break
            next_prompts = []
            for i, case in enumerate(cases):
                rows, cols = case.geometry.valid_shape_at(side)
                model_round = summarise_round(
                    model,
                    prompts[i],
                    mixture.select(i),
                    valid_probabilities(model, logits[i], case.geometry),
                    config.n_candidates,
                    seed=int(rng.integers(2**31)),
                )
                goal = targets[i][:rows, :cols].numpy().astype(bool)
                chosen = nearest_candidate(model_round.clusters.masks, goal)
                next_prompts.append(feedback_prompt(model, model_round, chosen, int(rng.integers(2**31))))
            prompts = next_prompts
            weights = next_weights(model, mixture.weights.detach(), initial_weights)
    return totals


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits) to the target over valid pixels, per image: logits (B, h, w)."""
    probability = torch.sigmoid(logits) * valid
    overlap = (probability * target).sum((-2, -1))
    total = probability.sum((-2, -1)) + (target * valid).sum((-2, -1))
    return 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


def click_training_step(
    model: SPAModel,
    cases: list[TrainingCase],
    config: TrainConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> dict[str, float]:
    """One step of the click baseline (SAM-style iterative training): per round the plain decoder's prediction for
    the prompts so far, BCE + Dice to the target, then one correction click from the error (see
    ``TrainConfig.careful_click_share``) with the prediction's logits as the next mask prompt."""
    del generator  # nothing is sampled: the click model is deterministic given its prompts
    side = model.backbone.mask_size
    embeddings, prompts, targets, target, valid = _draw_batch(model, cases, config, rng)
    totals = {"loss": 0.0, "bce": 0.0, "dice_loss": 0.0, "dice_first": 0.0, "dice_last": 0.0}
    for round_index in range(config.rounds):
        # SAM's decoder takes one image with any number of prompts: one call per image
        logits = torch.cat([model.plain_logits(embeddings[i : i + 1], [prompts[i]]) for i in range(len(cases))])
        bce = _masked_bce(logits, target, valid, config.pos_weight).mean()
        dice_loss = _soft_dice_loss(logits, target, valid).mean()
        loss = (bce + dice_loss) / config.rounds
        loss.backward()
        totals["loss"] += float(loss.detach())
        totals["bce"] += float(bce.detach()) / config.rounds
        totals["dice_loss"] += float(dice_loss.detach()) / config.rounds
        with torch.no_grad():
            predictions = (logits > 0).cpu().numpy()
            round_dice = []
            next_prompts = []
            for i, case in enumerate(cases):
                rows, cols = case.geometry.valid_shape_at(side)
                prediction = predictions[i, :rows, :cols]
                goal = targets[i][:rows, :cols].numpy() > 0.5
                round_dice.append(dice(prediction, goal))
                click = sampled_error_click(prediction, goal, rng, config.careful_click_share)
                point = None if click is None else model_point_of_cell(model, click[0], click[1])
                positive = True if click is None else click[2]
                next_prompts.append(prompts[i].with_feedback(point, positive, logits[i].detach().cpu()))
            if round_index == 0:
                totals["dice_first"] = float(np.mean(round_dice))
            totals["dice_last"] = float(np.mean(round_dice))
            prompts = next_prompts
    return totals


@dataclass
class TrainingRun:
    """What a finished (or interrupted) run reports."""

    steps_done: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    model: SPAModel,
    cases: list[TrainingCase],
    out_dir: Path,
    config: TrainConfig,
    data_description: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainingRun:
    """Train ``model`` in place; resumes from ``out_dir/checkpoint.pt`` when it exists."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    decoder_params = set_trainable(model, config)
    own_params = [p for n, p in model.named_parameters() if n.startswith(("generator.", "conditioning."))]
    if config.method is TrainMethod.CLICKS:  # the click baseline has no preference parts to train
        for parameter in own_params:
            parameter.requires_grad_(False)
        own_params = []
    step_function = click_training_step if config.method is TrainMethod.CLICKS else training_step
    optimizer = torch.optim.AdamW(
        [{"params": own_params, "lr": config.lr}, {"params": decoder_params, "lr": config.decoder_lr}],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, config.steps), eta_min=config.lr * 0.05
    )
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    step, seconds_before = 0, 0.0
    checkpoint_path = out_dir / "checkpoint.pt"
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_rng"])
        step, seconds_before = state["step"], state["seconds"]
    log_path = out_dir / "train_log.jsonl"
    model.train()
    started = time.perf_counter()
    history = []
    bar = tqdm(total=config.steps, initial=step, desc="training", disable=not progress, unit="step")
    while step < config.steps:
        indices = rng.choice(len(cases), size=min(config.batch_size, len(cases)), replace=False)
        optimizer.zero_grad(set_to_none=True)
        totals = step_function(model, [cases[i] for i in indices], config, rng, generator)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        totals["step"] = step
        history.append(totals)
        bar.update(1)
        bar.set_postfix(
            loss=f"{totals['loss']:.3f}", dice1=f"{totals['dice_first']:.2f}", diceT=f"{totals['dice_last']:.2f}"
        )
        if step % config.log_every == 0 or step == config.steps:
            recent = history[-config.log_every :]
            mean = {k: float(np.mean([h[k] for h in recent])) for k in recent[0] if k != "step"}
            with open(log_path, "a") as handle:
                handle.write(
                    json.dumps({"step": step, **mean, "elapsed_s": seconds_before + time.perf_counter() - started})
                    + "\n"
                )
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(
                checkpoint_path,
                model,
                optimizer,
                scheduler,
                rng,
                generator,
                step,
                seconds_before + time.perf_counter() - started,
            )
    bar.close()
    model.eval()
    seconds = seconds_before + time.perf_counter() - started
    model.training_info = {
        "train_config": config.to_dict(),
        "data": data_description or {},
        "steps": step,
        "seconds": round(seconds, 1),
        "device": str(model.device),
        "torch": str(torch.__version__),
    }
    model.invalidate_fingerprint()
    model.save(out_dir / "spa_model.pt")
    write_json_atomic(out_dir / "training.json", model.training_info | {"fingerprint": model.fingerprint()})
    return TrainingRun(step, seconds, history)


def _save_checkpoint(
    path: Path, model: SPAModel, optimizer, scheduler, rng, generator, step: int, seconds: float
) -> None:
    import io

    state = {
        "model": model.spa_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": generator.get_state(),
        "step": step,
        "seconds": seconds,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())
