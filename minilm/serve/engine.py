"""Continuous batching: every request being decoded advances by one token per model forward.

Design. The engine holds one KV cache for all the rows in flight, rows aligned at their *end* (the
newest token of every row sits in the same cache slot) and left-padded, the layout ``minilm.sampling``
uses for a batch of prompts. Rotary positions come from each row's key mask (``KVCache.key_mask``), so a
row's padding never shifts its positions. A loop of *steps*:

1. **choose**: the pending next-token logits of every row go through the same processors as
   :func:`minilm.sampling.generate` (repetition penalty, bans, temperature, top-k, top-p), applied per
   group of rows that share their controls (a seeded request has its own generator, so its draws do not
   depend on who else is in the batch);
2. **emit**: each row's text delta is sent to its request (text that could begin a stop string is held
   back until it is known not to); a row ends at EOS, a stop string, its ``max_new_tokens`` or when its
   client goes away;
3. **forward**: the rows still running are fed their new token in one batched forward, which gives their
   next logits;
4. **admit**: requests that arrived meanwhile are prefilled together (one left-padded forward) and packed
   into the running cache: both are left-padded to a common width, the leading columns no row uses any
   more are dropped. Finished rows leave the cache the same way.

So a request arriving while others are being decoded joins them at the next step instead of waiting for
them to finish (continuous batching); an idle engine waits ``window_s`` after the first request so that
requests arriving together share their prefill too. Rows never exceed the context: the caller checks that
prompt + ``max_new_tokens`` fits, and since rows are end-aligned and dead leading columns are dropped, the
cache width is the longest row in flight. ``metrics`` counts the rows of every decode forward (the batch
sizes), which is how the tests see that concurrent requests were decoded together.

With temperature 0 each row gets the tokens :func:`minilm.sampling.generate` gives for its prompt alone
(the tests check this under concurrent load); padding only adds masked keys.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SampleConfig
from ..model import KVCache, unwrap_compiled
from ..sampling import _cache_dtype, _left_padded, cut_at_stop, find_stop, process_logits, select_next

_ids = itertools.count()


@dataclass
class Event:
    """What a request hears: ``text`` deltas, then one ``done`` (``finish_reason`` stop | length |
    cancelled | error, the full ``text``, the token count)."""

    kind: str                      # "text" | "done"
    text: str
    finish_reason: str | None = None
    tokens: int = 0


@dataclass(eq=False)
class Request:
    """One completion: prompt ids (BOS included), its controls (``stop``, ``seed``, ``max_new_tokens``
    are its own), and a callback that is called from the engine's thread."""

    prompt: list[int]
    cfg: SampleConfig
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False        # set from any thread: the row is dropped at the next step

    def cancel(self) -> None:
        self.cancelled = True


class TextStream:
    """Incremental text of one row: deltas never include a stop string or a prefix of one that may still
    complete, nor a trailing replacement character (a byte-fallback character still being spelt)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops, self.sent = decode, stops, ""

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """(delta, stopped) after the row's ids grew by one token."""
        text = self.decode(ids)
        if find_stop(text, self.stops) >= 0:
            return self._delta(cut_at_stop(text, self.stops)), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._delta(text[:safe]), False

    def final(self, ids: list[int]) -> tuple[str, str]:
        """(the rest not yet sent, the whole text): what :func:`minilm.sampling.generate` returns."""
        text = cut_at_stop(self.decode(ids), self.stops)
        return self._delta(text), text


@dataclass(eq=False)
class _Row:
    req: Request
    stream: TextStream
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)


