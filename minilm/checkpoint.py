"""Checkpoints: one safetensors file holding everything a run needs to continue or be rebuilt.

Tensors are grouped by key prefix - ``model.`` (weights), ``ema.`` (EMA weights), ``optim.`` (optimizer
state), ``rng.`` (RNG states) - and a JSON document under the safetensors metadata key ``minilm`` holds the
model config, the full run config, the step and anything else a caller adds. No pickle is involved, so
loading a checkpoint can never execute code. Files are written atomically (temp file, fsync, rename); a
SHA-256 of the tensors, stored in the metadata, catches damaged tensor data on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig, from_dict, to_dict
from .errors import CheckpointError
from .fileio import _io_error, atomic_replace, check_safetensors_file, short_error, temp_path_beside
from .model import unwrap_compiled

FORMAT = "minilm-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    ema_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with ``_orig_mod.`` (torch.compile) stripped and a tied ``lm_head``
    dropped (it is the embedding; :func:`load_model_state` ties it back)."""
    model = unwrap_compiled(model)
    sd = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    model = unwrap_compiled(model)
    cfg = getattr(model, "config", None)
    tied = cfg is not None and getattr(cfg, "tie_embeddings", False)
    state = dict(state)
    if tied:
        state.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:     # shape mismatches raise even with strict=False
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line),
                      short_error(err))
        raise CheckpointError(f"checkpoint weights do not fit the model ({detail[:240]}); the checkpoint "
                              "was made for another model config, or its stored config was edited") from None
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}; the checkpoint was made for another model config")


