"""Tokenizers behind one small interface: a trained SentencePiece model, or a character vocabulary.

Both keep text lossless: ``decode(encode(text)) == text`` for ordinary text (limits are listed on each
class). Both have the ids ``unk``, ``bos``, ``eos`` and ``pad`` (distinct), user-defined special tokens
such as ``"### Response:"`` that always encode to one id, and a ``hash`` (SHA-256 of the saved file) that
later artifacts record so a mismatched tokenizer is caught.

``train_tokenizer`` makes one from a text file; ``load_tokenizer`` opens a saved one of either kind.
"""

from __future__ import annotations

import abc
import codecs
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .config import TokenizerConfig
from .errors import CheckpointError, ConfigError, DataError
from .fileio import atomic_write, write_json

CHAR_FORMAT = "minilm-char-tokenizer"
CHAR_VERSION = 1
CHAR_RESERVED = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3 of a char vocabulary
CHAR_UNK_SURFACE = "\ufffd"                             # how a char-vocab <unk> decodes

SP_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
SP_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SP_SPACE = "\u2581"  # SentencePiece's space marker


class Tokenizer(abc.ABC):
    """What the rest of minilm needs from a tokenizer."""

    kind: str
    path: Path
    hash: str        # hex SHA-256 of the saved file's bytes
    vocab_size: int
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by ``bos_id`` / ``eos_id``."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` (subclasses may do it faster)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ``bos``, ``eos`` and ``pad`` ids are skipped."""

    @abc.abstractmethod
    def token_id(self, piece: str) -> int | None:
        """Id of a vocabulary piece (meant for special tokens such as ``"### Response:"``), else None."""

    def token_bytes(self) -> list[int]:
        """The UTF-8 bytes each id stands for in decoded text (bos, eos and pad: 0), so that for ids
        that do not split a character ``sum(token_bytes()[i] for i in ids) == len(decode(ids).encode())``.
        Exact bits per byte divides the summed loss by these counts."""
        skip = {self.bos_id, self.eos_id, self.pad_id}
        return [0 if i in skip else len(self.decode([i]).encode()) for i in range(self.vocab_size)]

    def _skip_specials(self, ids: Sequence[int]) -> list[int]:
        skip = {self.bos_id, self.eos_id, self.pad_id}
        return [i for i in map(int, ids) if i not in skip]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE or unigram) trained by :func:`train_sentencepiece`.

    Round-trip limits: with ``byte_fallback`` every string round-trips except that a literal U+2581
    (``▁``, SentencePiece's space marker) decodes as a space; without it, characters outside the
    vocabulary decode as `` ⁇ ``. A model made elsewhere loads if it defines unk, bos, eos and pad ids.
    """

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        data = _read_tokenizer_bytes(self.path)
        self.hash = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError):
            raise CheckpointError(f"{self.path} is not a valid SentencePiece model (could not parse it); "
                                  "rerun the tokenizer stage to rebuild it") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        ids = (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = ids
        if min(ids) < 0 or len(set(ids)) != 4:
            raise CheckpointError(f"{self.path}: SentencePiece model lacks distinct unk/bos/eos/pad ids "
                                  f"(got {ids}); train it with minilm's tokenizer stage")
        self.threads = os.cpu_count() or 1   # SentencePiece's threads for encode_batch

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._skip_specials(ids))

    def token_bytes(self) -> list[int]:
        # a byte-fallback piece is one byte of a character (decoded alone it would be U+FFFD); control
        # pieces (bos, eos, pad) decode to nothing; every other piece decodes to its own text
        sp = self._sp
        return [1 if sp.is_byte(i) else 0 if sp.is_control(i) else len(sp.decode([i]).encode())
                for i in range(self.vocab_size)]

    def token_id(self, piece: str) -> int | None:
        piece = _sp_piece(piece)
        i = self._sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self._sp.id_to_piece(i) else i


def _sp_piece(text: str) -> str:
    """How SentencePiece stores a string as a piece: spaces as U+2581."""
    return text.replace(" ", SP_SPACE)


def train_sentencepiece(input_path: str | os.PathLike, out_path: str | os.PathLike,
                        cfg: TokenizerConfig) -> SentencePieceTokenizer:
    """Train a SentencePiece model on a UTF-8 text file and write it atomically to ``out_path``.

    Normalisation is the identity and whitespace is kept as is (no dummy prefix, no collapsing of
    spaces), so text round-trips. ``"\\n"`` is always a user-defined piece (SentencePiece reads its input
    one line at a time, so newlines are never learned otherwise) followed by ``cfg.special_tokens``
    (stored with spaces as U+2581, since SentencePiece matches them after escaping spaces).
    Lines longer than 65536 bytes are skipped during training (``max_sentence_length``); they still
    encode normally. Above ``cfg.max_sentences`` lines, a random sample of lines is used. Invalid UTF-8
    in the input is skipped by SentencePiece. Ids: unk=0, bos=1, eos=2, pad=3.
    """
    import sentencepiece as spm

    input_path = _check_input(input_path)
    # user-defined pieces are matched after spaces become the marker, so they are stored that way
    symbols = ["\n"] + [_sp_piece(t) for t in cfg.special_tokens if t != "\n"]
    reserved = set(SP_PIECES.values()) & set(symbols)
    if reserved:
        raise ConfigError(f"tokenizer.special_tokens {sorted(reserved)} clash with SentencePiece's own "
                          f"pieces {list(SP_PIECES.values())}; choose other strings")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=[str(input_path)], model_writer=model,
            model_type=cfg.model_type, vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
            user_defined_symbols=symbols,
            input_sentence_size=cfg.max_sentences, shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            unk_id=SP_IDS["unk"], bos_id=SP_IDS["bos"], eos_id=SP_IDS["eos"], pad_id=SP_IDS["pad"],
            unk_piece=SP_PIECES["unk"], bos_piece=SP_PIECES["bos"], eos_piece=SP_PIECES["eos"],
            pad_piece=SP_PIECES["pad"],
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as err:
        raise _sentencepiece_error(str(err), input_path, cfg) from None
    with atomic_write(out_path, "wb") as fh:
        fh.write(model.getvalue())
    return SentencePieceTokenizer(out_path)


def _sentencepiece_error(message: str, input_path: Path, cfg: TokenizerConfig) -> DataError:
    """SentencePiece's C++ error as a one-line DataError with the fix."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message)
    if too_high:
        return DataError(f"tokenizer.vocab_size {too_high.group(1)} is too high for this corpus "
                         f"({input_path}): SentencePiece can make at most {too_high.group(2)} pieces from "
                         f"it; lower tokenizer.vocab_size to <= {too_high.group(2)} or train on more text")
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return DataError(f"tokenizer.vocab_size {too_small.group(1)} is too small for this corpus "
                         f"({input_path}): its characters, byte pieces and special tokens need "
                         f"{too_small.group(2)}; raise tokenizer.vocab_size or lower "
                         "tokenizer.character_coverage")
    if "all_chars_count" in message:
        return DataError(f"{input_path} has no characters SentencePiece can learn from; add text to it")
    detail = re.sub(r"^\w+: \S+\(\d+\) \[[^\]]*\] ", "", message.strip().splitlines()[0])
    return DataError(f"SentencePiece could not train on {input_path} with {cfg.model_type} "
                     f"vocab_size={cfg.vocab_size}: {detail}; check the corpus and the tokenizer params")


# --------------------------------------------------------------------------------------------------
# characters


class CharTokenizer(Tokenizer):
    """One id per character of the training text, plus ``<pad>``=0, ``<unk>``=1, ``<bos>``=2,
    ``<eos>``=3 and user-defined special tokens (matched greedily, longest first, as whole strings).

    Round-trip limit: characters not seen in training encode as ``<unk>`` and decode as U+FFFD.
    Saved as a small JSON file: ``{"format", "version", "pieces", "special_tokens"}``, pieces in id order.
    """

    kind = "char"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        data = _read_tokenizer_bytes(self.path)
        self.hash = hashlib.sha256(data).hexdigest()
        pieces, specials = _parse_char_vocab(data, self.path)
        self._pieces = pieces
        self._ids = {p: i for i, p in enumerate(pieces)}
        self.special_tokens = specials
        self.vocab_size = len(pieces)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)
        by_length = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if specials else None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids, unk = self._ids, self.unk_id
        if self._split is None:
            out = [ids.get(c, unk) for c in text]
        else:
            out = []
            # re.split with a group: even items are plain text, odd items are special tokens
            for k, part in enumerate(self._split.split(text)):
                if k % 2:
                    out.append(ids[part])
                else:
                    out.extend(ids.get(c, unk) for c in part)
        if bos:
            out.insert(0, self.bos_id)
        if eos:
            out.append(self.eos_id)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        out = []
        for i in self._skip_specials(ids):
            if not 0 <= i < n:
                raise IndexError(f"token id {i} is outside the vocabulary (size {n})")
            out.append(CHAR_UNK_SURFACE if i == self.unk_id else self._pieces[i])
        return "".join(out)

    def token_id(self, piece: str) -> int | None:
        return self._ids.get(piece)