class Engine:
    """Decode many requests at once (see the module docstring). Drive it from one thread: either
    :meth:`start` a background loop and :meth:`submit` from anywhere, or call :meth:`run` in the calling
    thread (the terminal chat does)."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 16, window_s: float = 0.005,
                 device: torch.device | str | None = None):
        self.model = model.eval()
        self.net = unwrap_compiled(model)
        self.tokenizer = tokenizer
        vocab = self.net.config.vocab_size
        eos, pad = tokenizer.eos_id, tokenizer.pad_id
        self.eos_id = eos if eos is not None and 0 <= eos < vocab else None
        self.pad_id = pad if pad is not None and 0 <= pad < vocab else 0
        self.device = torch.device(device) if device is not None else next(self.net.parameters()).device
        self.context_length = self.net.config.context_length
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: queue.Queue[Request] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.seq: torch.Tensor | None = None       # (B, context_length) the tokens in the cache slots
        self.logits: torch.Tensor | None = None    # (B, V) each row's pending next-token logits
        self.metrics = {"decode_batch_sizes": Counter(), "prefill_batch_sizes": Counter(), "requests": 0,
                        "tokens": 0, "errors": 0, "finish_reasons": Counter()}
        self._metrics_lock = threading.Lock()     # snapshot() is read from other threads
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---------------------------------------------------------------------------------------------
    # the public side

    def submit(self, req: Request) -> Request:
        """Queue a request (any thread). Prompt + ``max_new_tokens`` must fit in the context."""
        if not req.prompt:
            raise ValueError("a request needs at least one prompt token")
        if len(req.prompt) + req.cfg.max_new_tokens > self.context_length:
            raise ValueError(f"{len(req.prompt)} prompt tokens + {req.cfg.max_new_tokens} new tokens exceed "
                             f"the context length {self.context_length}")
        self.queue.put(req)
        return req

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="minilm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def admit(self) -> bool:
        """Prefill the waiting requests (as many as the batch has room for) into the batch; True if any
        joined. :meth:`run` and the background loop call it before every step."""
        return self._admit(self._drain())

    def run(self) -> None:
        """Decode until the queue and the batch are empty (in the calling thread)."""
        while self.admit() or self.rows:
            self.step()

    def snapshot(self) -> dict:
        with self._metrics_lock:
            return self._snapshot()

    def _snapshot(self) -> dict:
        m = self.metrics
        sizes = m["decode_batch_sizes"]
        return {"requests": m["requests"], "tokens": m["tokens"], "errors": m["errors"],
                "running": len(self.rows), "waiting": self.queue.qsize(),
                "finish_reasons": dict(m["finish_reasons"]),
                "decode_steps": sum(sizes.values()), "max_decode_batch": max(sizes, default=0),
                "decode_batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
                "prefill_batch_sizes": {str(k): v for k, v in sorted(m["prefill_batch_sizes"].items())}}

    # ---------------------------------------------------------------------------------------------
    # the loop

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.rows:
                try:
                    first = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if self.max_batch > 1 and self.window_s > 0:
                    time.sleep(self.window_s)      # let the requests sent together arrive together
                self._admit([first] + self._drain(self.max_batch - 1))
            else:
                self.admit()
            if self.rows:
                self.step()

    def _drain(self, limit: int | None = None) -> list[Request]:
        room = self.max_batch - len(self.rows) if limit is None else limit
        out = []
        while len(out) < room:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def step(self) -> None:
        """Choose, emit, forward (see the module docstring). A failure ends every row in flight with
        finish_reason ``error`` and leaves the engine ready for new requests."""
        try:
            with torch.inference_mode():
                keep, nxt = self._choose_and_emit()
                self._forward(keep, nxt)
        except Exception as err:   # one bad step must not take the server down
            self.metrics["errors"] += 1
            for row in self.rows:
                row.req.on_event(Event("done", f"{type(err).__name__}: {err}", "error", len(row.ids)))
            self.rows, self.cache, self.seq, self.logits = [], None, None, None

    def _choose_and_emit(self) -> tuple[list[int], torch.Tensor]:
        nxt = self._choose()
        keep = []
        for b, (row, tok) in enumerate(zip(self.rows, nxt.tolist())):
            reason = self._advance(row, tok)
            if reason is None:
                keep.append(b)
            else:
                self._finish(row, reason)
        with self._metrics_lock:
            self.metrics["decode_batch_sizes"][len(self.rows)] += 1
        return keep, nxt

    def _advance(self, row: _Row, tok: int) -> str | None:
        """Add ``tok`` to the row and send its text; the finish reason when the row ends."""
        if row.req.cancelled:
            return "cancelled"
        if self.eos_id is not None and tok == self.eos_id:
            return "stop"
        row.ids.append(tok)
        delta, stopped = row.stream.push(row.ids)
        if delta:
            row.req.on_event(Event("text", delta))
        if stopped:
            return "stop"
        return "length" if len(row.ids) >= row.req.cfg.max_new_tokens else None

    def _finish(self, row: _Row, reason: str) -> None:
        rest, text = row.stream.final(row.ids)
        if rest and reason != "cancelled":
            row.req.on_event(Event("text", rest))
        with self._metrics_lock:
            self.metrics["requests"] += 1
            self.metrics["tokens"] += len(row.ids)
            self.metrics["finish_reasons"][reason] += 1
        row.req.on_event(Event("done", text, reason, len(row.ids)))

    def _choose(self) -> torch.Tensor:
        """(B,) next tokens: the processors of minilm.sampling per group of rows with equal controls."""
        width = self.cache.pos
        tokens, valid = self.seq[:, :width], self.cache.key_mask[:, :width]
        logits = self.logits.float()
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(self.rows):
            c = row.req.cfg
            key = (c.temperature, c.top_k, c.top_p, c.repetition_penalty, c.ban_window, c.no_repeat_ngram,
                   len(row.ids) < c.min_new_tokens, id(row.generator) if row.generator else None)
            groups.setdefault(key, []).append(b)
        nxt = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        for rows in groups.values():
            idx = torch.tensor(rows, device=self.device)
            first = self.rows[rows[0]]
            out = process_logits(logits[idx], tokens[idx], valid[idx], first.req.cfg, len(first.ids),
                                 self.eos_id)
            nxt[idx] = select_next(out, first.req.cfg, first.generator)
        return nxt

    def _forward(self, keep: list[int], nxt: torch.Tensor) -> None:
        """Feed the rows that go on their new token; drop the rows that ended."""
        if len(keep) < len(self.rows):
            self.rows = [self.rows[b] for b in keep]
            if not keep:
                self.cache = self.seq = self.logits = None
                return
            idx = torch.tensor(keep, device=self.device)
            c = self.cache
            self._pack([(c.k[:, idx, :, :c.pos], c.v[:, idx, :, :c.pos], c.key_mask[idx, :c.pos],
                         self.seq[idx, :c.pos])])
            nxt = nxt[idx]
        pos = self.cache.pos
        self.seq[:, pos] = nxt
        self.logits = self.model(nxt[:, None], cache=self.cache)[:, -1]

    # ---------------------------------------------------------------------------------------------
    # admission and packing

    def _admit(self, reqs: list[Request]) -> bool:
        """Prefill the new requests together and pack them into the batch; True if any joined."""
        reqs = [r for r in reqs if not r.cancelled]
        if not reqs:
            return False
        try:
            with torch.inference_mode():
                self._prefill(reqs)
        except Exception as err:
            self.metrics["errors"] += 1
            for r in reqs:
                r.on_event(Event("done", f"{type(err).__name__}: {err}", "error", 0))
            return False
        return True

    def _prefill(self, reqs: list[Request]) -> None:
        prompts = [r.prompt for r in reqs]
        P = max(len(p) for p in prompts)
        tokens, valid = _left_padded(prompts, P, self.pad_id, self.device)
        cache = KVCache(self.net.config, len(reqs), P, dtype=_cache_dtype(self.net, self.device),
                        device=self.device)
        padded = any(len(p) < P for p in prompts)
        logits = self.model(tokens, cache=cache, attention_mask=valid if padded else None)[:, -1]
        with self._metrics_lock:
            self.metrics["prefill_batch_sizes"][len(reqs)] += 1
        parts = [(cache.k, cache.v, valid, tokens)]
        if self.rows:
            c = self.cache
            parts.insert(0, (c.k[:, :, :, :c.pos], c.v[:, :, :, :c.pos], c.key_mask[:, :c.pos],
                             self.seq[:, :c.pos]))
            logits = torch.cat([self.logits, logits])
        for r in reqs:
            gen = None
            if r.cfg.seed is not None and r.cfg.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(r.cfg.seed)
            self.rows.append(_Row(r, TextStream(self.tokenizer.decode, list(r.cfg.stop)), gen))
        self._pack(parts)
        self.logits = logits

    def _pack(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One cache from (k, v, key_mask, tokens) blocks of rows: left-padded to a common width,
        concatenated along the batch, leading columns that no row uses dropped."""
        width = max(m.shape[1] for _, _, m, _ in parts)
        ks, vs, ms, ts = [], [], [], []
        for k, v, m, t in parts:                    # k, v: (n_layer, B, n_kv_head, w, head_dim)
            pad = width - m.shape[1]
            ks.append(F.pad(k, (0, 0, pad, 0)))
            vs.append(F.pad(v, (0, 0, pad, 0)))
            ms.append(F.pad(m, (pad, 0), value=False))
            ts.append(F.pad(t, (pad, 0), value=self.pad_id))
        k, v, m, t = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ms), torch.cat(ts)
        lead = int(m.any(0).long().argmax())       # the first column some row uses
        width -= lead
        cache = KVCache(self.net.config, m.shape[0], self.context_length, dtype=k.dtype, device=self.device)
        cache.k[:, :, :, :width] = k[:, :, :, lead:]
        cache.v[:, :, :, :width] = v[:, :, :, lead:]
        cache.key_mask = torch.zeros(m.shape[0], self.context_length, dtype=torch.bool, device=self.device)
        cache.key_mask[:, :width] = m[:, lead:]
        cache.pos = width
        self.seq = torch.full((m.shape[0], self.context_length), self.pad_id, dtype=torch.long,
                              device=self.device)
        self.seq[:, :width] = t[:, lead:]
        self.cache = cache
