"""The Markdown report of a results JSON: the machine, a summary of the targets, then one table per row."""

from __future__ import annotations

import math
from typing import Any

# per row, the details worth a column of their own
DETAILS = {
    "training": [("step_ms", "ms/step")],
    "utilisation": [("model_gflops", "model GFLOP/s"), ("peak_gflops", "peak GFLOP/s")],
    "generation": [("same_tokens", "same tokens"), ("same_tokens_as_minilm_fp32", "same tokens as minilm fp32"),
                   ("same_tokens_as_eager", "same tokens as eager"), ("compile_s", "compile s"),
                   ("share_pct", "share %")],
    "llamacpp": [("same_tokens", "same tokens"), ("compile_s", "compile s")],
    "finetune": [("trainable", "trainable"), ("train_mb", "train MB"), ("first_call_s", "first call s")],
    "quality": [("precision", "precision"), ("steps", "steps")],
    "pipeline": [("in_run_s", "in run s"), ("overhead_s", "overhead s")],
    "data": [("rss_mb", "peak RSS MB"), ("baseline_rss_mb", "1 worker peak RSS MB"),
             ("cpu_s_per_mb", "CPU s/MB"), ("baseline_cpu_s_per_mb", "1 worker CPU s/MB"),
             ("cores_used", "cores used"), ("baseline_cores_used", "1 worker cores used"),
             ("same_bytes", "same bytes"), ("bytes_per_sentence", "bytes / sentence")],
}


def fmt(value: Any, metric: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if metric.startswith("share"):
        return f"{value:.1%}"
    v = abs(value)
    if isinstance(value, int) or v >= 1000:
        return f"{value:,.0f}"
    if v >= 100:
        return f"{value:.0f}"
    if v >= 10:
        return f"{value:.1f}"
    if v >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def met(value: bool | None) -> str:
    return {True: "**yes**", False: "no", None: ""}[value]


def machine_line(m: dict[str, Any]) -> str:
    cores = m.get("cpu_cores_usable") or m.get("cpu_cores")
    bf16 = {True: "yes", False: "no", None: "unknown"}[m.get("cpu_bf16_native")]
    return (f"{m.get('cpu') or 'unknown CPU'}, {cores} usable cores, {m.get('ram_gb')} GB RAM, native bf16: "
            f"{bf16}; torch {m.get('torch')} ({m.get('torch_threads')} threads), transformers "
            f"{m.get('transformers') or '-'}, peft {m.get('peft') or '-'}, Python {m.get('python')}; minilm "
            f"precision 'auto' = {m.get('minilm_auto_precision')}; git {str(m.get('git_commit'))[:10]}"
            f"{' (uncommitted changes)' if m.get('git_dirty') else ''}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _profile_table(prof: dict[str, Any] | None) -> list[str]:
    """Row 2's breakdown of one training step by kind (benchmarks/profile.py)."""
    if not prof or not prof.get("ms"):
        return []
    rows = [[k, fmt(v), fmt(prof["share"][k], "share")] for k, v in prof["ms"].items()]
    rows.append(["total (profiled step)", fmt(prof["step_ms"]), "100.0%"])
    if prof.get("at_peak_ms") is not None:
        rows.append(["model FLOPs at peak GEMM rate", fmt(prof["at_peak_ms"]),
                     fmt(prof["at_peak_ms"] / prof["step_ms"], "share")])
    return [f"Where the time of one {prof['shape']} {prof['variant']} step goes:", ""] + _table(
        ["kind", "ms/step", "share of step"], rows) + [""]


def render(results: dict[str, Any]) -> str:
    md = ["# minilm benchmarks", "",
          f"Machine: {machine_line(results['machine'])}.", "",
          f"Run: `{results['command']}` ({results['mode']} mode, "
          f"{results['machine'].get('timestamp_utc')}).", "",
          "Each contender runs in the same process as its baseline, alternated in rotated rounds; a ratio is "
          "the median over rounds of minilm's figure over the baseline's, oriented so that > 1x means "
          "minilm is better (faster, lighter, lower loss).", ""]
    summary = [[f"{r['id']}", ln["case"], fmt(ln["minilm"], ln["metric"]) + f" {ln['metric']}",
                fmt(ln["baseline"], ln["metric"]), ratio(ln["ratio"]), ln["target"], met(ln["met"])]
               for r in results["rows"].values() for ln in r.get("lines", []) if ln.get("target")]
    if summary:
        md += ["## Targets", ""]
        md += _table(["row", "case", "minilm", "baseline", "ratio", "target", "met"], summary)
        md.append("")
    for key, row in results["rows"].items():
        md += [f"## {row['id']}. {row['title']}", ""]
        if row.get("earlier_run"):
            md += [f"_Measured in an earlier run ({row['earlier_run']})._", ""]
        if row.get("skipped"):
            md += [f"Skipped: {row['skipped']}", ""]
            continue
        if row.get("error"):
            md += [f"Failed: `{row['error']}`", ""]
            continue
        extra = DETAILS.get(key, [])
        header = ["case", "metric", "minilm", "baseline", "baseline value", "ratio", "target", "met"]
        header += [label for _, label in extra]
        body = []
        for ln in row["lines"]:
            body.append([ln["case"], ln["metric"], fmt(ln["minilm"], ln["metric"]), ln["baseline_name"] or "",
                         fmt(ln["baseline"], ln["metric"]), ratio(ln["ratio"]), ln["target"] or "",
                         met(ln["met"])] + [fmt(ln.get(k)) for k, _ in extra])
        md += _table(header, body)
        md.append("")
        md += _profile_table(row.get("profile"))
        md += [f"- {n}" for n in row.get("notes", [])]
        load = row.get("load_average_before"), row.get("load_average_after")
        loads = f"; 1-min load average {load[0][0]} before, {load[1][0]} after" if all(load) else ""
        md += [f"- row time: {row['seconds']:.0f} s{loads}", ""]
    return "\n".join(md).rstrip() + "\n"
