"""Supervised fine-tuning data: instruction/response pairs -> masked token sequences -> padded batches.

Each pair becomes ``BOS + tokens(template(instruction)) + tokens(response) + EOS``. The prompt and the
response are tokenized separately and concatenated, so the boundary between them is exact. ``labels``
are aligned with ``input_ids`` (Hugging Face's convention): -100 where no loss is taken - the prompt,
with ``response_only`` - and the token itself elsewhere. A batch is ``x = ids[:-1]``, ``y = labels[1:]``,
right-padded (pad id / -100): with causal attention no real token ever sees a pad, so padding changes
nothing but the compute spent.

An example holds at most ``max_length + 1`` tokens, so the model reads at most ``max_length`` positions
(like :class:`minilm.data.LMBatches`' windows of ``context_length + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_TEMPLATE, SFTConfig, template_problems  # noqa: F401  (re-exported)
from .errors import ConfigError, DataError
from .prefetch import pure_batches
from .tokenizer import Tokenizer
from .train import evaluate_loss

IGNORE = -100


# --------------------------------------------------------------------------------------------------
# encoding


@dataclass
class SFTExamples:
    """Encoded pairs. ``input_ids[i]`` and ``labels[i]`` are int64 arrays of the same length;
    ``prompt_lengths[i]`` counts BOS + prompt tokens. ``total`` pairs were read, of which ``dropped``
    were left out and ``truncated`` were cut to ``max_length + 1`` tokens."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    prompt_lengths: list[int]
    pad_id: int
    max_length: int
    total: int = 0
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    @property
    def n_targets(self) -> int:
        return int(sum((lab != IGNORE).sum() for lab in self.labels))

    def counts(self) -> dict[str, int]:
        """What to report: pairs read, kept, truncated and dropped, and target tokens."""
        return {"pairs": self.total, "examples": len(self), "truncated": self.truncated,
                "dropped": self.dropped, "target_tokens": self.n_targets}

    def response_only(self) -> "SFTExamples":
        """The same examples with targets on the response (+ EOS) only."""
        labels = []
        for ids, n_prompt in zip(self.input_ids, self.prompt_lengths):
            lab = ids.copy()
            lab[:n_prompt] = IGNORE
            labels.append(lab)
        return SFTExamples(self.input_ids, labels, self.prompt_lengths, self.pad_id, self.max_length,
                           self.total, self.truncated, self.dropped)


def _pairs(data: Any) -> list[tuple[str, str]]:
    """(instruction, response) strings from a DataFrame or a list of mappings."""
    if hasattr(data, "columns"):  # a pandas DataFrame
        missing = [c for c in ("instruction", "response") if c not in data.columns]
        if missing:
            raise DataError(f"the pairs table lacks column(s) {missing} (it has {list(data.columns)}); it "
                            "needs 'instruction' and 'response'")
        rows: Iterable[Any] = zip(data["instruction"].tolist(), data["response"].tolist())
    else:
        rows = []
        for i, rec in enumerate(data):
            if not isinstance(rec, Mapping) or "instruction" not in rec or "response" not in rec:
                raise DataError(f"pair {i} is not a mapping with 'instruction' and 'response' keys; fix "
                                "the pairs data")
            rows.append((rec["instruction"], rec["response"]))
    out = []
    for i, (inst, resp) in enumerate(rows):
        for name, value in (("instruction", inst), ("response", resp)):
            if not isinstance(value, str):
                raise DataError(f"pair {i}: {name} must be text, got {type(value).__name__} ({value!r}); "
                                "fix or remove that pair")
        out.append((inst, resp))
    return out


def encode_pairs(data: Any, tokenizer: Tokenizer, cfg: SFTConfig, context_length: int) -> SFTExamples:
    """Tokenize instruction/response pairs (a DataFrame with ``instruction``/``response`` columns, or a
    list of dicts) into masked examples; see the module docstring for the layout.

    An example longer than ``max_length + 1`` tokens is cut at the end (``overlong: truncate``) or left
    out (``drop``); one whose prompt alone fills the limit is always left out (nothing to learn).
    """
    limit = cfg.max_length or context_length
    if limit > context_length:
        raise ConfigError(f"sft.max_length ({cfg.max_length}) exceeds the model's context_length "
                          f"({context_length}); lower it or set 0 to use the context length")
    pairs = _pairs(data)
    if not pairs:
        raise DataError("no instruction/response pairs to fine-tune on; add pairs to the SFT data")
    prompts = tokenizer.encode_batch([cfg.prompt(inst) for inst, _ in pairs])
    responses = tokenizer.encode_batch([resp for _, resp in pairs])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    ids_out, labels_out, prompt_out = [], [], []
    truncated = dropped = 0
    for prompt, response in zip(prompts, responses):
        n_prompt = 1 + len(prompt)
        ids = np.array([bos, *prompt, *response, eos], dtype=np.int64)
        if len(ids) > limit + 1:
            if cfg.overlong == "drop" or n_prompt >= limit + 1:
                dropped += 1
                continue
            ids = ids[:limit + 1]
            truncated += 1
        labels = ids.copy()
        labels[:n_prompt if cfg.response_only else 1] = IGNORE
        ids_out.append(ids)
        labels_out.append(labels)
        prompt_out.append(n_prompt)
    if not ids_out:
        raise DataError(f"all {len(pairs)} pairs are longer than max_length={limit} tokens and were "
                        "dropped; raise sft.max_length (up to the context length), use overlong: truncate "
                        "or shorten the prompts")
    return SFTExamples(ids_out, labels_out, prompt_out, tokenizer.pad_id, limit, total=len(pairs),
                       truncated=truncated, dropped=dropped)


