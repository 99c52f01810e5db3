"""Where the image encoder runs: PyTorch (the reference) or a faster runtime over the same weights.

Encoding a slice is the one step a user waits for on every new image and on every slice of a propagation;
everything after it (prompts, the mixture, decoding N samples) stays in PyTorch. Each runtime compiles the
backbone's image encoder once and then maps a (B, 3, S, S) float32 input to the (B, C, e, e) float32
embedding, as the PyTorch module does:

- ``torch``: PyTorch eager, float32 (the reference every other runtime is measured against);
- ``torch-channels-last``, ``torch-jit`` (traced and frozen: batch norms folded into convolutions),
  ``torch-compile`` (inductor), ``torch-bf16`` (bfloat16 autocast after a float32 stem) and ``torch-int8``
  (dynamic int8 linear layers): PyTorch's own settings;
- ``onnxruntime``: the encoder exported to ONNX, all graph optimisations;
- ``openvino``: the encoder converted to OpenVINO, float32;
- ``openvino-bf16``: the stem (patch embedding and first stage) in float32, the rest in bfloat16, where the CPU
  computes bfloat16 natively (AMX or AVX-512 BF16).

``auto`` is ``openvino`` on a CPU when OpenVINO is installed, else ``torch``; ``spa bench --encoders`` measures
them side by side (time, embedding cosine to ``torch``, candidates identical or not). Float32 runtimes leave the
candidates unchanged; the lossy ones (bf16, int8) are opt-in, and their embeddings are cached under their
own key. Converted graphs are cached on disk (``$SPA_HOME/cache/encoders``), keyed by the weights, the input size
and the runtime's version: converting takes seconds and a few GB of memory once.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..enums import TextEnum
from ..errors import InputError

FLOAT32, BFLOAT16, INT8 = "float32", "bfloat16", "int8"


class EncoderRuntime(TextEnum):
    """The ways to run the image encoder (see the module's docstring)."""

    AUTO = "auto"
    TORCH = "torch"
    TORCH_CHANNELS_LAST = "torch-channels-last"
    TORCH_JIT = "torch-jit"
    TORCH_COMPILE = "torch-compile"
    TORCH_BF16 = "torch-bf16"
    TORCH_INT8 = "torch-int8"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    OPENVINO_BF16 = "openvino-bf16"


@dataclass(frozen=True)
class RuntimeSpec:
    """What a runtime computes in and which Python package it needs (None: PyTorch alone)."""

    precision: str
    package: str | None = None
    cpu_only: bool = True


RUNTIMES: dict[EncoderRuntime, RuntimeSpec] = {
    EncoderRuntime.TORCH: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_CHANNELS_LAST: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_JIT: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_COMPILE: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_BF16: RuntimeSpec(BFLOAT16),
    EncoderRuntime.TORCH_INT8: RuntimeSpec(INT8),
    EncoderRuntime.ONNXRUNTIME: RuntimeSpec(FLOAT32, "onnxruntime"),
    EncoderRuntime.OPENVINO: RuntimeSpec(FLOAT32, "openvino"),
    EncoderRuntime.OPENVINO_BF16: RuntimeSpec(BFLOAT16, "openvino"),
}
INSTALL_HINT = {
    "openvino": "pip install 'openvino==2026.4.1' (or SPASegmentationLib[fast])",
    "onnxruntime": "pip install 'onnxruntime==1.31.1' 'onnx==1.23.2'",
}


def is_available(runtime: EncoderRuntime | str) -> bool:
    """Whether ``runtime``'s package is installed (PyTorch's own runtimes always are)."""
    spec = RUNTIMES[EncoderRuntime.parse(runtime, "encoder runtime")]
    return spec.package is None or importlib.util.find_spec(spec.package) is not None


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_runtime(runtime: EncoderRuntime | str, device: torch.device | str) -> EncoderRuntime:
    """The runtime ``runtime`` means on ``device``: ``auto`` picks; an unusable choice is refused with the fix."""
    runtime = EncoderRuntime.parse(runtime, "encoder runtime")
    on_cpu = torch.device(device).type == "cpu"
    if runtime is EncoderRuntime.AUTO:
        return EncoderRuntime.OPENVINO if on_cpu and is_available(EncoderRuntime.OPENVINO) else EncoderRuntime.TORCH
    spec = RUNTIMES[runtime]
    if spec.cpu_only and not on_cpu:
        raise InputError(f"the {runtime} encoder runs on the CPU only; use --encoder torch with --device {device}")
    if not is_available(runtime):
        raise InputError(f"the {runtime} encoder needs the {spec.package} package: {INSTALL_HINT[spec.package]}")
    return runtime


def default_cache_dir() -> Path:
    """Where converted encoders are kept: ``$SPA_HOME/cache/encoders``."""
    from ..resources import spa_home

    return spa_home() / "cache" / "encoders"


class CompiledEncoder:
    """The image encoder compiled for one runtime: (B, 3, S, S) float32 → (B, C, e, e) float32 on the CPU."""

    def __init__(self, runtime: EncoderRuntime, run: Callable[[torch.Tensor], torch.Tensor], build_seconds: float):
        self.runtime = runtime
        self.precision = RUNTIMES[runtime].precision
        self.build_seconds = build_seconds
        self._run = run

    @property
    def exact(self) -> bool:
        """Float32 arithmetic: the embedding matches PyTorch's to rounding, so cached embeddings are shared."""
        return self.precision == FLOAT32

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)


