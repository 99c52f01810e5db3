"""One SPA round, the same for inference and training: sample → condition → decode → aggregate → cluster.

    prompt = start_prompt(geometry, point=(x, y))
    model_round = run_model_round(model, embedding, geometry, prompt, weights, n_samples, seed)
    prompt = feedback_prompt(model, model_round, chosen, feedback_seed(seed, 1))   # the user's choice

:func:`sample_round` is the differentiable part for a batch of images (training calls it with
gradients on); :func:`summarise_round` turns one image's N probability maps into what the user is
shown. :func:`run_model_round` is both for one image without gradients. Everything here works in
the model frame; :class:`~SPASegmentationLib.session.Session` maps to and from the image.
Every per-round seed is derived here, from the session seed (see :func:`round_seed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .candidates import N_CANDIDATES, CandidateClusters, aggregate, cluster_candidates, feedback_from_choice
from .errors import InputError
from .model.preprocess import ImageGeometry, prepare_image
from .model.spa import Prompt, SPAModel
from .preference import PreferenceMixture
from .stages import stage

FEEDBACK_SEED_OFFSET = 1000  # feedback seeds are round seeds of rounds 1000 + t


@dataclass
class SampledRound:
    """The differentiable part of a round for a batch of B images."""

    mixture: PreferenceMixture  # the batch's mixtures, weights (B, K_g)
    component: torch.Tensor  # (B, N) the component each sample was drawn from
    logits: torch.Tensor  # (B, N, m, m) mask logits on the decoder's full low-resolution grid


@dataclass
class ModelRound:
    """One image's round in the model frame: what the user is shown and what feedback is computed from."""

    prompt: Prompt
    mixture: PreferenceMixture  # unbatched, detached
    clusters: CandidateClusters
    mean_probability: np.ndarray  # (rows, cols) valid part of the low-resolution grid
    std: np.ndarray  # (rows, cols) per-pixel std of the N sample probabilities


def round_seed(seed: int, round_index: int) -> int:
    """The seed of round ``round_index`` (1-based) of a session seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(round_index)]).generate_state(1)[0])


def feedback_seed(seed: int, round_index: int) -> int:
    """The seed of the feedback point drawn after the user's choice in round ``round_index``."""
    return round_seed(seed, FEEDBACK_SEED_OFFSET + round_index)


def slice_seed(seed: int, index: int) -> int:
    """The session seed of slice ``index`` in a propagation seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), 0x5350, int(index)]).generate_state(1)[0] % (2**31))


def sample_round(
    model: SPAModel,
    embeddings: torch.Tensor,
    prompts: Sequence[Prompt],
    previous_weights: torch.Tensor,
    n_samples: int,
    generator: torch.Generator,
    trainable_transformer: bool = True,
) -> SampledRound:
    """Mixture, N latents and N mask logits per image: embeddings (B, C, e, e), weights (B, K_g).

    Runs with whatever grad mode the caller set; ``trainable_transformer=False`` keeps the decoder
    transformer out of the graph (see ``conditioning.decoder_features``).
    """
    with stage("generator"):
        sparse, valid, dense = model.encode_prompts(prompts)
        mixture = model.mixture(embeddings, sparse, valid, dense, previous_weights)
    with stage("sampling"):
        z, component = mixture.sample(n_samples, generator=generator, mode=model.config.sampling)
    with stage("conditioning_and_decoding"):
        logits = model.sample_logits(embeddings, sparse, dense, z, trainable_transformer=trainable_transformer)
    return SampledRound(mixture, component, logits)


def summarise_round(
    model: SPAModel,
    prompt: Prompt,
    mixture: PreferenceMixture,
    probabilities: torch.Tensor | np.ndarray,
    n_candidates: int,
    seed: int,
) -> ModelRound:
    """One image's N probability maps (N, rows, cols) → aggregate and candidate clusters, computed where the maps
    are (a GPU round copies back only these)."""
    threshold = model.config.recommend_threshold
    with stage("aggregation"):
        mean, _, std = aggregate(probabilities, threshold)
    with stage("kmeans"):
        clusters = cluster_candidates(probabilities, n_candidates, seed=seed % (2**31), threshold=threshold)
    return ModelRound(prompt, mixture.detach(), clusters, mean, std)


def valid_probabilities(model: SPAModel, logits: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """(N, m, m) logits of one image → (N, rows, cols) float32 probabilities of the part the image covers, on the
    logits' device."""
    rows, cols = geometry.valid_shape_at(model.backbone.mask_size)
    return torch.sigmoid(logits[:, :rows, :cols].float()).contiguous()


