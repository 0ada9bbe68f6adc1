"""Fused CPU kernels for inference: RMSNorm, SwiGLU, rotary, one-query attention, bf16 GEMV, and a whole
one-token decode step built from them (`DecodePlan`, driven by `runtime/fused_decode.py`).

Eager decoding on the CPU spends close to a third of each token outside the weight GEMVs, in ops that
each touch a few kilobytes: a norm is six aten ops, rotary five per tensor, SwiGLU two, and every one
of them pays the dispatcher and the cache misses the GEMVs leave behind. `decode.cpp` does each in one
call, and splits a decode step's attention over the keys so both cores work even with three kv heads.
In bfloat16 the weight GEMVs themselves are the problem: oneDNN streams bf16 weights well below the
memory bandwidth on the CPU, and `linear` widens them in registers at full speed.

They run where they can stand in for the torch ops: plain CPU tensors in float32 or bfloat16 with
gradients off (inference). Under `torch.compile` inductor fuses the small ops itself, and graphs call
only the two kernels it does not beat: decode attention and the bfloat16 GEMV. RMSNorm, SwiGLU and
rotary match torch bit for bit; attention and the GEMV, different algorithms, to float rounding.
The library is built with the system C++ compiler against the installed torch the first time it is
needed (seconds, once), then cached per source, torch version and instruction set under `$SPECFORMER_CACHE`
(default `~/.cache/specformer`). Without a compiler the torch ops run, after one warning;
`SPECFORMER_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
HEADERS = (
    "kernels.h",
    "decode_step.h",
    "packed_gemv.h",
    "int8_dot.h",
)  # included by SOURCE: one translation unit
# torch's vectorised types take their width from these macros. torch registers most of its CPU kernels
# (sum, silu, ...) for AVX2 only, also on AVX512 machines; built for AVX2 too, our reductions add in
# the same order and our exp is the same function, so results match torch's bit for bit.
_AVX2 = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
# AVX-512 goes only to the GEMV and attention loops, and tells the SwiGLU kernel that torch's silu runs
# its AVX-512 build (two 16-lane vectors a step).
_ISA_FLAGS = {"AVX512": [*_AVX2, "-DSPECFORMER_AVX512", "-DSPECFORMER_SILU_STEP=32"], "AVX2": _AVX2}
_DTYPES = (torch.float32, torch.bfloat16)
_PLAIN = (torch.Tensor, nn.Parameter)  # not DTensor or other subclasses: they need their own dispatch
_lock = threading.Lock()


def applies(*tensors: torch.Tensor) -> bool:
    """True when the kernels can stand in for torch's ops on `tensors` (building them on first use)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    for t in tensors:  # called several times per layer and token: the cheapest checks
        if not t.is_cpu or t.dtype not in _DTYPES or type(t) not in _PLAIN:
            return False
    return ops() is not None


def applies_compiled_too(*tensors: torch.Tensor) -> bool:
    """`applies`, and inside compiled graphs too: for the kernels inductor does not beat (decode
    attention over a static cache's masked slots, the bfloat16 GEMV), where it fuses everything around
    them. A graph can only call kernels already loaded, which the eager prefill before it has done."""
    if not torch.compiler.is_compiling():
        return applies(*tensors)
    if torch.is_grad_enabled() or not _loaded:
        return False
    return all(t.is_cpu and t.dtype in _DTYPES and type(t) in _PLAIN for t in tensors)


def packed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    int8_activations: bool = False,
) -> torch.Tensor:
    """x @ W.T + bias for a few rows of x, W packed as int8 (`bits=8`) or two 4-bit values a byte with
    per-group scales and offsets (`bits=4`): no float copy of W. Each weight is widened in registers, or
    with `int8_activations` x is rounded to int8 per block of 32 and the products are integer dot
    products, as llama.cpp computes them (groups of 32 for int4, multiples of 32 for int8)."""
    return torch.ops.specformer_cpu.packed_linear(x, weight, scales, offsets, bias, bits, int8_activations)


