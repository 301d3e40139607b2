"""Parsing and chunking (corral/stack/rag/ingest.py) and the chunking / filter request models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corral.stack.rag.api import ChunkingStrategy, SearchRequest
from corral.stack.rag.ingest import Chunking, IngestError, Tokenizer, chunk_text, extract_text, tokenizer_for
from tests.stack.rag_helpers import tiny_pdf


def test_formats_become_text():
    html = ("<html><head><title>T</title><style>p{}</style></head><body><script>secret()</script>"
            "<h1>Title</h1><p>First &amp; second.</p><ul><li>one</li><li>two</li></ul></body></html>")
    text = extract_text(html.encode(), "page.HTML")
    assert "secret" not in text and "p{}" not in text and "First & second." in text
    assert text.splitlines()[0] == "Title" and "one" in text and "two" in text
    assert extract_text(b'{"b": [1, {"name": "caf\\u00e9"}]}', "x.json") == '{\n  "b": [\n    1,\n    {\n      "name": "café"\n    }\n  ]\n}'
    assert extract_text(b"a,b\n1,2\n3,4\n", "t.csv") == "a: 1, b: 2\na: 3, b: 4"
    assert extract_text(tiny_pdf(["Hello PDF", "Second line"]), "doc.pdf").split() == ["Hello", "PDF", "Second", "line"]
    assert extract_text(tiny_pdf(["no extension needed"]), "upload").startswith("no extension")  # by magic
    assert extract_text("\ufeff# Héllo".encode(), "notes.md") == "# Héllo"


@pytest.mark.parametrize("data,name,code,words", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "img.png", "unsupported_file", "binary"),
    (b"\xff\xfe bad", "x.txt", "invalid_file", "UTF-8"),
    (b"   \n ", "x.txt", "invalid_file", "no text"),
    (b"{", "x.json", "invalid_file", "not valid JSON"),
    (tiny_pdf([]), "scan.pdf", "invalid_file", "no extractable text"),
    (b"%PDF-1.4 garbage", "x.pdf", "invalid_file", "PDF"),
])
def test_what_cannot_be_parsed_says_why(data, name, code, words):
    with pytest.raises(IngestError) as e:
        extract_text(data, name)
    assert e.value.code == code and words in e.value.message


def test_windows_of_tokens_with_overlap():
    text = " ".join(f"w{i}" for i in range(25))
    chunks = chunk_text(text, Tokenizer(None), Chunking(10, 4, "static"))  # words as tokens
    assert [c.start_token for c in chunks] == [0, 6, 12, 18]
    assert chunks[0].text == " ".join(f"w{i}" for i in range(10))
    assert chunks[-1].text == " ".join(f"w{i}" for i in range(18, 25)) and chunks[-1].n_tokens == 7
    assert [c.position for c in chunks] == [0, 1, 2, 3]
    assert chunk_text("short text", Tokenizer(None), Chunking())[0].text == "short text"


def test_minilm_chunks_keep_words_whole_and_case():
    tok = tokenizer_for("all-MiniLM-L6-v2")
    text = " ".join(f"Tokenization{i}" for i in range(300))  # several word pieces per word
    chunks = chunk_text(text, tok, Chunking(100, 20, "static"))
    words = set(text.split())
    for c in chunks:
        assert set(c.text.split()) <= words  # no word cut in two, original case kept
        assert tok.count(c.text) == c.n_tokens <= 100


def test_chunking_strategy_is_validated_as_openai_does():
    assert ChunkingStrategy(type="auto").resolve() == Chunking(800, 400, "auto")
    s = ChunkingStrategy.model_validate({"type": "static", "static": {"max_chunk_size_tokens": 4096,
                                                                       "chunk_overlap_tokens": 2048}})
    assert s.resolve() == Chunking(4096, 2048, "static")
    for bad in ({"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0},
                {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0},
                {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101},
                {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": -1}):
        with pytest.raises(ValidationError):
            ChunkingStrategy.model_validate({"type": "static", "static": bad})
    with pytest.raises(ValidationError):
        ChunkingStrategy.model_validate({"type": "static"})


def test_search_request_fails_closed():
    with pytest.raises(ValidationError, match="in"):
        SearchRequest.model_validate({"query": "x", "filters": {"key": "a", "type": "in", "value": "one"}})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"query": "x", "filters": {"type": "and", "filters": []}})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"query": "x", "filters": {"key": "a", "type": "eq", "value": 1, "extra": 2}})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"query": "x", "ranking_options": {"ranker": "cohere"}})
