"""Off the training thread: checkpoints written in the background, batches prepared a step ahead, and
the TF32 decision. Behaviour only (parity with the synchronous path, which thread does what, how errors
surface); no timing."""

from __future__ import annotations

import copy
import errno
import threading

import numpy as np
import pytest
import torch

import minilm.ckptwriter as ckptwriter
import minilm.train as train_mod
from minilm import checkpoint as ckpt_io
from minilm.checkpoint import load_checkpoint, save_checkpoint
from minilm.ckptwriter import CheckpointWriter
from minilm.config import ModelConfig, TrainConfig
from minilm.data import LMBatches
from minilm.errors import MinilmError
from minilm.model import GPT
from minilm.precision import set_matmul_precision, uses_tf32
from minilm.prefetch import StepBatches, prefetchable, pure_batches
from minilm.train import _target_tokens, train


@pytest.fixture(scope="module")
def byte_tokens() -> np.ndarray:
    import pydoc_data.topics as t

    text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[:200_000].copy()


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=256, context_length=32, n_layer=2, n_head=4, d_model=32))


def tiny_cfg(**kw) -> TrainConfig:
    cfg = dict(max_steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=4,
               eval_batches=2, log_every=4, precision="fp32", seed=7, ema_decay=0.9)
    cfg.update(kw)
    return TrainConfig(**cfg)


def run(tmp_path, tokens, cfg: TrainConfig, name: str, data=None):
    model = tiny_model()
    data = data or LMBatches(tokens, cfg.batch_size, 32, seed=cfg.seed)
    ev = LMBatches(tokens, cfg.batch_size, 32, seed=cfg.seed).eval_batches(cfg.eval_batches, seed=99)
    result = train(model, data, cfg, out_dir=tmp_path / name, eval_batches=ev, progress=False,
                   run_config={"cfg": "async"})
    return model, result


# --------------------------------------------------------------------------------------------------
# checkpoints


class _SyncReference(CheckpointWriter):
    """At every save, also writes what the synchronous path (``save_checkpoint``'s) writes at that moment,
    and keeps the bytes of both once the background write is done."""

    files: list[tuple[str, bytes, bytes]] = []

    def save(self, slot, path, tensors, meta, done=None):
        host = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        ref = path.with_name(f"ref-{self.writes}-{path.name}")
        ckpt_io.write_checkpoint(ref, host, copy.deepcopy(meta))

        def compare():
            type(self).files.append((path.name, ref.read_bytes(), path.read_bytes()))
            if done is not None:
                done()
        super().save(slot, path, tensors, meta, done=compare)


def test_background_saves_write_the_bytes_a_synchronous_save_writes(tmp_path, byte_tokens, monkeypatch):
    monkeypatch.setattr(train_mod, "CheckpointWriter", _SyncReference)
    _SyncReference.files = []
    run(tmp_path, byte_tokens, tiny_cfg(schedule="wsd", decay_fraction=0.5), "run")
    kinds = sorted({name for name, _, _ in _SyncReference.files})
    assert kinds == ["best.safetensors", "last.safetensors", "stable.safetensors"]
    assert len(_SyncReference.files) >= 7           # last at every eval (3), best when improved, stable
    for name, ref, written in _SyncReference.files:
        assert written == ref, name


def test_public_save_checkpoint_and_the_writer_agree_byte_for_byte(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "sync.safetensors", model, step=3, optimizer=opt, rng=True,
                    ema_state={k: v * 2 for k, v in ckpt_io.model_state(model).items()})
    rng = torch.get_rng_state()
    ema = {k: v * 2 for k, v in ckpt_io.model_state(model).items()}
    tensors, meta = ckpt_io.checkpoint_contents(model, step=3, optimizer=opt, rng=True, ema_state=ema)
    tensors["rng.torch"] = rng
    with CheckpointWriter() as writer:
        writer.save("last", tmp_path / "async.safetensors", tensors, meta)
    assert (tmp_path / "async.safetensors").read_bytes() == (tmp_path / "sync.safetensors").read_bytes()


