"""Llama3Tokenizer against Meta's llama_models.llama3.tokenizer.Tokenizer on the same tokenizer.model."""

import random

import pytest

from corral.tokenizer.base import Tokenizer
from corral.tokenizer.llama3 import PAT_STR, Llama3Tokenizer, split_long_runs
from tests.tokenizer.corpus import corpus

# Pathological inputs that exercise Meta's 25,000-char run splitting.
LONG = ["a" * 30_000, " " * 30_000, "ab " * 20_000, "中" * 30_000, ("x" * 26_000 + " ") * 2, "\n" * 25_001 + "z"]


def test_protocol_and_ids(llama3_tokenizer):
    tok = llama3_tokenizer
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.special_tokens["<|begin_of_text|>"] == 128000
    assert tok.special_tokens["<|image|>"] == 128011
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert len(tok.special_tokens) == 256


def test_meta_reference_ids(llama3_tokenizer):
    """Spec §8.1 (Meta's test_tokenizer.py) and the reference ids of spec §5."""
    tok = llama3_tokenizer
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    expected = {"user": [882], "system": [9125], "assistant": [78191], "ipython": [23799, 4690], "\n\n": [271],
                "\n": [198], "safe": [19193], "unsafe": [39257], "S1": [50, 16], "S10": [50, 605], ",": [11],
                "Hello, world!": [9906, 11, 1917, 0], "Environment: ipython": [13013, 25, 6125, 27993],
                "Cutting Knowledge Date: December 2023": [38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18],
                "Today Date: 26 Jul 2024": [15724, 2696, 25, 220, 1627, 10263, 220, 2366, 19]}
    for text, want in expected.items():
        assert tok.encode(text) == want, text


def test_pattern_is_metas(meta_tokenizer):
    assert PAT_STR == meta_tokenizer.pat_str


def test_encode_decode_parity_with_meta(llama3_tokenizer, meta_tokenizer):
    strings = corpus(1200, seed=0) + LONG
    assert len(strings) >= 1000
    mismatched = []
    for s in strings:
        ours = llama3_tokenizer.encode(s, bos=True, eos=False)
        ref = meta_tokenizer.encode(s, bos=True, eos=False)
        if ours != ref or llama3_tokenizer.decode(ours) != meta_tokenizer.decode(ref):
            mismatched.append(s[:60])
        assert llama3_tokenizer.decode(ours[1:]) == s  # lossless round trip
    assert not mismatched, f"{len(mismatched)} of {len(strings)} strings differ from Meta: {mismatched[:5]}"


def test_special_token_text_is_plain_by_default(llama3_tokenizer, meta_tokenizer):
    """Spec §8.2 item 1 / §9 item 10: Meta encodes special-token text inside content as ordinary text."""
    text = "hi <|eot_id|> there <|start_header_id|>"
    plain = llama3_tokenizer.encode(text)
    assert plain == meta_tokenizer.encode(text, bos=False, eos=False)
    assert 128009 not in plain and 128006 not in plain
    special = llama3_tokenizer.encode(text, allow_special=True)
    assert special == meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert 128009 in special and 128006 in special


def test_token_bytes_concatenate_to_utf8(llama3_tokenizer):
    for s in corpus(300, seed=1):
        ids = llama3_tokenizer.encode(s)
        assert b"".join(llama3_tokenizer.token_bytes(i) for i in ids) == s.encode("utf-8")
    assert llama3_tokenizer.token_bytes(128009) == b"<|eot_id|>"


def test_split_long_runs_matches_meta(meta_tokenizer):
    rng = random.Random(3)
    for _ in range(200):
        s = "".join(rng.choice([" ", "\n", "a", "b", "\t", "中"]) * rng.randint(1, 12) for _ in range(rng.randint(0, 30)))
        limit = rng.randint(1, 15)
        assert list(split_long_runs(s, limit)) == list(meta_tokenizer._split_whitespaces_or_nonwhitespaces(s, limit))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Llama3Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2"):
        Llama3Tokenizer(bad)
