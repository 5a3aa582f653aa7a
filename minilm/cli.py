"""Command-line entry points: error handling shared by every stage, and the ``minilm-sample`` script.

Stages and console scripts end with ``raise SystemExit(run_main(main))``: an expected mistake (any
:class:`~minilm.errors.MinilmError`) prints ``error: <message>`` as one line, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, get_args

from .config import DEFAULT_TEMPLATE, DecodePrecision, SampleConfig, build, load_yaml, template_problems
from .errors import CheckpointError, ConfigError, DataError, MinilmError, run_main  # noqa: F401

# --------------------------------------------------------------------------------------------------
# minilm-sample


def _seed(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint flags minilm-sample, minilm-chat and minilm-serve share."""
    io = p.add_argument_group("model")
    io.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file (*.safetensors)")
    io.add_argument("--tokenizer", "--spm", required=True, metavar="PATH",
                    help="tokenizer file the model was trained with")
    io.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to run: auto = cuda when available, else cpu")
    io.add_argument("--precision", choices=get_args(DecodePrecision), default="auto",
                    help="weights while decoding: auto = bf16 where the hardware has it natively "
                         "(decoding reads every weight per token; bf16 halves that), else fp32; int8 = "
                         "weight-only int8 linear layers (a quarter of fp32's weight bytes)")
    io.add_argument("--ema", action="store_true",
                    help="use the EMA weights when the checkpoint has them")
    io.add_argument("--params", metavar="PATH",
                    help="a params.yaml whose sft.template renders instructions (when the checkpoint does "
                         "not record its own)")
    io.add_argument("--template", metavar="TEXT",
                    help="the SFT template, with {instruction} (when neither the checkpoint nor --params "
                         f"gives one; default {DEFAULT_TEMPLATE!r})")


def add_sampling_args(p: argparse.ArgumentParser, d: SampleConfig, *, min_default: str) -> None:
    """The decoding controls, with the seed's spellings as aliases. ``--min-new-tokens`` defaults to
    None (``min_default`` says what that means) so that a lower ``--max-new-tokens`` can lower it."""
    s = p.add_argument_group("decoding")
    s.add_argument("--temperature", "--temp", type=float, default=d.temperature, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=d.top_k, help="keep the k likeliest tokens; 0 = off")
    s.add_argument("--top-p", "--top_p", type=float, default=d.top_p,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability; "
                        "1 = off")
    s.add_argument("--repetition-penalty", "--rep_penalty", type=float, default=d.repetition_penalty,
                   help="divide positive (multiply negative) logits of tokens already seen; 1 = off")
    s.add_argument("--ban-window", "--no_repeat", type=int, default=d.ban_window,
                   help="never repeat any of the last N tokens (prompt included); 0 = off")
    s.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram,
                   help="never repeat an n-gram of this size; 0 = off")
    s.add_argument("--min-new-tokens", "--min_new", type=int, default=None,
                   help=f"end-of-sequence is banned before this many new tokens; unset = {min_default}")
    s.add_argument("--max-new-tokens", "--max_new", type=int, default=d.max_new_tokens,
                   help="most new tokens")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop a completion before this text (repeatable)")
    s.add_argument("--seed", type=_seed, default=d.seed, help="random seed; 'none' = nondeterministic")


def sample_config(args: argparse.Namespace, min_default: int) -> SampleConfig:
    """The controls from the command line. Without ``--min-new-tokens`` the minimum is ``min_default``,
    lowered to ``--max-new-tokens`` when that is smaller."""
    min_new = args.min_new_tokens
    if min_new is None:
        min_new = min(min_default, args.max_new_tokens) if args.max_new_tokens > 0 else min_default
    return build(SampleConfig, {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty, "ban_window": args.ban_window,
        "no_repeat_ngram": args.no_repeat_ngram, "min_new_tokens": min_new,
        "max_new_tokens": args.max_new_tokens, "stop": list(args.stop or []), "seed": args.seed,
        "compile": getattr(args, "compile", False),
    }, "sample", source="command line")


def sample_parser() -> argparse.ArgumentParser:
    d = SampleConfig()
    p = argparse.ArgumentParser(
        prog="minilm-sample", allow_abbrev=False,
        description="Generate text from a minilm checkpoint. Each prompt is printed followed by its "
                    "completion; completions are separated by a '---' line (--layout seed: '### Prompt N', "
                    "the prompt, '---', the continuation). The seed's flags are accepted as aliases: "
                    "--spm, --temp, --top_p, --min_new, --max_new, --rep_penalty, --no_repeat (ban window).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    io = p.add_argument_group("prompts and output")
    io.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    io.add_argument("--prompt-file", metavar="PATH", help="a UTF-8 file with one prompt per line "
                    "(blank lines skipped)")
    io.add_argument("--no-bos", action="store_true", help="do not start prompts with the BOS token")
    io.add_argument("--instruct", action="store_true",
                    help="render each prompt through the SFT template as an instruction (template from the "
                         "checkpoint, else --params, else --template) and stop at the next instruction "
                         "marker; the minimum length then defaults to 0 (an answer may end at once)")
    io.add_argument("--layout", choices=["plain", "seed"], default="plain",
                    help="plain: prompt + completion, '---' between; seed: '### Prompt N', the prompt, "
                         "'---', the continuation")
    add_sampling_args(p, d, min_default=f"{d.min_new_tokens}, 0 with --instruct, never above "
                                        "--max-new-tokens")
    p.add_argument("--compile", action="store_true",
                   help="decode with the torch.compile'd static-shape KV-cache step (minilm.decode): the "
                        "same tokens, faster per token at batch 1, after a one-off compilation of ~10-40 s "
                        "(less when inductor's on-disk cache is warm)")
    return p


def _read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"prompt file {file} not found; fix --prompt-file or create the file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{file} is not valid UTF-8 (byte {err.start}); save it as UTF-8") from None
    return [line for line in text.splitlines() if line.strip()]