def test_hashing_and_writing_happen_in_one_background_thread_and_the_next_save_waits(tmp_path, monkeypatch):
    release, started, seen = threading.Event(), threading.Event(), []
    real = ckptwriter.write_checkpoint

    def slow_write(path, tensors, meta):
        seen.append(threading.current_thread())
        started.set()
        assert release.wait(60), "never released"
        return real(path, tensors, meta)

    monkeypatch.setattr(ckptwriter, "write_checkpoint", slow_write)
    model, writer = tiny_model(), CheckpointWriter()
    tensors, meta = ckpt_io.checkpoint_contents(model, step=1)
    writer.save("last", tmp_path / "last.safetensors", tensors, meta)
    buffers = {k: v.data_ptr() for k, v in writer._buffers["last"].items()}
    with torch.no_grad():                               # training goes on: the live weights change
        for p in model.parameters():
            p.add_(1.0)
    assert writer.pending() and not (tmp_path / "last.safetensors").exists()   # save returned at once
    assert started.wait(60) and seen[0] is not threading.main_thread()
    release.set()
    tensors2, meta2 = ckpt_io.checkpoint_contents(model, step=2)
    writer.save("last", tmp_path / "last.safetensors", tensors2, meta2)   # joins the pending write first
    assert load_checkpoint(tmp_path / "last.safetensors").step in (1, 2)
    writer.wait()
    assert not writer.pending() and len(seen) == 2 and seen[0] is not seen[1]
    assert threading.main_thread() not in seen
    assert {k: v.data_ptr() for k, v in writer._buffers["last"].items()} == buffers    # reused, not reallocated
    ckpt = load_checkpoint(tmp_path / "last.safetensors")      # the second snapshot, checksum verified
    assert ckpt.step == 2
    for k, v in ckpt_io.model_state(model).items():
        assert torch.equal(ckpt.model_state[k], v)


