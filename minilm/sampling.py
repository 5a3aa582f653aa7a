"""Text generation: batched prompts, a preallocated KV cache, one token per step.

Prompts of different lengths are left-padded and prefilled together (``attention_mask`` marks the padding);
then every row gets one new token per step. Each step the logits go through small pure functions, in
this order: repetition penalty -> bans (recent-token window, repeated n-grams, eos before
``min_new_tokens``) -> greedy argmax (temperature 0) or temperature -> top-k -> top-p -> a seeded draw.

Context length: the prompt and the new tokens together fit in ``context_length``. A prompt longer than
``context_length - max_new_tokens`` keeps only its last tokens (at least one, with a warning); when
``max_new_tokens`` alone reaches the context length, generation stops at the context length.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .config import SampleConfig
from .decode import StaticDecoder, cache_length
from .errors import DataError
from .model import KVCache, unwrap_compiled

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# logits processors: (B, V) logits and the rows so far, tokens (B, L) with valid (B, L) False on padding


def token_mask(tokens: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: True for every token id present at a valid position of its row."""
    idx = tokens.masked_fill(~valid, vocab_size)          # padding goes to a spare column
    mask = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.bool, device=tokens.device)
    mask.scatter_(1, idx, True)
    return mask[:, :vocab_size]


def repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                       penalty: float) -> torch.Tensor:
    """CTRL / Hugging Face penalty on every token already in the row (prompt included): a positive logit
    is divided by ``penalty``, a negative one multiplied by it."""
    if penalty == 1.0:
        return logits
    seen = token_mask(tokens, valid, logits.shape[-1])
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def recent_ban(tokens: torch.Tensor, valid: torch.Tensor, window: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens among the last ``window`` tokens of each row (prompt included)."""
    return token_mask(tokens[:, -window:], valid[:, -window:], vocab_size)


def ngram_ban(tokens: torch.Tensor, valid: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens that would complete an ``n``-gram already present in the row."""
    B, L = tokens.shape
    if L < n:
        return torch.zeros(B, vocab_size, dtype=torch.bool, device=tokens.device)
    grams = tokens.unfold(1, n, 1)                         # (B, L-n+1, n): every n-gram of the row
    ok = valid.unfold(1, n, 1).all(-1)                     # (B, L-n+1): made of real tokens only
    if n > 1:
        suffix = tokens[:, L - n + 1:]                     # (B, n-1): what the next token would extend
        ok = ok & (grams[:, :, :-1] == suffix[:, None, :]).all(-1)
        ok = ok & valid[:, L - n + 1:].all(-1, keepdim=True)
    return token_mask(grams[:, :, -1], ok, vocab_size)


def apply_bans(logits: torch.Tensor, ban: torch.Tensor) -> torch.Tensor:
    """-inf where ``ban`` is True. A row whose every token is banned is left as it was (it has to emit
    something; this only happens with a vocabulary smaller than the bans)."""
    ban = ban & ~ban.all(-1, keepdim=True)
    return logits.masked_fill(ban, NEG_INF)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits of each row (ties with the k-th included); 0 = off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]    # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of top tokens whose probability reaches ``p`` (the top
    token is always kept); 1.0 = off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs                 # probability of the strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def process_logits(logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, cfg: SampleConfig,
                   n_new: int, eos_id: int | None) -> torch.Tensor:
    """Penalty and bans for the next token, given ``n_new`` tokens generated so far."""
    vocab = logits.shape[-1]
    logits = repetition_penalty(logits, tokens, valid, cfg.repetition_penalty)
    ban = None
    if cfg.ban_window > 0:
        ban = recent_ban(tokens, valid, cfg.ban_window, vocab)
    if cfg.no_repeat_ngram > 0:
        grams = ngram_ban(tokens, valid, cfg.no_repeat_ngram, vocab)
        ban = grams if ban is None else ban | grams
    if eos_id is not None and n_new < cfg.min_new_tokens:
        if ban is None:
            ban = torch.zeros_like(logits, dtype=torch.bool)
        ban[:, eos_id] = True
    return logits if ban is None else apply_bans(logits, ban)