def build_char_tokenizer(input_path: str | os.PathLike, out_path: str | os.PathLike,
                         cfg: TokenizerConfig) -> CharTokenizer:
    """Collect the characters of a text file (streamed, so any size works) into a vocabulary JSON file.

    ``cfg.vocab_size`` is ignored: the vocabulary is whatever characters the text holds. Invalid UTF-8
    becomes U+FFFD (which then is in the vocabulary), matching ``invalid_utf8: replace`` when encoding.
    """
    input_path = _check_input(input_path)
    reserved = set(CHAR_RESERVED) & set(cfg.special_tokens)
    if reserved:
        raise ConfigError(f"tokenizer.special_tokens {sorted(reserved)} clash with the reserved pieces "
                          f"{list(CHAR_RESERVED)}; choose other strings")
    chars: set[str] = set()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(input_path, "rb") as fh:
        while block := fh.read(1 << 20):
            chars.update(decoder.decode(block))
    chars.update(decoder.decode(b"", final=True))
    singles = sorted(chars - set(cfg.special_tokens))
    pieces = list(CHAR_RESERVED) + list(cfg.special_tokens) + singles
    write_json(out_path, {"format": CHAR_FORMAT, "version": CHAR_VERSION, "pieces": pieces,
                          "special_tokens": list(cfg.special_tokens)})
    return CharTokenizer(out_path)