def test_the_first_snapshot_is_not_changed_by_training_after_the_save(tmp_path, monkeypatch):
    release = threading.Event()
    real = ckptwriter.write_checkpoint
    monkeypatch.setattr(ckptwriter, "write_checkpoint",
                        lambda *a: (release.wait(60), real(*a))[1])
    model, writer = tiny_model(), CheckpointWriter()
    before = {k: v.clone() for k, v in ckpt_io.model_state(model).items()}
    writer.save("best", tmp_path / "best.safetensors", *ckpt_io.checkpoint_contents(model, step=1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    release.set()
    writer.wait()
    saved = load_checkpoint(tmp_path / "best.safetensors").model_state
    assert all(torch.equal(saved[k], before[k]) for k in before)


_KILLED_WRITER = """
import sys, time
from pathlib import Path
import safetensors.torch
from minilm import checkpoint as ckpt_io
from minilm.ckptwriter import CheckpointWriter
from minilm.config import ModelConfig
from minilm.model import GPT

def stalled_save(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"torn" * 10_000)           # part of the new file, then the writer stalls
    print("writing", flush=True)
    time.sleep(120)

target = Path(sys.argv[1])
model = GPT(ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16))
ckpt_io.save_checkpoint(target, model, step=1)
safetensors.torch.save_file = stalled_save
writer = CheckpointWriter()
writer.save("last", target, *ckpt_io.checkpoint_contents(model, step=2))
print("training goes on", flush=True)
writer.wait()
"""


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_whole(tmp_path):
    import subprocess
    import sys

    from minilm.fileio import remove_stale_temps

    target = tmp_path / "last.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True)
    try:
        said = ""
        while not ("writing" in said and "training goes on" in said) and proc.poll() is None:
            said += proc.stdout.readline()       # two threads print: their lines may interleave
        assert "writing" in said and "training goes on" in said   # the main thread was not held up
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert load_checkpoint(target).step == 1                   # whole, checksum verified
    assert len(remove_stale_temps(target)) == 1 and [p.name for p in tmp_path.iterdir()] == [target.name]


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_writer_error_is_the_synchronous_one_line_error_and_keeps_the_previous_file(tmp_path, monkeypatch,
                                                                                       byte_tokens):
    import safetensors.torch

    model = tiny_model()
    target = tmp_path / "last.safetensors"
    save_checkpoint(target, model, step=1)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with pytest.raises(MinilmError) as sync_err:
        save_checkpoint(target, model, step=2)
    writer = CheckpointWriter()
    writer.save("last", target, *ckpt_io.checkpoint_contents(model, step=2))
    with pytest.raises(MinilmError) as async_err:
        writer.wait()
    assert str(async_err.value) == str(sync_err.value) and "\n" not in str(async_err.value)
    assert "no space left on device" in str(async_err.value)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    # through the training loop: the run stops with that line, no temporary file left
    with pytest.raises(MinilmError, match="no space left on device.*previous file was left intact"):
        run(tmp_path, byte_tokens, tiny_cfg(max_steps=8), "train")
    assert not [p for p in (tmp_path / "train").iterdir() if p.name.endswith(".tmp")]


def test_an_exception_in_training_still_waits_for_the_pending_write(tmp_path, byte_tokens):
    class Crash(Exception):
        pass

    class Crashing(LMBatches):
        def batch(self, step, micro=0):
            if step == 5:
                raise Crash
            return super().batch(step, micro)

    cfg = tiny_cfg(max_steps=12)
    with pytest.raises(Crash):
        run(tmp_path, byte_tokens, cfg, "crash",
            data=Crashing(byte_tokens, cfg.batch_size, 32, seed=cfg.seed))
    assert load_checkpoint(tmp_path / "crash" / "last.safetensors").step == 4    # complete, checksum verified
    assert not any(t.name.startswith("minilm-checkpoint") for t in threading.enumerate())


# --------------------------------------------------------------------------------------------------
# batches


def test_step_batches_match_the_source_and_are_drawn_a_step_ahead_off_the_training_thread(byte_tokens):
    data = LMBatches(byte_tokens, 4, 32, seed=3)
    assert prefetchable(data)
    drawn = []

    class Spy(LMBatches):
        @pure_batches
        def batch(self, step, micro=0):
            drawn.append((step, micro, threading.current_thread() is threading.main_thread()))
            return super().batch(step, micro)

    spy = Spy(byte_tokens, 4, 32, seed=3)
    with StepBatches(spy, [0, 1], torch.device("cpu"), _target_tokens, last=5) as batches:
        for step in range(5):
            micro, n = batches.get(step)
            assert n == 2 * 4 * 32
            for m, (x, y, kw) in enumerate(micro):
                ex, ey = data.batch(step, m)
                assert torch.equal(x, ex) and torch.equal(y, ey) and x.dtype == torch.int64 and kw == {}
    assert [(s, m) for s, m, _ in drawn] == [(s, m) for s in range(5) for m in (0, 1)]   # none past the end
    assert [main for s, _, main in drawn] == [s == 0 for s in range(5) for _ in (0, 1)]  # 1..4 ahead


def test_sources_not_marked_pure_are_drawn_at_their_step_in_the_training_thread(byte_tokens):
    threads = []

    class Overrides(LMBatches):                    # e.g. a test's crashing or signalling source
        def batch(self, step, micro=0):
            threads.append(threading.current_thread() is threading.main_thread())
            return super().batch(step, micro)

    data = Overrides(byte_tokens, 2, 16, seed=0)
    assert not prefetchable(data)
    with StepBatches(data, [0], torch.device("cpu"), _target_tokens, last=3) as batches:
        for step in range(3):
            batches.get(step)
    assert threads == [True, True, True]


def test_an_error_drawing_ahead_is_raised_by_the_get_of_its_step(byte_tokens):
    class Bad(LMBatches):
        @pure_batches
        def batch(self, step, micro=0):
            if step == 2:
                raise ValueError("bad window")
            return super().batch(step, micro)

    with StepBatches(Bad(byte_tokens, 2, 16, seed=0), [0], torch.device("cpu"), _target_tokens, last=4) as b:
        b.get(0)
        b.get(1)                                     # step 2 fails in the background: not raised yet
        with pytest.raises(ValueError, match="bad window"):
            b.get(2)


def test_narrow_windows_are_widened_after_the_copy_to_the_same_batches():
    tokens = np.arange(5000, dtype=np.uint16) * 13
    data = LMBatches(tokens, 3, 16, seed=1)
    assert data.windows(4, 1).dtype == torch.uint16 and data.windows(4, 1).shape == (3, 17)
    batches = StepBatches(data, [0, 1], torch.device("cpu"), _target_tokens, last=3)
    batches.windows = True                      # the CUDA path (pinned uint16 windows), on the CPU
    with batches:
        for step in range(3):
            micro, n = batches.get(step)
            assert n == 2 * 3 * 16
            for m, (x, y, _) in enumerate(micro):
                ex, ey = data.batch(step, m)
                assert x.dtype == y.dtype == torch.int64 and torch.equal(x, ex) and torch.equal(y, ey)


# --------------------------------------------------------------------------------------------------
# TF32


@pytest.mark.parametrize("device,precision,expected", [
    ("cuda", "fp32", True), ("cuda:1", "fp32", True), ("cuda", "bf16", False), ("cuda", "fp16", False),
    ("cpu", "fp32", False), ("cpu", "bf16", False)])
def test_tf32_is_for_fp32_on_cuda_only(device, precision, expected):
    assert uses_tf32(torch.device(device), precision) is expected


def test_tf32_setup_leaves_the_cpu_alone():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.matmul.fp32_precision)
    on = set_matmul_precision(torch.device("cpu"), "fp32")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.matmul.fp32_precision) == before
    assert on is (torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32)
