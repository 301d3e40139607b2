"""`corral serve`: the OpenAI / Llama Stack compatible server (see docs/server.md).

    corral serve                          # the built-in default model on 127.0.0.1:8321
    corral serve --config run.yaml        # models, providers, storage, port and API keys from a run config
    corral serve --config postgres        # a shipped run config by name (`corral stack list-configs`)
    corral serve --port 9000 --model SmolLM2-135M-Instruct --checkpoint path/to/model.gguf
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="run config: a YAML file, or a shipped one by name (local, postgres, remote-vllm: "
                                    "see `corral stack list-configs`); default: serve the built-in default model")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8321)")
    p.add_argument("--model", help="without --config: the model id to serve (a registry name)")
    p.add_argument("--checkpoint", help="without --config: the checkpoint to load for --model (name or path)")
    p.add_argument("--storage-dir", help="where the completion store lives (default $CORRAL_HOME/server)")
    p.add_argument("--api-key", action="append", dest="api_keys", help="require this API key (repeatable)")
    p.add_argument("--load", choices=["startup", "first_use"], help="load models at start (default) or on first use")
    p.add_argument("--max-queue", type=int, help="requests that may wait per model before 429 (default 8)")
    p.add_argument("--no-embeddings", action="store_true", help="without --config: do not serve all-MiniLM-L6-v2")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def build_config(args):
    from corral.stack.config import EMBEDDINGS, ConfigError, ModelEntry, load_run_config

    overrides = dict(host=args.host, port=args.port, storage_dir=args.storage_dir, api_keys=args.api_keys,
                     load=args.load, max_queue=args.max_queue)
    if args.config and (args.model or args.checkpoint or args.no_embeddings):
        raise ConfigError("--model, --checkpoint and --no-embeddings apply only without --config")
    cfg = load_run_config(args.config, **overrides)
    if not args.config and (args.model or args.checkpoint or args.no_embeddings):
        models = []
        for m in cfg.models:
            if m.model_type == "llm" and (args.model or args.checkpoint):
                m = ModelEntry(model_id=args.model or m.model_id, provider_id=m.provider_id,
                               checkpoint=args.checkpoint)
            if not (args.no_embeddings and m.model_type == "embedding"):
                models.append(m)
        providers = [p for p in cfg.providers if not (args.no_embeddings and p.provider_type == EMBEDDINGS)]
        cfg = cfg.model_copy(update={"models": models, "providers": providers})
    return cfg


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = add_arguments(argparse.ArgumentParser(prog="corral serve", description=__doc__.splitlines()[0])).parse_args(argv)
    from corral.stack.config import ConfigError

    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"corral serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from corral.stack.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from corral.stack.metrics import configure_access_log

    configure_access_log(args.log_level.upper())  # one JSON line per request at info (the default)
    try:
        app = create_app(cfg)
    except (ValueError, RuntimeError) as e:
        print(f"corral serve: {e}", file=sys.stderr)
        return 2
    print(f"corral serve: {', '.join(m.model_id for m in cfg.models)} on http://{cfg.host}:{cfg.port}/v1 "
          f"(models load at {'start' if cfg.load == 'startup' else 'first use'}; store in {cfg.storage_dir})",
          flush=True)
    # access_log=False: the JSON access log configured above is the one line per request
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level, timeout_graceful_shutdown=3,
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
