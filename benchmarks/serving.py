"""Row 7: serving - requests/s and tokens/s of a real ``minilm-serve`` process at 1, 4 and 16 concurrent
clients, continuous batching (``--max-batch 16``) against the same server decoding one request at a time
(``--max-batch 1``).

Both servers run side by side on 127.0.0.1 with the same checkpoint (random weights of the 10M shape, a
character vocabulary of Python's help text) and are measured in rotated rounds. Each client sends its
requests one after another (``/v1/completions``, greedy, ``min_tokens = max_tokens`` so every request
decodes exactly ``new`` tokens); a round's figure is the requests (tokens) completed over its wall time.
The row also records whether both servers gave the same text for every request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from minilm.checkpoint import save_checkpoint

from .harness import TEN_M, TINY_B, Context, build_model, line, median, median_ratio

CLIENTS = (1, 4, 16)
TARGET = 1.0   # batching beats serial at 16 clients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: Path, tok: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "minilm.serve.main", "--ckpt", str(ckpt), "--tokenizer", str(tok),
           "--port", str(port), "--device", "cpu", "--precision", "fp32", "--max-batch", str(max_batch),
           "--max-tokens", "1024"]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"minilm-serve did not start: {log.read_text()[-800:]}") from None
            time.sleep(0.2)


def _complete(url: str, prompt: str, new: int) -> str:
    body = json.dumps({"model": "minilm", "prompt": prompt, "temperature": 0, "max_tokens": new,
                       "min_tokens": new}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        out = json.loads(resp.read())
    assert out["usage"]["completion_tokens"] == new, out["usage"]
    return out["choices"][0]["text"]


def _load(url: str, prompts: list[list[str]], new: int) -> tuple[float, list[str]]:
    """Seconds for every client to send its prompts one after another, all clients at once."""
    def client(ps: list[str]) -> list[str]:
        return [_complete(url, p, new) for p in ps]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = [t for out in pool.map(client, prompts) for t in out]
    return time.perf_counter() - t0, texts


def _checkpoint(d: Path, quick: bool) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    from minilm.config import TokenizerConfig
    from minilm.tokenizer import build_char_tokenizer

    text = d / "text.txt"
    text.write_text("\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    tok = build_char_tokenizer(text, d / "char.json", TokenizerConfig(kind="char"))
    shape = replace(TINY_B if quick else TEN_M, vocab_size=tok.vocab_size)
    return save_checkpoint(d / "model.safetensors", build_model(shape).eval()), d / "char.json"


def run(ctx: Context) -> dict[str, Any]:
    from pydoc_data.topics import topics

    new, per_client = (16, 1) if ctx.quick else (64, 2)
    words = " ".join(topics[k] for k in sorted(topics)).split()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt, tok = _checkpoint(d, ctx.quick)
        servers = {name: _start(ckpt, tok, mb, d / f"{name}.log") for name, mb in (("batching", 16), ("serial", 1))}
        try:
            for _, url in servers.values():
                _complete(url, "warm up", 4)
            lines = []
            for c in CLIENTS:
                prompts = [[" ".join(words[(i * per_client + j) * 7:(i * per_client + j) * 7 + 6])[:30]
                            for j in range(per_client)] for i in range(c)]
                secs: dict[str, list[float]] = {n: [] for n in servers}
                texts: dict[str, list[str]] = {}
                names = list(servers)
                for r in range(ctx.repeats if ctx.quick else 3):
                    for name in names[r % 2:] + names[:r % 2]:
                        s, texts[name] = _load(servers[name][1], prompts, new)
                        secs[name].append(s)
                ctx.log(f"  serving {c} clients: " + ", ".join(f"{n} {median(v):.2f} s" for n, v in secs.items()))
                n_req = c * per_client
                rps = {n: [n_req / s for s in v] for n, v in secs.items()}
                tps = {n: [n_req * new / s for s in v] for n, v in secs.items()}
                same = sum(a == b for a, b in zip(texts["batching"], texts["serial"])) / n_req
                extra = {"clients": c, "requests": n_req, "new_tokens": new, "same_text_as_serial": same}
                for metric, vals in (("requests/s", rps), ("tokens/s", tps)):
                    r = median_ratio(vals["batching"], vals["serial"])
                    target = f"> {TARGET:g}x" if c == 16 and metric == "tokens/s" else None
                    lines.append(line(f"{c} clients, continuous batching", metric, median(vals["batching"]),
                                      baseline_name="serial (--max-batch 1)", baseline=median(vals["serial"]),
                                      ratio=r, target=target,
                                      met=(r > TARGET) if target and r is not None else None, **extra))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    notes = [f"random weights ({'tiny' if ctx.quick else '10M'} shape, fp32), character vocabulary; every "
             f"request decodes exactly {new} tokens after a prompt of at most 30 characters; {per_client} request(s) per client, "
             "sent one after another; both servers on the same machine, measured in alternating rounds.",
             "at 1 client both servers run the same engine on one row at a time (the batching one also "
             "waits its 5 ms batch window when idle), so that ratio is about 1x: batching pays off from 2 "
             "clients on. The client threads share the machine's cores with the servers."]
    return {"lines": lines, "notes": notes}
