"""A guard's verdict in OpenAI's moderation shape, and Llama Guard's codes mapped to OpenAI's categories.

Each result carries both vocabularies in `categories` / `category_scores` /
`category_applied_input_types`: OpenAI's thirteen names (what the `openai` SDK's `Moderation` reads) and
Llama Guard's own category names (what llama-stack's moderations return, e.g. "Violent Crimes").

Llama Guard 3 -> OpenAI (an OpenAI category is flagged when any of its codes is, and scores the highest
of their probabilities):

    S1  Violent Crimes          violence, illicit/violent
    S2  Non-Violent Crimes      illicit
    S3  Sex Crimes              sexual, illicit
    S4  Child Exploitation      sexual/minors
    S5  Defamation              harassment
    S9  Indiscriminate Weapons  illicit/violent
    S10 Hate                    hate
    S11 Self-Harm               self-harm
    S12 Sexual Content          sexual
    S14 Code Interpreter Abuse  illicit
    S6 Specialized Advice, S7 Privacy, S8 Intellectual Property, S13 Elections: no OpenAI category; they
    flag the input and show under their Llama Guard names only.

OpenAI has no Llama Guard counterpart for harassment/threatening, hate/threatening, self-harm/intent,
self-harm/instructions and violence/graphic: the guard cannot tell those apart, so they stay false, 0.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module, like guardrails.py, stays free of torch
    from corral.safety.guard import GuardResult

REFUSAL = "I can't answer that. Can I help with something else?"  # Llama Stack's canned refusal

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
# The categories OpenAI scores on images too (the openai SDK's CategoryAppliedInputTypes).
OPENAI_IMAGE_CATEGORIES = ("self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "violence",
                           "violence/graphic")

LLAMA_GUARD_TO_OPENAI: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"),
    "S2": ("illicit",),
    "S3": ("sexual", "illicit"),
    "S4": ("sexual/minors",),
    "S5": ("harassment",),
    "S6": (), "S7": (), "S8": (),
    "S9": ("illicit/violent",),
    "S10": ("hate",),
    "S11": ("self-harm",),
    "S12": ("sexual",),
    "S13": (),
    "S14": ("illicit",),
}


def moderation_result(result: GuardResult, categories, *, input_types: tuple[str, ...] = ("text",)) -> dict:
    """One entry of `results`. `categories`: the guard's policy (code, name), excluded ones left out."""
    flagged_codes = set(result.verdict.codes)
    flags: dict[str, bool] = {name: False for name in OPENAI_CATEGORIES}
    scores: dict[str, float] = {name: 0.0 for name in OPENAI_CATEGORIES}
    for c in categories:
        score = float(result.category_scores.get(c.code, 0.0))
        for name in LLAMA_GUARD_TO_OPENAI.get(c.code, ()):
            flags[name] = flags[name] or c.code in flagged_codes
            scores[name] = max(scores[name], score)
        flags[c.name] = c.code in flagged_codes
        scores[c.name] = score
    applied = {name: [t for t in input_types if t == "text" or name not in OPENAI_CATEGORIES
                      or name in OPENAI_IMAGE_CATEGORIES] for name in flags}
    flagged = not result.verdict.safe
    return {"flagged": flagged, "categories": flags, "category_scores": scores,
            "category_applied_input_types": applied, "user_message": REFUSAL if flagged else None,
            "metadata": {"violation_type": list(result.verdict.codes), "guard_output": result.output,
                         "p_unsafe": result.p_unsafe}}
