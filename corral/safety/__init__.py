"""Safety: Llama Guard 3 as a classifier, Llama Stack's shields and OpenAI's moderations on top of it.

- `prompt.py`: the exact Llama Guard 3 prompt for a conversation (`guard_prompt`), categories per model;
- `verdict.py`: the guard's answer read strictly (`parse_verdict`);
- `guard.py`: `LlamaGuard`, a verdict and per-category probabilities through Corral's engine;
- `moderation.py`: OpenAI's moderation shape and the S-code -> OpenAI category mapping;
- `guardrails.py`: the check that guards chat completions (input and output), shared with agents.
"""

from corral.safety.prompt import Category, LLAMA_GUARD_3_CATEGORIES, categories_for, guard_prompt
from corral.safety.verdict import GuardOutputError, Verdict, parse_verdict

__all__ = ["Category", "GuardOutputError", "LLAMA_GUARD_3_CATEGORIES", "Verdict", "categories_for", "guard_prompt",
           "parse_verdict"]
