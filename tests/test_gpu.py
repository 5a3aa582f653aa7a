"""CUDA paths (bf16/fp16 autocast, fused AdamW, the gradient scaler, torch.compile, cached decoding in bf16,
the fused attention kernels). Skipped without a GPU; CI has none, so these run only where one is present.

The bodies are functions of the device, so their logic also runs on CPU (``run_on("cpu")`` below is not
collected; call it by hand when changing them)."""

from __future__ import annotations

import pytest
import torch

from minilm.checkpoint import load_checkpoint
from minilm.config import ModelConfig, SampleConfig, TrainConfig
from minilm.data import LMBatches
from minilm.model import GPT, KVCache, attention_backend
from minilm.precision import resolve_precision
from minilm.sampling import generate_ids
from minilm.train import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOKENS = (torch.arange(20_000) % 97).numpy().astype("uint16")   # a learnable periodic sequence


def tiny(n_kv_head: int | None = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=128, context_length=32, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                           d_model=64))


def needs_bf16(precision: str) -> None:
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# training: learns, resumes where it stopped, compiles


class Crash(Exception):
    pass


class CrashingBatches(LMBatches):
    def __init__(self, *args, at: int, **kw):
        super().__init__(*args, **kw)
        self.at = at

    def batch(self, step, micro=0):
        if step == self.at:
            raise Crash
        return super().batch(step, micro)


def learns_and_resumes(tmp_path, precision: str, device: str) -> None:
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, save_every=10,
                      eval_batches=2, log_every=10, precision=precision)
    data = LMBatches(TOKENS, 8, 32, seed=1)
    ev = data.eval_batches(2)
    # the explicit-matmul attention: deterministic kernels, so the two runs can be compared closely
    with attention_backend("matmul"):
        full_model = tiny().to(device)
        full = train(full_model, data, cfg, out_dir=tmp_path / "full", eval_batches=ev, progress=False,
                     run_config={"run": precision})
        assert full.history[0]["train_loss"] > 2 * full.history[-1]["train_loss"]       # it learns
        out = tmp_path / "resumed"
        with pytest.raises(Crash):
            train(tiny().to(device), CrashingBatches(TOKENS, 8, 32, seed=1, at=45), cfg, out_dir=out,
                  eval_batches=ev, progress=False, run_config={"run": precision})
        assert load_checkpoint(out / "last.safetensors").step == 40
        model = tiny(seed=123).to(device)       # a new process builds another model: the checkpoint wins
        resumed = train(model, data, cfg, out_dir=out, eval_batches=ev, progress=False,
                        run_config={"run": precision})
    assert resumed.resumed_from == 40 and resumed.step == 60
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    # optimizer moments, the fp16 loss scale and the step count come back with the weights: a resume that
    # lost any of them moves the weights by ~lr per step, far beyond this
    theirs = weights(full_model)
    for k, v in weights(model).items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-5, msg=k)
    later = [(r["step"], round(r["train_loss"], 4)) for r in full.history if "train_loss" in r and r["step"] > 40]
    mine = [(r["step"], round(r["train_loss"], 4)) for r in resumed.history if "train_loss" in r and r["step"] > 40]
    assert mine == later


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_learns_and_resumes(tmp_path, precision):
    needs_bf16(precision)
    learns_and_resumes(tmp_path, precision, "cuda")


def compile_matches_eager(tmp_path, precision: str, device: str, rel: float) -> None:
    import torch._dynamo

    cfg = dict(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=100, log_every=5,
               precision=precision)
    data = LMBatches(TOKENS, 8, 32, seed=1)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result = train(tiny().to(device), data, TrainConfig(**cfg, compile=compiled),
                       out_dir=tmp_path / str(compiled), progress=False)
        runs[compiled] = [r["train_loss"] for r in result.history if "train_loss" in r]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        assert (graphs > 0) == compiled, graphs          # compile: true really compiled, and only then
    torch._dynamo.reset()
    assert runs[True] == pytest.approx(runs[False], rel=rel), runs


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_compiled_training_on_cuda_matches_eager(tmp_path, precision, rel):
    needs_bf16(precision)
    compile_matches_eager(tmp_path, precision, "cuda", rel)