@torch.no_grad()
def sample_probabilities(
    model: SPAModel,
    embedding: torch.Tensor,
    geometry: ImageGeometry,
    prompt: Prompt,
    previous_weights: torch.Tensor,
    n_samples: int,
    seed: int,
) -> tuple[torch.Tensor, PreferenceMixture]:
    """One image's N sample probability maps (N, rows, cols; on the model's device) for the prompt, and the mixture
    they came from."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with model.round_autocast():
        sampled = sample_round(
            model, embedding, [prompt], previous_weights.to(model.device)[None], n_samples, generator
        )
    with stage("aggregation"):
        probabilities = valid_probabilities(model, sampled.logits[0], geometry)
    mixture = sampled.mixture.select(0)  # float32 whatever the round's precision: it is kept and saved in profiles
    return probabilities, PreferenceMixture(mixture.weights.float(), mixture.means.float(), mixture.stds.float())


def run_model_round(
    model: SPAModel,
    embedding: torch.Tensor,
    geometry: ImageGeometry,
    prompt: Prompt,
    previous_weights: torch.Tensor,
    n_samples: int,
    seed: int,
    n_candidates: int = N_CANDIDATES,
) -> ModelRound:
    """One image's round: sample N masks for the prompt, aggregate them, find the candidates."""
    probabilities, mixture = sample_probabilities(model, embedding, geometry, prompt, previous_weights, n_samples, seed)
    return summarise_round(model, prompt, mixture, probabilities, n_candidates, seed)


def pull_towards(probabilities: torch.Tensor, choice: np.ndarray, weight: float) -> torch.Tensor:
    """Sample maps (N, h, w) moved the share ``weight`` (0..1) of the way to the chosen candidate's map (h, w).

    Aggregation and clustering are linear in the maps, so the recommendation moves the same share.
    """
    if weight == 0.0:
        return probabilities
    target = torch.as_tensor(choice, dtype=probabilities.dtype, device=probabilities.device)
    return (1.0 - weight) * probabilities + weight * target[None]


def feedback_prompt(model: SPAModel, model_round: ModelRound, chosen: int, seed: int) -> Prompt:
    """The next round's prompt after the user chose candidate ``chosen`` (0-based)."""
    rng = np.random.default_rng(seed)
    point, label, mask = feedback_from_choice(model_round.clusters, chosen, model_round.mean_probability, rng)
    side = model.backbone.mask_size
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[: mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask)
    mask_logits = (grid.float() * 2.0 - 1.0) * model.config.mask_prompt_logit if model.config.feedback_mask else None
    if point is not None:
        point = model_point_of_cell(model, point[0], point[1])
    return model_round.prompt.with_feedback(point, label, mask_logits)


def model_point_of_cell(model: SPAModel, column: float, row: float) -> tuple[float, float]:
    """The model-frame (x, y) of the centre of cell (column, row) of the decoder's low-resolution mask grid."""
    factor = model.backbone.image_size / model.backbone.mask_size
    return ((column + 0.5) * factor - 0.5, (row + 0.5) * factor - 0.5)


def next_weights(model: SPAModel, chosen_round_weights: torch.Tensor, initial_weights: torch.Tensor) -> torch.Tensor:
    """The mixture weights the generator receives in the round after a choice: the chosen round's (the paper), or
    the session's initial ones when the model was built without that update (``SPAConfig.carry_mixture`` off)."""
    return chosen_round_weights if model.config.carry_mixture else initial_weights


