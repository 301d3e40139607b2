"""The generation engine: tokens in, tokens out (see generate.py), sampling (sampling.py), stop strings (stop.py)."""

from corral.engine.generate import LogitsProcessor, TokenStep, decode_one_token, generate_tokens, prefill
from corral.engine.sampling import SamplingParams

__all__ = ["LogitsProcessor", "SamplingParams", "TokenStep", "decode_one_token", "generate_tokens", "prefill"]
