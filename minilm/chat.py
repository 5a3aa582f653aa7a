"""``minilm-chat``: talk to a fine-tuned model in the terminal, and the chat rendering the server shares.

A conversation is rendered the way SFT trained on pairs, one turn after another:
``BOS + tokens(template(instruction)) + tokens(answer) + EOS`` for every past turn, then
``BOS + tokens(template(instruction))`` for the new one. An answer ends at EOS or where the model starts
the next instruction (the template's marker, e.g. ``### Instruction:``, is a stop string). The oldest
turns are dropped when the conversation no longer fits in the context with room for the answer.

Lines of stdin are the user's turns (piped stdin works, one prompt per line); answers stream to stdout,
one per turn, each followed by a newline; prompts and notes go to stderr. Commands: ``/reset`` (start
over), ``/quit``, ``/params`` (show the controls) and ``/params key=value ...`` (set them: temperature,
top_p, top_k, repetition_penalty, ban_window, no_repeat_ngram, min_new_tokens, max_new_tokens, seed; the
seed's names temp, rep_penalty, no_repeat, min_new, max_new too).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from .cli import (
    add_model_args,
    add_sampling_args,
    load_for_inference,
    resolve_template,
    run_main,
    sample_config,
)
from .config import SampleConfig, build
from .errors import ConfigError, DataError, MinilmError

ALIASES = {"temp": "temperature", "top-p": "top_p", "rep_penalty": "repetition_penalty",
           "no_repeat": "ban_window", "min_new": "min_new_tokens", "max_new": "max_new_tokens"}
SETTABLE = ("temperature", "top_p", "top_k", "repetition_penalty", "ban_window", "no_repeat_ngram",
            "min_new_tokens", "max_new_tokens", "seed")


def instruction_marker(template: str) -> str:
    """The text that opens an instruction (``### Instruction:``): where a model starting a new turn is cut."""
    return template.split("{instruction}")[0].strip() or "###"


def render_turns(tokenizer, template: str, turns: list[tuple[str, str | None]]) -> list[int]:
    """Token ids of a conversation: (instruction, answer) pairs, the last answer None (to be generated)."""
    ids: list[int] = []
    for instruction, answer in turns:
        ids += tokenizer.encode(template.format(instruction=instruction), bos=True, eos=False)
        if answer is not None:
            ids += tokenizer.encode(answer, bos=False, eos=True)
    return ids


def fit_turns(tokenizer, template: str, turns: list[tuple[str, str | None]], room: int,
              ) -> tuple[list[int], int]:
    """(ids, turns dropped): the latest turns whose rendering fits in ``room`` tokens. A last turn that
    does not fit alone is a :class:`DataError`."""
    for dropped in range(len(turns)):
        ids = render_turns(tokenizer, template, turns[dropped:])
        if len(ids) <= room:
            return ids, dropped
    raise DataError(f"the message is {len(ids)} tokens; with the answer's max_new_tokens it leaves no room in "
                    f"the context (at most {room} prompt tokens); shorten it or lower max_new_tokens")


def messages_to_turns(messages: Iterable[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """OpenAI chat messages as turns. A system message is put before the next user message; consecutive
    user messages are joined by a newline; the last message must be the user's."""
    turns: list[tuple[str, str | None]] = []
    pending: list[str] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role in ("system", "developer", "user"):
            pending.append(content)
        elif role == "assistant":
            if not pending:
                raise ValueError("an assistant message must follow a user message")
            turns.append(("\n".join(pending), content))
            pending = []
        else:
            raise ValueError(f"unknown role {role!r}; use system, user or assistant")
    if not pending:
        raise ValueError("the last message must be the user's (the model answers it)")
    return turns + [("\n".join(pending), None)]


# --------------------------------------------------------------------------------------------------
# the terminal chat


class Chat:
    """A conversation with one model through an :class:`~minilm.serve.engine.Engine`."""

    def __init__(self, engine, template: str, cfg: SampleConfig, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr):
        self.engine, self.template, self.cfg = engine, template, cfg
        self.out, self.err = out, err
        self.turns: list[tuple[str, str]] = []

    def ask(self, instruction: str) -> str:
        """Stream the answer to ``instruction`` (given the conversation so far) and remember the turn."""
        from .serve.engine import Request

        eng = self.engine
        room = eng.context_length - self.cfg.max_new_tokens
        ids, dropped = fit_turns(eng.tokenizer, self.template, [*self.turns, (instruction, None)], room)
        if dropped:
            self.turns = self.turns[dropped:]
            print(f"(the {dropped} oldest turn(s) no longer fit in the context and were dropped)",
                  file=self.err)
        cfg = dataclasses.replace(self.cfg, stop=[*self.cfg.stop, instruction_marker(self.template)])
        done: list[Any] = []

        def on_event(ev) -> None:
            if ev.kind == "text":
                self.out.write(ev.text)
                self.out.flush()
            else:
                done.append(ev)

        req = eng.submit(Request(ids, cfg, on_event))
        try:
            eng.run()
        except KeyboardInterrupt:
            req.cancel()
            eng.run()
            print("\n(interrupted)", file=self.err)
        self.out.write("\n")
        self.out.flush()
        answer = done[0].text if done and done[0].finish_reason != "error" else ""
        if done and done[0].finish_reason == "error":
            print(f"error: decoding failed ({done[0].text}); the turn was not kept", file=self.err)
        elif answer.strip():
            self.turns.append((instruction, answer.strip()))
        return answer

    def command(self, line: str) -> bool:
        """Run a /command; False for /quit."""
        name, _, rest = line.strip().partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.turns = []
            print("(conversation reset)", file=self.err)
        elif name == "/params":
            if rest.strip():
                self.cfg = set_params(self.cfg, rest.split())
            print(" ".join(f"{k}={getattr(self.cfg, k)}" for k in SETTABLE), file=self.err)
        else:
            print(f"unknown command {name}; use /reset, /params [key=value ...] or /quit", file=self.err)
        return True


def set_params(cfg: SampleConfig, items: list[str]) -> SampleConfig:
    """``cfg`` with ``key=value`` items applied (validated like params.yaml: one-line ConfigError)."""
    values = dataclasses.asdict(cfg)
    for item in items:
        key, eq, raw = item.partition("=")
        key = ALIASES.get(key, key)
        if not eq or key not in SETTABLE:
            raise ConfigError(f"cannot set {item!r}; write key=value with key among {', '.join(SETTABLE)}")
        try:
            values[key] = None if raw.lower() == "none" else (float(raw) if "." in raw or "e" in raw.lower()
                                                               else int(raw))
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a number") from None
    return build(SampleConfig, values, "params", source="/params")


def chat_loop(chat: Chat, lines: Iterable[str], interactive: bool) -> None:
    if interactive:
        print("minilm-chat: type a message; /params, /reset, /quit", file=chat.err)
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            try:
                if not chat.command(text):
                    return
            except MinilmError as err:
                print(f"error: {err}", file=chat.err)
            continue
        try:
            chat.ask(text)
        except DataError as err:
            print(f"error: {err}", file=chat.err)


def _prompted_lines(stream: TextIO, err: TextIO) -> Iterable[str]:
    while True:
        err.write("you> ")
        err.flush()
        line = stream.readline()
        if not line:
            return
        yield line


def chat_parser() -> argparse.ArgumentParser:
    d = SampleConfig()
    p = argparse.ArgumentParser(prog="minilm-chat", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p, d, min_default="0 (an answer may end at once), never above --max-new-tokens")
    return p


def _chat(argv: list[str] | None) -> int:
    args = chat_parser().parse_args(argv)
    cfg = sample_config(args, 0)
    loaded = load_for_inference(args)
    template = resolve_template(args, loaded.extra)

    from .serve.engine import Engine

    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, window_s=0.0, device=loaded.device)
    if cfg.max_new_tokens >= engine.context_length:
        raise ConfigError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a message in the "
                          f"context of {engine.context_length} tokens; lower it")
    chat = Chat(engine, template, cfg)
    interactive = sys.stdin.isatty()
    chat_loop(chat, _prompted_lines(sys.stdin, sys.stderr) if interactive else sys.stdin, interactive)
    return 0


def chat_main(argv: list[str] | None = None) -> int:
    """Console script ``minilm-chat``."""
    return run_main(_chat, argv)


if __name__ == "__main__":
    raise SystemExit(chat_main())