def compile_encoder(
    encoder: nn.Module,
    image_size: int,
    runtime: EncoderRuntime | str,
    *,
    weights_key: str,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> CompiledEncoder:
    """``encoder`` (eval mode, float32, on the CPU for the CPU runtimes) compiled for ``runtime``.

    ``weights_key`` identifies the encoder's weights (the checkpoint's sha256) for the on-disk cache of
    converted graphs; ``threads`` (default: torch's) is what the runtime may use.
    """
    runtime = EncoderRuntime.parse(runtime, "encoder runtime")
    if runtime is EncoderRuntime.AUTO:
        raise InputError("resolve 'auto' with resolve_runtime() before compiling")
    threads = int(threads or torch.get_num_threads())
    example = torch.zeros(1, 3, image_size, image_size, device=_device_of(encoder))
    began = time.perf_counter()
    if runtime is EncoderRuntime.TORCH:
        run = encoder
    elif runtime is EncoderRuntime.TORCH_CHANNELS_LAST:
        run = _channels_last(encoder)
    elif runtime is EncoderRuntime.TORCH_JIT:
        run = _traced(encoder, example)
    elif runtime is EncoderRuntime.TORCH_COMPILE:
        run = _compiled(encoder, example)
    elif runtime is EncoderRuntime.TORCH_BF16:
        run = _torch_bf16(encoder, image_size)
    elif runtime is EncoderRuntime.TORCH_INT8:
        run = _torch_int8(encoder)
    else:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if runtime is EncoderRuntime.ONNXRUNTIME:
            run = _onnxruntime(encoder, example, folder, weights_key, threads)
        else:
            run = _openvino(encoder, example, folder, weights_key, threads, runtime is EncoderRuntime.OPENVINO_BF16)
    compiled = CompiledEncoder(runtime, run, 0.0)
    compiled(example)  # the first call builds kernels and buffers; count it as compiling
    compiled.build_seconds = time.perf_counter() - began
    return compiled


# ----- PyTorch's settings -----------------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _channels_last(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    copied = copy.deepcopy(encoder).to(memory_format=torch.channels_last)

    def run(images: torch.Tensor) -> torch.Tensor:
        return copied(images.contiguous(memory_format=torch.channels_last)).contiguous()

    return run


def _traced(encoder: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings(), torch.no_grad():
        _quiet_tracing()
        return torch.jit.freeze(torch.jit.trace(encoder, example))


def _quiet_tracing() -> None:
    """Inside ``warnings.catch_warnings()``: silence what tracing says that a user cannot act on (shape arithmetic
    turned into constants, as wanted here; TorchScript's deprecation, which OpenVINO's converter still uses)."""
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)


def _compiled(encoder: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(encoder, dynamic=False)


def split_stem(encoder: nn.Module, image_size: int) -> tuple[nn.Module, nn.Module]:
    """(stem, body) of a known encoder such that ``body(stem(x)) == encoder(x)``: the stem is the patch embedding
    (and, for TinyViT, its first, convolutional stage), where bfloat16 costs the most accuracy for the least time."""
    if all(hasattr(encoder, name) for name in ("patch_embed", "layers", "neck")):
        with torch.no_grad():  # the token grid's side is the embedding's (TinyViT-SAM writes 64 into its forward)
            side = encoder(torch.zeros(1, 3, image_size, image_size, device=_device_of(encoder))).shape[-1]
        return _TinyViTStem(encoder), _TinyViTBody(encoder, int(side))
    if all(hasattr(encoder, name) for name in ("patch_embed", "blocks", "neck")):
        return _ViTStem(encoder), _ViTBody(encoder)
    raise InputError(
        f"the bfloat16 encoders know TinyViT (LiteMedSAM) and SAM's ViT, not {type(encoder).__name__}; "
        "use --encoder openvino or torch"
    )


class _TinyViTStem(nn.Module):
    """LiteMedSAM's TinyViT up to the end of its convolutional first stage."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.layers[0](self.encoder.patch_embed(images))


class _TinyViTBody(nn.Module):
    """The rest of TinyViT: its attention stages, the tokens back to a 64 × 64 map, and the neck."""

    def __init__(self, encoder: nn.Module, side: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.side = side  # of the token grid (64 for LiteMedSAM at 256 px)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for stage in self.encoder.layers[1:]:
            tokens = stage(tokens)
        grid = tokens.view(tokens.shape[0], self.side, self.side, tokens.shape[-1]).permute(0, 3, 1, 2)
        return self.encoder.neck(grid)


class _ViTStem(nn.Module):
    """SAM's ViT patch embedding plus its absolute position embedding."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.patch_embed(images)
        if self.encoder.pos_embed is not None:
            tokens = tokens + self.encoder.pos_embed
        return tokens


class _ViTBody(nn.Module):
    """SAM's ViT blocks and neck."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.encoder.blocks:
            tokens = block(tokens)
        return self.encoder.neck(tokens.permute(0, 3, 1, 2))


def _torch_bf16(encoder: nn.Module, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    stem, body = split_stem(encoder, image_size)

    def run(images: torch.Tensor) -> torch.Tensor:
        tokens = stem(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return body(tokens).float()

    return run


def _torch_int8(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's move to torchao; the eager API still works in this torch
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {nn.Linear}, dtype=torch.qint8)


# ----- converted graphs, cached on disk ----------------------------------------------------------------------------
def _cache_folder(root: Path, runtime: str, weights_key: str, image_size: int, version: str, variant: str) -> Path:
    digest = hashlib.sha256(f"{weights_key}|{image_size}|{version}|{variant}".encode()).hexdigest()[:16]
    return root / f"{runtime}-{digest}"


def _cached(folder: Path, names: tuple[str, ...], write: Callable[[Path], None]) -> Path:
    """``folder`` holding ``names``, written by ``write(tmp)`` into a fresh folder renamed into place (atomic: a
    concurrent process either finds the complete folder or writes its own and keeps whichever landed first)."""
    if all((folder / name).is_file() for name in names):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write(scratch)
        try:
            os.rename(scratch, folder)
        except OSError:  # another process landed it first (or a stale partial folder is in the way)
            if not all((folder / name).is_file() for name in names):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _onnxruntime(
    encoder: nn.Module, example: torch.Tensor, root: Path, weights_key: str, threads: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    def export(target: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                encoder,
                (example,),
                str(target / "encoder.onnx"),
                input_names=["image"],
                output_names=["embedding"],
                opset_version=17,
                dynamo=False,
            )

    size = int(example.shape[-1])
    folder = _cached(
        _cache_folder(root, "onnx", weights_key, size, torch.__version__, "fp32"), ("encoder.onnx",), export
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(folder / "encoder.onnx"), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().cpu().float().numpy()
        outputs = [session.run(None, {"image": batch[i : i + 1]})[0] for i in range(batch.shape[0])]
        return torch.from_numpy(np.concatenate(outputs))

    return run


def _openvino(
    encoder: nn.Module, example: torch.Tensor, root: Path, weights_key: str, threads: int, bf16: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino

    if bf16 and not native_bfloat16():
        raise InputError(
            "this CPU has no native bfloat16 (AMX or AVX-512 BF16): the openvino-bf16 encoder would be emulated and "
            "slower than float32; use --encoder openvino"
        )
    parts = split_stem(encoder, int(example.shape[-1])) if bf16 else (encoder,)
    names = tuple(f"part{i}.xml" for i in range(len(parts)))

    def convert(target: Path) -> None:
        current = example
        with warnings.catch_warnings(), torch.no_grad():
            _quiet_tracing()
            for name, part in zip(names, parts, strict=True):
                graph = openvino.convert_model(part, example_input=current)
                openvino.save_model(graph, str(target / name), compress_to_fp16=False)
                current = part(current)

    size = int(example.shape[-1])
    variant = "stem-f32+bf16" if bf16 else "f32"
    folder = _cached(_cache_folder(root, "openvino", weights_key, size, openvino.__version__, variant), names, convert)
    core = openvino.Core()
    requests = []
    for index, name in enumerate(names):
        precision = "bf16" if bf16 and index > 0 else "f32"
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        requests.append(core.compile_model(core.read_model(str(folder / name)), "CPU", config).create_infer_request())

    def run(images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().cpu().float().numpy()
        outputs = []
        for i in range(batch.shape[0]):
            value = batch[i : i + 1]
            for request in requests:
                value = request.infer({0: value})[0]
            outputs.append(np.array(value, dtype=np.float32, copy=True))
        return torch.from_numpy(np.concatenate(outputs))

    return run


# ----- arithmetic ----------------------------------------------------------------------------------------------
def encoder_flops(encoder: nn.Module, image_size: int) -> int:
    """Floating-point operations (multiply and add counted apart) of one encoding, by PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    example = torch.zeros(1, 3, image_size, image_size, device=_device_of(encoder))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(example)
    return int(counter.get_total_flops())


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 8) -> float:
    """This machine's attainable GFLOP/s: a large square matrix product in ``dtype`` on the CPU with torch's threads."""
    a = torch.rand(size, size).to(dtype)
    b = torch.rand(size, size).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - began)
    return 2.0 * size**3 / float(np.median(times)) / 1e9
