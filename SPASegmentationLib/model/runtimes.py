"""Where the image encoder runs: PyTorch (the reference) or a faster runtime over the same weights.

Encoding a slice is the one step a user waits for on every new image and on every slice of a propagation;
everything after it (prompts, the mixture, decoding N samples) stays in PyTorch. Each runtime compiles the
backbone's image encoder once and then maps a (B, 3, S, S) float32 input to the (B, C, e, e) float32
embedding, as the PyTorch module does:

- ``torch``: PyTorch eager, float32 (the reference every other runtime is measured against);
- ``torch-channels-last``, ``torch-jit`` (traced and frozen: batch norms folded into convolutions),
  ``torch-compile`` (inductor), ``torch-bf16`` (bfloat16 autocast) and ``torch-int8``
  (dynamic int8 linear layers): PyTorch's own settings;
- ``onnxruntime``: the encoder exported to ONNX, all graph optimisations;
- ``openvino``: the encoder converted to OpenVINO, float32;
- ``openvino-bf16``: the same graph executed in bfloat16, where the CPU computes it natively (AMX or AVX-512 BF16).

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
import threading
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
    """What a runtime computes in and which Python packages it needs beyond PyTorch (none: PyTorch runs it)."""

    precision: str
    packages: tuple[str, ...] = ()
    cpu_only: bool = True

    @property
    def converted(self) -> bool:
        """Whether the encoder runs as a converted graph (exported to ONNX first) rather than in PyTorch."""
        return bool(self.packages)


RUNTIMES: dict[EncoderRuntime, RuntimeSpec] = {
    EncoderRuntime.TORCH: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_CHANNELS_LAST: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_JIT: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_COMPILE: RuntimeSpec(FLOAT32, cpu_only=False),
    EncoderRuntime.TORCH_BF16: RuntimeSpec(BFLOAT16),
    EncoderRuntime.TORCH_INT8: RuntimeSpec(INT8),
    # both export the encoder to ONNX (which needs the onnx package), then run that graph
    EncoderRuntime.ONNXRUNTIME: RuntimeSpec(FLOAT32, ("onnxruntime", "onnx")),
    EncoderRuntime.OPENVINO: RuntimeSpec(FLOAT32, ("openvino", "onnx")),
    EncoderRuntime.OPENVINO_BF16: RuntimeSpec(BFLOAT16, ("openvino", "onnx")),
}
PINNED = {"openvino": "openvino==2026.4.1", "onnxruntime": "onnxruntime==1.31.1", "onnx": "onnx==1.23.2"}


def is_available(runtime: EncoderRuntime | str) -> bool:
    """Whether ``runtime``'s package is installed (PyTorch's own runtimes always are)."""
    spec = RUNTIMES[EncoderRuntime.parse(runtime, "encoder runtime")]
    return all(importlib.util.find_spec(package) is not None for package in spec.packages)


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
        wanted = " ".join(f"'{PINNED[package]}'" for package in spec.packages)
        extra = " (or SPASegmentationLib[fast])" if "openvino" in spec.packages else ""
        raise InputError(f"the {runtime} encoder needs {' and '.join(spec.packages)}: pip install {wanted}{extra}")
    return runtime


PROPAGATION_AUTO, PROPAGATION_SAME = "auto", "same"


def resolve_propagation_runtime(
    runtime: EncoderRuntime | str, sessions: EncoderRuntime, device: torch.device | str
) -> EncoderRuntime | None:
    """The runtime propagations encode their slices with, None for the sessions' own (``sessions``).

    ``auto``: ``openvino-bf16`` when sessions run on ``openvino`` and the CPU computes bfloat16 natively (a
    propagation encodes every slice of a volume, and float32 cannot reach 50 slices in 15 s on a 2-core CPU: the
    encoder alone is 75 GFLOP a slice), else the sessions'; ``same``: the sessions'; a runtime word: that one.
    """
    if str(runtime) == PROPAGATION_SAME:
        return None
    if str(runtime) == PROPAGATION_AUTO:
        fast = sessions is EncoderRuntime.OPENVINO and native_bfloat16()
        return EncoderRuntime.OPENVINO_BF16 if fast else None
    chosen = resolve_runtime(runtime, device)
    return None if chosen is sessions else chosen


ENCODER_CACHE_ENV = "SPA_ENCODER_CACHE"


def default_cache_dir() -> Path:
    """Where converted encoders are kept: ``$SPA_ENCODER_CACHE``, else ``$SPA_HOME/cache/encoders``."""
    from ..resources import spa_home

    override = os.environ.get(ENCODER_CACHE_ENV)
    return Path(override) if override else spa_home() / "cache" / "encoders"


class CompiledEncoder:
    """The image encoder compiled for one runtime: (B, 3, S, S) float32 → (B, C, e, e) float32 on the CPU."""

    def __init__(self, runtime: EncoderRuntime, run: Callable[[torch.Tensor], torch.Tensor]):
        self.runtime = runtime
        self.precision = RUNTIMES[runtime].precision
        self._run = run
        self._lock = threading.Lock()  # an OpenVINO or ONNX Runtime request serves one call at a time

    @property
    def exact(self) -> bool:
        """Float32 arithmetic: the embedding matches PyTorch's to rounding, so cached embeddings are shared."""
        return self.precision == FLOAT32

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._run(images)


