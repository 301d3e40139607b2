"""tokenizer_from_gguf on the real SmolLM2 GGUF (vs transformers' GGUF tokenizer conversion) and on a Llama 3
vocabulary in GGUF form (vs Meta's tiktoken tokenizer)."""

import base64

import pytest

from corral.tokenizer.base import StreamDecoder, Tokenizer
from corral.tokenizer.gguf import tokenizer_from_gguf
from corral.tokenizer.hf import gpt2_byte_decoder
from corral.tokenizer.llama3 import SPECIAL_TOKENS
from tests.tokenizer.corpus import corpus


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_metadata):
    """transformers' own GGUF tokenizer conversion (what AutoTokenizer.from_pretrained(gguf_file=...) runs),
    fed the same metadata: keys renamed with its GGUF_TOKENIZER_MAPPING, converted by convert_gguf_tokenizer."""
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {renames[k[len("tokenizer."):]]: v for k, v in smollm2_metadata.items()
                      if k.startswith("tokenizer.") and k[len("tokenizer."):] in renames}
    backend, _ = convert_gguf_tokenizer(smollm2_metadata["general.architecture"], tokenizer_dict)
    return backend


def test_smollm2_ids_and_stops(smollm2_tokenizer, smollm2_metadata):
    tok = smollm2_tokenizer
    assert isinstance(tok, Tokenizer)
    assert smollm2_metadata["tokenizer.ggml.pre"] == "smollm"
    assert tok.vocab_size == len(smollm2_metadata["tokenizer.ggml.tokens"]) == 49152
    im_end, im_start = tok.special_tokens["<|im_end|>"], tok.special_tokens["<|im_start|>"]
    assert (tok.bos_id, tok.eos_id) == (im_start, im_end) == (1, 2)
    assert im_end in tok.stop_ids and tok.special_tokens["<|endoftext|>"] in tok.stop_ids
    assert tok.chat_template == smollm2_metadata["tokenizer.chat_template"]
    assert tok.encode("x", bos=True, eos=True) == [1, tok.encode("x")[0], 2]


# llama.cpp's pre-tokenizer for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): every \\p{N} on its own, then
# GPT-2's regex on the rest.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def llama_cpp_smollm_pretokens(text: str) -> list[str]:
    import regex

    out = []
    for piece in regex.split(r"(\p{N})", text):
        if regex.fullmatch(r"\p{N}", piece):
            out.append(piece)
        elif piece:
            out += regex.findall(GPT2_PATTERN, piece)
    return out


def test_smollm2_pretokenizer_is_llama_cpps(smollm2_tokenizer):
    byte_of = gpt2_byte_decoder()
    pre = smollm2_tokenizer.tokenizer.pre_tokenizer
    for s in corpus(1200, seed=0):
        ours = [bytes(byte_of[c] for c in piece).decode("utf-8", errors="replace") for piece, _ in
                pre.pre_tokenize_str(s)]
        want = [p.encode("utf-8").decode("utf-8", errors="replace") for p in llama_cpp_smollm_pretokens(s)]
        assert ours == want, s


def test_smollm2_parity_with_transformers(smollm2_tokenizer, transformers_smollm2, smollm2_metadata):
    """Same ids as transformers' GGUF conversion on >= 1,000 strings, with two deliberate differences:
    - transformers ignores tokenizer.ggml.pre == "smollm" (digits split before GPT-2's regex, as in llama.cpp and
      SmolLM2's own tokenizer.json), which changes how whitespace before a digit groups; so all strings are
      compared with transformers' tokenizer given that pre-tokenizer, and digit-free strings with it unchanged;
    - SmolLM2's vocabulary lacks a few byte tokens (control bytes such as 0x06): transformers emits the unknown id
      for them (0, <|endoftext|>, a stop token), we drop them as llama.cpp does."""
    import regex
    from tokenizers import Tokenizer

    patched = Tokenizer.from_str(transformers_smollm2.to_str())
    patched.pre_tokenizer = smollm2_tokenizer.tokenizer.pre_tokenizer
    missing = missing_byte_chars(smollm2_metadata)
    unk = smollm2_metadata["tokenizer.ggml.unknown_token_id"]
    strings = corpus(1200, seed=0)
    differ, n_plain, n_missing = [], 0, 0
    for s in strings:
        ours = smollm2_tokenizer.encode(s, allow_special=True)
        refs = [patched.encode(s, add_special_tokens=False).ids]
        if not regex.search(r"\p{N}", s):
            n_plain += 1
            refs.append(transformers_smollm2.encode(s, add_special_tokens=False).ids)
        if missing & set(s):
            n_missing += 1
            refs = [[i for i in r if i != unk] for r in refs]
            s = "".join(c for c in s if c not in missing)
        if any(ours != r for r in refs):
            differ.append(s[:60])
        # transformers' GGUF decoder turns "\u2581" into a space (a SentencePiece rule it applies to byte-level
        # vocabularies too); elsewhere decoding must agree, and ours must round-trip exactly.
        if "\u2581" not in s:
            assert smollm2_tokenizer.decode(ours) == transformers_smollm2.decode(refs[0], skip_special_tokens=False)
        assert smollm2_tokenizer.decode(ours) == s
    assert not differ, f"{len(differ)} of {len(strings)} strings differ from transformers: {differ[:5]}"
    assert n_plain > 600 and 0 < n_missing < 100


