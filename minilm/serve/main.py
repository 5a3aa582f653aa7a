"""``minilm-serve``: the OpenAI-compatible server and web chat page for a minilm checkpoint.

    minilm-serve --ckpt out/merge/model.safetensors --tokenizer out/tokenizer/tokenizer.model
    minilm-serve ... --params params.yaml          # the serve section (and sft.template) from params

Binds 127.0.0.1 (this machine only) unless told otherwise. When the environment variable named by
``--api-key-env`` (default MINILM_API_KEY) holds a key, /v1 requests need ``Authorization: Bearer <key>``;
a non-loopback host without a key is refused unless ``--allow-no-key``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import get_args

from ..cli import add_model_args, load_for_inference, resolve_template, run_main
from ..config import build, load_yaml
from ..errors import ConfigError
from . import LogLevel, ServeConfig, is_loopback


def serve_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="minilm-serve", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    s = p.add_argument_group("server (defaults: the serve section of --params, else these)")
    s.add_argument("--host", help=f"address to bind (default {d.host}: this machine only)")
    s.add_argument("--port", type=int, help=f"TCP port (default {d.port})")
    s.add_argument("--model-name", help=f"the model id clients send (default {d.model_name!r})")
    s.add_argument("--api-key-env", metavar="NAME",
                   help=f"environment variable holding the API key (default {d.api_key_env})")
    s.add_argument("--allow-no-key", action="store_true", default=None,
                   help="serve a non-loopback host without an API key")
    s.add_argument("--max-batch", type=int, help=f"most requests decoded together (default {d.max_batch}; "
                   "1 = one at a time)")
    s.add_argument("--batch-window-ms", type=float,
                   help=f"an idle server waits this long for requests to batch (default {d.batch_window_ms})")
    s.add_argument("--max-tokens", type=int, help=f"largest max_tokens a request may ask (default "
                   f"{d.max_tokens})")
    s.add_argument("--default-max-tokens", type=int,
                   help=f"max_tokens of a request that gives none (default {d.default_max_tokens})")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    s.add_argument("--log-level", choices=get_args(LogLevel),
                   help=f"uvicorn's log level (default {d.log_level})")
    return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """params ``serve:`` (when --params has one), overridden by the flags given."""
    values = dict(load_yaml(args.params).get("serve") or {}) if args.params else {}
    for f in dataclasses.fields(ServeConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    for name in ("device", "precision"):       # the model flags, when set away from their default
        if getattr(args, name) != "auto" or name not in values:
            values[name] = getattr(args, name)
    return build(ServeConfig, values, "serve", source=args.params or "command line")


def api_key(cfg: ServeConfig) -> str | None:
    """The key from the environment; refuses a non-loopback host without one (unless allowed)."""
    key = os.environ.get(cfg.api_key_env) or None
    if key is None and not is_loopback(cfg.host) and not cfg.allow_no_key:
        raise ConfigError(f"--host {cfg.host} lets other machines connect, and no API key is set; export "
                          f"{cfg.api_key_env}=<a secret> (clients send it as a Bearer token), or pass "
                          "--allow-no-key to serve without one, or bind 127.0.0.1")
    return key


def _serve(argv: list[str] | None) -> int:
    args = serve_parser().parse_args(argv)
    cfg = serve_config(args)
    key = api_key(cfg)
    args.device, args.precision = cfg.device, cfg.precision

    import torch
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_for_inference(args)
    template = resolve_template(args, loaded.extra)

    from .api import Served, create_app
    from .engine import Engine

    engine = Engine(loaded.model, loaded.tokenizer, max_batch=cfg.max_batch,
                    window_s=cfg.batch_window_ms / 1000, device=loaded.device)
    app = create_app(Served(engine, cfg, template, api_key=key))
    engine.start()
    print(f"minilm-serve: {args.ckpt} as {cfg.model_name!r} on http://{cfg.host}:{cfg.port} (chat page at /, "
          f"OpenAI API at /v1{', API key required' if key else ''}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False)
    finally:
        engine.stop()
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """Console script ``minilm-serve``."""
    return run_main(_serve, argv)


if __name__ == "__main__":
    raise SystemExit(serve_main())
