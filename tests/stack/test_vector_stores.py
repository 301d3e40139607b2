"""Vector stores through the official `openai` SDK against a real `corral serve`, on both backends.

One server runs for the module with two vector_io providers: the embedded SQLite + sqlite-vec one and
PostgreSQL + pgvector (a real PostgreSQL started by the `pg_dsn` fixture). Every test that takes
`provider` runs once per backend, creating its stores with Llama Stack's `provider_id` extra.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.stack.conftest import ServerProcess
from tests.stack.rag_helpers import EMBEDDING_MODEL, rag_config, tiny_pdf, upload, wait_batch, wait_store

PROVIDERS = ["sqlite-vec", "pgvector"]

DOCS = {
    "solar.md": ("# Solar power\n\nPhotovoltaic panels convert sunlight directly into electricity. "
                 "Inverters turn their direct current into alternating current for the grid.",
                 {"topic": "energy", "year": 2021, "draft": False}),
    "pasta.txt": ("Boil the spaghetti for nine minutes in plenty of salted water, then drain it "
                  "and toss it with olive oil, garlic and parmesan.",
                  {"topic": "cooking", "year": 2023, "draft": True}),
    "rivers.html": ("<html><head><title>Rivers</title><script>var hidden = 'zebra';</script>"
                    "<style>p {color: red}</style></head><body><h1>Rivers of Europe</h1>"
                    "<p>The Danube flows through Vienna and Budapest to the Black Sea.</p></body></html>",
                    {"topic": "geography", "year": 2024, "region": "europe"}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_dsn):
    srv = ServerProcess(tmp_path_factory.mktemp("rag-server"), rag_config(pg_dsn)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def corpus(client):
    """The three documents, uploaded once; name -> file id."""
    return {name: upload(client, name, text).id for name, (text, _) in DOCS.items()}


def make_store(client, provider, corpus=None, **kw):
    vs = client.vector_stores.create(name=f"test-{provider}", extra_body={"provider_id": provider}, **kw)
    for name, fid in (corpus or {}).items():
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=fid, attributes=DOCS[name][1])
    return wait_store(client, vs.id)


@pytest.fixture(scope="module")
def stores(client, corpus):
    """One store per backend holding the corpus with its attributes."""
    return {p: make_store(client, p, corpus) for p in PROVIDERS}


def names(results) -> list[str]:
    return [r.filename for r in results.data]


# ---------------------------------------------------------------------------------------------
# The lifecycle


@pytest.mark.parametrize("provider", PROVIDERS)
def test_lifecycle(client, provider):
    a = upload(client, "solar.md", DOCS["solar.md"][0])
    b = upload(client, "pasta.txt", DOCS["pasta.txt"][0])
    vs = client.vector_stores.create(name="lifecycle", file_ids=[a.id, b.id], metadata={"owner": "tests"},
                                     extra_body={"provider_id": provider})
    assert vs.object == "vector_store" and vs.id.startswith("vs_") and vs.metadata == {"owner": "tests"}
    assert vs.file_counts.total == 2
    vs = wait_store(client, vs.id)
    assert vs.status == "completed" and vs.file_counts.completed == 2
    assert vs.usage_bytes == a.bytes + b.bytes
    assert getattr(vs, "provider_id") == provider and getattr(vs, "embedding_model") == EMBEDDING_MODEL

    files = client.vector_stores.files.list(vector_store_id=vs.id)
    assert {f.id for f in files.data} == {a.id, b.id}
    assert all(f.status == "completed" and f.last_error is None for f in files.data)
    got = client.vector_stores.files.retrieve(vector_store_id=vs.id, file_id=a.id)
    assert got.chunking_strategy.type == "static"
    assert got.chunking_strategy.static.max_chunk_size_tokens == 800  # auto is 800 / 400
    assert got.chunking_strategy.static.chunk_overlap_tokens == 400

    res = client.vector_stores.search(vector_store_id=vs.id, query="How do solar panels make electricity?")
    assert res.data[0].file_id == a.id and res.data[0].filename == "solar.md"
    assert "Photovoltaic" in res.data[0].content[0].text and res.data[0].content[0].type == "text"
    assert 0 < res.data[0].score <= 1

    content = list(client.vector_stores.files.content(vector_store_id=vs.id, file_id=a.id))
    assert "".join(c.text for c in content) == DOCS["solar.md"][0]  # short: one chunk, the exact text

    vs2 = client.vector_stores.update(vs.id, name="renamed", metadata={"owner": "someone"})
    assert vs2.name == "renamed" and vs2.metadata == {"owner": "someone"}
    assert client.vector_stores.retrieve(vs.id).name == "renamed"

    deleted = client.vector_stores.files.delete(vector_store_id=vs.id, file_id=a.id)
    assert deleted.deleted and deleted.id == a.id
    assert client.vector_stores.retrieve(vs.id).file_counts.total == 1
    res = client.vector_stores.search(vector_store_id=vs.id, query="solar panels", max_num_results=10)
    assert a.id not in {r.file_id for r in res.data}
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(vector_store_id=vs.id, file_id=a.id)

    assert client.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(vs.id)
    assert client.files.retrieve(b.id).id == b.id  # the file itself stays


def test_the_sdks_poll_helpers(client):
    """upload_and_poll / create_and_poll: the SDK's own upload, attach and polling loop."""
    import io

    vs = client.vector_stores.create(name="helpers")
    f = client.vector_stores.files.upload_and_poll(vector_store_id=vs.id, file=("kiwi.md", io.BytesIO(
        b"The kiwi is a flightless bird from New Zealand.")), poll_interval_ms=100)
    assert f.status == "completed" and f.vector_store_id == vs.id
    batch = client.vector_stores.file_batches.upload_and_poll(vector_store_id=vs.id, files=[
        ("emu.md", io.BytesIO(b"The emu is a large flightless bird of Australia.")),
        ("moa.md", io.BytesIO(b"The moa were extinct flightless birds of New Zealand."))], poll_interval_ms=100)
    assert batch.status == "completed" and batch.file_counts.completed == 2
    res = client.vector_stores.search(vector_store_id=vs.id, query="Australian bird", max_num_results=1)
    assert res.data[0].filename == "emu.md"
    client.vector_stores.delete(vs.id)


