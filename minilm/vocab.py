"""A SentencePiece tokenizer as tables other tools read: pieces, scores, kinds, and BPE merges.

Both export formats rebuild minilm's tokenizer from these tables instead of running SentencePiece:
Hugging Face's ``tokenizers`` (``tokenizer.json``: a BPE model with byte fallback, the user-defined
pieces as added tokens) and llama.cpp (GGUF ``tokenizer.ggml.*``: pieces, scores and token types).
What those rebuilds cannot reproduce exactly is refused by :func:`exportable_vocab` with one line
naming the setting: the char tokenizer, a unigram model, a dummy prefix, any normalisation.

SentencePiece's BPE encoder merges, at each step, the adjacent pair whose concatenation is the
best-scoring piece. ``tokenizers`` merges by rank, so :func:`bpe_merges` lists every pair of normal
pieces that concatenates to a normal piece, ranked by that piece's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tokenizer import SP_SPACE, CharTokenizer, Tokenizer

# SentencePiece's piece kinds; GGUF's token types use the same numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2      # TrainerSpec.ModelType.BPE


@dataclass(frozen=True)
class Vocab:
    """The pieces of a SentencePiece BPE model in id order, with their scores and kinds."""

    pieces: list[str]        # as SentencePiece stores them (spaces as U+2581)
    scores: list[float]
    kinds: list[int]         # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED or BYTE
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    model_bytes: bytes       # the .model file itself

    def __len__(self) -> int:
        return len(self.pieces)

    def surface(self, i: int) -> str:
        """How piece ``i`` appears in text: a user-defined piece with its spaces back."""
        piece = self.pieces[i]
        return piece.replace(SP_SPACE, " ") if self.kinds[i] == USER_DEFINED else piece

    @property
    def user_defined(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == USER_DEFINED]


def _proto(data: bytes, path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:   # protobuf's DecodeError
        raise ConfigError(f"{path} is not a SentencePiece model; export needs the tokenizer the model "
                          "was trained with") from None
    return proto


def exportable_vocab(tokenizer: Tokenizer) -> Vocab:
    """The tables of ``tokenizer``, or a one-line :class:`ConfigError` naming what prevents an exact
    export (another tool would split text differently)."""
    if isinstance(tokenizer, CharTokenizer):
        raise ConfigError("tokenizer.kind is 'char': a character vocabulary has no Hugging Face or "
                          "llama.cpp counterpart; export needs tokenizer.kind: sentencepiece (model_type: bpe)")
    data = tokenizer.path.read_bytes()
    proto = _proto(data, tokenizer.path)
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != _BPE:
        kind = type(proto.trainer_spec).ModelType.Name(proto.trainer_spec.model_type).lower()
        raise ConfigError(f"tokenizer.model_type is {kind!r}: llama.cpp and the exported Hugging Face "
                          "tokenizer split text like SentencePiece BPE only; retrain with "
                          "tokenizer.model_type: bpe to export")
    problems = []
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is on")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization is {norm.name!r}")
    if problems:
        raise ConfigError(f"{tokenizer.path}: {', '.join(problems)}; export reproduces only minilm's "
                          "tokenizer settings (identity normalisation, no dummy prefix, whitespace kept)")
    return Vocab(pieces=[p.piece for p in proto.pieces], scores=[float(p.score) for p in proto.pieces],
                 kinds=[int(p.type) for p in proto.pieces], unk_id=tokenizer.unk_id,
                 bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                 model_bytes=data)


def bpe_merges(vocab: Vocab) -> list[tuple[str, str]]:
    """Every (left, right) pair of normal pieces whose concatenation is a normal piece, best-scoring
    result first (ties: lower id of the result, then of the left and right pieces)."""
    ids = {p: i for i, (p, k) in enumerate(zip(vocab.pieces, vocab.kinds)) if k == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def hf_tokenizer_json(vocab: Vocab) -> str:
    """``tokenizer.json`` for Hugging Face ``tokenizers``: the same ids as minilm's SentencePiece model
    for any text (BPE with byte fallback; user-defined pieces matched first, on the raw text; spaces
    become U+2581 with no prefix; BOS prepended like minilm's ``encode(bos=True)``)."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    table = {vocab.surface(i): i for i in range(len(vocab))}
    unk = vocab.pieces[vocab.unk_id]
    tok = HFTokenizer(BPE(vocab=table, merges=bpe_merges(vocab), unk_token=unk, byte_fallback=True,
                          fuse_unk=False))
    tok.normalizer = normalizers.Replace(" ", SP_SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    specials = [vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id]
    tok.add_special_tokens([AddedToken(vocab.pieces[i], special=True, normalized=False)
                            for i in sorted(specials)])
    tok.add_tokens([AddedToken(vocab.surface(i), special=False, normalized=False)
                    for i in vocab.user_defined])
    bos = vocab.pieces[vocab.bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab.bos_id)])
    for i in specials + vocab.user_defined:          # added tokens must keep the model's ids
        if tok.token_to_id(vocab.surface(i)) != i:
            raise RuntimeError(f"tokenizer.json would give piece {i} ({vocab.surface(i)!r}) another id")
    return tok.to_str(pretty=True)
