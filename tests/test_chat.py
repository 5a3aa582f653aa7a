"""minilm-chat through a real subprocess with piped stdin (answers compared with generate), its commands,
the template's sources; and minilm-sample's --instruct, --layout seed, the seed's flag aliases and the
sampling defaults."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest
import torch
from servekit import env1, kit  # noqa: F401  (kit is a fixture)

from minilm.chat import fit_turns, instruction_marker, messages_to_turns, render_turns, set_params
from minilm.cli import resolve_template, sample_config, sample_main, sample_parser
from minilm.config import DEFAULT_TEMPLATE, SampleConfig
from minilm.errors import ConfigError, DataError
from minilm.sampling import generate, generate_ids

GREEDY = SampleConfig(temperature=0.0, min_new_tokens=0, max_new_tokens=30)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)          # the subprocesses decode on one thread: the same float sums here
    yield
    torch.set_num_threads(before)


def chat(kit, stdin: str, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    cmd = [sys.executable, "-m", "minilm.chat", "--ckpt", str(kit.ckpt), "--tokenizer", str(kit.tokenizer_path),
           "--device", "cpu", "--precision", "fp32", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env1(), timeout=120)


def answer(kit, turns: list[tuple[str, str | None]], cfg: SampleConfig) -> str:  # noqa: F811
    """What the chat should say: generate_ids on the rendered conversation, cut at the marker."""
    marker = instruction_marker(kit.template)
    cfg = dataclasses.replace(cfg, stop=[*cfg.stop, marker])
    ids = render_turns(kit.tokenizer, kit.template, turns)
    out = generate_ids(kit.model, [ids], cfg, eos_id=kit.tokenizer.eos_id, pad_id=kit.tokenizer.pad_id,
                       decode=kit.tokenizer.decode)[0]
    return kit.tokenizer.decode(out).split(marker)[0]


def test_piped_chat_answers_each_line_with_the_history(kit):  # noqa: F811
    q1, q2 = "What is a list?", "How do I open a file?"
    proc = chat(kit, f"{q1}\n\n{q2}\n", "--temperature", "0", "--max-new-tokens", "30")
    assert proc.returncode == 0, proc.stderr
    a1 = answer(kit, [(q1, None)], GREEDY)
    # the first turn is exactly what generate() gives for the templated question
    assert a1 == generate(kit.model, kit.tokenizer, [kit.template.format(instruction=q1)],
                          dataclasses.replace(GREEDY, stop=[instruction_marker(kit.template)]))[0]
    a2 = answer(kit, [(q1, a1.strip()), (q2, None)], GREEDY)
    assert a1.strip() and proc.stdout == f"{a1}\n{a2}\n"
    assert "Traceback" not in proc.stderr


def test_chat_commands_params_reset_quit(kit):  # noqa: F811
    q = "What is a set?"
    script = f"/params temp=0 max_new=10 ban_window=2\n/params\n{q}\n/reset\n{q}\n/quit\nWhat is None?\n"
    proc = chat(kit, script)
    assert proc.returncode == 0, proc.stderr
    cfg = dataclasses.replace(GREEDY, max_new_tokens=10, ban_window=2)
    a = answer(kit, [(q, None)], cfg)
    assert proc.stdout == f"{a}\n{a}\n"          # /reset: the second ask starts afresh; /quit ends the chat
    assert "temperature=0.0" in proc.stderr and "max_new_tokens=10" in proc.stderr
    assert "ban_window=2" in proc.stderr and "(conversation reset)" in proc.stderr


def test_chat_bad_commands_are_one_line_and_the_chat_goes_on(kit):  # noqa: F811
    proc = chat(kit, "/params temperature=-1\n/params bogus=1\n/params top_p=x\n/frobnicate\nWhat is a dict?\n",
                "--temperature", "0", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "temperature must be >= 0" in errors[0] and "bogus" in errors[1]
    assert "unknown command /frobnicate" in proc.stderr
    assert proc.stdout == answer(kit, [("What is a dict?", None)], dataclasses.replace(GREEDY, max_new_tokens=8)) \
        + "\n"


def test_chat_command_line_errors_are_one_line(kit, tmp_path):  # noqa: F811
    proc = chat(kit, "", "--max-new-tokens", "128")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no room" in proc.stderr
    cmd = [sys.executable, "-m", "minilm.chat", "--ckpt", str(tmp_path / "none.safetensors"), "--tokenizer",
           str(kit.tokenizer_path)]
    proc = subprocess.run(cmd, input="hi\n", capture_output=True, text=True, env=env1(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_chat_help():
    proc = subprocess.run([sys.executable, "-m", "minilm.chat", "--help"], capture_output=True, text=True,
                          env=env1(), timeout=60)
    assert proc.returncode == 0
    for flag in ("--ckpt", "--tokenizer", "--params", "--template", "--temperature", "--top-p",
                 "--repetition-penalty", "--ban-window", "--max-new-tokens", "/reset", "/params"):
        assert flag in proc.stdout


# --------------------------------------------------------------------------------------------------
# rendering and the template


def test_render_turns_is_the_sft_layout(kit):  # noqa: F811
    tok = kit.tokenizer
    ids = render_turns(tok, DEFAULT_TEMPLATE, [("Q1", "A1"), ("Q2", None)])
    want = (tok.encode(DEFAULT_TEMPLATE.format(instruction="Q1"), bos=True) + tok.encode("A1", eos=True)
            + tok.encode(DEFAULT_TEMPLATE.format(instruction="Q2"), bos=True))
    assert ids == want
    assert instruction_marker(DEFAULT_TEMPLATE) == "### Instruction:"
    turns = [("Q1", "A1"), ("Q2", "A2"), ("Q3", None)]
    ids, dropped = fit_turns(tok, DEFAULT_TEMPLATE, turns, len(render_turns(tok, DEFAULT_TEMPLATE, turns[1:])))
    assert dropped == 1 and ids == render_turns(tok, DEFAULT_TEMPLATE, turns[1:])
    with pytest.raises(DataError, match="no room"):
        fit_turns(tok, DEFAULT_TEMPLATE, turns, 3)


def test_messages_to_turns():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    assert messages_to_turns(msgs) == [("S\nU1", "A1"), ("U2", None)]
    for bad in ([{"role": "assistant", "content": "A"}], msgs[:3], [{"role": "tool", "content": "x"}]):
        with pytest.raises(ValueError):
            messages_to_turns(bad)


def test_set_params_validates():
    cfg = set_params(SampleConfig(), ["temp=0.3", "rep_penalty=1", "no_repeat=3", "seed=none"])
    assert (cfg.temperature, cfg.repetition_penalty, cfg.ban_window, cfg.seed) == (0.3, 1.0, 3, None)
    with pytest.raises(ConfigError, match="top_p must be in"):
        set_params(cfg, ["top_p=2"])


def _ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"ckpt": "model.safetensors", "params": None, "template": None, **kw})


def test_template_comes_from_the_checkpoint_then_params_then_the_flag(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text('sft:\n  template: "Q: {instruction}\\nA: "\n', encoding="utf-8")
    stored = "<<{instruction}>>\n"
    assert resolve_template(_ns(params=str(params)), {"sft_template": stored}) == stored
    assert "differs and is not used" in capsys.readouterr().err
    assert resolve_template(_ns(params=str(params), template="T {instruction} R"), {}) == "Q: {instruction}\nA: "
    assert resolve_template(_ns(template="T {instruction} R"), {}) == "T {instruction} R"
    assert resolve_template(_ns(), {}) == DEFAULT_TEMPLATE
    with pytest.raises(ConfigError, match="must contain the field"):
        resolve_template(_ns(template="no field"), {})


# --------------------------------------------------------------------------------------------------
# minilm-sample


def sample(kit, capsys, *args: str) -> str:  # noqa: F811
    argv = ["--ckpt", str(kit.ckpt), "--tokenizer", str(kit.tokenizer_path), "--device", "cpu",
            "--precision", "fp32", *args]
    assert sample_main(argv) == 0
    return capsys.readouterr().out


def test_sample_defaults_are_the_seeds():
    d = SampleConfig()
    assert (d.temperature, d.top_p, d.repetition_penalty, d.ban_window, d.min_new_tokens, d.max_new_tokens) \
        == (0.6, 0.92, 1.2, 5, 40, 120)
    args = sample_parser().parse_args(["--ckpt", "c", "--tokenizer", "t"])
    assert sample_config(args, d.min_new_tokens) == d
    # the generate stage samples with the same values (params.yaml, the pipeline's source of truth)
    from pathlib import Path

    from stages.params import load_params

    gen = load_params(Path(__file__).parents[1] / "params.yaml").generate
    assert {f.name: getattr(gen, f.name) for f in dataclasses.fields(SampleConfig)} == dataclasses.asdict(d)


def test_seed_aliases_mean_the_long_flags():
    p = sample_parser()
    short = p.parse_args(["--ckpt", "c", "--spm", "t", "--temp", "0.3", "--top_p", "0.5", "--min_new", "2",
                          "--max_new", "9", "--rep_penalty", "1.1", "--no_repeat", "4"])
    long = p.parse_args(["--ckpt", "c", "--tokenizer", "t", "--temperature", "0.3", "--top-p", "0.5",
                         "--min-new-tokens", "2", "--max-new-tokens", "9", "--repetition-penalty", "1.1",
                         "--ban-window", "4"])
    assert short == long and long.ban_window == 4 and long.no_repeat_ngram == 0


def test_max_new_below_the_default_min_lowers_the_min(kit, capsys):  # noqa: F811
    args = sample_parser().parse_args(["--ckpt", "c", "--tokenizer", "t", "--max-new-tokens", "20"])
    assert (sample_config(args, 40).min_new_tokens, sample_config(args, 40).max_new_tokens) == (20, 20)
    out = sample(kit, capsys, "--prompt", "A list", "--max-new-tokens", "20", "--temperature", "0")
    want = generate(kit.model, kit.tokenizer, ["A list"], SampleConfig(temperature=0.0, min_new_tokens=20,
                                                                        max_new_tokens=20))[0]
    assert out == "A list" + want + "\n"


def test_sample_instruct_wraps_prompts_in_the_template(kit, capsys, tmp_path):  # noqa: F811
    qs = tmp_path / "questions.txt"
    qs.write_text("What is a list?\nWhat is a tuple?\n", encoding="utf-8")
    out = sample(kit, capsys, "--prompt-file", str(qs), "--instruct", "--temperature", "0", "--max_new", "30")
    cfg = SampleConfig(temperature=0.0, min_new_tokens=0, max_new_tokens=30, stop=["### Instruction:"])
    prompts = [kit.template.format(instruction=q) for q in ("What is a list?", "What is a tuple?")]
    want = [p + c for p, c in zip(prompts, generate(kit.model, kit.tokenizer, prompts, cfg))]
    assert out == "\n\n---\n\n".join(want) + "\n"
    assert out.startswith("### Instruction:\nWhat is a list?\n\n### Response:\n")


def test_sample_seed_layout(kit, capsys):  # noqa: F811
    out = sample(kit, capsys, "--prompt", "A list", "--prompt", "The file", "--layout", "seed", "--temp", "0",
                 "--max_new", "12", "--min_new", "12")
    c = generate(kit.model, kit.tokenizer, ["A list", "The file"],
                 SampleConfig(temperature=0.0, min_new_tokens=12, max_new_tokens=12))
    assert out == f"### Prompt 1\nA list\n---\n{c[0]}\n\n### Prompt 2\nThe file\n---\n{c[1]}\n"
