"""Weight-only int8 for decoding: every linear layer's weight as int8 with one scale per output channel.

Decoding at batch 1 reads every weight once per token, so it is bound by weight bytes and per-op
overhead, not FLOPs; int8 weights are a quarter of fp32's bytes and half of bf16's. Activations stay in the
compute dtype (bf16 where the CPU has it natively, else fp32) and the matrix product runs in
``aten._weight_int8pack_mm`` (x @ (w_int8 * scale).T without materialising the float weight). The
embedding table, the norms and the KV cache keep the compute dtype; a tied LM head gets its own int8
copy of the embedding matrix (the lookup still reads the float table).

Symmetric per-channel quantisation: ``scale = max|w_row| / 127``, ``w_int8 = round(w / scale)``. The
quality cost is measured, not assumed: tests/test_quant.py and benchmarks row 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 per-row scale) with ``weight ~= w_int8 * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and per-output-channel scales (inference only)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        device = linear.weight.device
        self.register_buffer("weight_int8", q.to(device))
        self.register_buffer("scale", scale.to(device=device, dtype=dtype))
        self.register_buffer("bias", None if linear.bias is None
                             else linear.bias.detach().to(device=device, dtype=dtype))
        self._packed = device.type == "cpu"     # aten's int8 kernel; elsewhere dequantise per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        if self._packed:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8,
                                                   self.scale).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Cast ``model`` to ``dtype`` and replace every ``nn.Linear`` (the attention and MLP projections and
    the LM head) by an :class:`Int8Linear`, in place; returns it in eval mode. For decoding only: the
    quantised layers have no parameters to train and do not round-trip into a checkpoint."""
    model.to(dtype)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(linear, dtype))
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decoding step reads (parameters and int8 buffers; not the RoPE tables)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *(m.weight_int8 for m in model.modules() if isinstance(m, Int8Linear))]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
