"""The serving engine (engine.py: paged KV cache, continuous batching, prefix caching), one-shot generation
(generate.py), sampling (sampling.py), stop strings (stop.py)."""

from corral.engine.engine import Engine, RequestHandle
from corral.engine.generate import LogitsProcessor, TokenStep, generate_tokens
from corral.engine.sampling import SamplingParams

__all__ = ["Engine", "LogitsProcessor", "RequestHandle", "SamplingParams", "TokenStep", "generate_tokens"]