def dequantize_packed(
    weight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float (N, K) weight of a packed int8/int4 matrix, in one parallel pass; into `out` (N * K values
    of `dtype`, contiguous; returned reshaped) when given."""
    if out is None:
        return torch.ops.specformer_cpu.dequantize_packed(weight, scales, offsets, bits, dtype)
    if out.dtype != dtype:
        raise ValueError(f"dequantize_packed: out is {out.dtype}; expected {dtype}")
    torch.ops.specformer_cpu.dequantize_packed_into(out, weight, scales, offsets, bits)
    return out.view(weight.shape[0], -1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a few rows of x, streaming weight once (float32 accumulation)."""
    return torch.ops.specformer_cpu.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; bfloat16 rounds where Llama's norm does."""
    return torch.ops.specformer_cpu.rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the SwiGLU product, in one pass."""
    return torch.ops.specformer_cpu.silu_mul(gate, up)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, H, T, D) rotated by cos and signed sin (B|1, 1, T, D), as `apply_rotary` does."""
    return torch.ops.specformer_cpu.rotary(q, k, cos, signed_sin)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, 1, D) over k, v (B, Hkv, S, D); `allowed` (B|1, S) masks keys."""
    return torch.ops.specformer_cpu.decode_attention(q, k, v, allowed, scale)


@functools.cache
def ops() -> Any:
    """torch.ops.specformer_cpu, built and loaded once per process; None when off or unavailable."""
    if os.environ.get("SPECFORMER_CPU_KERNELS", "1") == "0":
        return None
    try:
        load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"specformer's fused CPU kernels are unavailable ({error}); CPU inference uses torch's ops "
            "instead, which decode more slowly. Set SPECFORMER_CPU_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return torch.ops.specformer_cpu


_loaded: list[Path] = []


def load() -> None:
    """Build (or find) the library and load it into torch.ops, at most once per process: the operators
    register under one name, so a second build (say, of an edited source) must not load too."""
    with _lock:
        if not _loaded:
            path = build()
            torch.ops.load_library(str(path))
            # What tracing needs to know of the kernels compiled graphs call: their outputs' shapes.
            torch.library.register_fake("specformer_cpu::decode_attention")(_decode_attention_shape)
            torch.library.register_fake("specformer_cpu::linear")(_linear_shape)
            _loaded.append(path)


def _decode_attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return q.new_empty(q.shape)


def _linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def build(cache: Path | None = None) -> Path:
    """Compile decode.cpp for this torch and CPU unless a cached build exists; return the library's path."""
    command = compile_command()
    digest = hashlib.sha256(SOURCE.read_bytes())
    for header in HEADERS:
        digest.update(SOURCE.with_name(header).read_bytes())
    digest.update(" ".join([torch.__version__, *command]).encode())
    cache = cache or Path(os.environ.get("SPECFORMER_CACHE", Path.home() / ".cache" / "specformer"))
    target = cache / "kernels" / f"specformer_cpu-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building specformer's CPU kernels (once per torch version): %s", target)
    # Built under a temporary name and renamed: a concurrent process never loads a half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([*command, "-o", partial], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"`{command[0]}` failed to build {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def compile_command() -> list[str]:
    """The compiler invocation for decode.cpp (without `-o`), matching the installed torch's ABI."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    torch_lib = cpp_extension.library_paths()[0]
    command = [compiler, str(SOURCE), "-shared", "-fPIC", "-O3", "-std=c++20", "-ffp-contract=off"]
    command += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += [f"-I{path}" for path in cpp_extension.include_paths()]
    command += _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    if "-DSPECFORMER_AVX512" in command and getattr(torch.cpu, "_is_avx512_bf16_supported", bool)():
        command.append("-DSPECFORMER_AVX512_BF16")  # the CPU's own float32 -> bfloat16 conversion
    command += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in the header; link the libgomp torch already loaded, not a second one.
        command += ["-fopenmp", "-lgomp"]
    return command
