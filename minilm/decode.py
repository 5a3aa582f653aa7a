"""A compiled decode step: one new token per row over a static-shape KV cache, one graph for every step.

The eager loop (``GPT.forward`` with a :class:`~minilm.model.KVCache`) slices the cache to the filled
length, so every token has new shapes, and it dispatches ~300 small ops a token from Python: at batch 1
on a CPU that per-op overhead, not the weight bytes, is most of a token's time (benchmarks row 3). Here
the shapes never change from one token to the next:

- the cache is the model's one preallocated tensor for the whole layer stack, ``KVCache.kv``
  (n_layer, 2, B, n_kv_head, S, head_dim); after a step, all its keys/values go in at ``slot`` (a
  1-element tensor, not a Python int) with one ``index_copy_`` into that tensor, outside the graph
  (written inside, inductor copied the whole cache every token);
- attention always reads all S slots, with ``key_mask`` (B, S) hiding the unfilled ones (and the left
  padding of shorter prompts), plus the new token's own key and value;
- rotary positions (B,) and the slot are tensors that the step advances itself.

So :func:`decode_step` compiles once per (model, batch, S, dtype) with ``fullgraph=True`` (no graph breaks:
the layer loop unrolls over a fixed ``nn.ModuleList``) and never recompiles per token
(tests/test_fast_decode.py counts the compilations). The prefill stays eager (it runs once). Sampling
stays outside the graph, in :mod:`minilm.sampling`, so its results are the eager loop's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .model import KVCache, apply_rope, compute_dtype

CACHE_ROUND = 64          # S is rounded up to a multiple of this (fewer distinct shapes to compile)
_compiled: dict[str, Callable[..., Any]] = {}


def cache_length(needed: int, context_length: int) -> int:
    """The static cache length S for ``needed`` slots: rounded up to a multiple of :data:`CACHE_ROUND`,
    at most the context length."""
    return min(context_length, -(-needed // CACHE_ROUND) * CACHE_ROUND)


def _attend(attn: nn.Module, h: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention of one new token per row: h (B, 1, d), kv (2, B, Hkv, S, hd) the layer's cache before
    this token, bias (B, 1, 1, S) fp32 additive mask. Returns the output (B, 1, d) and the token's own key
    and value (B, Hkv, 1, hd), which attend here without being in the cache yet."""
    B, H, Hkv, hd = h.shape[0], attn.n_head, attn.n_kv_head, attn.head_dim
    q = apply_rope(attn.q_proj(h).view(B, Hkv, H // Hkv, hd), cos, sin)      # (B, Hkv, G, hd)
    k = apply_rope(attn.k_proj(h).view(B, Hkv, 1, hd), cos, sin).to(kv.dtype)
    v = attn.v_proj(h).view(B, Hkv, 1, hd).to(kv.dtype)
    # scores (B, Hkv, G, S + 1): the cache's slots, then the token itself. Broadcast products and sums,
    # which inductor fuses with the softmax and the weighted sum into a few loops (a GEMV-sized bmm
    # would be one more library call per layer).
    scale = hd ** -0.5
    cached = (q.unsqueeze(3) * kv[0].unsqueeze(2)).sum(-1, dtype=torch.float32) * scale + bias
    own = (q * k).sum(-1, keepdim=True, dtype=torch.float32) * scale
    p = torch.cat([cached, own], dim=-1).softmax(-1)
    S = kv.shape[3]
    y = (p[..., :S, None] * kv[1].unsqueeze(2)).sum(-2) + p[..., S:] * v      # (B, Hkv, G, hd) fp32
    return attn.o_proj(y.to(q.dtype).reshape(B, 1, H * hd)), k, v


def decode_step(net: nn.Module, kv: torch.Tensor, key_mask: torch.Tensor, tokens: torch.Tensor,
                slot: torch.Tensor, positions: torch.Tensor):
    """Logits (B, V) fp32 of the token after ``tokens`` (B, 1), at cache slot ``slot`` (1,) with rotary
    ``positions`` (B,). Also returns the token's keys and values (n_layer, 2, B, Hkv, 1, hd), for the
    caller to write at ``slot`` of ``kv`` (n_layer, 2, B, Hkv, S, hd), and the key mask, slot and
    positions of the next step. The step reads ``kv`` and mutates nothing: inductor turned an in-graph
    write into the cache into a copy of the whole cache per token."""
    bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=kv.device)
    bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]          # (B, 1, 1, S)
    x = net.model.embed_tokens(tokens)                                          # (B, 1, d)
    cos = net.rope_cos[positions][:, None, None, :].to(x.dtype)                 # (B, 1, 1, hd)
    sin = net.rope_sin[positions][:, None, None, :].to(x.dtype)
    new = []
    for i, block in enumerate(net.model.layers):
        h = compute_dtype(block.input_layernorm(x))
        a, k, v = _attend(block.self_attn, h, kv[i], bias, cos, sin)
        new.append(torch.stack([k, v]))
        if block.parallel:
            x = x + a + block.mlp(h)
        else:
            x = x + a
            x = x + block.mlp(compute_dtype(block.post_attention_layernorm(x)))
    logits = net.lm_head(net.model.norm(x))[:, 0].float()
    return logits, torch.stack(new), key_mask.index_fill(1, slot, True), slot + 1, positions + 1


def compiled_step(mode: str | None = None) -> Callable[..., Any]:
    """:func:`decode_step` under ``torch.compile`` (fullgraph, static shapes), made once per process.
    Dynamo caches a graph per (model structure, batch, S, dtype); the first call of each compiles."""
    key = mode or "default"
    if key not in _compiled:
        _compiled[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _compiled[key]


class StaticDecoder:
    """Decode steps over a prefilled :class:`KVCache` with :func:`decode_step`, compiled or not.

    ``decoder(tokens)`` (B,) appends one token per row and returns the logits (B, V) fp32 of the next.
    """

    def __init__(self, net: nn.Module, cache: KVCache, *, compile: bool = True):
        self.net, self.kv = net, cache.kv
        S, device = cache.max_len, cache.kv.device
        if cache.key_mask is not None:
            self.key_mask = cache.key_mask.clone()
        else:
            self.key_mask = (torch.arange(S, device=device) < cache.pos).expand(cache.batch, S).clone()
        self.slot = torch.tensor([cache.pos], device=device)
        self.positions = cache.next_position.clone()
        self.step = compiled_step() if compile else decode_step
        self.free = S - cache.pos

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.free <= 0:
            raise ValueError(f"KV cache is full ({self.kv.shape[4]} slots)")
        self.free -= 1
        logits, new, key_mask, slot, self.positions = self.step(
            self.net, self.kv, self.key_mask, tokens[:, None], self.slot, self.positions)
        self.kv.index_copy_(4, self.slot, new)
        self.key_mask, self.slot = key_mask, slot
        return logits
