"""Text tokenizers: fixed-length int32 token arrays for the text tower.

Both tokenizers share one interface:

    tok.encode(texts: list[str]) -> np.ndarray int32 [N, max_len]
    tok.decode(tokens: int array [N, L] or [L]) -> list[str] or str
    tok.vocab_size, tok.max_len, tok.pad_id, tok.eos_id

Every row ends with ``eos_id`` right after the (possibly truncated) text and is
padded with ``pad_id`` after it, so the EOS token is always inside the row.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("encode takes a list of strings, not a single string; wrap it: [text]")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, bytes):
            t = t.decode("utf-8", errors="replace")
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
        out.append(t)
    return out


def _check_max_len(max_len: Any) -> int:
    if int(max_len) != max_len or max_len < 2:
        raise ValueError(f"tokenizer.max_len must be an integer >= 2, got {max_len!r}")
    return int(max_len)


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b -> id b + 2; 0 = pad, 1 = EOS; vocab_size 258.

    Args:
      max_len: tokens per text, EOS included. Longer texts keep their first
        ``max_len - 1`` bytes.
    """

    pad_id = 0
    eos_id = 1
    _OFFSET = 2
    vocab_size = 256 + _OFFSET

    def __init__(self, max_len: int):
        self.max_len = _check_max_len(max_len)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """list of N strings -> int32 [N, max_len]."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, t in enumerate(texts):
            b = np.frombuffer(t.encode("utf-8"), np.uint8)[: self.max_len - 1]
            out[i, : len(b)] = b.astype(np.int32) + self._OFFSET
            out[i, len(b)] = self.eos_id
        return out

    def decode(self, tokens: Any) -> list[str] | str:
        """int [N, L] -> N strings ([L] -> one string); stops at EOS, ignores pad."""
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            return self.decode(arr[None])[0]
        out = []
        for row in arr:
            ids = []
            for t in row.tolist():
                if t == self.eos_id:
                    break
                if t >= self._OFFSET:
                    ids.append(t - self._OFFSET)
            out.append(bytes(ids).decode("utf-8", errors="replace"))
        return out


class SentencePieceTokenizer:
    """A SentencePiece model with the ``ByteTokenizer`` interface.

    Args:
      model_path: path of a ``.model`` file written by sentencepiece's trainer.
      max_len: tokens per text, EOS included.
      add_eos: append the model's EOS id (only when the model has one).

    ``pad_id`` is the model's pad id, or 0 when the model defines none (0 is then
    also the model's id for that piece, usually ``<unk>``); ``vocab_size`` is the
    model's piece count.
    """

    def __init__(self, model_path: str, max_len: int, add_eos: bool = True):
        import sentencepiece as spm  # Local import: only needed for this tokenizer.

        if not model_path:
            raise ValueError("tokenizer.model_path is empty; set it to a SentencePiece .model file")
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"tokenizer.model_path {model_path!r} does not exist")
        self.max_len = _check_max_len(max_len)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(os.fspath(model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer.model_path {model_path!r} is not a SentencePiece model: {e}") from e
        self.model_path = os.fspath(model_path)
        self.vocab_size = int(self._sp.GetPieceSize())
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else 0
        eos = int(self._sp.eos_id())
        self.eos_id = eos if (add_eos and eos >= 0) else None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """list of N strings -> int32 [N, max_len]."""
        texts = _check_texts(texts)
        out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        keep = self.max_len - (1 if self.eos_id is not None else 0)
        for i, ids in enumerate(self._sp.EncodeAsIds(texts)):
            ids = ids[:keep]
            out[i, : len(ids)] = ids
            if self.eos_id is not None:
                out[i, len(ids)] = self.eos_id
        return out

    def decode(self, tokens: Any) -> list[str] | str:
        """int [N, L] -> N strings ([L] -> one string); stops at EOS, drops pad."""
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            return self.decode(arr[None])[0]
        out = []
        for row in arr.tolist():
            ids = []
            for t in row:
                if self.eos_id is not None and t == self.eos_id:
                    break
                if t != self.pad_id:
                    ids.append(t)
            out.append(self._sp.DecodeIds(ids))
        return out


def build_tokenizer(config: Any) -> ByteTokenizer | SentencePieceTokenizer:
    """Tokenizer from ``config.tokenizer`` (or that sub-config itself).

    Fields: kind ("bytes" | "sentencepiece"), max_len, model_path (sentencepiece).
    """
    cfg = config.tokenizer if hasattr(config, "tokenizer") else config
    kind = cfg.get("kind", "bytes") if hasattr(cfg, "get") else cfg.kind
    if kind == "bytes":
        return ByteTokenizer(cfg.max_len)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(cfg.get("model_path", ""), cfg.max_len)
    raise ValueError(f"tokenizer.kind must be 'bytes' or 'sentencepiece', got {kind!r}")