# ---------------------------------------------------------------------------------------------
# Search


@pytest.mark.parametrize("provider", PROVIDERS)
def test_search_modes(client, stores, provider):
    vs = stores[provider].id
    # no word in common with pasta.txt: only the embedding can find it
    res = client.vector_stores.search(vector_store_id=vs, query="how long to cook noodles", max_num_results=1)
    assert names(res) == ["pasta.txt"]

    res = client.vector_stores.search(vector_store_id=vs, query="Danube", extra_body={"search_mode": "keyword"})
    assert names(res) == ["rivers.html"] and 0 < res.data[0].score < 1
    assert "zebra" not in res.data[0].content[0].text  # scripts are not text
    assert client.vector_stores.search(vector_store_id=vs, query="zebra", extra_body={"search_mode": "keyword"}).data == []

    res = client.vector_stores.search(vector_store_id=vs, query="spaghetti garlic", extra_body={"search_mode": "hybrid"})
    assert names(res)[0] == "pasta.txt" and res.data[0].score == pytest.approx(1.0)  # first in both lists
    assert len(res.data) == 3  # the vector list brings in every chunk

    res = client.vector_stores.search(vector_store_id=vs, query=["solar", "electricity"], max_num_results=2)
    assert res.search_query == ["solar", "electricity"] and len(res.data) == 2 and names(res)[0] == "solar.md"
    scores = [r.score for r in res.data]
    assert scores == sorted(scores, reverse=True)

    res = client.vector_stores.search(vector_store_id=vs, query="solar electricity",
                                      ranking_options={"score_threshold": scores[0] - 1e-3, "ranker": "none"})
    assert names(res) == ["solar.md"]
    assert res.data[0].attributes == {"topic": "energy", "year": 2021, "draft": False}


