"""Device and mixed-precision selection: one config value picks bf16 / fp16 / fp32."""

from __future__ import annotations

import contextlib
import functools
from typing import get_args

import torch

from .config import Precision
from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device, refusing with one line what this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and (not name.startswith("cuda") or not (name == "cuda" or name[5:].isdigit()
                                                             and name[4] == ":")):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = open("/proc/cpuinfo").read()
            return "avx512_bf16" in flags or "amx_bf16" in flags
    except Exception:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware does bf16 natively, fp16 on CUDA without bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weight dtype for decoding: 'auto' -> bf16 where the hardware does bf16 natively (decoding is
    bound by reading the weights, and bf16 halves that: benchmarks row 3), else fp32 (fp16 weights without
    autocast can overflow a model trained in fp32/bf16, so only an explicit 'fp16' gives them)."""
    if precision not in get_args(Precision):
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(get_args(Precision))}")
    resolved = resolve_precision(precision, device)    # refuses fp16 off CUDA
    if precision == "auto" and resolved == "fp16":
        resolved = "fp32"
    return DTYPES[resolved]


def for_decoding(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """``model`` ready to decode in ``precision``: its weights in :func:`inference_dtype`, or for 'int8'
    weight-only int8 linear layers (``minilm.quant``) with activations in bf16 where the hardware does it
    natively, else fp32. Returns the model (changed in place)."""
    if precision == "int8":
        from .quant import quantize_int8

        return quantize_int8(model, inference_dtype("auto", device))
    return model.to(inference_dtype(precision, device))


def check_decode_precision(precision: str, device: torch.device) -> None:
    """Refuse a decoding precision the device cannot run, in one line, before any loading."""
    if precision != "int8":
        inference_dtype(precision, device)


def uses_tf32(device: torch.device, precision: str) -> bool:
    """Whether float32 matmuls should run on TF32 tensor cores: on CUDA when the resolved precision is
    fp32 (under bf16/fp16 autocast the matmuls are already half precision). TF32 keeps fp32's range and
    a 10-bit mantissa, accumulates in fp32, and runs fp32 matmuls several times faster on Ampere and
    later; CPU arithmetic is never changed."""
    return device.type == "cuda" and precision == "fp32"


def set_matmul_precision(device: torch.device, precision: str) -> bool:
    """Allow TF32 for CUDA float32 matmuls (cuBLAS) and convolutions (cuDNN) when :func:`uses_tf32`
    says so (a process-wide setting; nothing is changed otherwise). Returns whether TF32 is on.

    The per-backend flags, not ``torch.set_float32_matmul_precision``: that one also switches oneDNN's
    CPU matmuls, and the newer ``fp32_precision`` attributes, set for CUDA alone, make
    ``torch.get_float32_matmul_precision()`` (which inductor calls) raise."""
    if uses_tf32(device, precision):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return tf32_enabled()


def tf32_enabled() -> bool:
    """Whether CUDA float32 matmuls in this process may use TF32 (False without CUDA)."""
    return torch.cuda.is_available() and bool(torch.backends.cuda.matmul.allow_tf32)


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
