"""Training loop: schedule, accumulation, EMA, checkpoints, exact resume, numerics, learning."""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import torch

from minilm.checkpoint import load_checkpoint, load_model
from minilm.config import ModelConfig, TrainConfig
from minilm.data import LMBatches
from minilm.ema import EMA
from minilm.errors import TrainingError
from minilm.model import GPT
from minilm.schedule import lr_at
from minilm.train import accumulate_gradients, build_optimizer, evaluate_loss, token_loss_sum, train


@pytest.fixture(scope="module")
def byte_tokens() -> np.ndarray:
    """Real English text (Python's own documentation) as bytes: a 256-symbol vocabulary."""
    import pydoc_data.topics as t

    text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[:300_000].copy()


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, context_length=32, n_layer=2, n_head=4, d_model=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def tiny_cfg(**kw) -> TrainConfig:
    cfg = dict(max_steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=5,
               eval_batches=2, log_every=5, precision="fp32", seed=7)
    cfg.update(kw)
    return TrainConfig(**cfg)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_to_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))            # linear warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))            # cosine decays
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and min(lrs) >= 0.1


def test_cosine_with_warm_restarts_period_and_multiplier():
    cfg = TrainConfig(max_steps=200, warmup_steps=0, lr=1.0, min_lr=0.0, schedule="cosine_restarts",
                      restart_period=10, restart_mult=2.0)
    lrs = [lr_at(s, cfg) for s in range(70)]
    restarts = [s for s in range(1, 70) if lrs[s] > lrs[s - 1] + 1e-9]
    assert restarts == [10, 30]                                        # cycles of 10, 20, 40 steps
    assert lrs[0] == lrs[10] == lrs[30] == pytest.approx(1.0)
    flat = TrainConfig(max_steps=100, warmup_steps=0, lr=1.0, min_lr=0.0, schedule="cosine_restarts",
                       restart_period=25)
    assert [lr_at(s, flat) for s in range(25)] == [lr_at(s, flat) for s in range(25, 50)]


# ---------------------------------------------------------------------------------------------- pieces