FILTERS = [
    ({"key": "topic", "type": "eq", "value": "energy"}, {"solar.md"}),
    ({"key": "topic", "type": "ne", "value": "energy"}, {"pasta.txt", "rivers.html"}),
    ({"key": "year", "type": "gt", "value": 2023}, {"rivers.html"}),
    ({"key": "year", "type": "gte", "value": 2023}, {"pasta.txt", "rivers.html"}),
    ({"key": "year", "type": "lt", "value": 2023}, {"solar.md"}),
    ({"key": "year", "type": "lte", "value": 2023}, {"solar.md", "pasta.txt"}),
    ({"key": "draft", "type": "eq", "value": True}, {"pasta.txt"}),
    ({"key": "topic", "type": "in", "value": ["cooking", "geography"]}, {"pasta.txt", "rivers.html"}),
    ({"key": "topic", "type": "nin", "value": ["cooking", "geography"]}, {"solar.md"}),
    ({"key": "region", "type": "ne", "value": "europe"}, {"solar.md", "pasta.txt"}),  # a missing key passes ne
    ({"type": "and", "filters": [{"key": "year", "type": "gte", "value": 2022},
                                 {"key": "draft", "type": "ne", "value": True}]}, {"rivers.html"}),
    ({"type": "or", "filters": [{"key": "topic", "type": "eq", "value": "energy"},
                                {"key": "region", "type": "eq", "value": "europe"}]}, {"solar.md", "rivers.html"}),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("flt,expected", FILTERS, ids=[f"{f.get('key', f['type'])}-{f['type']}" for f, _ in FILTERS])
def test_filters(client, stores, provider, flt, expected):
    for mode in ("vector", "keyword"):
        res = client.vector_stores.search(vector_store_id=stores[provider].id, query="solar spaghetti danube",
                                          filters=flt, max_num_results=50, extra_body={"search_mode": mode})
        assert set(names(res)) == expected, mode


@pytest.mark.parametrize("provider", PROVIDERS)
def test_updated_attributes_are_what_filters_see(client, corpus, provider):
    vs = make_store(client, provider, {"solar.md": corpus["solar.md"]})
    only = {"key": "reviewed", "type": "eq", "value": True}
    assert client.vector_stores.search(vector_store_id=vs.id, query="solar", filters=only).data == []
    f = client.vector_stores.files.update(corpus["solar.md"], vector_store_id=vs.id, attributes={"reviewed": True})
    assert f.attributes == {"reviewed": True}
    res = client.vector_stores.search(vector_store_id=vs.id, query="solar", filters=only)
    assert names(res) == ["solar.md"] and res.data[0].attributes == {"reviewed": True}
    client.vector_stores.delete(vs.id)


# ---------------------------------------------------------------------------------------------
# Formats and failures


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_format_and_the_failures(client, provider):
    good = {
        "planets.json": '{"planets": [{"name": "Mars", "fact": "Mars has Olympus Mons, the tallest volcano."}]}',
        "trees.csv": "species,height_m\nCoast redwood,115\nGiant sequoia,95\n",
        "tower.pdf": tiny_pdf(["The Eiffel Tower was completed in 1889.", "It stands in Paris."]),
    }
    bad = {
        "blob.bin": b"\x00\x01\x02 binary \x00 data",
        "broken.json": '{"unterminated": ',
        "empty.pdf": tiny_pdf([]),
        "latin1.txt": "caf\xe9".encode("latin-1"),
    }
    ids = {name: upload(client, name, data).id for name, data in {**good, **bad}.items()}
    vs = client.vector_stores.create(name="formats", file_ids=list(ids.values()), extra_body={"provider_id": provider})
    vs = wait_store(client, vs.id)
    assert vs.file_counts.completed == len(good) and vs.file_counts.failed == len(bad)

    failed = {f.id: f for f in client.vector_stores.files.list(vector_store_id=vs.id, filter="failed")}
    assert set(failed) == {ids[n] for n in bad}
    err = {n: failed[ids[n]].last_error for n in bad}
    assert err["blob.bin"].code == "unsupported_file" and "binary" in err["blob.bin"].message
    assert err["broken.json"].code == "invalid_file" and "not valid JSON" in err["broken.json"].message
    assert err["empty.pdf"].code == "invalid_file" and "no extractable text" in err["empty.pdf"].message
    assert err["latin1.txt"].code == "invalid_file" and "UTF-8" in err["latin1.txt"].message

    def top(query):
        return client.vector_stores.search(vector_store_id=vs.id, query=query, max_num_results=1,
                                           extra_body={"search_mode": "keyword"}).data[0]

    assert top("Olympus volcano").filename == "planets.json"
    hit = top("redwood")
    assert hit.filename == "trees.csv" and "species: Coast redwood, height_m: 115" in hit.content[0].text
    hit = top("Eiffel 1889")
    assert hit.filename == "tower.pdf" and "Eiffel Tower was completed in 1889" in hit.content[0].text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_static_chunking_by_model_tokens(client, provider):
    words = " ".join(f"word{i}" for i in range(600))  # 'word123' is several MiniLM tokens
    f = upload(client, "long.txt", words)
    vs = make_store(client, provider)
    client.vector_stores.files.create(vector_store_id=vs.id, file_id=f.id, chunking_strategy={
        "type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}})
    wait_store(client, vs.id)
    chunks = [c.text for c in client.vector_stores.files.content(vector_store_id=vs.id, file_id=f.id)]

    from tokenizers import Tokenizer

    from corral.stack.providers.embeddings import PACKAGES, model_dir

    tok = Tokenizer.from_file(str(model_dir(PACKAGES[EMBEDDING_MODEL][0]) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    n_tokens = len(tok.encode(words, add_special_tokens=False).ids)
    assert len(chunks) == -(-(n_tokens - 100) // 50) + 1  # windows of 100 tokens every 50
    assert chunks[0].startswith("word0 ") and chunks[-1].endswith("word599")
    assert all(len(tok.encode(c, add_special_tokens=False).ids) <= 100 for c in chunks)
    assert chunks[1] in words and chunks[0][len(chunks[0]) // 2:] in chunks[1]  # the overlap
    client.vector_stores.delete(vs.id)


# ---------------------------------------------------------------------------------------------
# Batches, pagination, cascades


@pytest.mark.parametrize("provider", PROVIDERS)
def test_file_batches(client, corpus, provider):
    vs = make_store(client, provider)
    batch = client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=list(corpus.values()),
                                                     attributes={"batch": "one"})
    assert batch.object == "vector_store.files_batch" and batch.file_counts.total == 3
    batch = wait_batch(client, vs.id, batch.id)
    assert batch.status == "completed" and batch.file_counts.completed == 3
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id)
    assert {f.id for f in listed.data} == set(corpus.values())
    assert all(f.attributes == {"batch": "one"} for f in listed.data)

    # cancel: three larger files on two ingestion workers, so at least one is still waiting
    big = [upload(client, f"big{i}.txt", " ".join(f"entry {i}-{j} of the cancelled batch" for j in range(1500))).id
           for i in range(3)]
    batch = client.vector_stores.file_batches.create(
        vector_store_id=vs.id, file_ids=big,
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}})
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=vs.id)
    assert cancelled.status == "cancelled" and cancelled.file_counts.cancelled >= 1
    batch = wait_batch(client, vs.id, batch.id)
    assert batch.status == "cancelled"
    files = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id, filter="cancelled")
    assert len(files.data) >= 1
    for f in files.data:  # a cancelled file leaves no chunks
        assert list(client.vector_stores.files.content(vector_store_id=vs.id, file_id=f.id)) == []
    res = client.vector_stores.search(vector_store_id=vs.id, query="cancelled batch", max_num_results=50,
                                      extra_body={"search_mode": "keyword"})
    done = {f.id for f in client.vector_stores.files.list(vector_store_id=vs.id, filter="completed", limit=100)}
    assert {r.file_id for r in res.data} <= done
    client.vector_stores.delete(vs.id)


def test_pagination(client):
    ids = [upload(client, f"page{i}.txt", f"page {i}").id for i in range(5)]
    first = client.files.list(limit=2, order="asc", purpose="user_data")
    assert first.data == [] and not first.has_more  # nothing of that purpose
    newest = client.files.list(limit=2)
    assert [f.id for f in newest.data] == ids[::-1][:2] and newest.has_more
    paged = [f.id for f in client.files.list(limit=2)]  # the SDK follows `after` through every page
    assert paged[:5] == ids[::-1]
    asc = client.files.list(limit=3, order="asc", after=ids[0])
    assert [f.id for f in asc.data] == ids[1:4]

    stores = [client.vector_stores.create(name=f"p{i}") for i in range(3)]
    page = client.vector_stores.list(limit=2)
    assert [s.id for s in page.data] == [stores[2].id, stores[1].id] and page.has_more
    assert [s.id for s in client.vector_stores.list(limit=2, after=stores[1].id).data][0] == stores[0].id
    assert [s.id for s in client.vector_stores.list(limit=1, before=stores[1].id).data] == [stores[2].id]
    vs = stores[0].id
    client.vector_stores.file_batches.create(vector_store_id=vs, file_ids=ids)
    wait_store(client, vs)
    got = [f.id for f in client.vector_stores.files.list(vector_store_id=vs, limit=2, order="asc")]
    assert got == ids
    for s in stores:
        client.vector_stores.delete(s.id)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_deleting_a_file_cascades(client, provider):
    f = upload(client, "quokka.txt", "The quokka is a small marsupial from Rottnest Island.")
    stores = [make_store(client, provider) for _ in range(2)]
    for vs in stores:
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=f.id)
        wait_store(client, vs.id)
        assert names(client.vector_stores.search(vector_store_id=vs.id, query="quokka")) == ["quokka.txt"]
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    for vs in stores:
        assert client.vector_stores.retrieve(vs.id).file_counts.total == 0
        for mode in ("vector", "keyword"):
            res = client.vector_stores.search(vector_store_id=vs.id, query="quokka", extra_body={"search_mode": mode})
            assert res.data == []
        client.vector_stores.delete(vs.id)


