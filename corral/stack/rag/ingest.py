"""From an uploaded file's bytes to chunks of text: parsing and token chunking.

Parsing is chosen by the file's content (PDF magic) and its name's extension, never by a path: text,
Markdown, HTML (tags, scripts and styles dropped), JSON (re-printed with indentation, so keys and
values are searchable), CSV (one `column: value` line per row) and PDF (pypdf's text extraction).
Anything that cannot be parsed raises `IngestError` with OpenAI's `last_error` code
(`unsupported_file` or `invalid_file`) and a message saying why.

Chunks are windows of the embedding model's own tokens (OpenAI's `chunking_strategy`: `auto` is 800
tokens with 400 overlap, `static` sets both). A chunk's text is the exact span of the source that its
tokens cover (offsets, not a decode: MiniLM's tokenizer lower-cases, the stored text keeps the case).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser

AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS = 800, 400


class IngestError(Exception):
    """A file that cannot be turned into text; `code` is OpenAI's last_error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------------------------------------
# Parsing

TEXT_EXTENSIONS = {".txt", ".text", ".md", ".markdown", ".rst", ".log", ".py", ".yaml", ".yml", ".tex"}


def extract_text(data: bytes, filename: str) -> str:
    """The text of a document; IngestError when it has none we can read."""
    ext = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if data.startswith(b"%PDF-") or ext == ".pdf":
        text = _pdf_text(data)
    elif ext in (".html", ".htm"):
        text = _html_text(_decode(data, filename))
    elif ext == ".json":
        text = _json_text(_decode(data, filename), filename)
    elif ext == ".csv":
        text = _csv_text(_decode(data, filename), filename)
    else:  # text, Markdown and unknown extensions: anything that decodes as text
        text = _decode(data, filename)
    if not text.strip():
        raise IngestError("invalid_file", f"{filename!r} contains no text")
    return text


def _decode(data: bytes, filename: str) -> str:
    if b"\x00" in data[:8192]:
        raise IngestError("unsupported_file", f"{filename!r} is a binary file; supported: text, Markdown, HTML, "
                                              "JSON, CSV and PDF")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError("invalid_file", f"{filename!r} is not valid UTF-8 text (byte {e.start})") from None


def _pdf_text(data: bytes) -> str:
    import pypdf
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise IngestError("invalid_file", f"not a readable PDF: {e}") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise IngestError("invalid_file", f"the PDF's {len(pages)} page(s) have no extractable text "
                                          "(a scanned PDF needs OCR first)")
    return text


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def _json_text(text: str, filename: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except json.JSONDecodeError as e:
        raise IngestError("invalid_file", f"{filename!r} is not valid JSON: {e}") from None


def _csv_text(text: str, filename: str) -> str:
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise IngestError("invalid_file", f"{filename!r} is not valid CSV: {e}") from None
    if not rows:
        return ""
    header, lines = rows[0], []
    for row in rows[1:]:
        lines.append(", ".join(f"{h}: {v}" for h, v in zip(header, row)))
    return "\n".join(lines) if lines else ", ".join(header)


# ---------------------------------------------------------------------------------------------
# Chunking


@dataclass(frozen=True)
class Chunking:
    """OpenAI's chunking_strategy, resolved: `auto` is static 800/400."""

    max_tokens: int = AUTO_MAX_TOKENS
    overlap_tokens: int = AUTO_OVERLAP_TOKENS
    kind: str = "auto"

    def to_openai(self) -> dict:
        return {"type": "static", "static": {"max_chunk_size_tokens": self.max_tokens,
                                             "chunk_overlap_tokens": self.overlap_tokens}}


@dataclass(frozen=True)
class TextChunk:
    text: str
    position: int  # the chunk's index in its file
    start_token: int
    n_tokens: int


class Tokenizer:
    """Token offsets for chunking: the embedding model's tokenizer (or words, for a model we cannot tokenize)."""

    def __init__(self, hf_tokenizer=None, name: str = "words"):
        self.hf, self.name = hf_tokenizer, name

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of each token."""
        if self.hf is None:
            return [m.span() for m in re.finditer(r"\S+", text)]
        return [(a, b) for a, b in self.hf.encode(text, add_special_tokens=False).offsets]

    def count(self, text: str) -> int:
        return len(self.spans(text))


@lru_cache(maxsize=4)
def tokenizer_for(model_resource_id: str) -> Tokenizer:
    """The tokenizer of an embedding model served by sentence-transformers, by its resource id."""
    from corral.stack.providers.embeddings import PACKAGES, model_dir

    if model_resource_id not in PACKAGES:
        # A remote embedding model: we do not have its tokenizer; whitespace words approximate tokens
        # (a word is at least one token, so chunks stay within the limit in words, not tokens).
        return Tokenizer(None, "words")
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(model_dir(PACKAGES[model_resource_id][0]) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return Tokenizer(tok, model_resource_id)


def chunk_text(text: str, tokenizer: Tokenizer, chunking: Chunking) -> list[TextChunk]:
    """Windows of `max_tokens` tokens, each starting `max_tokens - overlap_tokens` after the last."""
    spans = tokenizer.spans(text)
    # A window never cuts a word: its start moves forward and its end back to word boundaries (a token
    # that starts where the previous one ended continues a word, e.g. MiniLM's '##' pieces), so a
    # chunk's text tokenizes to the same tokens again, at most max_tokens of them.
    word_start = [i == 0 or spans[i][0] > spans[i - 1][1] for i in range(len(spans))] + [True]
    step = chunking.max_tokens - chunking.overlap_tokens
    chunks = []
    for start in range(0, max(len(spans), 1), step):
        end = min(start + chunking.max_tokens, len(spans))
        a, b = start, end
        while a < b and not word_start[a]:
            a += 1
        while b > a and not word_start[b]:
            b -= 1
        if b <= a:  # one "word" longer than the window: cut it
            a, b = start, end
        if b > a:
            chunks.append(TextChunk(text[spans[a][0]:spans[b - 1][1]], len(chunks), a, b - a))
        if end >= len(spans):
            break
    return chunks
