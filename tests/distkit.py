"""Tiny training runs for tests/test_distributed.py, the same in one process and under torchrun.

``python tests/distkit.py WORKDIR CASE...`` (under ``torchrun``) runs each case through
:func:`minilm.train.train` with the process group torchrun set up; the test runs the one-process
references in pytest itself with :func:`run_case`. Rank 0 trains into ``WORKDIR/<case>``, every other rank
into ``WORKDIR/<case>.rank<r>``, which stays empty when only rank 0 writes. Each rank writes what it
saw (history, step, whether it was interrupted) to ``WORKDIR/<case>.w<world>.r<rank>.json``.

Cases: ``<kind>-<strategy>`` with kind ``pretrain`` (a 2-layer GPT on random tokens), ``lora`` (LoRA
SFT of that GPT on synthetic masked pairs) or ``dpo`` (DPO with a fresh LoRA adapter on synthetic preference
pairs, the reference being the adapter switched off), strategy ``ddp`` or ``fsdp``; a ``+stop@N`` suffix sends this
rank SIGTERM (rank 1 only, under torchrun) while step N's batch is drawn; ``+kill@N`` SIGKILLs rank 1 there;
``+ema`` trains with an EMA of the weights (evaluated and saved as ``best``); ``+nan@N`` makes that rank's
logits infinite in step N's forward (with ``nonfinite: skip``);
a ``:TAG`` suffix names the case's directory (default: the case without its suffixes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from minilm.config import DPOConfig, LoRAConfig, ModelConfig, TrainConfig
from minilm.data import LMBatches
from minilm.dpo import DPOObjective, PreferenceBatches, PreferenceExamples, eval_pair_batches
from minilm.distributed import DistributedConfig, Parallel, init
from minilm.errors import run_main
from minilm.lora import inject_lora, lora_state, mark_only_lora_trainable
from minilm.model import GPT
from minilm.sft import IGNORE, SFTBatches, SFTExamples, eval_batches
from minilm.train import TrainResult, train

MODEL = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32)
# grad_clip below the gradient norms these runs see: a gradient off by the world size (ranks' gradients
# summed where they should be averaged, or the other way round) changes the clipped update, not only
# the logged norm
CFG = TrainConfig(max_steps=8, batch_size=4, grad_accum=1, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                  eval_every=4, eval_batches=2, log_every=1, grad_clip=0.5, precision="fp32", seed=3,
                  save_every=2)


class Trigger:
    """A batch source that signals this process when step ``at``'s first micro-batch is drawn."""

    def __init__(self, data, at: int, sig: int) -> None:
        self.data, self.at, self.sig, self.tokens_per_batch = data, at, sig, None

    def batch(self, step: int, micro: int = 0):
        if step == self.at and self.sig:
            os.kill(os.getpid(), self.sig)
            self.sig = 0
        return self.data.batch(step, micro)


class Poison(Trigger):
    """Makes the model's logits infinite in the forward of step ``at`` (on the rank it is given to)."""

    def __init__(self, data, at: int, model: torch.nn.Module) -> None:
        super().__init__(data, at, 0)
        self.armed = False
        model.lm_head.register_forward_hook(self._hook)

    def batch(self, step: int, micro: int = 0):
        self.armed = self.armed or step == self.at
        return self.data.batch(step, micro)

    def _hook(self, module, inputs, output):
        if self.armed and module.training:
            self.armed = False
            return output * float("inf")
        return output


def _examples(seed: int = 0, n: int = 40) -> SFTExamples:
    rng = np.random.default_rng(seed)
    ids, labels, prompts = [], [], []
    for _ in range(n):
        length, prompt = int(rng.integers(6, 17)), int(rng.integers(2, 5))
        row = rng.integers(1, MODEL.vocab_size, length).astype(np.int64)
        lab = row.copy()
        lab[:prompt] = IGNORE
        ids.append(row), labels.append(lab), prompts.append(prompt)
    return SFTExamples(ids, labels, prompts, pad_id=0, max_length=16, total=n)


