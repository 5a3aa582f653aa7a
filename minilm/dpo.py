"""Direct preference optimisation (DPO, and IPO) with a LoRA adapter: pairs -> batches -> the loss.

A preference pair is a prompt with a ``chosen`` and a ``rejected`` response. Each side is encoded as an
SFT example (``BOS + template(prompt) + response + EOS``, targets on the response + EOS only), and a
batch of ``B`` pairs is one ``(2B, T)`` tensor: the chosen sequences, then the rejected ones, right-padded.

The policy is the fine-tuned model with a fresh LoRA adapter; the reference is the *same* model with the
adapter switched off (:func:`minilm.lora.adapters_disabled`), so no second copy is held. A sequence's
log-probability sums the response tokens' log-probs (IPO, as TRL does, averages them). With

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)

the sigmoid loss is ``-(1 - ls) log sigmoid(beta logits) - ls log sigmoid(-beta logits)`` and IPO's is
``(logits - 1 / (2 beta))^2``; the implicit rewards are ``beta (policy - reference)`` per side. A fresh
adapter changes nothing (``B = 0``), so at step 0 every reward is 0 and the sigmoid loss is ln 2.

:class:`DPOObjective` plugs into :func:`minilm.train.train` as its ``objective``: the one loop then gives
DPO resume, EMA, precision, the non-finite policy and interrupt safety, and logs TRL's figures
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``; ``val_``-prefixed on held-out pairs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DPOConfig
from .errors import ConfigError, DataError
from .lora import adapters_disabled
from .model import lm_loss
from .sft import IGNORE, SFTBatches, SFTExamples, collate
from .tokenizer import Tokenizer

STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


@dataclass
class PreferenceExamples:
    """Encoded pairs: ``chosen[i]`` and ``rejected[i]`` share pair ``i``'s prompt."""

    chosen: SFTExamples
    rejected: SFTExamples
    total: int = 0                  # pairs read
    truncated: int = 0              # pairs with a side cut to max_length + 1 tokens
    dropped: int = 0                # pairs left out (the prompt alone fills max_length)

    def __len__(self) -> int:
        return len(self.chosen)

    def counts(self) -> dict[str, int]:
        return {"pairs": self.total, "examples": len(self), "truncated": self.truncated,
                "dropped": self.dropped}


def encode_preferences(data: Any, tokenizer: Tokenizer, template: str, context_length: int,
                       max_length: int = 0) -> PreferenceExamples:
    """Tokenize a table with ``prompt``/``chosen``/``rejected`` columns (or a list of such dicts).

    A side longer than ``max_length + 1`` tokens (0 = the context length) is cut at the end; a pair whose
    BOS + prompt fills the limit is left out, and so is one whose two sides are equal after cutting.
    """
    limit = max_length or context_length
    if limit > context_length:
        raise ConfigError(f"dpo.max_length ({max_length}) exceeds the model's context_length "
                          f"({context_length}); lower it or set 0")
    rows = data.to_dict("records") if hasattr(data, "to_dict") else list(data)
    if not rows:
        raise DataError("no preference pairs to train on; add prompt/chosen/rejected pairs")
    prompts = tokenizer.encode_batch([template.format(instruction=r["prompt"]) for r in rows])
    chosen = tokenizer.encode_batch([r["chosen"] for r in rows])
    rejected = tokenizer.encode_batch([r["rejected"] for r in rows])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    sides: tuple[list, list] = ([], [])
    prompt_lengths, truncated, dropped = [], 0, 0
    for prompt, c, r in zip(prompts, chosen, rejected):
        n_prompt = 1 + len(prompt)
        if n_prompt >= limit + 1:
            dropped += 1
            continue
        seqs = [np.array([bos, *prompt, *resp, eos], dtype=np.int64) for resp in (c, r)]
        if any(len(s) > limit + 1 for s in seqs):
            truncated += 1
            seqs = [s[:limit + 1] for s in seqs]
        if np.array_equal(seqs[0], seqs[1]):
            dropped += 1
            continue
        for side, ids in zip(sides, seqs):
            labels = ids.copy()
            labels[:n_prompt] = IGNORE
            side.append((ids, labels))
        prompt_lengths.append(n_prompt)
    if not prompt_lengths:
        raise DataError(f"all {len(rows)} preference pairs were left out (prompts longer than {limit} "
                        "tokens, or chosen equal to rejected once cut); raise dpo.max_length or shorten "
                        "the prompts")

    def examples(side: list) -> SFTExamples:
        return SFTExamples([ids for ids, _ in side], [lab for _, lab in side], list(prompt_lengths),
                           tokenizer.pad_id, limit, total=len(rows))

    return PreferenceExamples(examples(sides[0]), examples(sides[1]), total=len(rows), truncated=truncated,
                              dropped=dropped)


def collate_pairs(examples: PreferenceExamples, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y`` of shape (2B, T): pairs ``idx``' chosen sequences, then their rejected ones."""
    (xc, yc), (xr, yr) = collate(examples.chosen, idx), collate(examples.rejected, idx)
    T = max(xc.shape[1], xr.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, T - x.shape[1]), value=value)

    pad_id = examples.chosen.pad_id
    return (torch.cat([pad(xc, pad_id), pad(xr, pad_id)]), torch.cat([pad(yc, IGNORE), pad(yr, IGNORE)]))


