"""Export a minilm model to one GGUF file that llama.cpp runs (architecture ``llama``).

Written with the ``gguf`` package (llama.cpp's own writer). What differs from minilm's layout:

- **Rotary layout.** minilm (like transformers) rotates the two halves of each head's vector
  (``rotate_half``); llama.cpp's Llama rotates adjacent pairs. The rows of ``q_proj`` and ``k_proj``
  (and their biases) are permuted per head so that llama.cpp's pairs are minilm's (i, i + d/2) pairs
  - ``k_proj`` per key/value head, so GQA and MQA export as they are.
- **Tied embeddings.** No ``output.weight`` is written; llama.cpp then uses ``token_embd.weight``.
- **Weight types.** ``f32`` | ``f16`` | ``bf16`` | ``q8_0`` for the matrices; norms and biases stay f32,
  and a q8_0 matrix whose rows are not a multiple of 32 values is written f16.
- **Tokenizer.** SentencePiece's pieces, scores and kinds (``tokenizer.ggml.model = llama``), the
  user-defined pieces (the SFT markers, ``\\n``) with their spaces back - llama.cpp matches them on the
  raw text, before its BPE - ``add_space_prefix = false`` (minilm's models have no dummy prefix) and
  BOS added, EOS not; the chat template of :func:`minilm.export.chat_template`.

The file goes to a temporary name beside the target, fsynced, then renamed: a failure leaves no
partial file, and the old one, if any, untouched. The same model gives the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_TEMPLATE, ModelConfig, SampleConfig
from .errors import ConfigError, MinilmError
from .export import chat_template, check_vocab_fits, hf_state
from .fileio import _io_error, atomic_replace, temp_path_beside
from .hf import check_exportable
from .model import unwrap_compiled
from .tokenizer import Tokenizer
from .vocab import Vocab, exportable_vocab

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}     # gguf.LlamaFileType values
Q8_BLOCK = 32


def rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or its bias) from rotate-half order to llama.cpp's adjacent pairs:
    within each head, rows (j, j + d/2) become rows (2j, 2j + 1)."""
    rows = w.shape[0]
    # (n_heads, 2 halves, d/2, ...) -> (n_heads, d/2, 2, ...): half h, index j lands at 2j + h
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under GGUF's Llama tensor names, q/k permuted for llama.cpp's rotary."""
    import gguf

    cfg: ModelConfig = unwrap_compiled(model).config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    out = {}
    for key, t in hf_state(model).items():
        t = t.float()
        if ".self_attn.q_proj." in key:
            t = rotary_permute(t, cfg.n_head)
        elif ".self_attn.k_proj." in key:
            t = rotary_permute(t, cfg.kv_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:        # a bug: every minilm weight has a Llama counterpart
            raise RuntimeError(f"no GGUF name for {key}")
        out[name] = t
    return out


def _encode(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(array, raw type or None) for ``GGUFWriter.add_tensor``."""
    import gguf

    data = t.contiguous().numpy().astype(np.float32)
    if data.ndim == 1 or gguf_type == "f32":
        return data, None
    if gguf_type == "f16" or (gguf_type == "q8_0" and data.shape[-1] % Q8_BLOCK):
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


def _model_keys(w: Any, cfg: ModelConfig, gguf_type: str, name: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[gguf_type])
    if gguf_type in ("q8_0", "bf16"):
        w.add_quantization_version(2)           # gguf.GGML_QUANT_VERSION
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)


def _tokenizer_keys(w: Any, vocab: Vocab, template: str) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([vocab.surface(i).encode("utf-8") for i in range(len(vocab))])
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.kinds)      # SentencePiece's kinds are GGUF's token types, number for number
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template(template))


def _sampling_keys(w: Any, sample: SampleConfig) -> None:
    """llama.cpp's sampling defaults (``general.sampling.*``) from minilm's."""
    w.add_sampling_temp(sample.temperature)
    if sample.top_k:
        w.add_sampling_top_k(sample.top_k)
    w.add_sampling_top_p(sample.top_p)
    w.add_sampling_penalty_repeat(sample.repetition_penalty)
    if sample.ban_window:
        w.add_sampling_penalty_last_n(sample.ban_window)


def export_gguf(model: nn.Module, tokenizer: Tokenizer, path: str | os.PathLike, *, gguf_type: str = "q8_0",
                sample: SampleConfig | None = None, template: str = DEFAULT_TEMPLATE,
                name: str = "minilm") -> Path:
    """Write ``model`` with ``tokenizer`` as the GGUF file ``path`` (see the module docstring)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"export.gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    cfg: ModelConfig = unwrap_compiled(model).config
    check_exportable(cfg)
    vocab = exportable_vocab(tokenizer)
    check_vocab_fits(cfg, vocab)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the GGUF file's path (e.g. {path / 'model.gguf'})")
    tensors = {k: _encode(t, gguf_type) for k, t in gguf_tensors(model).items()}
    tmp = temp_path_beside(path)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _model_keys(writer, cfg, gguf_type, name)
        _tokenizer_keys(writer, vocab, template)
        _sampling_keys(writer, sample or SampleConfig())
        for key, (data, raw) in tensors.items():
            writer.add_tensor(key, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except OSError as err:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise _io_error(path, err) from None
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    atomic_replace(tmp, path)
    return path


def read_gguf_info(path: str | os.PathLike) -> dict[str, Any]:
    """A few header fields of a GGUF file (for checks and reports), or a one-line error."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:   # gguf's reader fails on a truncated file with IndexError, ValueError...
        raise MinilmError(f"{path} is not a readable GGUF file ({type(err).__name__}: "
                          f"{str(err)[:120]}); export it again") from None
    arch = reader.get_field("general.architecture")
    return {"architecture": bytes(arch.parts[-1]).decode() if arch else None,
            "tensors": len(reader.tensors),
            "types": sorted({t.tensor_type.name for t in reader.tensors})}