def _parse_char_vocab(data: bytes, path: Path) -> tuple[list[str], list[str]]:
    fix = "rerun the tokenizer stage to rebuild it"
    try:
        doc: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {err}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHAR_FORMAT:
        raise CheckpointError(f"{path} is JSON but not a minilm char tokenizer; point to a tokenizer "
                              "file made by minilm")
    if doc.get("version") != CHAR_VERSION:
        raise CheckpointError(f"{path} is char tokenizer version {doc.get('version')!r}, this minilm reads "
                              f"version {CHAR_VERSION}; {fix} or upgrade minilm")
    pieces, specials = doc.get("pieces"), doc.get("special_tokens")
    ok = (isinstance(pieces, list) and isinstance(specials, list)
          and all(isinstance(p, str) and p for p in pieces)
          and tuple(pieces[:4]) == CHAR_RESERVED and len(set(pieces)) == len(pieces)
          and pieces[4:4 + len(specials)] == specials
          and all(len(p) == 1 for p in pieces[4 + len(specials):]))
    if not ok:
        raise CheckpointError(f"{path} has a malformed char vocabulary; {fix}")
    return pieces, specials


# --------------------------------------------------------------------------------------------------
# dispatch


def train_tokenizer(input_path: str | os.PathLike, out_path: str | os.PathLike,
                    cfg: TokenizerConfig) -> Tokenizer:
    """Train (sentencepiece) or build (char) a tokenizer from a text file, per ``cfg.kind``."""
    if cfg.kind == "char":
        return build_char_tokenizer(input_path, out_path, cfg)
    return train_sentencepiece(input_path, out_path, cfg)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Open a saved tokenizer of either kind (a char vocabulary is JSON, anything else SentencePiece)."""
    path = Path(path)
    head = _read_tokenizer_bytes(path)[:64]
    if head.lstrip().startswith(b"{"):
        return CharTokenizer(path)
    return SentencePieceTokenizer(path)


def _read_tokenizer_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"tokenizer file {path} not found; run the tokenizer stage first (e.g. "
                              "`dvc repro tokenizer`) or fix the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; point to a tokenizer file")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"tokenizer file {path} is empty; rerun the tokenizer stage to rebuild it")
    return data


def _check_input(input_path: str | os.PathLike) -> Path:
    path = Path(input_path)
    if not path.is_file():
        raise DataError(f"tokenizer training text {path} not found; create it or fix the input path")
    if path.stat().st_size == 0:
        raise DataError(f"tokenizer training text {path} is empty; add text to it")
    return path