def _optimizer_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, step: int = 0,
                    config: dict[str, Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
                    ema_state: dict[str, torch.Tensor] | None = None, rng: bool = False,
                    extra: dict[str, Any] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically. ``state`` overrides the weights taken from ``model``."""
    tensors, meta = checkpoint_contents(model, step=step, config=config, optimizer=optimizer,
                                        ema_state=ema_state, rng=rng, extra=extra, state=state)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share memory: give each its own storage
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[k] = v.clone()
        seen.add(ptr)
    return write_checkpoint(path, tensors, meta)


def checkpoint_contents(model: nn.Module, *, step: int = 0, config: dict[str, Any] | None = None,
                        optimizer: torch.optim.Optimizer | None = None,
                        ema_state: dict[str, torch.Tensor] | None = None, rng: bool = False,
                        extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`save_checkpoint` writes: the named tensors (live ones, on their devices, not copied)
    and the metadata (without its checksum, which :func:`write_checkpoint` adds)."""
    base = unwrap_compiled(model)
    weights = state if state is not None else model_state(base)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in weights.items()}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": int(step),
                            "model_config": to_dict(base.config), "config": config or {},
                            "extra": extra or {}}
    if ema_state is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer.state_dict())
        tensors.update(opt_tensors)
    if rng:
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
    return tensors, meta


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Hash ``tensors`` (contiguous CPU tensors with storages of their own) into ``meta`` and write both
    atomically (temporary file, fsync, rename): a crash leaves the previous file whole. Safe to call from
    a background thread (:mod:`minilm.ckptwriter`) on tensors no one else writes to meanwhile."""
    from safetensors.torch import save_file

    path = Path(path)
    meta["tensors_sha256"] = tensors_digest(tensors)
    tmp = temp_path_beside(path)
    try:
        save_file(tensors, str(tmp), metadata={"minilm": json.dumps(meta)})
    except Exception as err:  # safetensors reports a full disk as its own error type, not OSError
        tmp.unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is None:
            raise
        raise _io_error(path, cause) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_replace(tmp, path)
    return path


def _os_error(err: Exception) -> OSError | None:
    """The OS error behind a failed write (safetensors wraps it: "I/O error: ... (os error 28)")."""
    if isinstance(err, OSError):
        return err
    code = re.search(r"os error (\d+)", str(err))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (stored in every checkpoint, so
    damaged tensor data is caught on load, not trained on)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON metadata, without reading any tensor."""
    from safetensors import safe_open

    path = _check_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("minilm")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is corrupt or truncated ({short_error(err)}); delete it and rerun "
                              "the stage that makes it") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a minilm checkpoint (no 'minilm' "
                              "metadata); point to a checkpoint written by minilm")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt metadata; delete it and rerun the stage that makes "
                              "it") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a {meta.get('format')!r} file, not a minilm model checkpoint; "
                              "point to a checkpoint written by minilm's training (e.g. its best.safetensors)")
    return meta


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`. Never unpickles anything."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_meta(path)
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}, "rng": {}}
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            for key in f.keys():
                prefix, _, rest = key.partition(".")
                if prefix == "optim":
                    groups["optim"][key] = f.get_tensor(key)
                elif prefix in groups:
                    groups[prefix][rest] = f.get_tensor(key)
    except Exception as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({short_error(err)}); delete it and rerun "
                              "the stage that makes it") from None
    expected = meta.get("tensors_sha256")
    if expected is not None:
        found = {**{f"{p}.{k}": v for p in ("model", "ema", "rng") for k, v in groups[p].items()},
                 **groups["optim"]}
        if tensors_digest(found) != expected:
            raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum stored in it "
                                  "(damaged on disk or in transfer); delete it and rerun the stage that "
                                  "makes it")
    model_config = from_dict(ModelConfig, meta["model_config"], "model_config", source=str(path))
    optimizer_state = _optimizer_state(groups["optim"], meta["optimizer"]) if "optimizer" in meta else None
    return Checkpoint(model_config=model_config, model_state=groups["model"], meta=meta,
                      ema_state=groups["ema"] or None, optimizer_state=optimizer_state,
                      rng_state=groups["rng"])


def check_compatible(ckpt: Checkpoint, path: str | os.PathLike, model_config: ModelConfig | None = None,
                     *, tokenizer_hash: str | None = None) -> None:
    """Refuse a checkpoint trained with another tokenizer or another model config than the caller's.

    ``tokenizer_hash`` is the sha256 of the tokenizer file in use, compared with the ``tokenizer_sha256``
    the training run recorded (checkpoints that recorded none pass); ``model_config`` is what params
    describe, with ``vocab_size`` from that tokenizer. Raises a one-line :class:`CheckpointError`.
    """
    fix = "rerun the stage that trains it (e.g. `dvc repro pretrain`) or restore the params it was trained with"
    recorded = ckpt.meta.get("extra", {}).get("tokenizer_sha256")
    if tokenizer_hash is not None and recorded and recorded != tokenizer_hash:
        raise CheckpointError(f"{path} was trained with another tokenizer (sha256 {recorded[:12]}, the "
                              f"tokenizer now is {tokenizer_hash[:12]}); {fix}")
    if model_config is not None:
        have, want = to_dict(ckpt.model_config), to_dict(model_config)
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            said = {k: "the tokenizer has" if k == "vocab_size" else "params say" for k in diff}
            shown = ", ".join(f"model.{k}={have.get(k)!r} ({said[k]} {want[k]!r})" for k in diff[:4])
            raise CheckpointError(f"{path} was trained with {shown}; {fix}")


# model keys that change how a model trains, not what its weights mean
_TRAINING_ONLY = ("dropout", "init_std")


def init_weights_from(model: nn.Module, path: str | os.PathLike, *, tokenizer_hash: str | None = None,
                      what: str = "the initial checkpoint") -> str:
    """Load only the weights of the minilm checkpoint ``path`` into ``model`` (not its optimizer, EMA,
    data position or step): the start of a fresh run from a trained or imported model. The shape and
    architecture must match ``model.config`` exactly and the recorded tokenizer must be ``tokenizer_hash``;
    a mismatch is one :class:`CheckpointError` naming it. Returns the file's SHA-256."""
    from .fileio import sha256_file

    ckpt = load_checkpoint(path)
    have, want = to_dict(ckpt.model_config), to_dict(unwrap_compiled(model).config)
    diff = [k for k in want if k not in _TRAINING_ONLY and have.get(k) != want[k]]
    if diff:
        shown = ", ".join(f"model.{k}={have.get(k)!r} (this run: {want[k]!r})" for k in diff[:4])
        raise CheckpointError(f"{what} {path} holds another model: {shown}; set these model params to the "
                              "checkpoint's values, or start from a checkpoint of this shape")
    recorded = ckpt.meta.get("extra", {}).get("tokenizer_sha256")
    if tokenizer_hash is not None and recorded and recorded != tokenizer_hash:
        raise CheckpointError(f"{what} {path} was trained with another tokenizer (sha256 {recorded[:12]}, this "
                              f"run's is {tokenizer_hash[:12]}); its token ids would mean other text. Use the "
                              "tokenizer it came with (for an imported model: minilm-import's tokenizer.model)")
    load_model_state(model, ckpt.model_state)
    return sha256_file(path)


def restore_rng(rng_state: dict[str, torch.Tensor]) -> None:
    if "torch" in rng_state:
        torch.set_rng_state(rng_state["torch"].cpu())
    if torch.cuda.is_available():
        for key, s in rng_state.items():
            if key.startswith("cuda."):
                i = int(key.split(".")[1])
                if i < torch.cuda.device_count():
                    torch.cuda.set_rng_state(s.cpu(), i)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, use_ema: bool = False):
    """A :class:`~minilm.model.GPT` with the checkpoint's weights (EMA weights if asked and present),
    in eval mode."""
    from .model import GPT

    ckpt = load_checkpoint(path)
    model = GPT(ckpt.model_config)
    state = ckpt.ema_state if (use_ema and ckpt.ema_state) else ckpt.model_state
    load_model_state(model, state)
    return model.to(device).eval(), ckpt


def _check_file(path: Path) -> Path:
    return check_safetensors_file(path, "checkpoint", fix="delete it and rerun the stage that makes it",
                                  missing="run the stage that writes it first (e.g. `dvc repro pretrain`) "
                                          "or fix the path")
