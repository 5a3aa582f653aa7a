"""What the serving and chat tests share: a tiny model *trained* (a few seconds) on instruction/response
pairs rendered through the SFT template with a real SentencePiece tokenizer, and a real ``minilm-serve``
process on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minilm.checkpoint import load_model, save_checkpoint
from minilm.config import DEFAULT_TEMPLATE, ModelConfig, TokenizerConfig
from minilm.model import GPT, lm_loss
from minilm.tokenizer import load_tokenizer, train_sentencepiece

PAIRS = [("What is a list?", "A list is an ordered collection of items."),
         ("What is a dict?", "A dict maps keys to values."),
         ("How do I open a file?", "Use open with a path and a mode."),
         ("What does len do?", "It returns the number of items."),
         ("What is a tuple?", "A tuple is an immutable sequence."),
         ("How do I print text?", "Call print with the text."),
         ("What is a set?", "A set holds unique items."),
         ("What is a string?", "A string is a sequence of characters."),
         ("How do I sort a list?", "Call sorted on it or use the sort method."),
         ("What is None?", "None means no value."),
         ("What does range do?", "It gives a sequence of numbers."),
         ("How do I read a line?", "Call readline on the file.")]
CTX = 128


@dataclass
class Kit:
    ckpt: Path
    tokenizer_path: Path
    model: GPT
    tokenizer: object
    template: str = DEFAULT_TEMPLATE


def make_kit(d: Path, steps: int = 150) -> Kit:
    """Train (once per session directory) and load the tiny chat model. The checkpoint records its SFT
    template and tokenizer hash, as the pipeline's merged model does."""
    ckpt, tok_path = d / "chat.safetensors", d / "sp.model"
    if not ckpt.exists():
        _train(d, ckpt, tok_path, steps)
    model, _ = load_model(ckpt)
    return Kit(ckpt, tok_path, model, load_tokenizer(tok_path))


def _train(d: Path, ckpt: Path, tok_path: Path, steps: int) -> None:
    from pydoc_data.topics import topics

    d.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f"{DEFAULT_TEMPLATE.format(instruction=q)}{a}" for q, a in PAIRS)
    text += "\n" + "\n".join(topics[k] for k in sorted(topics))[:30_000]
    (d / "text.txt").write_text(text, encoding="utf-8")
    tok = train_sentencepiece(d / "text.txt", tok_path, TokenizerConfig(
        vocab_size=512, special_tokens=["### Instruction:", "### Response:"]))
    seq: list[int] = []
    for q, a in PAIRS:
        seq += tok.encode(DEFAULT_TEMPLATE.format(instruction=q), bos=True) + tok.encode(a, eos=True)
    data = torch.tensor(seq * 4)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2,
                            d_model=64, ffn_hidden=128, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - CTX - 1, (16,), generator=g)
        x = torch.stack([data[s:s + CTX] for s in starts])
        y = torch.stack([data[s + 1:s + CTX + 1] for s in starts])
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(ckpt, model, extra={"sft_template": DEFAULT_TEMPLATE, "tokenizer_sha256": tok.hash})


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> Kit:
    return make_kit(tmp_path_factory.getbasetemp() / "chatkit")


def env1() -> dict[str, str]:
    """The environment of a child process: one torch thread (the CI machine is shared)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``minilm-serve`` child process (``python -m minilm.serve.main``) on 127.0.0.1."""

    def __init__(self, kit: Kit, *args: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "minilm.serve.main", "--ckpt", str(kit.ckpt), "--tokenizer",
               str(kit.tokenizer_path), "--port", str(self.port), "--device", "cpu", "--precision", "fp32",
               "--threads", "1", *args]
        self.out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env or env1(), stdout=self.out, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:] if self.log else ""
                self.close()
                pytest.fail(f"minilm-serve did not come up (exit {self.proc.returncode}):\n{tail}")
            time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.out is not subprocess.DEVNULL:
            self.out.close()
