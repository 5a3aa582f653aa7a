"""optimizer: muon - Muon for the blocks' matrices, AdamW for the rest, as one optimizer the loop resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minilm.config import LoRAConfig, ModelConfig, TrainConfig, build
from minilm.data import LMBatches
from minilm.errors import ConfigError
from minilm.lora import inject_lora, mark_only_lora_trainable
from minilm.model import GPT
from minilm.optim import MuonAdamW, build_optimizer, clip_gradients
from minilm.train import train

CPU = torch.device("cpu")
TOKENS = np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16)


def model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, context_length=32, n_layer=2, n_head=2, d_model=32))


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=5, eval_batches=2,
                log_every=5, optimizer="muon", muon_lr=0.02)
    base.update(kw)
    return TrainConfig(**base)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    m = model()
    opt = build_optimizer(m, cfg(), CPU)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    muon = [names[id(p)] for p in opt._muon.param_groups[0]["params"]]
    adamw = [names[id(p)] for g in opt._adamw.param_groups for p in g["params"]]
    assert muon and all(n.startswith("model.layers.") and n.endswith("proj.weight") for n in muon)
    assert "model.embed_tokens.weight" in adamw and any("norm" in n for n in adamw)
    assert len(muon) + len(adamw) == len(list(m.parameters()))
    assert opt.param_groups[-1]["lr_scale"] == pytest.approx(0.02 / 3e-3)
    assert isinstance(build_optimizer(m, cfg(optimizer="adamw"), CPU), torch.optim.AdamW)


def test_muon_on_lora_takes_only_the_adapter_matrices():
    m = model()
    inject_lora(m, LoRAConfig(rank=4, alpha=8))
    mark_only_lora_trainable(m)
    opt = build_optimizer(m, cfg(), CPU)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(p.requires_grad for p in params)
    assert all(p.dim() == 2 for p in opt._muon.param_groups[0]["params"])


def _run(out, steps, **kw):
    m = model()
    data = LMBatches(TOKENS, 4, 32, seed=1)
    result = train(m, data, cfg(max_steps=steps, schedule="constant", **kw), out_dir=out,
                   eval_batches=data.eval_batches(2), progress=False, run_config={"muon": 1})
    return m, result


def test_muon_learns_and_resumes_bit_identically(tmp_path):
    whole, r = _run(tmp_path / "whole", 20)
    assert r.history[-1]["val_loss"] < r.history[1]["val_loss"]
    _run(tmp_path / "split", 10)
    resumed, r2 = _run(tmp_path / "split", 20)
    assert r2.resumed_from == 10
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_the_state_dict_round_trips_into_a_fresh_optimizer():
    m = model()
    opt = build_optimizer(m, cfg(), CPU)
    m(torch.randint(0, 64, (2, 16))).float().pow(2).mean().backward()
    opt.step()
    fresh = build_optimizer(m, cfg(), CPU)
    fresh.load_state_dict(opt.state_dict())
    assert fresh._muon.state is fresh.state and fresh._adamw.param_groups[0] is fresh.param_groups[0]
    p = fresh._muon.param_groups[0]["params"][0]
    assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[opt._muon.param_groups[0]["params"][0]]
                       ["momentum_buffer"])


def test_muon_settings_are_validated():
    with pytest.raises(ConfigError, match=r"pretrain.optimizer must be 'adamw' \| 'muon', got 'sgd'"):
        build(TrainConfig, {"optimizer": "sgd"}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain.muon_momentum must be in \[0, 1\), got 1.0"):
        build(TrainConfig, {"muon_momentum": 1.0}, "pretrain")


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, float("nan"), float("inf")])
@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_clip_gradients_is_clip_grad_norm_bit_for_bit(scale, grad_clip):
    """Skipping the multiply by a clamped 1.0 changes nothing: same norm, same gradients, to the bit."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(40, 24)) for _ in range(4)] + [torch.nn.Parameter(torch.randn(24))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(a, grad_clip if grad_clip > 0 else float("inf"))
    norm = clip_gradients(b, grad_clip)
    assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan()) or (norm.isinf() and
                                                                               expected.isinf())
    for p, q in zip(a, b):
        assert torch.equal(p.grad.view(torch.int32), q.grad.view(torch.int32))
