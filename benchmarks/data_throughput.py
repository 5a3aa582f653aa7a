"""Row 10: data throughput - the encode stage's MB/s and peak memory with every core against one worker
(the serial encoder), at two corpus sizes; and the tokenizer stage's peak memory against
``tokenizer.max_sentences``.

The corpora are real English text: ``data/corpus.txt`` (or, where prepare has not run, the default
stdlib corpus written by :func:`minilm.corpus.write_corpus`) repeated to each size in a temporary
directory. Every encode and every tokenizer training runs in its own subprocess, so its peak RSS is its
own: the encoding process's ``VmHWM`` plus, with workers, each worker's (read from ``/proc`` while they
run; Linux), summed, which is an upper bound for the peak of their sum. The two encoders alternate in
rotated rounds at each size; the ratio is the median over rounds. Both must write byte-identical files
(``same bytes``).

The tokenizer's memory is measured at two ``max_sentences`` values for each of: BPE on the corpus as
it is (short lines), BPE and unigram on the same text with every 8 lines joined into one (long lines).
The fitted slope is the memory per sampled sentence, given also per byte of an average line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import ROOT, Context, line, median, median_ratio

TARGET = 2.0
# --quick: the same code paths at toy sizes
SIZES_MB = {False: (30, 150), True: (2, 4)}
ROUNDS = {False: (3, 2), True: (1, 1)}
# (label, model_type, long lines, the two max_sentences values)
TOKENIZER_RUNS = {
    False: [("BPE, short lines", "bpe", False, (500_000, 2_000_000)),
            ("BPE, long lines", "bpe", True, (100_000, 400_000)),
            ("unigram, long lines", "unigram", True, (25_000, 100_000))],
    True: [("BPE, short lines", "bpe", False, (5_000, 20_000)),
           ("unigram, long lines", "unigram", True, (1_000, 4_000))],
}
TOKENIZER_VOCAB = {False: 4096, True: 500}

# what each measuring subprocess runs: one encode or one tokenizer training, then its figures as JSON
_CHILD = r"""
import glob, hashlib, json, os, resource, sys, threading, time
args = json.loads(sys.argv[1])
cpu = lambda: sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                            resource.RUSAGE_CHILDREN)))