class PreferenceBatches(SFTBatches):
    """Training batches of pairs, a pure function of ``(seed, step, micro)`` (the plan of
    :class:`~minilm.sft.SFTBatches`, grouped by the longer side's length)."""

    def __init__(self, examples: PreferenceExamples, batch_size: int, seed: int, *, grad_accum: int = 1):
        longer = [c if len(c) >= len(r) else r
                  for c, r in zip(examples.chosen.input_ids, examples.rejected.input_ids)]
        super().__init__(SFTExamples(longer, longer, examples.chosen.prompt_lengths, examples.chosen.pad_id,
                                     examples.chosen.max_length), batch_size, seed, grad_accum=grad_accum)
        self.pairs = examples

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_pairs(self.pairs, self.indices(step, micro))


def eval_pair_batches(examples: PreferenceExamples, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every pair once, in a fixed order."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    n = len(examples)
    return [collate_pairs(examples, range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------------------
# the loss


def sequence_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's targets, how many targets) in fp32; -100 is skipped."""
    nll = lm_loss(logits, y, reduction="none").view(y.shape)       # 0 where the target is -100
    return -nll.sum(-1), (y != IGNORE).sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from sequence log-probs (module docstring)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss must be 'sigmoid' or 'ipo', got {loss!r}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


class DPOObjective:
    """The DPO loss as :func:`minilm.train.train`'s objective: ``objective(model, x, y, kw)`` is the summed
    loss of the batch's pairs, :meth:`count` the pairs (the loop divides by them), and :meth:`metrics`
    the mean rewards and log-probs since it was last asked, kept apart for training and evaluation (by
    ``model.training``)."""

    def __init__(self, cfg: DPOConfig) -> None:
        self.beta, self.loss, self.label_smoothing = cfg.beta, cfg.loss, cfg.label_smoothing
        self._sums: dict[bool, torch.Tensor | None] = {True: None, False: None}
        self._pairs = {True: 0, False: 0}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        policy, n = sequence_logps(model(x, **kw), y)
        with torch.no_grad():
            ref, _ = sequence_logps(reference_logits(model, x, kw), y)
        if self.loss == "ipo":                       # IPO compares mean token log-probs (as TRL)
            policy, ref = policy / n.clamp(min=1), ref / n.clamp(min=1)
        B = x.shape[0] // 2
        losses, chosen, rejected = preference_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta=self.beta,
                                                   loss=self.loss, label_smoothing=self.label_smoothing)
        pol = policy.detach()
        row = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                           (chosen - rejected).sum(), pol[:B].sum(), pol[B:].sum()])
        key = bool(model.training)
        self._sums[key] = row if self._sums[key] is None else self._sums[key].to(row.device) + row
        self._pairs[key] += B
        return losses.sum()

    def state_dict(self) -> dict[str, Any]:
        """The training figures gathered since the last logged row (``last`` carries them, so a resumed
        run logs what an uninterrupted one would)."""
        sums = self._sums[True]
        return {"sums": sums.tolist() if sums is not None else None, "pairs": self._pairs[True]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums = state.get("sums")
        self._sums[True] = torch.tensor(sums, dtype=torch.float32) if sums is not None else None
        self._pairs[True] = int(state.get("pairs", 0))

    @staticmethod
    def count(y: torch.Tensor) -> int:
        return y.shape[0] // 2

    def metrics(self, training: bool, reduce: Callable[[list[float]], list[float]] = lambda v: v
                ) -> dict[str, float]:
        """Means since the last call (``reduce`` sums over data-parallel ranks; every rank calls it)."""
        sums = self._sums[training]
        values = [*(sums.tolist() if sums is not None else [0.0] * len(STATS)), float(self._pairs[training])]
        self._sums[training], self._pairs[training] = None, 0
        *totals, pairs = reduce(values)
        if not pairs:
            return {}
        prefix = "" if training else "val_"
        return {prefix + name: total / pairs for name, total in zip(STATS, totals)}


def reference_logits(model: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """The reference model's logits: ``model`` with its adapters off, in eval mode (no dropout)."""
    inner = getattr(model, "module", model)          # DDP's wrapped module (FSDP2 shards in place)
    was_training = inner.training
    inner.eval()
    try:
        with adapters_disabled(inner):
            return inner(x, **kw)
    finally:
        inner.train(was_training)


def pair_logps(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
               device: torch.device | str | None = None, reference: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs of every pair in ``batches`` (fp32, eval mode), from the
    model or, with ``reference``, from it with its adapters off."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (adapters_disabled(model) if reference else contextlib.nullcontext()):
            for x, y in batches:
                logps, _ = sequence_logps(model(x.to(device)), y.to(device))
                B = x.shape[0] // 2
                chosen.append(logps[:B].cpu())
                rejected.append(logps[B:].cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(model_logps: tuple[torch.Tensor, torch.Tensor],
                        ref_logps: tuple[torch.Tensor, torch.Tensor], beta: float) -> dict[str, float]:
    """Held-out figures of a tuned model against its reference: the share of pairs whose chosen reward
    beats the rejected one, and the mean reward margin."""
    chosen = beta * (model_logps[0] - ref_logps[0])
    rejected = beta * (model_logps[1] - ref_logps[1])
    return {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean()),
            "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
            "pairs": int(chosen.numel())}
