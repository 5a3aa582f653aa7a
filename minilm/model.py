"""A decoder-only Transformer in the Llama layout, written to be read top to bottom.

RMSNorm -> rotary embeddings -> grouped-query attention (SDPA, or explicit matmuls for bf16 on CPU) ->
SwiGLU -> block -> model.
Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``,
``model.layers.0.mlp.gate_proj``, ``lm_head`` ...), and the rotary layout is rotate-half, so exporting a
sequential-layout model to transformers is a copy of the state dict.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


# --------------------------------------------------------------------------------------------------
# rotary position embeddings (real-valued, rotate-half layout as in transformers' Llama)


def rope_cache(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)                      # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)               # (T, head_dim)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin broadcast to it: (1, 1, T, hd) or (B, 1, T, hd). Computed in x's dtype
    # (as transformers' Llama does under autocast): no fp32 temporaries for bf16 activations.
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# attention kernel

_BACKENDS = ("auto", "sdpa", "matmul")
_backend = "auto"


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Compute attention with ``"sdpa"`` (``F.scaled_dot_product_attention``), ``"matmul"`` (explicit
    batched matmuls and a softmax) or ``"auto"`` (matmul for bf16 on CPU, SDPA otherwise, the default)
    inside the block. Both give the same result up to rounding (tests/test_model.py)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _use_matmul(q: torch.Tensor) -> bool:
    if _backend == "auto":
        # For bf16 on CPU the flash kernel is slower than plain bf16 GEMMs at our sizes, forward and
        # backward (benchmarks row 1: minilm bf16 vs minilm bf16 sdpa); in fp32 and on GPUs SDPA is as
        # fast or faster. One query (a decode step) stays on SDPA: oneDNN's bf16 bmm is re-JITted for
        # every new key length.
        return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] > 1
    return _backend == "matmul"


def _bias(mask: torch.Tensor | None, is_causal: bool, Tq: int, Tk: int, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor | None:
    """Additive mask (0 where a query may attend, -inf elsewhere), broadcastable to (B, H, Tq, Tk). Built
    per call (microseconds): a cache keyed by shape would make torch.compile recompile per length."""
    if mask is not None:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    if not is_causal:
        return None
    return torch.full((Tq, Tk), float("-inf"), dtype=dtype, device=device).triu(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, H, Tq, hd) and k, v (B, Hkv, Tk, hd), H a multiple of
    Hkv (query head h reads key/value head h // (H / Hkv)). ``mask``: bool, broadcastable to
    (B, H, Tq, Tk), True = may attend; ``is_causal``: the lower-triangular mask (Tq == Tk)."""
    H, Hkv = q.shape[1], k.shape[1]
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError("is_causal needs as many queries as keys; pass an explicit mask instead")
    if not _use_matmul(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout_p, enable_gqa=H != Hkv)
    B, _, Tq, hd = q.shape
    Tk = k.shape[2]
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    with torch.autocast(q.device.type, enabled=False):   # dtypes are explicit from here on
        qf, kf, vf = q.reshape(B * H, Tq, hd), k.reshape(B * H, Tk, hd), v.reshape(B * H, Tk, hd)
        bias = _bias(mask, is_causal, Tq, Tk, q.dtype, q.device)
        if bias is None:   # beta=0: the input is ignored, the scale is applied before rounding
            scores = torch.baddbmm(qf.new_zeros(()), qf, kf.transpose(1, 2), beta=0.0, alpha=hd ** -0.5)
        else:
            bias = bias.expand(B, H, Tq, Tk).reshape(B * H, Tq, Tk)
            scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), alpha=hd ** -0.5)
        p = scores.softmax(-1)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p)
        return torch.bmm(p, vf).view(B, H, Tq, hd)


# --------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for incremental decoding of a batch.

    ``kv``: one tensor for the layer stack, (n_layer, 2, B, n_kv_head, max_len, head_dim); ``k``/``v`` are
    its views (n_layer, B, n_kv_head, max_len, head_dim). ``pos`` is the number of slots filled (the
    same for every row). With left-padded prompts, ``key_mask`` (B, max_len) marks real tokens and
    ``next_position`` (B,) holds each row's next rotary position.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if max_len > cfg.context_length:
            raise ValueError(f"cache length {max_len} exceeds the model's context_length "
                             f"{cfg.context_length}")
        shape = (cfg.n_layer, 2, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)   # minilm.decode's compiled step reads it
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]
        self.max_len = max_len
        self.pos = 0
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool, only when padding is present
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]