def _pairs(seed: int, n: int) -> PreferenceExamples:
    """Synthetic preference pairs: the same prompts, two different random responses."""
    chosen, other = _examples(seed, n), _examples(seed + 100, n)
    rejected = []
    for ids, p, o in zip(chosen.input_ids, chosen.prompt_lengths, other.input_ids):
        rejected.append(np.concatenate([ids[:p], o[p:] if len(o) > p else o[-2:]])[:17])
    labels = []
    for ids, p in zip(rejected, chosen.prompt_lengths):
        lab = ids.copy()
        lab[:p] = IGNORE
        labels.append(lab)
    return PreferenceExamples(chosen, SFTExamples(rejected, labels, chosen.prompt_lengths, 0, 16, n), total=n)


def build(kind: str, cfg: TrainConfig, world: int):
    """(model, data, eval batches, save_state, objective) of a case; every rank builds the same."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    if kind == "dpo":
        inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
        mark_only_lora_trainable(model)
        data = PreferenceBatches(_pairs(0, 40), cfg.batch_size, cfg.seed, grad_accum=cfg.grad_accum * world)
        return (model, data, eval_pair_batches(_pairs(9, 8), 4)[: cfg.eval_batches], lora_state,
                DPOObjective(DPOConfig(beta=0.5)))
    if kind == "pretrain":
        tokens = np.random.default_rng(1).integers(0, MODEL.vocab_size, 4000).astype(np.uint16)
        data = LMBatches(tokens, cfg.batch_size, MODEL.context_length, seed=cfg.seed)
        return model, data, data.eval_batches(cfg.eval_batches, seed=5), None, None
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    mark_only_lora_trainable(model)
    with torch.no_grad():     # B != 0, so the adapter changes the model from the first step
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.02)
    examples = _examples()
    data = SFTBatches(examples, cfg.batch_size, cfg.seed, grad_accum=cfg.grad_accum * world)
    return model, data, eval_batches(_examples(seed=9, n=8), 4)[: cfg.eval_batches], lora_state, None


def run_case(case: str, workdir: Path, par: Parallel | None = None, **cfg_over) -> TrainResult:
    par = par or Parallel()
    case, _, tag = case.partition(":")
    name, _, trigger = case.partition("+")
    kind, strategy = name.split("-")
    name = tag or name
    if trigger == "ema":
        cfg_over, trigger = {"ema_decay": 0.9, **cfg_over}, ""
    if trigger.startswith("nan"):
        cfg_over = {"nonfinite": "skip", **cfg_over}
    cfg = dataclasses.replace(CFG, **cfg_over)
    model, data, evals, save_state, objective = build(kind, cfg, par.world)
    if trigger and (par.rank == 1 or not par.active):
        what, at = trigger.split("@")
        data = (Poison(data, int(at), model) if what == "nan" else
                Trigger(data, int(at), signal.SIGTERM if what == "stop" else signal.SIGKILL))
    par = dataclasses.replace(par, strategy=strategy)
    out = workdir / (name if par.is_main else f"{name}.rank{par.rank}")
    result = train(model, data, cfg, out_dir=out, eval_batches=evals, progress=False,
                   run_config={"case": kind, "cfg": dataclasses.asdict(dataclasses.replace(
                       cfg, grad_accum=cfg.grad_accum * par.world))},
                   save_state=save_state, parallel=par, objective=objective)
    record = {"history": result.history, "step": result.step, "interrupted": result.interrupted,
              "resumed_from": result.resumed_from, "world": par.world, "skipped": result.skipped_steps}
    if kind in ("lora", "dpo"):       # the frozen base, gathered from the shards: unchanged by training?
        now = par.full_state(model.state_dict())
        torch.manual_seed(0)
        start = GPT(MODEL).state_dict()
        record["base_change"] = max((now[k] - v).abs().max().item() for k, v in start.items())
    (workdir / f"{name}.w{par.world}.r{par.rank}.json").write_text(json.dumps(record))
    return result


def main(argv: list[str]) -> None:
    workdir, cases = Path(argv[0]), argv[1:]
    par = init(DistributedConfig(timeout_s=20), "cpu")
    torch.set_num_threads(1)
    for case in cases:
        run_case(case, workdir, par)
    par.close()


if __name__ == "__main__":       # one line per failing rank, as a stage prints
    raise SystemExit(run_main(main, sys.argv[1:]))
