"""Durability: `kill -9` of `corral serve` while files are being indexed, on both backends at once.

Before the kill a small file is completed in each store and a large one is mid-ingestion. After the
restart the completed file is still there and searchable, the interrupted file resumes and ends with
exactly the chunks a clean ingestion makes (no half file, no duplicates), and a file whose bytes
vanished while the server was down fails with a visible `last_error`.
"""

from __future__ import annotations

import time

import openai

from corral.stack.rag.ingest import Chunking, chunk_text, tokenizer_for
from tests.stack.conftest import ServerProcess
from tests.stack.rag_helpers import EMBEDDING_MODEL, rag_config, upload, wait_store

PROVIDERS = ["sqlite-vec", "pgvector"]
STATIC = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}}


def test_kill_during_ingestion(tmp_path, pg_dsn):
    server = ServerProcess(tmp_path / "srv", rag_config(pg_dsn)).start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)
        small = upload(client, "wombat.txt", "The wombat digs burrows with its strong claws.")
        big_text = " ".join(f"Paragraph {i} of the long report on durable ingestion." for i in range(500))
        big = upload(client, "report.txt", big_text)
        gone = upload(client, "vanishing.txt", "This file's bytes disappear while the server is down.")
        stores = {p: client.vector_stores.create(name=p, file_ids=[small.id], extra_body={"provider_id": p}).id
                  for p in PROVIDERS}
        for vs in stores.values():
            assert wait_store(client, vs).file_counts.completed == 1
        for vs in stores.values():
            client.vector_stores.files.create(vector_store_id=vs, file_id=big.id, chunking_strategy=STATIC)
        client.vector_stores.files.create(vector_store_id=stores["sqlite-vec"], file_id=gone.id)  # queued behind
        time.sleep(0.1)
        before = {p: client.vector_stores.files.retrieve(vector_store_id=vs, file_id=big.id).status
                  for p, vs in stores.items()}
        server.kill()
        assert "in_progress" in before.values(), f"the kill came after the ingestion ended: {before}"

        (server.workdir / "store" / "files" / "blobs" / gone.id).unlink()
        server.start()
        for p, vs in stores.items():
            # the completed file survived the kill, whole
            f = client.vector_stores.files.retrieve(vector_store_id=vs, file_id=small.id)
            assert f.status == "completed"
            res = client.vector_stores.search(vector_store_id=vs, query="wombat", extra_body={"search_mode": "keyword"})
            assert [r.filename for r in res.data] == ["wombat.txt"]
            # the interrupted one is never completed with part of its chunks
            wait_store(client, vs)
            f = client.vector_stores.files.retrieve(vector_store_id=vs, file_id=big.id)
            assert f.status == "completed", f.last_error
            expected = chunk_text(big_text, tokenizer_for(EMBEDDING_MODEL), Chunking(100, 0, "static"))
            got = [c.text for c in client.vector_stores.files.content(vector_store_id=vs, file_id=big.id)]
            assert got == [c.text for c in expected], p
        f = client.vector_stores.files.retrieve(vector_store_id=stores["sqlite-vec"], file_id=gone.id)
        assert f.status == "failed" and "no longer exists" in f.last_error.message
    finally:
        server.stop()