def start_prompt(
    geometry: ImageGeometry,
    point: tuple[float, float] | None = None,
    box: tuple[float, float, float, float] | None = None,
    label: bool = True,
) -> Prompt:
    """The first prompt in the model frame from a point and/or box in image pixels, validated."""
    if point is None and box is None:
        raise InputError("start needs a point (x, y) inside the structure or a box (x0, y0, x1, y1)")
    prompt = Prompt()
    height, width = geometry.height, geometry.width
    if point is not None:
        x, y = _pair(point, "point")
        if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
            raise InputError(f"point ({x:g}, {y:g}) is outside the image (x 0..{width - 1}, y 0..{height - 1})")
        mx, my = geometry.to_model(np.array([x, y]))
        prompt = Prompt([(float(mx), float(my))], [bool(label)])
    if box is not None:
        if len(box) != 4:
            raise InputError(f"a box needs four numbers x0,y0,x1,y1, got {len(box)}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty; it needs x0 < x1 and y0 < y1")
        if x0 < -0.5 or y0 < -0.5 or x1 > width - 0.5 or y1 > height - 0.5:
            raise InputError(
                f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) extends outside the image (x 0..{width - 1}, y 0..{height - 1})"
            )
        corners = geometry.to_model(np.array([[x0, y0], [x1, y1]]))
        prompt.box = (float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0]), float(corners[1, 1]))
    return prompt


# Half-sides of the boxes tried around a click, as shares of the model frame: 3 … 192 pixels of a 256 frame,
# doubling; tried a few at a time from the smallest, so a small structure costs two or four decoder passes.
BOX_SEARCH_HALF_SIDES = tuple(3.0 / 256.0 * 2.0**k for k in range(7))
BOX_SEARCH_BATCH = 2
BOX_SEARCH_MARGIN_PX = 1.0  # image pixels added around the found structure, as training's boxes have
# A box holds the structure when its mask touches at most this many of the box's inner sides and at most this share
# of the mask lies outside the box (chosen on the validation splits; see the model card).
BOX_SEARCH_MAX_SIDES = 1
BOX_SEARCH_MAX_OUTSIDE = 0.10
# ... and its edge is seen in the image: the mean intensity inside the mask and in a two-pixel ring around it
# differ by at least this many pooled standard deviations (a mask inside a homogeneous organ has no edge).
BOX_SEARCH_MIN_CONTRAST = 1.0
BOX_SEARCH_RING_PX = 2