def select_next(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) next tokens: argmax at temperature 0, else a draw after temperature, top-k and top-p."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# stop strings


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    i = find_stop(text, stops)
    return text if i < 0 else text[:i]


def stop_window(stops: Sequence[str]) -> int:
    """Tokens of a row to decode each step to see whether the newest one completed a stop string: a
    token is at least one byte, so the string lies in the last ``max bytes`` tokens; 8 more keep it off
    the window's first token (whose leading space a SentencePiece decode drops, and which may be a
    partial UTF-8 character). Decoding only these keeps each step's cost flat as the answer grows."""
    return max(len(s.encode("utf-8")) for s in stops) + 8


def _trim_ids(ids: list[int], decode: Callable[[list[int]], str], stops: Sequence[str]) -> list[int]:
    """The longest prefix of ``ids`` whose text ends before the first stop string (a token holding the
    start of the stop string is dropped whole)."""
    end = find_stop(decode(ids), stops)
    if end < 0:
        return list(ids)
    ids = list(ids)
    while ids and len(decode(ids)) > end:
        ids.pop()
    return ids


# --------------------------------------------------------------------------------------------------
# the decoding loop

_SYNC_EVERY = 8          # on an accelerator, look at the rows' done flags (a host sync) every this many tokens


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the model's own mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _cache_dtype(net: nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(net.parameters()).dtype


def _fit_prompts(prompts: list[list[int]], context_length: int, max_new: int) -> list[list[int]]:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DataError(f"prompt {i} has no tokens; give a non-empty prompt or encode it with a BOS "
                            "token")
    keep = max(1, context_length - max_new)
    if any(len(p) > keep for p in prompts):
        warnings.warn(f"prompts longer than {keep} tokens keep only their last {keep} tokens so that "
                      f"{max_new} new tokens fit in context_length {context_length}", stacklevel=3)
        prompts = [p[-keep:] for p in prompts]
    return prompts