def hwm_kb(pid):
    # VmHWM: the peak RSS of one process since it exec'd (ru_maxrss would carry the forking parent's over;
    # a worker not yet exec'd, still a copy of this process, counts nothing)
    try:
        if pid != "self" and open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[1:3] != [b"-m",
                                                                                            b"minilm.encoding"]:
            return 0
        with open(f"/proc/{pid}/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0

workers, done = {}, threading.Event()
def watch():   # the workers' peaks, read until each exits (VmHWM only grows)
    while not done.wait(0.02):
        for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
            for pid in open(path).read().split():
                workers[pid] = max(workers.get(pid, 0), hwm_kb(pid))
threading.Thread(target=watch, daemon=True).start()
if args["what"] == "encode":
    from minilm.data import encode_corpus
    from minilm.tokenizer import load_tokenizer
    tok = load_tokenizer(args["tokenizer"])
    t0, c0 = time.perf_counter(), cpu()
    encode_corpus(args["corpus"], tok, args["out"], val_fraction=0.05, progress=False,
                  workers=args["workers"])
    seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
    digest = hashlib.sha256()
    for name in ("train.bin", "val.bin", "meta.json"):
        with open(f"{args['out']}/{name}", "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    extra = {"sha256": digest.hexdigest(), "cpu_s": cpu_s}
else:
    from minilm.config import TokenizerConfig
    from minilm.tokenizer import train_sentencepiece
    cfg = TokenizerConfig(model_type=args["model_type"], vocab_size=args["vocab_size"],
                          max_sentences=args["max_sentences"])
    t0 = time.perf_counter()
    train_sentencepiece(args["corpus"], args["out"], cfg)
    seconds = time.perf_counter() - t0
    extra = {}
done.set()
print(json.dumps({"seconds": seconds, "self_kb": hwm_kb("self"), "workers_kb": sorted(workers.values()),
                  **extra}))
"""


def _child(args: dict[str, Any]) -> dict[str, Any]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{args['what']} subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def base_text(tmp: Path) -> Path:
    """Real English text: the pipeline's corpus if prepare wrote it, else the default stdlib corpus."""
    corpus = ROOT / "data" / "corpus.txt"
    if corpus.is_file() and corpus.stat().st_size >= 1 << 20:
        return corpus
    from minilm.config import DataConfig
    from minilm.corpus import write_corpus

    write_corpus(DataConfig(), tmp / "base.txt")
    return tmp / "base.txt"


def repeat_to(base: Path, mb: float, path: Path) -> Path:
    """``base`` repeated (whole copies, then whole lines) to about ``mb`` MB."""
    text = base.read_bytes()
    text = text if text.endswith(b"\n") else text + b"\n"
    want = int(mb * 1e6)
    with open(path, "wb") as out:
        for _ in range(want // len(text)):
            out.write(text)
        rest = want % len(text)
        out.write(text[: text.rfind(b"\n", 0, rest) + 1])
    return path


def long_lines(src: Path, path: Path, join: int = 8) -> Path:
    """``src`` with every ``join`` lines joined into one by spaces (paragraph-length lines)."""
    with open(src, encoding="utf-8") as fh, open(path, "w", encoding="utf-8") as out:
        group: list[str] = []
        for text in fh:
            group.append(text.rstrip("\n"))
            if len(group) == join:
                out.write(" ".join(group) + "\n")
                group = []
        if group:
            out.write(" ".join(group) + "\n")
    return path


def _rss_mb(res: dict[str, Any]) -> float:
    return (res["self_kb"] + sum(res["workers_kb"])) / 1024


def encode_lines(ctx: Context, corpora: list[Path], tokenizer: Path, tmp: Path) -> tuple[list, list]:
    """One line per corpus size (all cores vs 1 worker), and the rounds' raw figures."""
    from minilm.encoding import resolve_workers

    cores = resolve_workers(0)
    lines, raw = [], []
    for corpus, rounds in zip(corpora, ROUNDS[ctx.quick]):
        mb = corpus.stat().st_size / 1e6
        runs: dict[int, list[dict[str, Any]]] = {1: [], cores: []}
        for r in range(rounds):
            order = [1, cores] if r % 2 == 0 else [cores, 1]
            for workers in order:
                ctx.log(f"  encode {mb:.0f} MB, {workers} worker(s), round {r + 1}/{rounds}")
                res = _child({"what": "encode", "corpus": str(corpus), "tokenizer": str(tokenizer),
                              "out": str(tmp / f"enc{workers}"), "workers": workers})
                runs[workers].append(dict(res, mb_s=mb / res["seconds"], rss_mb=_rss_mb(res)))
        par, ser = runs[cores], runs[1]
        same = len({r["sha256"] for r in par + ser}) == 1
        is_target = corpus is corpora[-1]
        ratio = median_ratio([r["mb_s"] for r in par], [r["mb_s"] for r in ser])
        lines.append(line(
            f"encode {mb:.0f} MB: {cores} workers (all cores) vs 1", "MB/s", median([r["mb_s"] for r in par]),
            baseline_name="1 worker (the serial encoder)", baseline=median([r["mb_s"] for r in ser]),
            ratio=ratio, target=f">= {TARGET:g}x" if is_target else None,
            met=(ratio is not None and ratio >= TARGET) if is_target else None,
            rss_mb=max(r["rss_mb"] for r in par), baseline_rss_mb=max(r["rss_mb"] for r in ser),
            cpu_s_per_mb=median([r["cpu_s"] / mb for r in par]),
            baseline_cpu_s_per_mb=median([r["cpu_s"] / mb for r in ser]),
            cores_used=median([r["cpu_s"] / r["seconds"] for r in par]),
            baseline_cores_used=median([r["cpu_s"] / r["seconds"] for r in ser]),
            process_rss_mb=max(r["self_kb"] for r in par) / 1024,
            worker_rss_mb=max(max(r["workers_kb"], default=0) for r in par) / 1024, same_bytes=same,
            corpus_mb=mb, workers=cores, rounds=rounds))
        raw.append(runs)
    return lines, raw


def tokenizer_lines(ctx: Context, corpus: Path, tmp: Path) -> tuple[list, list[str]]:
    """Peak RSS of tokenizer training at two max_sentences values per configuration, and the fit."""
    lines, notes = [], []
    long = None
    for label, model_type, is_long, counts in TOKENIZER_RUNS[ctx.quick]:
        if is_long and long is None:
            long = long_lines(corpus, tmp / "long.txt")
        text = long if is_long else corpus
        n_lines = sum(1 for t in open(text, "rb") if t.strip())
        avg = text.stat().st_size / max(1, n_lines)
        points = []
        for n in counts:
            ctx.log(f"  tokenizer {label}, max_sentences={n:,}")
            res = _child({"what": "tokenizer", "corpus": str(text), "out": str(tmp / "tok.model"),
                          "model_type": model_type, "vocab_size": TOKENIZER_VOCAB[ctx.quick],
                          "max_sentences": n})
            points.append((n, res["self_kb"] * 1024, res["seconds"]))
        (n1, m1, _), (n2, m2, _) = points
        per_sentence = (m2 - m1) / (n2 - n1)
        base = m1 - per_sentence * n1
        for n, mem, seconds in points:
            lines.append(line(f"tokenizer {label}, max_sentences={n:,}", "peak RSS MB", mem / 2**20,
                              seconds=seconds, bytes_per_sentence=per_sentence,
                              bytes_per_line_byte=per_sentence / avg, base_mb=base / 2**20,
                              avg_line_bytes=avg, lines_in_corpus=n_lines))
        notes.append(f"tokenizer {label} (non-empty lines average {avg:.0f} bytes, {n_lines:,} of them): "
                     f"peak RSS ~ {base / 2**20:.0f} MB + {per_sentence:,.0f} bytes per sampled sentence "
                     f"({per_sentence / avg:.1f}x the average line)")
    return lines, notes


def _busy_note(ln: dict[str, Any]) -> str:
    """How many cores the encoders got, and the ratio their CPU time per MB implies on free cores."""
    cores = min(ln["workers"], os.cpu_count() or 1)
    projected = cores * ln["baseline_cpu_s_per_mb"] / ln["cpu_s_per_mb"]
    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        autogroup = False
    why = (" (the kernel's autogroup scheduling shares the CPU between sessions, so one session's "
           "processes together get that session's share, however many there are)" if autogroup else "")
    busy = (f": below {cores}, other work kept the cores busy{why}" if ln["cores_used"] < 0.8 * cores
            else " (the cores were free)")
    return (f"cores used at {ln['corpus_mb']:.0f} MB: {ln['cores_used']:.2f} with {ln['workers']} workers, "
            f"{ln['baseline_cores_used']:.2f} with 1{busy}. With the cores free, the CPU time per MB "
            f"measured here implies {cores} x {ln['baseline_cpu_s_per_mb']:.3f} / {ln['cpu_s_per_mb']:.3f} = "
            f"{projected:.2f}x (a projection from CPU time, not a measured ratio)")


def run(ctx: Context) -> dict[str, Any]:
    from minilm.config import TokenizerConfig
    from minilm.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory(prefix="minilm-data-bench-") as name:
        tmp = Path(name)
        base = base_text(tmp)
        corpora = [repeat_to(base, mb, tmp / f"corpus{mb}.txt") for mb in SIZES_MB[ctx.quick]]
        tokenizer = tmp / "encode.model"
        train_sentencepiece(base, tokenizer, TokenizerConfig(vocab_size=TOKENIZER_VOCAB[ctx.quick]))
        t0 = time.perf_counter()
        enc, _ = encode_lines(ctx, corpora, tokenizer, tmp)
        enc_s = time.perf_counter() - t0
        tok, tok_notes = tokenizer_lines(ctx, corpora[-1], tmp)
        base_name = base.name if base.parent == tmp else str(base.relative_to(ROOT))
        base_mb = base.stat().st_size / 1e6
        base_sha = hashlib.sha256(base.read_bytes()).hexdigest()[:12]
    small, large = enc[0], enc[-1]
    notes = [
        f"corpora: {base_name} ({base_mb:.1f} MB, sha256 {base_sha}) repeated to "
        f"{' and '.join(f'{mb:g}' for mb in SIZES_MB[ctx.quick])} MB; BPE tokenizer, vocab "
        f"{TOKENIZER_VOCAB[ctx.quick]}, trained on that text; val_fraction 0.05; default chunk_bytes (1 MiB)",
        "MB/s = corpus bytes / wall time of encode_corpus inside its subprocess (worker start-up included, "
        "interpreter start-up and imports not); CPU s/MB = CPU time of the encoding process and its workers "
        "over the same span, per MB (the work done, whatever share of the cores a busy machine gave); cores "
        "used = that CPU time over the wall time (2 = both cores of an idle 2-core machine); peak RSS = the "
        "encoding process's peak (VmHWM) plus each worker's peak, summed (an upper bound); the encoding "
        "process imports torch as the stage does",
        f"memory flat: peak RSS with {large['workers']} workers {small['rss_mb']:.0f} MB at "
        f"{small['corpus_mb']:.0f} MB and {large['rss_mb']:.0f} MB at {large['corpus_mb']:.0f} MB; 1 worker "
        f"{small['baseline_rss_mb']:.0f} and {large['baseline_rss_mb']:.0f} MB",
        f"encode measurements took {enc_s:.0f} s; both encoders wrote byte-identical files: "
        f"{all(ln['same_bytes'] for ln in enc)}",
        _busy_note(large),
    ] + tok_notes
    return {"lines": enc + tok, "notes": notes}
