"""Tokenizers: fixed-length rows, EOS always present, round trips."""

import ml_collections
import numpy as np
import pytest

from vlm_jax.data import tokenizers


def test_byte_tokenizer_round_trips_unicode_and_pads_after_eos():
    tok = tokenizers.ByteTokenizer(max_len=24)
    texts = ["a red triangle", "", "größe ✓"]
    ids = tok.encode(texts)
    assert ids.shape == (3, 24) and ids.dtype == np.int32
    assert tok.decode(ids) == texts
    assert ids.max() < tok.vocab_size and ids.min() >= 0
    n = len("a red triangle")
    assert ids[0, n] == tok.eos_id and np.all(ids[0, n + 1:] == tok.pad_id)
    assert ids[1, 0] == tok.eos_id
    assert not np.any(ids[0, :n] == tok.pad_id)


def test_byte_tokenizer_truncates_but_keeps_eos():
    tok = tokenizers.ByteTokenizer(max_len=8)
    ids = tok.encode(["a long caption here"])
    assert ids[0, -1] == tok.eos_id
    assert tok.decode(ids[0]) == "a long "


def test_byte_tokenizer_rejects_a_bare_string():
    with pytest.raises(TypeError, match="list"):
        tokenizers.ByteTokenizer(8).encode("abc")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("sp") / "tiny"
    sentences = [f"{n} {c} {k}s on a {t} background" for n in ("one", "two", "three")
                 for c in ("red", "green", "blue", "white") for k in ("circle", "square", "ring")
                 for t in ("plain", "striped")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(path), vocab_size=30,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
        minloglevel=2, num_threads=1)
    return str(path) + ".model"


def test_sentencepiece_tokenizer_round_trips(sp_model):
    tok = tokenizers.SentencePieceTokenizer(sp_model, max_len=48)
    texts = ["two red circles on a plain background", "a blue ring"]
    ids = tok.encode(texts)
    assert ids.shape == (2, 48) and ids.dtype == np.int32
    assert tok.decode(ids) == texts
    import sentencepiece as spm

    assert tok.vocab_size == spm.SentencePieceProcessor(model_file=sp_model).GetPieceSize()
    assert ids.max() < tok.vocab_size
    assert tok.pad_id == 0 and tok.eos_id == 2
    for row in ids:
        eos = int(np.argmax(row == tok.eos_id))
        assert row[eos] == tok.eos_id and np.all(row[eos + 1:] == tok.pad_id)
    short = tokenizers.SentencePieceTokenizer(sp_model, max_len=4).encode(texts)
    assert np.all(short[:, -1] == tok.eos_id)


def test_build_tokenizer_reads_the_config(sp_model):
    cfg = ml_collections.ConfigDict(dict(kind="bytes", max_len=10, model_path=""))
    assert isinstance(tokenizers.build_tokenizer(cfg), tokenizers.ByteTokenizer)
    cfg.kind, cfg.model_path = "sentencepiece", sp_model
    tok = tokenizers.build_tokenizer(ml_collections.ConfigDict(dict(tokenizer=cfg)))
    assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.max_len == 10
    cfg.kind = "wordpiece"
    with pytest.raises(ValueError, match="tokenizer.kind"):
        tokenizers.build_tokenizer(cfg)
    cfg.kind, cfg.model_path = "sentencepiece", "/nonexistent.model"
    with pytest.raises(FileNotFoundError, match="model_path"):
        tokenizers.build_tokenizer(cfg)
