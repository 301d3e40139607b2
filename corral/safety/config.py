"""The run config's safety sections (read by corral/stack/config.py; pydantic only, no torch).

    providers:
      - provider_id: corral
        provider_type: inline::corral
      - provider_id: llama-guard
        provider_type: inline::llama-guard
        config: {excluded_categories: []}        # codes every shield of this provider leaves out
    models:
      - model_id: Llama-3.2-1B-Instruct
        provider_id: corral
      - model_id: Llama-Guard-3-1B                # the guard is a model of an inline::corral provider
        provider_id: corral
    shields:
      - shield_id: llama-guard
        provider_id: llama-guard
        provider_shield_id: Llama-Guard-3-1B      # the served model the shield runs (default: shield_id)
        params:                                   # optional, per shield
          excluded_categories: [S6]
          categories: [{code: S1, name: Violent Crimes, description: ...}]   # a custom policy
    guardrails:                                   # optional: shields that check every chat completion
      shields: [llama-guard]
      check: [input, output]                      # the conversation before the model runs, its answer after
      models: null                                # the guarded models (null: every llm but the guards)
      stream: sentence                            # sentence: release a streamed answer sentence by sentence,
                                                  # each checked first; end: hold it all until checked

The guard variant (and so its category list: S1..S13 for 1B and 11B-Vision, S1..S14 otherwise) is named by
`provider_shield_id`, a model id like "Llama-Guard-3-1B", as in Llama Stack.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SAFETY = "inline::llama-guard"
CATEGORY_CODE = r"^[A-Z]{1,3}\d{1,3}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CategoryConfig(_Strict):
    code: str = Field(pattern=CATEGORY_CODE)
    name: str = Field(min_length=1)
    description: str | None = None


class ShieldParams(_Strict):
    excluded_categories: list[str] = Field(default_factory=list)
    categories: list[CategoryConfig] | None = None  # a custom policy in place of the model's own


class LlamaGuardConfig(_Strict):
    excluded_categories: list[str] = Field(default_factory=list)


class ShieldEntry(_Strict):
    shield_id: str = Field(min_length=1)
    provider_id: str
    provider_shield_id: str | None = None  # the guard model's model_id (default: shield_id)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        ShieldParams.model_validate(v)
        return v

    @property
    def model_id(self) -> str:
        return self.provider_shield_id or self.shield_id

    @property
    def shield_params(self) -> ShieldParams:
        return ShieldParams.model_validate(self.params)


class GuardrailsConfig(_Strict):
    shields: list[str] = Field(min_length=1)
    check: list[Literal["input", "output"]] = Field(default_factory=lambda: ["input", "output"], min_length=1)
    models: list[str] | None = None
    stream: Literal["sentence", "end"] = "sentence"


def check_safety(cfg) -> None:
    """Cross-checks of a RunConfig's shields and guardrails (ValueError naming the key)."""
    types = {p.provider_id: p.provider_type for p in cfg.providers}
    served = {m.model_id: types.get(m.provider_id) for m in cfg.models if m.model_type == "llm"}
    for k, m in enumerate(cfg.models):
        if types.get(m.provider_id) == SAFETY:
            raise ValueError(f"models[{k}].provider_id: {m.provider_id!r} is a safety provider; serve the guard "
                             "model with an inline::corral provider and name it in `shields`")
    ids = set()
    for k, s in enumerate(cfg.shields):
        if types.get(s.provider_id) != SAFETY:
            raise ValueError(f"shields[{k}].provider_id: {s.provider_id!r} is not an {SAFETY} provider")
        if served.get(s.model_id) != "inline::corral":
            raise ValueError(f"shields[{k}].provider_shield_id: {s.model_id!r} is not an llm model of an "
                             "inline::corral provider under `models`")
        if s.shield_id in ids:
            raise ValueError(f"shields[{k}].shield_id: {s.shield_id!r} appears twice")
        ids.add(s.shield_id)
    g = cfg.guardrails
    if g is None:
        return
    for name in g.shields:
        if name not in ids:
            raise ValueError(f"guardrails.shields: {name!r} is not a shield_id under `shields` (have {sorted(ids)})")
    for name in g.models or []:
        if name not in served:
            raise ValueError(f"guardrails.models: {name!r} is not an llm model under `models`")


def default_guards(models_dir) -> list[str]:
    """The Llama Guard models whose weights are in the model cache (registry names)."""
    from corral.checkpoints.download import checkpoint_format

    return [name for name in ("Llama-Guard-3-1B", "Llama-Guard-3-11B-Vision")
            if checkpoint_format(models_dir / name) is not None]