@dataclass
class _Step:
    """Per-forward attention context shared by every layer."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None   # bool (B, 1, Tq, Tk), True = may attend; None = see is_causal
    is_causal: bool
    cache: KVCache | None
    start: int                  # first cache slot written by this forward


# --------------------------------------------------------------------------------------------------
# attention, feed-forward, block


def compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """``h`` in the autocast dtype when autocast is on, else unchanged: a norm's output cast once for the
    projections that read it (q, k, v or gate, up, and any LoRA A), instead of once per projection by
    autocast. The same rounding either way."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return h.to(torch.get_autocast_dtype(device))
    return h


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q = apply_rope(q, step.cos, step.sin)
        k = apply_rope(k, step.cos, step.sin)
        if step.cache is not None:
            c, end = step.cache, step.start + T
            c.k[layer, :, :, step.start:end] = k
            c.v[layer, :, :, step.start:end] = v
            k, v = c.k[layer, :, :, :end], c.v[layer, :, :, :end]
        y = attention(q, k, v, mask=step.mask, is_causal=step.is_causal,
                      dropout_p=self.dropout if self.training else 0.0)               # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_dim
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """``sequential``: x += attn(norm1(x)); x += mlp(norm2(x))  (Llama).
    ``parallel``:   h = norm1(x); x += attn(h) + mlp(h)      (one norm, side by side)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.block == "parallel"
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(cfg)
        self.mlp = SwiGLU(cfg)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
        h = compute_dtype(self.input_layernorm(x))
        if self.parallel:
            return x + self.resid_drop(self.self_attn(h, step, layer) + self.mlp(h))
        x = x + self.resid_drop(self.self_attn(h, step, layer))
        return x + self.resid_drop(self.mlp(compute_dtype(self.post_attention_layernorm(x))))


class Decoder(nn.Module):
    """Embedding, blocks and final norm (``LlamaModel``'s place in the hierarchy)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)


# --------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.model = Decoder(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(cfg.context_length, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norm weights start at one, every bias at zero
                is_norm_weight = name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
                nn.init.ones_(p) if is_norm_weight else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_parameters(self, *, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
        return count_parameters(self, trainable_only=trainable_only,
                                exclude=("model.embed_tokens.weight",) if exclude_embeddings else ())

    def _rope(self, positions: torch.Tensor | None, start: int, T: int):
        if positions is None:
            return self.rope_cos[start:start + T][None, None], self.rope_sin[start:start + T][None, None]
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T).

        Without a cache this is the ordinary causal forward. With a cache, the tokens are appended to
        it (prefill or decode). ``attention_mask`` (B, T_total_so_far) marks real tokens (1) and left
        padding (0); pass it on the prefill call of a batch of prompts of different lengths.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length "
                             f"{self.config.context_length}")
        mask, positions, is_causal = None, None, False
        if cache is None:
            if attention_mask is not None:
                positions, mask = _padded_mask(attention_mask.bool(), T, 0)
            else:
                is_causal = T > 1
        else:
            if cache.batch != B:
                raise ValueError(f"cache holds {cache.batch} rows, got a batch of {B}")
            if T > cache.max_len - start:
                raise ValueError(f"KV cache is full ({cache.max_len} slots)")
            if attention_mask is not None:
                cache.key_mask = torch.zeros(B, cache.max_len, dtype=torch.bool, device=idx.device)
                cache.key_mask[:, :attention_mask.shape[1]] = attention_mask.bool()
            if cache.key_mask is not None:
                cache.key_mask[:, start:start + T] |= attention_mask is None
                positions, mask = _padded_mask(cache.key_mask[:, :start + T], T, start)
                cache.next_position = positions[:, -1] + 1
            else:
                is_causal = start == 0 and T > 1
                if T > 1 and start > 0:  # chunked prefill: explicit causal mask, offset by start
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)
                cache.next_position = torch.full((B,), start + T, device=idx.device)
        cos, sin = self._rope(positions, start, T)
        step = _Step(cos, sin, mask, is_causal, cache, start)
        x = self.drop(self.model.embed_tokens(idx))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, step, i)
        if cache is not None:
            cache.pos = start + T
        return self.lm_head(self.model.norm(x))


def _padded_mask(key_mask: torch.Tensor, T: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions (B, T) and attention mask (B, 1, T, start+T) for left-padded rows.

    A real token attends to the real tokens at or before it; a padding query attends to itself only
    (its output is never used, but a row with nothing to attend to would give NaN).
    """
    total = start + T
    positions_all = (key_mask.long().cumsum(-1) - 1).clamp(min=0)       # (B, total)
    positions = positions_all[:, start:]
    causal = torch.ones(T, total, dtype=torch.bool, device=key_mask.device).tril(start)
    mask = causal[None] & key_mask[:, None, :]                           # (B, T, total)
    diag = torch.zeros(T, total, dtype=torch.bool, device=key_mask.device)
    diag[torch.arange(T, device=key_mask.device), torch.arange(start, total, device=key_mask.device)] = True
    mask = mask | (diag[None] & ~key_mask[:, start:, None])
    return positions, mask.unsqueeze(1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose target is not -100 (computed in fp32)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (whose state-dict keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def count_parameters(model: nn.Module, *, trainable_only: bool = False, exclude: tuple[str, ...] = ()) -> int:
    """Distinct parameters (a tied embedding/head counts once), optionally only trainable ones."""
    seen, total = set(), 0
    for name, p in unwrap_compiled(model).named_parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        if name not in exclude:
            total += p.numel()
    return total
