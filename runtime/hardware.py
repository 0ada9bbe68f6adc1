"""What this machine can do: the compute device, its dtypes, and which optional packages are usable.

Optional packages (flash-attn, bitsandbytes, triton) are probed with `importlib.util.find_spec`, never
imported here, so `import specformer` stays fast and cannot fail because one of them is missing or broken.
`require(...)` imports a package on first real use and, if it is absent, says which pip extra to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("specformer")

# package -> (import name, pip extra of specformer that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "flash_attn": ("flash_attn", "gpu"),
    "bitsandbytes": ("bitsandbytes", "quant"),
    "triton": ("triton", "gpu"),
    "gguf": ("gguf", "demo"),
}


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed (or not usable on this machine)."""


def available_memory() -> int | None:
    """Memory the kernel can hand out without swapping (MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_installed(package: str) -> bool:
    """Whether `package` can be found, without importing it; a broken install counts as absent."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require(package: str, feature: str) -> ModuleType:
    """Import optional `package` for `feature`, or raise an error naming the pip extra that installs it."""
    module_name, extra = OPTIONAL_PACKAGES.get(package, (package, None))
    if not is_installed(module_name):
        hint = f'pip install "specformer[{extra}]"' if extra else f"pip install {package}"
        raise MissingDependencyError(
            f"{feature} needs the `{package}` package, which is not installed; run: {hint}"
        )
    return importlib.import_module(module_name)


def default_device() -> torch.device:
    """The best available accelerator: cuda (also ROCm), then xpu, then mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def supports_dtype(dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Whether `device` computes in `dtype` natively (CPUs emulate half precision: correct but slow)."""
    device = torch.device(device) if device is not None else default_device()
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return torch.cuda.is_bf16_supported()
        return dtype == torch.float16
    if device.type == "mps":
        return dtype == torch.float16 or (
            dtype == torch.bfloat16 and torch.backends.mps.is_macos_or_newer(14, 0)
        )
    if device.type == "xpu":
        return dtype in (torch.float16, torch.bfloat16)
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def supports_tf32(device: torch.device | str | None = None) -> bool:
    """TF32 matmuls exist on NVIDIA Ampere (compute capability 8.0) and newer."""
    device = torch.device(device) if device is not None else default_device()
    return (
        device.type == "cuda"
        and torch.version.cuda is not None
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def flash_attn_2_unusable_reason(
    dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> str | None:
    """Why FlashAttention-2 cannot run here, or None when it can."""
    device = torch.device(device) if device is not None else default_device()
    if not is_installed("flash_attn"):
        return (
            'the `flash_attn` package is not installed (pip install "specformer[gpu]", needs CUDA to build)'
        )
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only and this model is on `{device.type}`"
    if torch.version.cuda is not None and torch.cuda.get_device_capability(device)[0] < 8:
        return "it needs an Ampere (sm80) or newer GPU"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"it computes in float16 or bfloat16 only, and the model is in {dtype}; load with dtype=torch.bfloat16"
    return None


def is_flash_attn_2_available(
    dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> bool:
    return flash_attn_2_unusable_reason(dtype, device) is None


@functools.cache
def is_bitsandbytes_available() -> bool:
    """bitsandbytes is installed; since 0.45 it also runs (slowly) on CPU, so no device is required."""
    return is_installed("bitsandbytes")


def is_triton_available(device: torch.device | str | None = None) -> bool:
    """Triton kernels can run: on a CUDA/XPU device, or anywhere under TRITON_INTERPRET=1 (for tests)."""
    if not is_installed("triton"):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    device = torch.device(device) if device is not None else default_device()
    return device.type in ("cuda", "xpu")


def is_flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def best_attention(dtype: torch.dtype, device: torch.device | str) -> str:
    """The fastest attention backend usable for this dtype and device, logged so the choice is visible."""
    device = torch.device(device)
    if device.type == "cpu":
        choice = "specformer_cpu"  # SDPA, with specformer's kernel for one-query (decoding) steps
    else:
        choice = "flash_attention_2" if is_flash_attn_2_available(dtype, device) else "sdpa"
    logger.info("attention backend: %s (for %s on %s)", choice, dtype, device.type)
    return choice
