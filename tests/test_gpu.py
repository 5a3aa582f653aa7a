"""CUDA paths (bf16/fp16 autocast, fused AdamW, the gradient scaler, cached decoding). Skipped without
a GPU; CI has none, so these run only where one is present."""

from __future__ import annotations

import pytest
import torch

from minilm.config import ModelConfig, SampleConfig, TrainConfig
from minilm.data import LMBatches
from minilm.model import GPT
from minilm.precision import resolve_precision
from minilm.sampling import generate_ids
from minilm.train import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=128, context_length=32, n_layer=2, n_head=4, n_kv_head=2,
                           d_model=64))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_learns_and_resumes(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    tokens = (torch.arange(20_000) % 97).numpy().astype("uint16")   # a learnable periodic sequence
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=30,
                      eval_batches=2, log_every=10, precision=precision)
    model = tiny().cuda()
    data = LMBatches(tokens, 8, 32, seed=1)
    result = train(model, data, cfg, out_dir=tmp_path, eval_batches=data.eval_batches(2),
                   progress=False)
    assert result.history[0]["train_loss"] > 2 * result.history[-1]["train_loss"]
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_auto_precision_on_cuda_is_low_precision():
    assert resolve_precision("auto", torch.device("cuda")) in ("bf16", "fp16")


def test_cached_decoding_on_cuda_matches_cpu():
    model = tiny()
    cfg = SampleConfig(temperature=0.0, min_new_tokens=10, max_new_tokens=10, repetition_penalty=1.0,
                       ban_window=0)
    prompts = [[1, 2, 3, 4], [5, 6]]
    cpu = generate_ids(model, prompts, cfg, eos_id=None)
    gpu = generate_ids(model.cuda(), prompts, cfg, eos_id=None)
    assert cpu == gpu