def picture_on_mask_grid(model: SPAModel, image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """The image as the model sees it (grey, 0..1), on the valid part of the decoder's mask grid (rows, cols)."""
    tensor, geometry = prepare_image(image, model.backbone.image_size, window=window)
    side = model.backbone.mask_size
    grey = tensor.mean(dim=1, keepdim=True)
    if side != model.backbone.image_size:
        grey = F.interpolate(grey, size=(side, side), mode="area")
    rows, cols = geometry.valid_shape_at(side)
    return grey[0, 0, :rows, :cols].numpy()


def edge_contrast(picture: np.ndarray, mask: np.ndarray, ring_px: int = BOX_SEARCH_RING_PX) -> float:
    """How clearly ``mask`` stands out of ``picture``: |mean inside − mean of the ring around it| / pooled std."""
    ring = ndimage.binary_dilation(mask, iterations=ring_px) & ~mask
    if not ring.any() or not mask.any():
        return 0.0
    inside, around = picture[mask], picture[ring]
    pooled = np.sqrt((inside.var() + around.var()) / 2.0) + 1e-3
    return float(abs(inside.mean() - around.mean()) / pooled)


@torch.no_grad()
def box_from_point(
    model: SPAModel,
    embedding: torch.Tensor,
    geometry: ImageGeometry,
    point: tuple[float, float],
    picture: np.ndarray | None = None,
) -> tuple[float, float, float, float] | None:
    """A box around the structure under a click (model frame), or None when no scale holds it.

    A click alone does not say how big the structure is: on CT the backbone answers a lone point with
    whatever region of similar tissue surrounds it (the abdomen for a point in the liver; a vessel tree
    for a nodule). So boxes of doubling size (1 % … 75 % of the model frame per half-side) are centred
    on the click, smallest first, and the backbone predicts a mask for each; the first mask that holds
    the click, touches at most one of the box's sides (those that are not the image edge), lies
    almost wholly inside the box and, given the ``picture`` (:func:`picture_on_mask_grid`), has an edge
    the image shows (:func:`edge_contrast`) is the structure; its extent plus a pixel becomes the box prompt.
    """
    side = model.backbone.mask_size
    rows, cols = geometry.valid_shape_at(side)
    factor = side / model.backbone.image_size  # model frame → mask grid
    x, y = point
    frame = model.backbone.image_size
    limit_x, limit_y = geometry.valid_shape[1] - 0.5, geometry.valid_shape[0] - 0.5
    boxes = [
        (max(-0.5, x - h * frame), max(-0.5, y - h * frame), min(limit_x, x + h * frame), min(limit_y, y + h * frame))
        for h in BOX_SEARCH_HALF_SIDES
    ]
    click_row = int(np.clip(round((y + 0.5) * factor - 0.5), 0, rows - 1))
    click_col = int(np.clip(round((x + 0.5) * factor - 0.5), 0, cols - 1))
    for first in range(0, len(boxes), BOX_SEARCH_BATCH):
        batch = boxes[first : first + BOX_SEARCH_BATCH]
        logits = model.plain_logits(embedding, [Prompt([(x, y)], [True], box) for box in batch])
        for box, mask in zip(batch, (logits[:, :rows, :cols] > 0).cpu().numpy(), strict=True):
            if not mask[click_row, click_col]:
                continue
            mask_rows, mask_cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            x0, y0, x1, y1 = ((v + 0.5) * factor - 0.5 for v in box)  # the box on the mask grid
            touched = (
                int(x0 > 0 and mask_cols[0] <= x0 + 1)
                + int(y0 > 0 and mask_rows[0] <= y0 + 1)
                + int(x1 < cols - 1 and mask_cols[-1] >= x1 - 1)
                + int(y1 < rows - 1 and mask_rows[-1] >= y1 - 1)
            )
            rows_in = slice(max(0, int(np.ceil(y0))), int(np.floor(y1)) + 1)
            cols_in = slice(max(0, int(np.ceil(x0))), int(np.floor(x1)) + 1)
            outside = 1.0 - mask[rows_in, cols_in].sum() / mask.sum()
            if touched > BOX_SEARCH_MAX_SIDES or outside > BOX_SEARCH_MAX_OUTSIDE:
                continue
            if picture is None or edge_contrast(picture, mask) >= BOX_SEARCH_MIN_CONTRAST:
                extent = np.array([[mask_cols[0], mask_rows[0]], [mask_cols[-1], mask_rows[-1]]], dtype=np.float64)
                corners = (extent + 0.5) / factor - 0.5  # mask grid → model frame
                margin = BOX_SEARCH_MARGIN_PX * geometry.scale
                return (
                    float(max(-0.5, corners[0, 0] - margin)),
                    float(max(-0.5, corners[0, 1] - margin)),
                    float(min(limit_x, corners[1, 0] + margin)),
                    float(min(limit_y, corners[1, 1] + margin)),
                )
    return None


@torch.no_grad()
def click_mask(
    model: SPAModel, embedding: torch.Tensor, geometry: ImageGeometry, point: tuple[float, float]
) -> np.ndarray:
    """The backbone's plain mask for a lone click (model frame), on the valid part of the mask grid (rows, cols)."""
    rows, cols = geometry.valid_shape_at(model.backbone.mask_size)
    logits = model.plain_logits(embedding, [Prompt([point], [True])])
    return (logits[0, :rows, :cols] > 0).cpu().numpy()


# A click whose surroundings are one tissue: the pixels connected to it within this much intensity (0..1 scale) of
# the click's own cover more than CLICK_REGION_MAX_SHARE of a window around it (the inside of a large organ).
CLICK_REGION_TOLERANCE = 0.1
CLICK_REGION_MAX_SHARE = 0.5


def click_region_share(model: SPAModel, picture: np.ndarray, point: tuple[float, float]) -> float:
    """The share of ``picture`` (:func:`picture_on_mask_grid`) taken by the region of similar intensity around
    a click (model frame): the connected pixels within CLICK_REGION_TOLERANCE of the median around the click."""
    rows, cols = picture.shape
    factor = model.backbone.mask_size / model.backbone.image_size
    row = int(np.clip(round((point[1] + 0.5) * factor - 0.5), 0, rows - 1))
    col = int(np.clip(round((point[0] + 0.5) * factor - 0.5), 0, cols - 1))
    value = float(np.median(picture[max(0, row - 1) : row + 2, max(0, col - 1) : col + 2]))
    labels, _ = ndimage.label(np.abs(picture - value) <= CLICK_REGION_TOLERANCE)
    return float((labels == labels[row, col]).mean())


def _pair(value: Any, what: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a {what} needs two numbers (x, y), got {value!r}") from exc
    if not (np.isfinite(x) and np.isfinite(y)):
        raise InputError(f"the {what} ({x}, {y}) is not finite")
    return x, y