@dataclasses.dataclass
class Loaded:
    """A model ready to decode: its tokenizer, device and the checkpoint's ``extra`` metadata."""

    model: Any
    tokenizer: Any
    device: str
    extra: dict[str, Any]


def load_for_inference(args: argparse.Namespace) -> Loaded:
    """The model of ``--ckpt`` in ``--precision`` on ``--device`` with the tokenizer of ``--tokenizer``;
    a tokenizer that does not fit the model is a one-line error."""
    from .precision import resolve_device

    device = str(resolve_device(args.device))

    import torch

    from .checkpoint import check_compatible, load_model
    from .precision import check_decode_precision, for_decoding
    from .tokenizer import load_tokenizer  # imported here: the CLI must not need it for --help

    check_decode_precision(args.precision, torch.device(device))   # a bad choice fails before loading
    model, ckpt = load_model(args.ckpt, device, use_ema=args.ema)
    for_decoding(model, args.precision, torch.device(device))
    if args.ema and not ckpt.ema_state:
        print(f"note: {args.ckpt} has no EMA weights; using the model weights", file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the model "
                              f"in {args.ckpt} expects {model.config.vocab_size}; pass the tokenizer the "
                              "model was trained with")
    check_compatible(ckpt, args.ckpt, tokenizer_hash=tokenizer.hash)
    return Loaded(model, tokenizer, device, dict(ckpt.meta.get("extra") or {}))


def resolve_template(args: argparse.Namespace, extra: dict[str, Any]) -> str:
    """The SFT template: the checkpoint's own (``extra["sft_template"]``, what it was trained with), else
    ``sft.template`` of ``--params``, else ``--template``, else the default. A template given on the
    command line that the checkpoint overrides is reported in a note."""
    given = [(f"--params {args.params}", _params_template(args.params)) if args.params else None,
             ("--template", args.template) if args.template is not None else None]
    given = [g for g in given if g is not None]
    stored = extra.get("sft_template")
    if stored:
        for name, tpl in given:
            if tpl != stored:
                print(f"note: using the SFT template recorded in {args.ckpt} (the model was trained with "
                      f"it); the one from {name} differs and is not used", file=sys.stderr)
        return stored
    template = given[0][1] if given else DEFAULT_TEMPLATE
    problems = template_problems(template)
    if problems:
        raise ConfigError(f"SFT template {template!r}: {'; '.join(problems)}")
    return template


def _params_template(path: str) -> str:
    sft = load_yaml(path).get("sft") or {}
    if not isinstance(sft, dict):
        raise ConfigError(f"{path}: section sft must be a mapping")
    template = sft.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str):
        raise ConfigError(f"{path}: sft.template must be a string, got {type(template).__name__}")
    return template


def _sample(argv: list[str] | None) -> int:
    args = sample_parser().parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += _read_prompts(args.prompt_file)
    if not prompts:
        raise ConfigError("no prompt given; pass --prompt TEXT (repeatable) or --prompt-file PATH")
    cfg = sample_config(args, 0 if args.instruct else SampleConfig().min_new_tokens)
    loaded = load_for_inference(args)

    from .sampling import generate

    inputs = prompts
    if args.instruct:
        from .chat import instruction_marker

        template = resolve_template(args, loaded.extra)
        inputs = [template.format(instruction=p) for p in prompts]
        cfg = dataclasses.replace(cfg, stop=[*cfg.stop, instruction_marker(template)])
    completions = generate(loaded.model, loaded.tokenizer, inputs, cfg, device=loaded.device,
                           bos=not args.no_bos)
    for i, (prompt, completion) in enumerate(zip(inputs, completions)):
        if args.layout == "seed":
            print(f"{'' if i == 0 else chr(10)}### Prompt {i + 1}\n{prompt}\n---\n{completion}", flush=True)
        else:
            if i:
                print("\n---\n")
            print(prompt + completion, flush=True)
    return 0


def sample_main(argv: list[str] | None = None) -> int:
    """Console script ``minilm-sample``."""
    return run_main(_sample, argv)


if __name__ == "__main__":
    raise SystemExit(sample_main())