def test_auto_precision_on_cuda_is_low_precision():
    assert resolve_precision("auto", torch.device("cuda")) in ("bf16", "fp16")


# --------------------------------------------------------------------------------------------------
# decoding


def test_cached_decoding_on_cuda_matches_cpu():
    model = tiny()
    cfg = SampleConfig(temperature=0.0, min_new_tokens=10, max_new_tokens=10, repetition_penalty=1.0,
                       ban_window=0)
    prompts = [[1, 2, 3, 4], [5, 6]]
    cpu = generate_ids(model, prompts, cfg, eos_id=None)
    gpu = generate_ids(model.cuda(), prompts, cfg, eos_id=None)
    assert cpu == gpu


def bf16_cached_matches_full(device: str, n_kv_head: int | None) -> None:
    """bf16 weights (generate.precision auto on a GPU): the cached path and the full forward agree to bf16
    rounding, greedy choices included wherever the margin exceeds the rounding."""
    eps = torch.finfo(torch.bfloat16).eps
    for seed in range(3):
        model = tiny(n_kv_head, seed).to(device=device, dtype=torch.bfloat16).eval()
        x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad():
            full = model(x).float()
            cache = KVCache(model.config, 2, 24, dtype=torch.bfloat16, device=device)
            steps = [model(x[:, :8], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(8, 24)]
        cached = torch.cat(steps, 1).float()
        bound = 2 * eps * full.abs().max()                 # two roundings of the largest logit
        assert (cached - full).abs().max() <= bound, ((cached - full).abs().max() / bound, seed)
        top2 = full.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * bound
        assert clear.float().mean() > 0.5
        assert torch.equal(cached.argmax(-1)[clear], full.argmax(-1)[clear]), seed


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_bf16_cached_decode_on_cuda_matches_full_forward(n_kv_head):
    needs_bf16("bf16")
    bf16_cached_matches_full("cuda", n_kv_head)


# --------------------------------------------------------------------------------------------------
# the attention kernel: a fused one (flash, memory-efficient or cuDNN), never the math fallback


@pytest.mark.parametrize("n_kv_head", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_on_cuda_never_falls_back_to_the_math_kernel(n_kv_head, dtype):
    """Under sdpa_kernel() without MATH, SDPA raises instead of falling back: a mask where is_causal would
    do, a layout or dtype the fused kernels refuse, or an unsupported GQA call shows up here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if dtype == torch.bfloat16:
        needs_bf16("bf16")
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    model = tiny(n_kv_head).cuda()
    x = torch.randint(0, 128, (4, 32), device="cuda")
    with sdpa_kernel(fused):
        with torch.autocast("cuda", dtype=dtype):          # training: causal self-attention, backward too
            model(x).float().logsumexp(-1).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        decoder = model.to(dtype).eval()
        cfg = SampleConfig(temperature=0.0, min_new_tokens=6, max_new_tokens=6, repetition_penalty=1.0,
                           ban_window=0)
        with torch.no_grad():
            generate_ids(decoder, [[1, 2, 3, 4, 5]], cfg, eos_id=None)            # prefill + decode steps
            generate_ids(decoder, [[1, 2, 3, 4, 5], [6, 7]], cfg, eos_id=None)    # left-padded: a mask


def run_on(device: str = "cpu", tmp_path=None) -> None:
    """The device-independent bodies on another device (a check of the test logic itself)."""
    import tempfile
    from pathlib import Path

    tmp = Path(tmp_path or tempfile.mkdtemp())
    for precision in ("fp32", "bf16"):
        learns_and_resumes(tmp / f"r-{precision}", precision, device)
    compile_matches_eager(tmp / "c", "fp32", device, 1e-3)
    for n_kv_head in (None, 2):
        bf16_cached_matches_full(device, n_kv_head)