def _left_padded(prompts: list[list[int]], length: int, pad_id: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, length): the prompts right-aligned at the longest prompt's end, room for new tokens
    after; valid (B, length): True on the prompt tokens (the new columns are set as they are written)."""
    P = max(len(p) for p in prompts)
    rows = [[pad_id] * (P - len(p)) + p for p in prompts]
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    tokens[:, :P] = torch.tensor(rows, dtype=torch.long, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool, device=device)
    valid[:, :P] = torch.arange(P, device=device)[None] >= (P - lengths)[:, None]
    return tokens, valid


def _decode_rows(model: nn.Module, prompts: list[list[int]], cfg: SampleConfig, eos_id: int | None,
                 pad_id: int, decode: Callable[[list[int]], str] | None, use_cache: bool,
                 device: torch.device | str | None) -> list[list[int]]:
    """New tokens of each row; eos excluded, a row ended by a stop string keeps the token that completed
    it."""
    net = unwrap_compiled(model)
    mcfg = net.config
    device = torch.device(device) if device is not None else next(net.parameters()).device
    if not prompts:
        return []
    prompts = _fit_prompts([list(p) for p in prompts], mcfg.context_length, cfg.max_new_tokens)
    B, P = len(prompts), max(len(p) for p in prompts)
    steps = min(cfg.max_new_tokens, mcfg.context_length - P)
    if steps <= 0:
        return [[] for _ in prompts]
    check_stops = bool(cfg.stop)
    if check_stops and decode is None:
        raise ValueError("stop strings need a `decode` function to read the generated text")

    tokens, valid = _left_padded(prompts, P + steps, pad_id, device)
    padded = any(len(p) < P for p in prompts)
    generator = None
    if cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)

    if use_cache:
        length = P + cfg.max_new_tokens
        cache = KVCache(mcfg, B, cache_length(length, mcfg.context_length) if cfg.compile
                        else min(mcfg.context_length, length), dtype=_cache_dtype(net, device), device=device)
        logits = model(tokens[:, :P], cache=cache, attention_mask=valid[:, :P] if padded else None)
        # compile: every later token through one static-shape graph (minilm.decode), else GPT.forward
        step = StaticDecoder(net, cache) if cfg.compile else (lambda t: model(t[:, None], cache=cache)[:, -1])
    else:
        logits = model(tokens[:, :P], attention_mask=valid[:, :P] if padded else None)
    logits = logits[:, -1]

    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_kept = torch.zeros(B, dtype=torch.long, device=device)
    new_ids: list[list[int]] = [[] for _ in range(B)]       # host copy, only to check stop strings
    window = stop_window(cfg.stop) if check_stops else 0
    all_done = False
    t = 0
    for t in range(steps):
        cur = P + t
        logits = process_logits(logits.float(), tokens[:, :cur], valid[:, :cur], cfg, t, eos_id)
        nxt = select_next(logits, cfg, generator).masked_fill(done, pad_id)   # (B,)
        tokens[:, cur] = nxt
        valid[:, cur] = True
        live = ~done
        if eos_id is not None:
            ended = live & (nxt == eos_id)
            n_kept += live & ~ended
            done |= ended
        else:
            n_kept += live

        if check_stops:
            col, live_h, done_h = torch.stack([nxt, live, done]).tolist()   # the one host round trip
            stopped = []
            for b in range(B):
                if live_h[b] and not done_h[b]:
                    new_ids[b].append(col[b])
                    if find_stop(decode(new_ids[b][-window:]), cfg.stop) >= 0:   # the new text only
                        stopped.append(b)
            if stopped:
                done[torch.tensor(stopped, device=device)] = True
            all_done = all(d or b in stopped for b, d in enumerate(done_h))
        elif device.type == "cpu" or t % _SYNC_EVERY == _SYNC_EVERY - 1:
            all_done = bool(done.all())             # a host sync: on an accelerator, every 8th token only
        if all_done or t == steps - 1:
            break
        if use_cache:
            logits = step(nxt)
        else:
            logits = model(tokens[:, :cur + 1], attention_mask=valid[:, :cur + 1] if padded else None)[:, -1]

    out = tokens[:, P:P + t + 1].tolist()
    return [row[:n] for row, n in zip(out, n_kept.tolist())]


def generate_ids(model: nn.Module, prompts: list[list[int]], cfg: SampleConfig, *, eos_id: int | None,
                 pad_id: int = 0, decode: Callable[[list[int]], str] | None = None, use_cache: bool = True,
                 device: torch.device | str | None = None) -> list[list[int]]:
    """The new token ids of each prompt (eos not included).

    ``cfg.stop`` needs ``decode``: a row stops once its new text holds a stop string, and its ids are cut
    to the longest prefix whose text holds none. ``use_cache=False`` recomputes the whole sequence each
    step (for parity tests and benchmarks). The model is run in eval mode and put back as it was. Wrap
    the call in ``torch.autocast`` for low precision. ``cfg.compile`` runs every token after the prompt
    through :mod:`minilm.decode`'s compiled static-shape step (the same tokens; the first call for a new
    model shape, batch size or cache length pays the compilation).
    """
    with _eval_mode(model), torch.inference_mode():
        rows = _decode_rows(model, prompts, cfg, eos_id, pad_id, decode, use_cache, device)
    if cfg.stop and decode is not None:
        rows = [_trim_ids(r, decode, cfg.stop) for r in rows]
    return rows


def generate(model: nn.Module, tokenizer, prompts: list[str], cfg: SampleConfig, *,
             device: torch.device | str | None = None, bos: bool = True) -> list[str]:
    """The completion (new text only) of each prompt, cut before the first stop string."""
    ids = [tokenizer.encode(p, bos=bos, eos=False) for p in prompts]
    vocab = unwrap_compiled(model).config.vocab_size
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and 0 <= tokenizer.eos_id < vocab else None
    pad = tokenizer.pad_id if tokenizer.pad_id is not None and 0 <= tokenizer.pad_id < vocab else 0
    with _eval_mode(model), torch.inference_mode():
        rows = _decode_rows(model, ids, cfg, eos, pad, tokenizer.decode, True, device)
    return [cut_at_stop(tokenizer.decode(r), cfg.stop) for r in rows]
