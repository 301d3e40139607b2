"""The Files API through the official `openai` SDK against a real `corral serve`, and expiry in process.

The server's general body limit is 2 KiB here and its upload limit 64 KiB: uploads get their own
limit (a 10 KiB file goes through), and an upload over it is a 413.
"""

from __future__ import annotations

import io
import re
import time

import httpx
import openai
import pytest

from tests.stack.conftest import ServerProcess
from tests.stack.rag_helpers import AppServer, rag_config, upload

MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = rag_config(None, load="first_use", max_body_bytes=2048)
    cfg["providers"][1]["config"] = {"max_upload_bytes": MAX_UPLOAD}
    srv = ServerProcess(tmp_path_factory.mktemp("files-server"), cfg).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)


def test_upload_retrieve_content_delete(client, server):
    data = bytes(range(256)) * 40  # 10 KiB, every byte value: over the 2 KiB body limit, under the upload limit
    f = upload(client, "../../etc/passwd", data)
    assert f.object == "file" and re.fullmatch(r"file-[0-9a-f]{32}", f.id)
    assert f.bytes == len(data) and f.filename == "passwd" and f.purpose == "assistants" and f.expires_at is None
    assert abs(f.created_at - time.time()) < 60
    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).content == data
    # a filename never chooses a path: the bytes sit under the server's name for them
    blobs = server.workdir / "store" / "files" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == sorted(
        p.name for p in blobs.iterdir() if re.fullmatch(r"file-[0-9a-f]{32}", p.name))
    assert (blobs / f.id).read_bytes() == data

    gone = client.files.delete(f.id)
    assert gone.deleted and gone.id == f.id
    assert not (blobs / f.id).exists()
    for call in (lambda: client.files.retrieve(f.id), lambda: client.files.content(f.id),
                 lambda: client.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_oversized_upload_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        upload(client, "big.txt", b"x" * (MAX_UPLOAD + 1))
    assert e.value.status_code == 413
    assert str(MAX_UPLOAD) in e.value.body["message"] and e.value.body["code"] == "request_too_large"
    # the JSON routes keep the general limit
    r = httpx.post(str(client.base_url) + "vector_stores", json={"name": "x" * 4096})
    assert r.status_code == 413


def test_expires_after_and_purpose(client):
    f = upload(client, "a.txt", "hello", expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    b = upload(client, "batch.jsonl", '{"a": 1}\n', purpose="batch")
    assert b.expires_at == b.created_at + 30 * 24 * 3600  # OpenAI's default for batch files
    for bad, param in (({"anchor": "created_at", "seconds": 60}, "expires_after[seconds]"),
                       ({"anchor": "last_active_at", "seconds": 3600}, "expires_after[anchor]")):
        with pytest.raises(openai.BadRequestError) as e:
            upload(client, "a.txt", "hello", expires_after=bad)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, "a.txt", "hello", purpose="training")
    assert e.value.body["param"] == "purpose" and "user_data" in e.value.body["message"]


def test_malformed_uploads(server):
    url = server.base_url + "/files"
    r = httpx.post(url, data={"purpose": "assistants"}, files={"other": ("a.txt", b"x")})
    assert r.status_code == 400 and "other" in r.json()["error"]["message"]
    r = httpx.post(url, data={"purpose": "assistants"})
    assert r.status_code == 400 and "file" in r.json()["error"]["message"]
    r = httpx.post(url, json={"purpose": "assistants"})
    assert r.status_code == 400


def test_list_pages_and_filters(client):
    ids = [upload(client, f"n{i}.txt", f"note {i}", purpose="user_data").id for i in range(4)]
    page = client.files.list(purpose="user_data", limit=3)
    assert [f.id for f in page.data] == ids[::-1][:3] and page.has_more
    assert [f.id for f in client.files.list(purpose="user_data", limit=3, after=ids[1])] == [ids[0]]
    assert [f.id for f in client.files.list(purpose="user_data", order="asc")] == ids
    assert all(f.purpose == "user_data" for f in client.files.list(purpose="user_data"))
    with pytest.raises(openai.BadRequestError):
        client.files.list(after="file-unknown")
    with pytest.raises(openai.BadRequestError):
        client.files.list(limit=0)


# ---------------------------------------------------------------------------------------------
# Expiry: in process, with the server's clock moved forward


@pytest.fixture
def inproc(tmp_path, monkeypatch):
    from corral.stack.config import RunConfig
    from corral.stack.rag import service

    monkeypatch.setattr(service, "SWEEP_EVERY_S", 0.1)
    cfg = RunConfig.model_validate({**rag_config(None, load="first_use"), "storage_dir": str(tmp_path / "store")})
    server = AppServer(cfg).start()
    yield server
    server.stop()


def test_expiry(inproc):
    client = openai.OpenAI(base_url=inproc.base_url, api_key="none", max_retries=0, timeout=30)
    stack = inproc.stack
    keep = upload(client, "keep.txt", "kept")
    f = upload(client, "temp.txt", "temporary", expires_after={"anchor": "created_at", "seconds": 3600})
    vs = client.vector_stores.create(name="short", expires_after={"anchor": "last_active_at", "days": 1})
    assert vs.expires_at == vs.last_active_at + 86400 and vs.status == "completed"
    blob = stack.files.blobs / f.id
    assert blob.exists()

    later = time.time() + 2 * 86400
    stack.files.clock = stack.vector_stores.clock = lambda: later
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert f.id not in {x.id for x in client.files.list()} and keep.id in {x.id for x in client.files.list()}
    assert client.vector_stores.retrieve(vs.id).status == "expired"
    with pytest.raises(openai.BadRequestError) as e:
        client.vector_stores.search(vector_store_id=vs.id, query="anything")
    assert "expired" in e.value.body["message"]
    deadline = time.monotonic() + 10
    while blob.exists() and time.monotonic() < deadline:  # the sweep removes the bytes
        time.sleep(0.05)
    assert not blob.exists() and (stack.files.blobs / keep.id).exists()