def test_weight_decay_groups_by_dimension():
    model = tiny_model(norm="layernorm", bias=True)
    opt = build_optimizer(model, tiny_cfg(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_accumulation_normalises_over_all_tokens_of_the_step():
    """Two micro-batches with different numbers of unmasked targets give the gradient of one batch."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 16), generator=g)
    y = torch.randint(0, 256, (4, 16), generator=g)
    y[0, :12] = -100          # first micro-batch keeps few targets
    y[3, 2:] = -100
    cpu = torch.device("cpu")
    accumulate_gradients(model, [(x, y, {})], device=cpu)
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    accumulate_gradients(model, [(x[:1], y[:1], {}), (x[1:], y[1:], {})], device=cpu)
    for a, b in zip(whole, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ema_tracks_and_swaps_back():
    model = tiny_model()
    ema = EMA(model, decay=0.9)
    before = weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(50):
        ema.update(model)
    after = weights(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    # the average moved most of the way towards the new weights, but not all of it
    gap = (ema.shadow[name] - after[name]).abs().max().item()
    assert 0 < gap < 0.05
    with ema.swapped(model):
        assert torch.equal(model.state_dict()[name], ema.shadow[name])
    assert torch.equal(model.state_dict()[name], after[name])
    assert not torch.equal(before[name], after[name])


# ---------------------------------------------------------------------------------------------- runs


def run(tmp_path, byte_tokens, cfg: TrainConfig, name: str, model=None, **kw):
    model = model or tiny_model()
    data = LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed)
    ev = LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed).eval_batches(cfg.eval_batches, seed=99)
    result = train(model, data, cfg, out_dir=tmp_path / name, eval_batches=ev, progress=False,
                   run_config={"cfg": name.split("-")[0]}, **kw)
    return model, result


def test_seeded_tiny_run_matches_stored_loss_curve(tmp_path, byte_tokens):
    """A silent numerics change (init, RoPE, loss, schedule, optimizer) shows up here."""
    _, result = run(tmp_path, byte_tokens, tiny_cfg(max_steps=20), "curve")
    losses = [round(r["train_loss"], 4) for r in result.history if "train_loss" in r]
    stored = STORED_CURVE
    assert losses == pytest.approx(stored, abs=2e-3), losses


STORED_CURVE = [5.3446, 4.8651, 4.4038, 4.2593]  # torch 2.13.0 CPU, fp32


@pytest.mark.parametrize("variant", [
    dict(),
    dict(ema_decay=0.9, grad_accum=2),
    dict(dropout=0.1),
])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, byte_tokens, variant):
    dropout = variant.pop("dropout", 0.0)
    cfg = tiny_cfg(save_every=4, **variant)
    full_model, full = run(tmp_path, byte_tokens, cfg, "a-full", model=tiny_model(dropout=dropout))

    class Crash(Exception):
        pass

    class CrashingBatches(LMBatches):
        def batch(self, step, micro=0):
            if step == 10:
                raise Crash
            return super().batch(step, micro)

    out = tmp_path / "a-resumed"
    model = tiny_model(dropout=dropout)
    data = CrashingBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed)
    ev = LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed).eval_batches(cfg.eval_batches, seed=99)
    with pytest.raises(Crash):
        train(model, data, cfg, out_dir=out, eval_batches=ev, progress=False, run_config={"cfg": "a"})
    assert load_checkpoint(out / "last.safetensors").step == 8
    # a brand-new process would build a fresh model with another seed: the checkpoint must win
    model2 = tiny_model(seed=123, dropout=dropout)
    data2 = LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed)
    resumed = train(model2, data2, cfg, out_dir=out, eval_batches=ev, progress=False,
                    run_config={"cfg": "a"})
    assert resumed.resumed_from == 8 and resumed.step == cfg.max_steps
    for k, v in weights(full_model).items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert resumed.history == full.history            # no wall-clock column: bit-identical rows
    assert all(set(r) <= {"step", "train_loss", "lr", "grad_norm", "val_loss"} for r in full.history)
    assert resumed.best_val_loss == full.best_val_loss


# ---------------------------------------------------------------------------------------------- continuing


def test_wsd_is_stable_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70                                   # stable until the last 20%
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))             # then strictly down...
    assert lrs[-1] == pytest.approx(0.1)                              # ...to min_lr at the last step
    longer = dataclasses.replace(cfg, max_steps=150)                  # the stable phase ignores the length
    assert [lr_at(s, longer) for s in range(80)] == lrs[:80]


def test_a_finished_wsd_run_given_more_steps_equals_the_longer_run_from_scratch(tmp_path, byte_tokens):
    """10 steps (decay from step 6), then extended to 16 (decay from step 10): the extension branches
    from the stable-phase checkpoint at step 6 and ends bit-identical to 16 steps from scratch."""
    short = tiny_cfg(max_steps=10, schedule="wsd", decay_fraction=0.4, save_every=5)
    longer = dataclasses.replace(short, max_steps=16)
    model, first = run(tmp_path, byte_tokens, short, "w-run")
    assert first.step == 10 and (tmp_path / "w-run" / "stable.safetensors").exists()
    assert load_checkpoint(tmp_path / "w-run" / "stable.safetensors").step == 6
    cont_model, cont = run(tmp_path, byte_tokens, longer, "w-run", model=tiny_model(seed=5))
    assert cont.resumed_from == 6 and cont.step == 16
    ref_model, ref = run(tmp_path, byte_tokens, longer, "w-ref")
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, cont_model.state_dict()[k]), k
    assert cont.history == ref.history


def test_a_finished_cosine_run_given_more_steps_continues_from_last(tmp_path, byte_tokens):
    """Cosine has no stable phase: the extension continues from step 10 on the new curve (so the
    learning rate rises again from min_lr), with the optimizer state and data position of step 10."""
    cfg = tiny_cfg(max_steps=10)
    run(tmp_path, byte_tokens, cfg, "c-run")
    longer = dataclasses.replace(cfg, max_steps=16)
    _, cont = run(tmp_path, byte_tokens, longer, "c-run", model=tiny_model(seed=5))
    assert cont.resumed_from == 10 and cont.step == 16
    assert cont.history[-1]["lr"] == pytest.approx(lr_at(15, longer))
    assert lr_at(10, longer) > lr_at(9, cfg)                          # the documented jump back up


def test_an_interrupted_run_in_its_decay_phase_resumes_from_last_not_the_branch_point(tmp_path, byte_tokens):
    cfg = tiny_cfg(max_steps=12, schedule="wsd", decay_fraction=0.5, save_every=2)

    class Stop(Exception):
        pass

    class Crashing(LMBatches):
        def batch(self, step, micro=0):
            if step == 9:
                raise Stop
            return super().batch(step, micro)

    with pytest.raises(Stop):
        train(tiny_model(), Crashing(byte_tokens, cfg.batch_size, 32, seed=cfg.seed), cfg,
              out_dir=tmp_path / "d-run", progress=False, run_config={"cfg": "d"})
    _, resumed = run(tmp_path, byte_tokens, cfg, "d-run", model=tiny_model(seed=5))
    assert resumed.resumed_from == 8


def test_off_a_terminal_progress_is_a_plain_line_now_and_then(tmp_path, byte_tokens, capfd):
    model = tiny_model()
    cfg = tiny_cfg(max_steps=40)
    train(model, LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed), cfg, out_dir=tmp_path / "p",
          progress=True)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: step")]
    assert "\r" not in err and 2 <= len(lines) <= 21, err
    assert lines[-1].startswith("train: step 40/40: train_loss")


def test_changed_params_start_afresh(tmp_path, byte_tokens):
    cfg = tiny_cfg(max_steps=10)
    run(tmp_path, byte_tokens, cfg, "x-run")
    model = tiny_model()
    data = LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed)
    result = train(model, data, tiny_cfg(max_steps=12), out_dir=tmp_path / "x-run", progress=False,
                   run_config={"cfg": "different"})
    assert result.resumed_from == 0 and result.step == 12


def test_sigterm_saves_last_and_the_run_continues_exactly(tmp_path, byte_tokens):
    cfg = tiny_cfg(save_every=100)   # no periodic save: only the signal makes `last` mid-run
    full_model, _ = run(tmp_path, byte_tokens, cfg, "s-full")

    class Signalling(LMBatches):
        def batch(self, step, micro=0):
            if step == 6 and micro == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().batch(step, micro)

    out = tmp_path / "s-run"
    model = tiny_model()
    result = train(model, Signalling(byte_tokens, cfg.batch_size, 32, seed=cfg.seed), cfg, out_dir=out,
                   progress=False, run_config={"cfg": "s"})
    assert result.interrupted and result.step == 7
    assert load_checkpoint(out / "last.safetensors").step == 7
    model2 = tiny_model(seed=5)
    train(model2, LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed), cfg, out_dir=out,
          progress=False, run_config={"cfg": "s"})
    for k, v in weights(full_model).items():
        assert torch.equal(v, model2.state_dict()[k]), k


class NaNAfter(torch.nn.Module):
    """Wraps a model and poisons its logits on chosen calls (a stand-in for an fp16 overflow)."""

    def __init__(self, model, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = model, set(bad_calls), 0
        self.config = model.config

    def forward(self, x, **kw):
        out = self.inner(x, **kw)
        self.calls += 1
        return out * float("nan") if self.calls in self.bad_calls else out


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, byte_tokens):
    cfg = tiny_cfg(max_steps=12, save_every=5, eval_every=100)
    model = NaNAfter(tiny_model(), bad_calls={8})
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 8.*lr"):
        train(model, LMBatches(byte_tokens, 4, 32, seed=1), cfg, out_dir=out, progress=False)
    assert load_checkpoint(out / "last.safetensors").step == 5


def test_nonfinite_skip_counts_and_continues(tmp_path, byte_tokens):
    cfg = tiny_cfg(max_steps=12, eval_every=100, nonfinite="skip")
    model = NaNAfter(tiny_model(), bad_calls={3, 9})
    weights = []                         # weights[i]: the model as forward call i + 1 saw it
    model.register_forward_pre_hook(lambda m, args: weights.append(
        torch.cat([p.detach().flatten().clone() for p in m.inner.parameters()])))
    result = train(model, LMBatches(byte_tokens, 4, 32, seed=1), cfg, out_dir=tmp_path / "skip",
                   progress=False)
    assert result.skipped_steps == 2 and result.step == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(weights) >= 12            # one forward per step (grad_accum 1, no eval before step 12)
    for bad in (3, 9):                   # a skipped step leaves the weights exactly as they were...
        assert torch.equal(weights[bad - 1], weights[bad]), bad
    for good in (2, 4, 8, 10):           # ...while a good step moves them
        assert not torch.equal(weights[good - 1], weights[good]), good


def test_best_checkpoint_uses_ema_weights_and_reloads(tmp_path, byte_tokens):
    cfg = tiny_cfg(max_steps=20, ema_decay=0.95)
    model, result = run(tmp_path, byte_tokens, cfg, "e-run")
    best, ckpt = load_model(tmp_path / "e-run" / "best.safetensors")
    ev = LMBatches(byte_tokens, cfg.batch_size, 32, seed=cfg.seed).eval_batches(cfg.eval_batches, seed=99)
    val = evaluate_loss(best, ev, device=torch.device("cpu"))
    assert val == pytest.approx(result.best_val_loss, rel=1e-5)
    raw = evaluate_loss(model, ev, device=torch.device("cpu"))
    assert raw != pytest.approx(val, rel=1e-6)        # the raw weights are not what `best` holds
    last = load_checkpoint(tmp_path / "e-run" / "last.safetensors")
    assert last.ema_state is not None and last.optimizer_state is not None and "torch" in last.rng_state


def test_a_tiny_model_visibly_learns_real_text(tmp_path, byte_tokens):
    """A few hundred steps on real English: the loss falls far below the unigram entropy."""
    counts = np.bincount(byte_tokens, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram_nats = float(-(p * np.log(p)).sum())
    cfg = tiny_cfg(max_steps=300, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                   eval_every=100, eval_batches=4, log_every=50)
    model = tiny_model(context_length=64, d_model=64)
    data = LMBatches(byte_tokens, 16, 64, seed=1)
    ev = LMBatches(byte_tokens, 16, 64, seed=1).eval_batches(4, seed=99)
    result = train(model, data, cfg, out_dir=tmp_path / "learn", eval_batches=ev, progress=False)
    print(f"unigram entropy {unigram_nats:.3f} nats, val loss after 300 steps {result.last_val_loss:.3f}")
    assert result.last_val_loss < unigram_nats - 0.8
    assert math.isfinite(result.best_val_loss)


def test_compile_trains_like_eager(tmp_path, byte_tokens):
    """``compile: true`` compiles the model with its loss (token_loss_sum): the same losses and weights as
    eager to fp32 rounding, evaluation included."""
    cfg = tiny_cfg(max_steps=6, eval_every=3, log_every=1)
    eager_model, eager = run(tmp_path, byte_tokens, cfg, "eager-run")
    compiled_model, compiled = run(tmp_path, byte_tokens, dataclasses.replace(cfg, compile=True), "compiled-run")
    assert [h["train_loss"] for h in compiled.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], abs=1e-4)
    assert compiled.best_val_loss == pytest.approx(eager.best_val_loss, abs=1e-4)
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)


def test_compiled_loss_traces_once_across_sft_lengths():
    """SFT batches are padded to their longest example, so lengths vary step to step: the compiled
    model-plus-loss (what ``compile: true`` runs) must not recompile per length, and must equal eager."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_model()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]   # counters outlive reset()
    loss_fn = torch.compile(token_loss_sum, backend="eager")   # dynamo only: cheap, and it is what recompiles
    g = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for T in (8, 12, 16, 20, 24, 28):
            x = torch.randint(0, 256, (2, T), generator=g)
            y = torch.randint(0, 256, (2, T), generator=g)
            y[:, : T // 2] = -100                                # prompt positions carry no loss
            assert loss_fn(model, x, y, {}).item() == pytest.approx(token_loss_sum(model, x, y, {}).item(),
                                                                     rel=1e-6)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert frames <= 3, f"compiled {frames} graphs for 6 lengths"


# --------------------------------------------------------------------------------------------------
# pretrain.init_from: weights only, strict


def test_init_weights_from_loads_exactly_the_weights_and_refuses_a_mismatch(tmp_path):
    from minilm.checkpoint import init_weights_from, save_checkpoint
    from minilm.errors import CheckpointError
    from minilm.fileio import sha256_file

    cfg = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(1)
    trained = GPT(cfg)
    path = save_checkpoint(tmp_path / "init.safetensors", trained, step=500,
                           extra={"tokenizer_sha256": "a" * 64})
    torch.manual_seed(2)
    fresh = GPT(dataclasses.replace(cfg, dropout=0.1))     # dropout changes training, not the weights
    assert init_weights_from(fresh, path, tokenizer_hash="a" * 64) == sha256_file(path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"holds another model: model.d_model=32 \(this run: 64\)"):
        init_weights_from(GPT(dataclasses.replace(cfg, d_model=64)), path)
    with pytest.raises(CheckpointError, match="another tokenizer .*minilm-import's tokenizer.model") as err:
        init_weights_from(GPT(cfg), path, tokenizer_hash="b" * 64)
    assert "\n" not in str(err.value)
