"""Run configs shipped with Corral, selectable by name: `corral serve --config local|postgres|remote-vllm`.

    local        one machine, everything embedded (the zero-configuration default)
    postgres     the local engine, vector stores on PostgreSQL + pgvector (CORRAL_PG_DSN)
    remote-vllm  inference from a vLLM / OpenAI-compatible cluster (VLLM_URL, VLLM_MODEL)

Each is a YAML run config (corral/stack/config.py) in this directory. Any run config, shipped or not,
may take values from the environment, Llama Stack's way:
    ${env.NAME}            the variable; an error naming it when it is unset or empty
    ${env.NAME:=default}   the variable, or `default` when it is unset or empty
A value that is one placeholder resolving to "" becomes null (e.g. an optional api_key).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PLACEHOLDER = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)(?::=([^}]*))?\}")


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def describe(name: str) -> str:
    """The config's one-line summary: its first comment line, after the name."""
    first = config_path(name).read_text().splitlines()[0]
    return first.lstrip("# ").split(":", 1)[-1].strip()


def config_path(name: str) -> Path:
    if name not in names():
        raise KeyError(f"no shipped run config named {name!r} (shipped: {', '.join(names())})")
    return HERE / f"{name}.yaml"


def resolve(path_or_name: str | Path) -> Path:
    """An existing file wins; else a shipped config's name; else the path as given (its error says so)."""
    path = Path(path_or_name).expanduser()
    if path.exists() or str(path_or_name) not in names():
        return path
    return config_path(str(path_or_name))


class MissingEnv(ValueError):
    pass


def substitute_env(data: Any, where: str = "") -> Any:
    """`data` (parsed YAML) with every ${env.NAME[:=default]} in its strings replaced; keys are kept."""
    if isinstance(data, dict):
        return {k: substitute_env(v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute_env(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${env." not in data:
        return data

    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name) or default
        if got is None:
            raise MissingEnv(f"{where}: environment variable {name} is not set (the config says ${{env.{name}}})")
        return got

    out = PLACEHOLDER.sub(value, data)
    whole = PLACEHOLDER.fullmatch(data.strip()) is not None
    return None if whole and not out.strip() else out