# --------------------------------------------------------------------------------------------------
# batching


def collate(examples: SFTExamples, idx: Sequence[int], pad_id: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y`` (B, T) int64 for the examples ``idx``, right-padded to the longest of them."""
    pad = examples.pad_id if pad_id is None else pad_id
    T = max(len(examples.input_ids[i]) for i in idx) - 1
    x = np.full((len(idx), T), pad, dtype=np.int64)
    y = np.full((len(idx), T), IGNORE, dtype=np.int64)
    for row, i in enumerate(idx):
        ids, lab = examples.input_ids[i], examples.labels[i]
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = lab[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


class SFTBatches:
    """Training batches of ``examples``, a pure function of ``(seed, step, micro)``.

    Global micro-batch ``g = step * grad_accum + micro`` walks through epochs. Each epoch takes a seeded
    permutation, sorts each window of ``group_batches`` batches by length (so a batch holds sequences of
    similar length and little padding), cuts the windows into batches and shuffles the batch order.
    Every example is seen once per epoch; the last batch of a window may be smaller.
    """

    def __init__(self, examples: SFTExamples, batch_size: int, seed: int, pad_id: int | None = None, *,
                 grad_accum: int = 1, group_batches: int = 8):
        if batch_size <= 0 or grad_accum <= 0 or group_batches <= 0:
            raise ConfigError(f"batch_size, grad_accum and group_batches must be > 0, got {batch_size}, "
                              f"{grad_accum}, {group_batches}")
        if len(examples) == 0:
            raise DataError("no SFT examples to batch; add instruction/response pairs")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id = examples.pad_id if pad_id is None else pad_id
        self.grad_accum, self.group_batches = grad_accum, group_batches
        self._lengths = examples.lengths
        self._plans: dict[int, list[np.ndarray]] = {}

    @property
    def batches_per_epoch(self) -> int:
        n, window = len(self.examples), self.batch_size * self.group_batches
        full, rest = divmod(n, window)
        return full * self.group_batches + -(-rest // self.batch_size)

    def indices(self, step: int, micro: int = 0) -> np.ndarray:
        """Which examples make up micro-batch ``micro`` of optimizer step ``step``."""
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro must be in [0, {self.grad_accum}), got {micro}")
        epoch, j = divmod(step * self.grad_accum + micro, self.batches_per_epoch)
        return self._plan(epoch)[j]

    @pure_batches                    # drawn a step ahead, off the training thread (minilm.prefetch)
    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(self.examples, self.indices(step, micro), self.pad_id)

    def tokens_per_batch(self, batch: Sequence[torch.Tensor]) -> int:
        """Non-pad input tokens of a batch (for tokens/s)."""
        return int((batch[0] != self.pad_id).sum())

    def _plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            rng = np.random.default_rng([self.seed % (1 << 64), epoch])
            order = rng.permutation(len(self.examples))
            window, B = self.batch_size * self.group_batches, self.batch_size
            batches = []
            for start in range(0, len(order), window):
                idx = order[start:start + window]
                idx = idx[np.argsort(-self._lengths[idx], kind="stable")]   # longest first
                batches.extend(idx[i:i + B] for i in range(0, len(idx), B))
            self._plans[epoch] = [batches[k] for k in rng.permutation(len(batches))]
        return self._plans[epoch]


def eval_batches(examples: SFTExamples, batch_size: int, pad_id: int | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in a fixed order (by length, so batches carry little padding)."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    order = np.argsort(examples.lengths, kind="stable")
    return [collate(examples, order[i:i + batch_size], pad_id) for i in range(0, len(order), batch_size)]


def response_loss(model: nn.Module, examples: SFTExamples, *, batch_size: int = 16,
                  device: torch.device | str | None = None, precision: str = "fp32") -> float:
    """Mean per-token loss over the response (+ EOS) tokens of ``examples`` (whatever their labels),
    e.g. held-out pairs scored by the base and the fine-tuned model."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = eval_batches(examples.response_only(), batch_size)
    return evaluate_loss(model, batches, device=device, precision=precision)
