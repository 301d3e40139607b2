"""One generation, tokens in and tokens out: the engine (engine.py) serving a single sequence.

    for step in generate_tokens(model, prompt_ids, SamplingParams(max_tokens=16)): ...

Everything, the Python API, the CLI and the server, generates through `Engine`; this function is the
shortest way to it for one request (a private engine whose loop thread stops when the request ends).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from corral.engine.engine import Engine
from corral.engine.sampling import SamplingParams
from corral.engine.scheduler import LogitsProcessor, TokenStep, check_length

__all__ = ["LogitsProcessor", "TokenStep", "check_length", "generate_tokens"]


def generate_tokens(model, prompt_ids: list[int], params: SamplingParams, *, stop_ids: Iterable[int] = (),
                    logits_processor: LogitsProcessor | None = None, kv_cache_mb: int | None = None,
                    kv_dtype=None, cross_state=None) -> Iterator[TokenStep]:
    """Yield one TokenStep per generated token; the last has finish_reason set.

    stop_ids are the model's own stop tokens (ignored with params.ignore_eos); params.stop_token_ids
    always stop. Bad input raises ValueError at the call. Closing the generator stops generation.
    cross_state: a vision model's `encode_images(...)` for this prompt. kv_dtype: the KV cache's (Engine's default
    when None).
    """
    engine = Engine(model, max_num_seqs=1, kv_cache_mb=kv_cache_mb, kv_dtype=kv_dtype, threaded=True)
    handle = engine.submit(list(prompt_ids), params, stop_ids=stop_ids, logits_processor=logits_processor,
                           cross_state=cross_state)

    def steps():
        try:
            yield from handle
        finally:
            handle.close()
            engine.shutdown()

    return steps()