def test_smollm2_special_text_plain_by_default(smollm2_tokenizer, transformers_smollm2):
    text = "<|im_start|>user\nhi<|im_end|>"
    special = smollm2_tokenizer.encode(text, allow_special=True)
    assert special[0] == 1 and special[-1] == 2
    plain = smollm2_tokenizer.encode(text)
    assert 1 not in plain and 2 not in plain and smollm2_tokenizer.decode(plain) == text
    transformers_smollm2.encode_special_tokens = True  # transformers' split_special_tokens=True
    try:
        assert plain == transformers_smollm2.encode(text, add_special_tokens=False).ids
    finally:
        transformers_smollm2.encode_special_tokens = False


def missing_byte_chars(metadata) -> set[str]:
    """ASCII characters whose byte has no token in the vocabulary (they are dropped when encoding)."""
    byte_of = gpt2_byte_decoder()
    present = {byte_of[t] for t in metadata["tokenizer.ggml.tokens"] if len(t) == 1 and t in byte_of}
    return {chr(b) for b in set(range(128)) - present}


def test_smollm2_token_bytes_and_streaming(smollm2_tokenizer, smollm2_metadata):
    missing = missing_byte_chars(smollm2_metadata)
    for s in corpus(400, seed=2):
        s = "".join(c for c in s if c not in missing)
        ids = smollm2_tokenizer.encode(s)
        assert b"".join(smollm2_tokenizer.token_bytes(i) for i in ids) == s.encode("utf-8")
        stream = StreamDecoder(smollm2_tokenizer)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == s
        assert all("\ufffd" not in p for p in pieces)  # never a partial character
    assert smollm2_tokenizer.token_bytes(2) == b"<|im_end|>"


def llama3_as_gguf(path) -> dict:
    """Meta's tokenizer.model written as GGUF tokenizer metadata (as llama.cpp's converter does): tokens in
    GPT-2's byte alphabet, merges recovered from the ranks, the 256 special tokens as control tokens."""
    ranks = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_unicode = {b: c for c, b in gpt2_byte_decoder().items()}
    spell = lambda bs: "".join(to_unicode[b] for b in bs)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], spell(a) + " " + spell(b)) for a, b in pairs]
    merges.sort()
    tokens = [spell(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])] + SPECIAL_TOKENS
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * len(ranks) + [3] * len(SPECIAL_TOKENS),
            "tokenizer.ggml.merges": [m[-1] for m in merges], "tokenizer.ggml.bos_token_id": 128000,
            "tokenizer.ggml.eos_token_id": 128009, "tokenizer.ggml.add_bos_token": True}


def test_llama_bpe_gguf_matches_meta(llama3_tokenizer_model, meta_tokenizer):
    tok = tokenizer_from_gguf(llama3_as_gguf(llama3_tokenizer_model))
    assert tok.vocab_size == 128256 and tok.stop_ids == {128001, 128008, 128009}
    strings = corpus(1000, seed=7)
    differ = [s[:60] for s in strings
              if tok.encode(s, allow_special=True) != meta_tokenizer.encode(s, bos=False, eos=False,
                                                                            allowed_special="all")
              or tok.encode(s) != meta_tokenizer.encode(s, bos=False, eos=False)]
    assert not differ, f"{len(differ)} of {len(strings)} strings differ from Meta's tiktoken: {differ[:5]}"
    ids = tok.encode("héllo 🙂 <|eot_id|>", allow_special=True)
    assert tok.decode(ids) == "héllo 🙂 <|eot_id|>" and ids[-1] == 128009


def test_bad_metadata_is_named():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 2}
    assert tokenizer_from_gguf(base).encode("abab") == [2, 2]
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'.*SentencePiece"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='qwen2'"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.merges": ["abc"]})
    with pytest.raises(ValueError, match="eos_token_id=7"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.eos_token_id": 7})
    with pytest.raises(ValueError, match="no 'tokenizer.ggml.tokens'"):
        tokenizer_from_gguf({k: v for k, v in base.items() if k != "tokenizer.ggml.tokens"})