def compile_encoder(
    encoder: nn.Module | Callable[[], nn.Module],
    image_size: int,
    runtime: EncoderRuntime | str,
    *,
    weights_key: str,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> CompiledEncoder:
    """``encoder`` (eval mode, float32, on the CPU for the CPU runtimes) compiled for ``runtime``.

    ``encoder`` may be a function that builds the module: OpenVINO and ONNX Runtime then call it only when the
    converted graph is not cached yet (and drop the module after converting). ``weights_key`` identifies the
    encoder's weights (the checkpoint's sha256) for the on-disk cache of converted graphs; ``threads`` (default:
    torch's) is what the runtime may use.
    """
    runtime = EncoderRuntime.parse(runtime, "encoder runtime")
    if runtime is EncoderRuntime.AUTO:
        raise InputError("resolve 'auto' with resolve_runtime() before compiling")
    threads = int(threads or torch.get_num_threads())
    if RUNTIMES[runtime].converted:  # a converted graph, on the CPU
        example = torch.zeros(1, 3, image_size, image_size)
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        build = (lambda: encoder) if isinstance(encoder, nn.Module) else encoder
        if runtime is EncoderRuntime.ONNXRUNTIME:
            run = _onnxruntime(build, example, folder, weights_key, threads)
        else:
            run = _openvino(build, example, folder, weights_key, threads, runtime is EncoderRuntime.OPENVINO_BF16)
    else:
        module = encoder if isinstance(encoder, nn.Module) else encoder()
        example = torch.zeros(1, 3, image_size, image_size, device=_device_of(module))
        run = _torch_settings(module, runtime, example)
    compiled = CompiledEncoder(runtime, run)
    compiled(example)  # the first call builds kernels and buffers: here, not in the user's first encoding
    return compiled


# ----- PyTorch's settings -----------------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _torch_settings(
    encoder: nn.Module, runtime: EncoderRuntime, example: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encoder`` run by PyTorch under one of its ``torch-*`` settings."""
    if runtime is EncoderRuntime.TORCH:
        return encoder
    if runtime is EncoderRuntime.TORCH_CHANNELS_LAST:
        return _channels_last(encoder)
    if runtime is EncoderRuntime.TORCH_JIT:
        return _traced(encoder, example)
    if runtime is EncoderRuntime.TORCH_COMPILE:
        return torch.compile(encoder, dynamic=False)
    if runtime is EncoderRuntime.TORCH_BF16:
        return _torch_bf16(encoder)
    return _torch_int8(encoder)


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
    turned into constants, as wanted here; TorchScript's deprecation notes)."""
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)


def _torch_bf16(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(images).float()

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


def _one_image_at_a_time(infer: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A runtime's single-image call (a (1, 3, S, S) float32 array in, its embedding out) as a batch encoder on
    tensors; the output is copied out of the runtime's buffers, which its next call overwrites."""

    def run(images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().cpu().float().numpy()
        outputs = [np.array(infer(batch[i : i + 1]), dtype=np.float32) for i in range(len(batch))]
        return torch.from_numpy(np.concatenate(outputs))

    return run


def _onnx_export(build: Callable[[], nn.Module], example: torch.Tensor, root: Path, weights_key: str) -> Path:
    """The encoder exported to ONNX (TorchScript exporter, opset 17), cached on disk; ``build`` is called only to
    export."""

    def export(target: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                build(),
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
    return folder / "encoder.onnx"


def _onnxruntime(
    build: Callable[[], nn.Module], example: torch.Tensor, root: Path, weights_key: str, threads: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph = _onnx_export(build, example, root, weights_key)
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    return _one_image_at_a_time(lambda image: session.run(None, {"image": image})[0])


def _openvino(
    build: Callable[[], nn.Module], example: torch.Tensor, root: Path, weights_key: str, threads: int, bf16: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """OpenVINO's CPU plugin on the encoder's graph, read from the ONNX export: on LiteMedSAM's TinyViT that graph
    runs 8 % faster than OpenVINO's own conversion of the PyTorch module (0.37 s against 0.40 s a slice on a 2-core
    Xeon), with the same embedding to 4e-6."""
    import openvino

    if bf16 and not native_bfloat16():
        raise InputError(
            "this CPU has no native bfloat16 (AMX or AVX-512 BF16): the openvino-bf16 encoder would be emulated and "
            "slower than float32; use --encoder openvino"
        )

    def convert(target: Path) -> None:
        graph = openvino.convert_model(str(_onnx_export(build, example, root, weights_key)))
        openvino.save_model(graph, str(target / "encoder.xml"), compress_to_fp16=False)

    # one float32 graph for both precisions: bf16 is the CPU plugin's execution precision, chosen at compile time
    size = int(example.shape[-1])
    version = f"{openvino.__version__}|torch {torch.__version__}"
    folder = _cached(_cache_folder(root, "openvino", weights_key, size, version, "f32-onnx"), ("encoder.xml",), convert)
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
    }
    core = openvino.Core()
    request = core.compile_model(str(folder / "encoder.xml"), "CPU", config).create_infer_request()

    return _one_image_at_a_time(lambda image: request.infer({0: image})[0])


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
