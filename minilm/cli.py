"""Command-line entry points: error handling shared by every stage, and the ``minilm-sample`` script.

Stages and console scripts end with ``raise SystemExit(run_main(main))``: an expected mistake (any
:class:`~minilm.errors.MinilmError`) prints ``error: <message>`` as one line, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, get_args

from .config import Precision, SampleConfig, build
from .errors import CheckpointError, ConfigError, DataError, MinilmError


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and turn its outcome into an exit code.

    MinilmError -> ``error: <message>`` on stderr, its ``exit_code`` (2); Ctrl-C -> ``interrupted``, 130;
    ``SystemExit`` (argparse's --help / usage errors) -> its code; otherwise main's int, or 0.
    """
    try:
        code = main(argv)
    except MinilmError as err:
        message = " ".join(str(err).splitlines()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    return int(code or 0)


# --------------------------------------------------------------------------------------------------
# minilm-sample


def _seed(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def sample_parser() -> argparse.ArgumentParser:
    d = SampleConfig()
    p = argparse.ArgumentParser(
        prog="minilm-sample",
        description="Generate text from a minilm checkpoint. Each prompt is printed followed by its "
                    "completion; completions are separated by a '---' line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("model and prompts")
    io.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file (*.safetensors)")
    io.add_argument("--tokenizer", required=True, metavar="PATH",
                    help="tokenizer file the model was trained with")
    io.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    io.add_argument("--prompt-file", metavar="PATH", help="a UTF-8 file with one prompt per line "
                    "(blank lines skipped)")
    io.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to run: auto = cuda when available, else cpu")
    io.add_argument("--precision", choices=get_args(Precision), default="auto",
                    help="weights while decoding: auto = bf16 where the hardware has it natively "
                         "(decoding reads every weight per token; bf16 halves that), else fp32")
    io.add_argument("--ema", action="store_true",
                    help="use the EMA weights when the checkpoint has them")
    io.add_argument("--no-bos", action="store_true", help="do not start prompts with the BOS token")
    s = p.add_argument_group("decoding")
    s.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=d.top_k, help="keep the k likeliest tokens; 0 = off")
    s.add_argument("--top-p", type=float, default=d.top_p,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability; "
                        "1 = off")
    s.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="divide positive (multiply negative) logits of tokens already seen; 1 = off")
    s.add_argument("--ban-window", type=int, default=d.ban_window,
                   help="never repeat any of the last N tokens (prompt included); 0 = off")
    s.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram,
                   help="never repeat an n-gram of this size; 0 = off")
    s.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens,
                   help="end-of-sequence is banned before this many new tokens")
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="most new tokens")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop a completion before this text (repeatable)")
    s.add_argument("--seed", type=_seed, default=d.seed, help="random seed; 'none' = nondeterministic")
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


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    return name


def _sample(argv: list[str] | None) -> int:
    args = sample_parser().parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += _read_prompts(args.prompt_file)
    if not prompts:
        raise ConfigError("no prompt given; pass --prompt TEXT (repeatable) or --prompt-file PATH")
    cfg = build(SampleConfig, {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty, "ban_window": args.ban_window,
        "no_repeat_ngram": args.no_repeat_ngram, "min_new_tokens": args.min_new_tokens,
        "max_new_tokens": args.max_new_tokens, "stop": list(args.stop or []), "seed": args.seed,
    }, "sample", source="command line")
    device = _device(args.device)

    import torch

    from .checkpoint import load_model
    from .precision import inference_dtype
    from .sampling import generate
    from .tokenizer import load_tokenizer  # imported here: the CLI must not need it for --help

    dtype = inference_dtype(args.precision, torch.device(device))   # a bad choice fails before loading
    model, ckpt = load_model(args.ckpt, device, use_ema=args.ema)
    model.to(dtype)
    if args.ema and not ckpt.ema_state:
        print(f"note: {args.ckpt} has no EMA weights; using the model weights", file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the model "
                              f"in {args.ckpt} expects {model.config.vocab_size}; pass the tokenizer the "
                              "model was trained with")
    completions = generate(model, tokenizer, prompts, cfg, device=device, bos=not args.no_bos)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if i:
            print("\n---\n")
        print(prompt + completion, flush=True)
    return 0


def sample_main(argv: list[str] | None = None) -> int:
    """Console script ``minilm-sample``."""
    return run_main(_sample, argv)


if __name__ == "__main__":
    raise SystemExit(sample_main())
