"""HFTokenizer.from_dir on a Hugging Face tokenizer directory (SmolLM2's vocabulary saved by transformers), and
token_bytes on a SentencePiece-style byte-fallback vocabulary."""

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers

from corral.tokenizer.base import StreamDecoder
from corral.tokenizer.hf import HFTokenizer
from tests.tokenizer.corpus import corpus

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_tokenizer, tmp_path_factory):
    """SmolLM2's tokenizer written as a Hugging Face checkpoint directory by transformers."""
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("smollm2-hf")
    ref = PreTrainedTokenizerFast(tokenizer_object=smollm2_tokenizer.tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<|endoftext|>")
    ref.chat_template = TEMPLATE
    ref.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return directory


def test_from_dir_ids_and_metadata(smollm2_dir):
    tok = HFTokenizer.from_dir(smollm2_dir)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.stop_ids == {0, 2}  # generation_config.json's eos list
    assert tok.chat_template == TEMPLATE
    assert tok.vocab_size == 49152 and tok.special_tokens["<|im_end|>"] == 2


def test_from_dir_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    tok = HFTokenizer.from_dir(smollm2_dir)
    ref = AutoTokenizer.from_pretrained(smollm2_dir)
    for s in corpus(300, seed=4):
        assert tok.encode(s, allow_special=True) == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.encode(s) == ref(s, add_special_tokens=False, split_special_tokens=True)["input_ids"], s
        ids = tok.encode(s, allow_special=True)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_from_dir_errors(tmp_path, smollm2_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_a_token|>"}))
    with pytest.raises(ValueError, match=r"eos_token='<\|not_a_token\|>' is not in tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        HFTokenizer.from_dir(tmp_path)


def sentencepiece_style() -> HFTokenizer:
    """A tiny Llama-2-style vocabulary: '▁' word prefix, <0xNN> byte-fallback tokens, no byte-level alphabet."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "h", "i", "▁h", "▁hi", "中", "文", "中文"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "i"), ("中", "文")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(Regex(" "), "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return HFTokenizer(tok, bos_id=1, eos_id=2)


def test_token_bytes_of_byte_fallback_tokens():
    tok = sentencepiece_style()
    assert not tok.byte_level
    for s in ["hi", "hi 🙂 中文", "中文中", "hi\u00e9 \U0001F468\u200D\U0001F469 h", "ê€"]:
        ids = tok.encode(s)
        # the decoder strips the leading "▁" the normalizer added; token bytes keep it
        assert b"".join(tok.token_bytes(i) for i in ids) == (" " + s).encode("utf-8")
        assert tok.decode(ids) == s
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == " " + s
        assert all("\ufffd" not in p for p in pieces)
    assert tok.token_bytes(tok.tokenizer.token_to_id("<0xF0>")) == b"\xf0"
