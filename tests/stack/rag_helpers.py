"""Shared pieces of the RAG tests: a run config with both vector_io backends, polling, a tiny PDF."""

from __future__ import annotations

import io
import time

from tests.stack.conftest import ThreadedServer

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def rag_config(pg_dsn: str | None, **extra) -> dict:
    providers = [{"provider_id": "st", "provider_type": "inline::sentence-transformers"},
                 {"provider_id": "localfs", "provider_type": "inline::localfs"},
                 {"provider_id": "sqlite-vec", "provider_type": "inline::sqlite-vec"}]
    if pg_dsn:
        providers.append({"provider_id": "pgvector", "provider_type": "remote::pgvector", "config": {"dsn": pg_dsn}})
    return {"providers": providers,
            "models": [{"model_id": EMBEDDING_MODEL, "provider_id": "st", "model_type": "embedding"}], **extra}


def upload(client, name: str, data: bytes | str, purpose: str = "assistants", **kw):
    if isinstance(data, str):
        data = data.encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose=purpose, **kw)


def wait_store(client, store_id: str, timeout: float = 120):
    """The vector store once no file of it is in progress."""
    deadline = time.monotonic() + timeout
    while True:
        vs = client.vector_stores.retrieve(store_id)
        if vs.file_counts.in_progress == 0:
            return vs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{store_id} still has {vs.file_counts.in_progress} file(s) in progress")
        time.sleep(0.2)


def wait_batch(client, store_id: str, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        b = client.vector_stores.file_batches.retrieve(batch_id, vector_store_id=store_id)
        if b.file_counts.in_progress == 0:
            return b
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still in progress")
        time.sleep(0.2)


def tiny_pdf(lines: list[str]) -> bytes:
    """A one-page PDF whose text layer holds `lines` (Helvetica), written object by object."""
    ops = ["BT /F1 12 Tf 72 720 Td 14 TL"] + [f"({ln}) Tj T*" for ln in lines] + ["ET"]
    stream = "\n".join(ops).encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


class AppServer(ThreadedServer):
    """`create_app(cfg)` served on a thread, so a test can reach into its stack (clocks, sweeps)."""

    def __init__(self, cfg):
        from corral.stack.server import create_app

        app = create_app(cfg)
        self.stack = app.fastapi.state.stack
        super().__init__(app)
