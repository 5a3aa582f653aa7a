"""Export a minilm model to a Hugging Face directory (and, through :mod:`minilm.gguf`, to GGUF).

:func:`export_hf` writes what ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load with no custom code and no network:

- ``config.json`` (``LlamaForCausalLM``) and ``model.safetensors`` (the weights under their own names:
  minilm's module paths are Llama's; a tied ``lm_head`` is left out, as transformers does);
- ``generation_config.json``: the sampling defaults given (temperature, top-k/p, repetition penalty,
  n-gram ban, min/max new tokens; minilm's ``ban_window`` and ``seed`` have no field, and ``stop``
  strings are left out because transformers' ``generate`` then demands the tokenizer on every call);
- ``tokenizer.json`` (see :mod:`minilm.vocab`), ``tokenizer_config.json`` with the special tokens and a
  chat template that renders exactly ``sft.template``: ``apply_chat_template`` of a user message (plus
  the assistant's answer) gives minilm's SFT ids ``BOS + prompt (+ response + EOS)``;
  ``special_tokens_map.json``; and ``tokenizer.model``, the SentencePiece file itself.

Nothing depends on the time, the machine or the paths, so the same model gives the same bytes. The
directory is built beside the target and renamed into place: a failed export leaves the old one.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DEFAULT_TEMPLATE, ExportConfig, GGUFType, ModelConfig, SampleConfig  # noqa: F401
from .errors import ConfigError
from .fileio import _io_error
from .hf import check_exportable, plain_state, to_transformers_config
from .model import unwrap_compiled
from .tokenizer import Tokenizer
from .vocab import Vocab, exportable_vocab, hf_tokenizer_json

# --------------------------------------------------------------------------------------------------
# what goes into the directory


def template_parts(template: str) -> tuple[str, str]:
    """(text before ``{instruction}``, text after it) of an SFT template, literal braces unescaped."""
    head, tail, seen = [], [], False
    for text, name, _, _ in string.Formatter().parse(template):
        (tail if seen else head).append(text)
        if name is not None:
            if name != "instruction" or seen:
                raise ConfigError(f"sft.template must contain {{instruction}} exactly once, got {template!r}")
            seen = True
    if not seen:
        raise ConfigError(f"sft.template must contain {{instruction}}, got {template!r}")
    return "".join(head), "".join(tail)


def chat_template(template: str) -> str:
    """A Jinja chat template rendering ``template``: BOS, then per user message the text before
    ``{instruction}`` and the message; an assistant message (or the generation prompt) follows the text
    after ``{instruction}``, and an assistant message ends with EOS. Other roles are refused."""
    head, tail = (json.dumps(part) for part in template_parts(template))   # Jinja reads JSON strings
    return ("{{ bos_token }}{% for message in messages %}"
            f"{{% if message['role'] == 'user' %}}{{{{ {head} + message['content'] }}}}"
            f"{{% elif message['role'] == 'assistant' %}}{{{{ {tail} + message['content'] + eos_token }}}}"
            "{% else %}{{ raise_exception('this model was fine-tuned on user and assistant messages "
            "only') }}{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {tail} }}}}{{% endif %}}")


def hf_config(cfg: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    """``config.json``: LlamaConfig's fields (rope written both as transformers 4 and 5 spell it)."""
    kw = to_transformers_config(cfg)
    kw.update(bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **kw,
            "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "pretraining_tp": 1, "use_cache": True, "torch_dtype": "float32"}


def generation_config(sample: SampleConfig, vocab: Vocab) -> dict[str, Any]:
    """``generation_config.json``: minilm's sampling defaults under transformers' names."""
    out: dict[str, Any] = {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id,
                           "pad_token_id": vocab.pad_id, "do_sample": sample.temperature > 0}
    if sample.temperature > 0:
        out.update(temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p)
    out.update(repetition_penalty=sample.repetition_penalty, no_repeat_ngram_size=sample.no_repeat_ngram,
               min_new_tokens=sample.min_new_tokens, max_new_tokens=sample.max_new_tokens)
    return out   # no stop_strings: with them transformers' generate() fails unless given the tokenizer


def tokenizer_files(vocab: Vocab, template: str, context_length: int) -> dict[str, bytes]:
    specials = {"bos_token": vocab.pieces[vocab.bos_id], "eos_token": vocab.pieces[vocab.eos_id],
                "unk_token": vocab.pieces[vocab.unk_id], "pad_token": vocab.pieces[vocab.pad_id]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": context_length, "padding_side": "left",
              "chat_template": chat_template(template)}
    return {"tokenizer.json": hf_tokenizer_json(vocab).encode(), "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(specials), "tokenizer.model": vocab.model_bytes}


def hf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under transformers' names, each in its own contiguous CPU storage."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in plain_state(model).items()}


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# writing


def export_hf(model: nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
              sample: SampleConfig | None = None, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write the Hugging Face directory ``out_dir`` (replacing it whole; see the module docstring)."""
    from safetensors.torch import save

    cfg: ModelConfig = unwrap_compiled(model).config
    check_exportable(cfg)
    vocab = exportable_vocab(tokenizer)
    check_vocab_fits(cfg, vocab)
    files = {"config.json": _json(hf_config(cfg, vocab)),
             "generation_config.json": _json(generation_config(sample or SampleConfig(), vocab)),
             **tokenizer_files(vocab, template, cfg.context_length),
             "model.safetensors": save(hf_state(model), metadata={"format": "pt"})}
    return write_dir(out_dir, files)


def check_vocab_fits(cfg: ModelConfig, vocab: Vocab) -> None:
    if cfg.vocab_size != len(vocab):
        raise ConfigError(f"the tokenizer has {len(vocab)} pieces but the model's vocab_size is "
                          f"{cfg.vocab_size}; export the model with the tokenizer it was trained with")


def write_dir(out_dir: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write ``files`` into a fresh directory beside ``out_dir`` and rename it over ``out_dir``.

    A failure at any point leaves ``out_dir`` as it was (an OS error becomes a one-line MinilmError)."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as err:
        raise _io_error(out_dir, err) from None
    old = tmp.with_suffix(".old")
    try:
        for name, data in sorted(files.items()):
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if out_dir.is_dir() and not out_dir.is_symlink():
            os.replace(out_dir, old)
        elif out_dir.exists():
            raise ConfigError(f"{out_dir} exists and is not a directory; remove it or choose another "
                              "output path")
        os.replace(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise _io_error(out_dir, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