# ---------------------------------------------------------------------------------------------
# Llama Stack's vector-io, providers, errors


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vector_io_insert_and_query(client, server, provider):
    vs = make_store(client, provider)
    texts = ["Llamas are domesticated South American camelids.", "Corral serves models on CPUs.",
             "Alpacas are smaller than llamas."]
    vecs = [d.embedding for d in client.embeddings.create(model=EMBEDDING_MODEL, input=texts).data]
    chunks = [{"content": t, "chunk_id": f"c{i}", "metadata": {"document_id": f"doc{i}", "kind": "animal" if i != 1 else "software"},
               "chunk_metadata": {"chunk_id": f"c{i}", "document_id": f"doc{i}"}, "embedding": v,
               "embedding_model": EMBEDDING_MODEL, "embedding_dimension": 384} for i, (t, v) in enumerate(zip(texts, vecs))]
    r = httpx.post(f"{server.url}/v1/vector-io/insert", json={"vector_store_id": vs.id, "chunks": chunks})
    assert r.status_code == 200, r.text

    for mode in ("vector", "keyword", "hybrid"):
        r = httpx.post(f"{server.url}/v1/vector-io/query", json={
            "vector_store_id": vs.id, "query": "llamas", "params": {"max_chunks": 2, "mode": mode}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["chunks"]) == len(body["scores"]) <= 2
        assert {c["chunk_id"] for c in body["chunks"]} <= {"c0", "c2"}, mode
        c = body["chunks"][0]
        assert len(c["embedding"]) == 384 and c["embedding_model"] == EMBEDDING_MODEL
        assert c["metadata"]["document_id"] in ("doc0", "doc2") and c["chunk_metadata"]["chunk_id"] == c["chunk_id"]

    # the same chunks through the OpenAI search, with their metadata as attributes
    res = client.vector_stores.search(vector_store_id=vs.id, query="software that serves models",
                                      filters={"key": "kind", "type": "eq", "value": "software"})
    assert [r.content[0].text for r in res.data] == [texts[1]] and res.data[0].file_id == "doc1"

    r = httpx.post(f"{server.url}/v1/vector-io/insert", json={"vector_store_id": vs.id, "chunks": [
        {**chunks[0], "embedding": [0.1] * 10}]})
    assert r.status_code == 400 and "384" in r.json()["error"]["message"]
    client.vector_stores.delete(vs.id)


def test_providers_are_discoverable(server):
    data = {p["provider_id"]: p for p in httpx.get(f"{server.url}/v1/providers").json()["data"]}
    assert data["localfs"]["api"] == "files" and data["localfs"]["provider_type"] == "inline::localfs"
    assert data["localfs"]["config"]["max_upload_bytes"] > 0
    assert data["sqlite-vec"]["api"] == "vector_io" and data["sqlite-vec"]["config"]["db_path"].endswith(".db")
    assert data["pgvector"]["api"] == "vector_io" and data["pgvector"]["provider_type"] == "remote::pgvector"
    assert "dsn" in data["pgvector"]["config"]
    assert all(data[p]["health"]["status"] == "OK" for p in ("localfs", "sqlite-vec", "pgvector"))
    one = httpx.get(f"{server.url}/v1/providers/pgvector").json()
    assert one["api"] == "vector_io"
    # file_search over these stores is a tool runtime (Llama Stack's rag-runtime)
    rag = httpx.get(f"{server.url}/v1/providers/rag-runtime").json()
    assert (rag["api"], rag["provider_type"]) == ("tool_runtime", "inline::rag-runtime")
    routes = httpx.get(f"{server.url}/v1/inspect/routes").json()["data"]
    types = {(r["route"], r["method"]): r["provider_types"] for r in routes}
    assert types[("/v1/files", "POST")] == ["inline::localfs"]
    assert types[("/v1/vector_stores/{store_id}/search", "POST")] == ["inline::sqlite-vec", "remote::pgvector"]
    assert types[("/v1/vector-io/query", "POST")] == ["inline::sqlite-vec", "remote::pgvector"]
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert any(m["id"] == EMBEDDING_MODEL and m["custom_metadata"]["embedding_dimension"] == 384 for m in models)


def test_bad_requests_name_the_problem(client, stores, corpus):
    vs = stores["sqlite-vec"].id

    def err(call, status=400):
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == status, e.value
        return e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value.body)

    assert "max_num_results" in err(lambda: client.vector_stores.search(vector_store_id=vs, query="x", max_num_results=51))
    assert "compares numbers" in err(lambda: client.vector_stores.search(
        vector_store_id=vs, query="x", filters={"key": "year", "type": "gt", "value": "2020"}))
    assert "type" in err(lambda: client.vector_stores.search(
        vector_store_id=vs, query="x", filters={"key": "year", "type": "like", "value": 1}))
    assert "search_mode" in err(lambda: client.vector_stores.search(vector_store_id=vs, query="x",
                                                                   extra_body={"search_mode": "semantic"}))
    assert "rewrite_query" in err(lambda: client.vector_stores.search(vector_store_id=vs, query="x", rewrite_query=True))
    assert "query" in err(lambda: client.vector_stores.search(vector_store_id=vs, query="  "))
    assert "chunk_overlap_tokens" in err(lambda: client.vector_stores.files.create(
        vector_store_id=vs, file_id=corpus["solar.md"],
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150}}))
    assert "max_chunk_size_tokens" in err(lambda: client.vector_stores.files.create(
        vector_store_id=vs, file_id=corpus["solar.md"],
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}}))
    assert "unrecognized" in err(lambda: client.vector_stores.create(name="x", extra_body={"colour": "red"}))
    assert "provider_id" in err(lambda: client.vector_stores.create(name="x", extra_body={"provider_id": "faiss"}))
    assert "not found" in err(lambda: client.vector_stores.create(name="x", file_ids=["file-nope"]), 404)
    assert "not found" in err(lambda: client.vector_stores.retrieve("vs_nope"), 404)
    assert "not found" in err(lambda: client.vector_stores.search(vector_store_id="vs_nope", query="x"), 404)
    assert "attributes" in err(lambda: client.vector_stores.files.create(
        vector_store_id=vs, file_id=corpus["solar.md"], attributes={f"k{i}": i for i in range(17)}))


def test_uploads_and_ingestion_do_not_block_other_requests(client, server):
    """A slow 8 MiB upload (over the 4 MiB general body limit) and an ingestion in progress while
    /v1/health and a search keep answering."""
    import threading
    import time

    boundary = "corralboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.txt\"\r\n"
            "Content-Type: text/plain\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    piece = b"slow upload line of text\n" * 40_000  # ~1 MiB

    def body():
        yield head
        for _ in range(8):
            time.sleep(0.2)
            yield piece
        yield tail

    result = {}

    def send():
        result["r"] = httpx.post(server.base_url + "/files", content=body(), timeout=120,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    big = upload(client, "busy.txt", " ".join(f"sentence {i} keeps the embedder busy." for i in range(1500)))
    vs = client.vector_stores.create(name="busy", file_ids=[big.id], chunking_strategy={
        "type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}})
    sender = threading.Thread(target=send)
    sender.start()
    worst = 0.0
    while sender.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.05)
    sender.join()
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["bytes"] == len(piece) * 8
    assert worst < 1.0, f"/v1/health took {worst:.2f}s during an upload and an ingestion"
    client.vector_stores.delete(vs.id)
