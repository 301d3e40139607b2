"""Serving benchmark: Corral's engine measured THROUGH `corral serve`, next to transformers' and llama.cpp's
continuous batching on the same weights, prompts and thread count.

    python bench/serve_bench.py                                          # everything, 3 runs each
    python bench/serve_bench.py --models smollm2-int8 --streams 1,8 --max-tokens 32 --runs 1 --skip-peers
    python bench/serve_bench.py --models llama-1b-int8 --kv-cache-mb 2048 --max-num-seqs 32

Models (the weights are made by bench/bench.py's helpers, into --workdir, once):
  smollm2        the real SmolLM2-135M-Instruct Q4_1 GGUF, which Corral runs in its own Q4_1 blocks
  smollm2-int8   the same file with `quantize: int8` (Corral's int8 decode kernel)
  llama-1b-int8  the Llama 3.2 1B architecture with random bf16 weights, served with `quantize: int8`;
                 Corral loads the HF checkpoint plus Meta's Llama 3 tokenizer.model (from the llama-models
                 wheel), so chat works
Peers, per base model: transformers loads the same weights as an HF checkpoint (SmolLM2: fp32; 1B: bf16);
llama.cpp's `llama-server` loads the GGUF (SmolLM2: the Q4_1 file as it is; 1B: an F16 GGUF).

What is measured, with Corral started as `corral serve --config <generated run config>` on 127.0.0.1
(one server per model, OMP_NUM_THREADS=--threads, max_queue 64 so nothing is refused):

1. Throughput: N = --streams concurrent streaming /v1/completions requests (HTTP client threads released
   together), each a distinct prompt of --prompt-tokens random token ids (seeded, distinct per run and per
   stream, so no run reuses a cached prefix) and max_tokens --max-tokens, temperature 0, `ignore_eos: true`
   when the server accepts that field (else the tokens actually produced are counted from `usage`).
   aggregate tok/s  = completion tokens of all N streams / (last token of the batch - first request sent)
   per-stream tok/s = (tokens - 1) / (last token - first token) of each stream, median over the streams
   vs 1 stream     = aggregate(N) / aggregate(1). Target: 8 streams >= 4x one stream.
   corral vs <peer> = Corral's aggregate / the peer's at the same N (peers run once per base model).
   transformers: `model.generate_batch(prompts, generation_config=...)` (its continuous batching, paged
   `sdpa_paged` attention) on the same ids, in a child process with --threads threads; wall time of the
   call (which starts and stops its batching thread, as every call does); tokens from the returned outputs
   (per-stream times are not observable there: "-"). transformers 4.57.1 sizes its paged cache from GPU
   memory only, so the child reports the machine's MemAvailable to it; the block count is set explicitly.
   llama.cpp: `llama-server -np N -c <slot ctx * N> -t T -tb T` per N, native /completion with
   `n_predict`, `ignore_eos`, streamed; the same clock as Corral. The binary is built once from the vendored
   llama.cpp in llama-cpp-python's sdist into ~/.cache/corral-bench (or pass --llama-server; about 30 min
   on 2 cores; --no-build skips llama.cpp instead).
2. Follow-up TTFT (Corral, streaming /v1/chat/completions): turn 1 is a ~--conversation-tokens user message
   (text generated per run, so nothing is cached from a previous run); turn 2 repeats the conversation plus
   turn 1's reply plus a short new user message. TTFT = first non-empty content delta - request sent.
   Target: turn-2 TTFT <= 15% of turn 1's.
3. Memory: --rss-streams (32) concurrent requests of --rss-prompt-tokens prompt tokens; the server process's
   VmRSS is sampled every 0.1 s while they run, printed with the idle RSS, VmHWM (lifetime peak, loading
   included) and the configured KV pool (`kv_cache_mb`, or "auto").

Every figure is the median of --runs runs with the min-max spread. Run configs accept the serving keys
--kv-cache-mb, --max-num-seqs, --max-batch-tokens, --server-max-tokens and --context-length only when given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as weights  # noqa: E402  bench/bench.py: prepare(), write_hf_checkpoint(), write_gguf()

# name -> (base weights in bench.py's prepare(), Corral's per-model run-config keys, label)
MODELS = {
    "smollm2": ("smollm2", {}, "SmolLM2-135M-Instruct (Q4_1 file)"),
    "smollm2-int8": ("smollm2", {"quantize": "int8"}, "SmolLM2-135M-Instruct (int8)"),
    "llama-1b-int8": ("llama-1b", {"quantize": "int8"}, "Llama-3.2-1B random (int8)"),
}
PEER_LABELS = {"smollm2": {"transformers": "transformers (fp32)", "llama.cpp": "llama.cpp (Q4_1 file)"},
               "llama-1b": {"transformers": "transformers (bf16)", "llama.cpp": "llama.cpp (F16)"}}
SERVE_KEYS = ("kv_cache_mb", "max_num_seqs", "max_batch_tokens", "server_max_tokens", "context_length")
CACHE = Path(os.environ.get("CORRAL_BENCH_CACHE", Path.home() / ".cache" / "corral-bench"))
LLAMA_CPP_PY = "llama-cpp-python==0.3.36"
HOST = "127.0.0.1"
TIMEOUT_S = 7200  # one request may wait behind many others on a server that runs them one at a time


def log(msg: str) -> None:
    print(f"serve_bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def prompt_ids(n: int, seed: str) -> list[int]:
    """n random ids in [3, 32000): valid and ordinary in both vocabularies (SmolLM2 49152, Llama 3 128256)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


def median_spread(values: list[float], fmt: str = "{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- HTTP: one streamed request, timed ---------------------------------------------------------------------

def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def stream(port: int, path: str, body: dict) -> dict:
    """POST a streaming request; read its Server-Sent Events. Understands OpenAI chunks (completions and
    chat) and llama-server's native /completion chunks. Returns the send / first-token / last-token clock
    readings, the completion and prompt token counts (usage when given, else the chunks) and the text."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    t_send = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"POST {path}: HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}")
    t_first = t_last = None
    chunks, n_tokens, n_prompt, text, finish = 0, None, None, [], None
    try:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            now = time.perf_counter()
            if "error" in obj:
                raise RuntimeError(f"POST {path}: error in the stream: {obj['error']}")
            if "content" in obj and "choices" not in obj:  # llama-server native /completion
                piece, finish = obj.get("content") or "", "stop" if obj.get("stop") else None
                got = bool(piece or obj.get("tokens"))
                if obj.get("stop"):
                    n_tokens = obj.get("tokens_predicted", n_tokens)
                    n_prompt = obj.get("tokens_evaluated", n_prompt)
            else:
                choice = (obj.get("choices") or [{}])[0]
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
                got = bool(piece) or bool(choice.get("finish_reason") and t_first is None)
                if obj.get("usage"):
                    n_tokens = obj["usage"]["completion_tokens"]
                    n_prompt = obj["usage"]["prompt_tokens"]
            if got:
                t_first = t_first or now
                t_last = now
                chunks += 1
                text.append(piece)
            if obj.get("stop") is True:
                break
    finally:
        conn.close()
    return dict(t_send=t_send, t_first=t_first, t_last=t_last, tokens=chunks if n_tokens is None else n_tokens,
                prompt_tokens=n_prompt, text="".join(text), finish=finish)


def concurrently(n: int, request) -> list[dict]:
    """request(i) for i < n, from n threads released together."""
    results, errors = [None] * n, []
    gate = threading.Barrier(n)

    def one(i):
        try:
            gate.wait()
            results[i] = request(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def batch_stats(results: list[dict]) -> dict:
    start, end = min(r["t_send"] for r in results), max(r["t_last"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    per_stream = [(r["tokens"] - 1) / (r["t_last"] - r["t_first"]) for r in results
                  if r["tokens"] > 1 and r["t_last"] > r["t_first"]]
    return dict(aggregate=tokens / (end - start), wall_s=end - start, tokens=tokens,
                per_stream=statistics.median(per_stream) if per_stream else None,
                ttft=statistics.mean(r["t_first"] - r["t_send"] for r in results),
                min_tokens=min(r["tokens"] for r in results))


# --- Corral: `corral serve` in a subprocess ----------------------------------------------------------------

def corral_checkpoint(base: str, workdir: Path) -> Path:
    """What Corral serves for a base model: SmolLM2's Q4_1 GGUF as it is. The random 1B gets Meta's Llama 3 tokenizer.model (shipped in the
    llama-models wheel) next to links to bench.py's HF checkpoint, so its chat format works."""
    files = weights.prepare(base, workdir)
    if base == "smollm2":  # the real GGUF (its tokenizer inside), not bench.py's tokenizer-less HF copy
        return Path(files["q4_1"])
    path = Path(files["corral"])
    return weights.with_llama3_tokenizer(path, workdir / "llama-1b-random-serve")


class CorralServer:
    """`corral serve` on a free loopback port with a generated run config; stopped on exit."""

    def __init__(self, checkpoint: Path, model_keys: dict, args, tmp: Path):
        self.port = free_port()
        self.model = "bench"
        entry = {"model_id": self.model, "provider_id": "corral", "checkpoint": str(checkpoint), **model_keys}
        for key in SERVE_KEYS:
            value = getattr(args, key)
            if value is not None:
                entry["max_tokens" if key == "server_max_tokens" else key] = value
        config = {"host": HOST, "port": self.port, "storage_dir": str(tmp / "store"), "max_queue": 64,
                  "providers": [{"provider_id": "corral", "provider_type": "inline::corral"}], "models": [entry]}
        self.config_path = tmp / f"run-{self.port}.yaml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = tmp / f"serve-{self.port}.log"
        self.entry = entry
        self.threads = args.threads

    def __enter__(self):
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(self.config_path),
               "--log-level", "warning"]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.time() + 1800
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                status, body = http_json(self.port, "GET", "/v1/models", timeout=5)
                if status == 200 and any(m.get("id") == self.model for m in body.get("data", [])):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"corral serve did not come up within 30 minutes:\n{self.log_tail()}")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()

    def log_tail(self, n: int = 3000) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def accepts_ignore_eos(self) -> bool:
        status, body = http_json(self.port, "POST", "/v1/completions", {
            "model": self.model, "prompt": prompt_ids(8, "probe"), "max_tokens": 1, "temperature": 0,
            "ignore_eos": True}, timeout=TIMEOUT_S)
        if status == 200:
            return True
        if status == 400 and "ignore_eos" in json.dumps(body):
            return False
        raise RuntimeError(f"probe request failed: HTTP {status}: {body}")

    def completion(self, ids: list[int], max_tokens: int, ignore_eos: bool) -> dict:
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        return stream(self.port, "/v1/completions", body)

    def chat(self, messages: list[dict], max_tokens: int) -> dict:
        return stream(self.port, "/v1/chat/completions", {
            "model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}})

    def kv_info(self) -> str | None:
        """Whatever the health route says about the KV cache (once the engine reports it)."""
        try:
            status, body = http_json(self.port, "GET", "/v1/health")
        except OSError:
            return None
        found = {}

        def walk(obj, path=""):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if "kv" in k.lower() and not isinstance(v, (dict, list)):
                        found[f"{path}{k}"] = v
                    walk(v, f"{path}{k}.")

        walk(body)
        return ", ".join(f"{k.removeprefix('models.bench.')}={v}" for k, v in found.items()) or None


def corral_throughput(server: CorralServer, args, ignore_eos: bool) -> dict[int, list[dict]]:
    server.completion(prompt_ids(args.prompt_tokens, "warm-up"), 4, ignore_eos)
    out = {}
    for n in args.stream_counts:
        out[n] = []
        for run in range(args.runs):
            results = concurrently(n, lambda i: server.completion(
                prompt_ids(args.prompt_tokens, f"{n}-{run}-{i}"), args.max_tokens, ignore_eos))
            out[n].append(batch_stats(results))
            log(f"  corral {n:>2} streams run {run + 1}: {out[n][-1]['aggregate']:.2f} tok/s aggregate "
                f"({out[n][-1]['tokens']} tokens in {out[n][-1]['wall_s']:.1f} s)")
    return out


WORDS = ("the river town market winter light garden old road small house long bridge summer rain "
         "north field quiet morning people stone wall green hill school train evening music story letter "
         "window friend table bread coffee paper doctor farmer harbor boat island mountain forest cloud "
         "yellow seven twelve numbers history science machine engine window careful bright slowly").split()


def document(n_tokens: int, seed: str) -> str:
    """Plain English-like text of roughly n_tokens tokens (about 1.0 token per word with these words, plus the chat template)."""
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_tokens * 0.9:
        k = rng.randrange(6, 14)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        sentences.append(s[0].upper() + s[1:] + ".")
        words += k
    return " ".join(sentences)


def corral_followup_ttft(server: CorralServer, args) -> list[dict]:
    runs = []
    for run in range(args.runs):
        turn1 = [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": document(args.conversation_tokens, f"doc-{run}")
                  + "\n\nWhat is this text about?"}]
        r1 = server.chat(turn1, args.reply_tokens)
        turn2 = turn1 + [{"role": "assistant", "content": r1["text"]},
                         {"role": "user", "content": "Thanks. Now say it in one short sentence."}]
        r2 = server.chat(turn2, 4)
        runs.append(dict(ttft1=r1["t_first"] - r1["t_send"], ttft2=r2["t_first"] - r2["t_send"],
                         prompt1=r1["prompt_tokens"], prompt2=r2["prompt_tokens"], reply_tokens=r1["tokens"]))
        log(f"  follow-up TTFT run {run + 1}: turn 1 {runs[-1]['ttft1']:.3f} s ({r1['prompt_tokens']} prompt tokens), "
            f"turn 2 {runs[-1]['ttft2']:.3f} s ({r2['prompt_tokens']} prompt tokens)")
    return runs


def corral_memory(server: CorralServer, args, ignore_eos: bool) -> dict:
    idle = rss_mb(server.pid)
    peak, done = [idle], threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak.append(rss_mb(server.pid))
            except OSError:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = concurrently(args.rss_streams, lambda i: server.completion(
            prompt_ids(args.rss_prompt_tokens, f"rss-{i}"), args.rss_max_tokens, ignore_eos))
    finally:
        done.set()
        sampler.join()
    stats = batch_stats(results)
    return dict(idle_mb=idle, peak_mb=max(peak), hwm_mb=rss_mb(server.pid, "VmHWM"), kv=server.kv_info(),
                aggregate=stats["aggregate"], wall_s=stats["wall_s"])


def kv_need_mb(base: str, seqs: int, tokens: int) -> float:
    """fp16 K+V bytes (the CPU engine's cache) of `seqs` sequences of `tokens` tokens (what a pool must hold for
    all to run at once)."""
    from corral.models.config import DEFAULT_MODEL, get_config

    c = get_config(DEFAULT_MODEL if base == "smollm2" else "Llama-3.2-1B")
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2 * seqs * tokens / 2**20


# --- transformers: generate_batch in a child process ------------------------------------------------------

def transformers_child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    import transformers.generation.continuous_batching.cache as cb_cache

    torch.set_num_threads(args.threads)

    # transformers 4.57.1 sizes the paged cache from GPU memory only (on CPU the total is None and the check
    # fails): report the machine's available memory instead. num_blocks and max_batch_tokens are given below.
    def cpu_memory():
        avail = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
        return torch.device("cpu"), int(avail.split()[1]) * 1024, 0, 0

    cb_cache.get_device_and_memory_breakdown = cpu_memory
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype, attn_implementation="sdpa_paged").eval()
    block = 32
    blocks_per_seq = -(-(args.prompt_tokens + args.max_tokens) // block) + 1
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0,
                              block_size=block, num_blocks=blocks_per_seq * max(args.stream_counts) + 8,
                              max_batch_tokens=max(512, max(args.stream_counts)))

    def batch(prompts):
        t0 = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False)
        wall = time.perf_counter() - t0
        if len(out) != len(prompts):
            raise RuntimeError(f"generate_batch returned {len(out)} of {len(prompts)} results")
        tokens = sum(len(o.generated_tokens) for o in out.values())
        return dict(aggregate=tokens / wall, wall_s=wall, tokens=tokens, per_stream=None, ttft=None,
                    min_tokens=min(len(o.generated_tokens) for o in out.values()))

    batch([prompt_ids(16, "warm-up")])
    results = {}
    for n in args.stream_counts:
        results[n] = [batch([prompt_ids(args.prompt_tokens, f"{n}-{run}-{i}") for i in range(n)])
                      for run in range(args.runs)]
        print(f"transformers {n} streams: {[round(r['aggregate'], 2) for r in results[n]]} tok/s",
              file=sys.stderr, flush=True)
    print(json.dumps(results))


def transformers_throughput(path: Path, dtype: str, args) -> dict[int, list[dict]]:
    cmd = [sys.executable, __file__, "--child", "transformers", "--path", str(path), "--dtype", dtype,
           "--streams", args.streams, "--max-tokens", str(args.max_tokens), "--prompt-tokens",
           str(args.prompt_tokens), "--runs", str(args.runs), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    for line in proc.stderr:  # pass its progress lines through
        stderr.append(line)
        if line.startswith("transformers "):
            log("  " + line.rstrip())
    stdout = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError("".join(stderr)[-2000:])
    return {int(k): v for k, v in json.loads(stdout.strip().splitlines()[-1]).items()}


# --- llama.cpp: llama-server with N parallel slots ---------------------------------------------------------

def build_llama_server(log_to: Path) -> Path:
    """Build llama.cpp's llama-server (CPU only) from the llama.cpp vendored in llama-cpp-python's sdist."""
    CACHE.mkdir(parents=True, exist_ok=True)
    src = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        log(f"downloading the {LLAMA_CPP_PY} sdist (for the vendored llama.cpp source) into {CACHE}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        LLAMA_CPP_PY, "-d", str(CACHE)], check=True, stdout=subprocess.DEVNULL)
        sdist = next(CACHE.glob("llama_cpp_python-*.tar.gz"))
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(CACHE)], check=True)
        src = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build = CACHE / "build"
    log(f"building llama-server from {src} into {build} (CPU only; takes a while); log: {log_to}")
    t0 = time.time()
    with open(log_to, "w") as f:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                        "-DGGML_NATIVE=ON"], check=True, stdout=f, stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=f, stderr=subprocess.STDOUT)
    log(f"built llama-server in {time.time() - t0:.0f} s")
    return build / "bin" / "llama-server"


def find_llama_server(args) -> tuple[Path | None, str | None]:
    """(binary, None) or (None, why not)."""
    binary = Path(args.llama_server) if args.llama_server else CACHE / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary, None
    if args.llama_server or args.no_build:
        return None, f"no llama-server binary at {binary}"
    try:
        binary = build_llama_server(CACHE / "build-llama-server.log")
        return (binary, None) if binary.is_file() else (None, f"the build produced no {binary}")
    except (subprocess.CalledProcessError, OSError, StopIteration) as e:
        tail = ""
        if (CACHE / "build-llama-server.log").is_file():
            tail = (CACHE / "build-llama-server.log").read_text(errors="replace")[-600:]
        return None, f"llama-server could not be built ({e}); {tail}"


class LlamaServer:
    def __init__(self, binary: Path, gguf: Path, slots: int, slot_ctx: int, threads: int, tmp: Path):
        self.port = free_port()
        self.cmd = [str(binary), "-m", str(gguf), "--host", HOST, "--port", str(self.port), "-np", str(slots),
                    "-c", str(slot_ctx * slots), "-t", str(threads), "-tb", str(threads), "-ngl", "0",
                    "--no-warmup"]
        self.log_path = tmp / f"llama-server-{self.port}.log"

    def __enter__(self):
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n"
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                status, _ = http_json(self.port, "GET", "/health", timeout=5)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("llama-server did not come up within 5 minutes")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()

    def completion(self, ids: list[int], max_tokens: int) -> dict:
        return stream(self.port, "/completion", {"prompt": ids, "n_predict": max_tokens, "temperature": 0,
                                                 "ignore_eos": True, "stream": True, "cache_prompt": True})


def llama_cpp_throughput(binary: Path, gguf: Path, args, tmp: Path) -> dict[int, list[dict]]:
    out = {}
    slot_ctx = args.prompt_tokens + args.max_tokens + 64
    for n in args.stream_counts:
        with LlamaServer(binary, gguf, n, slot_ctx, args.threads, tmp) as server:
            server.completion(prompt_ids(16, "warm-up"), 4)
            out[n] = []
            for run in range(args.runs):
                results = concurrently(n, lambda i: server.completion(
                    prompt_ids(args.prompt_tokens, f"{n}-{run}-{i}"), args.max_tokens))
                out[n].append(batch_stats(results))
                log(f"  llama.cpp {n:>2} streams run {run + 1}: {out[n][-1]['aggregate']:.2f} tok/s aggregate")
    return out


# --- the tables ---------------------------------------------------------------------------------------------

def throughput_table(rows: list[dict], args) -> list[str]:
    lines = [f"### Aggregate throughput: completion tokens / batch wall time, prefill included "
             f"({args.prompt_tokens}-token prompts, max_tokens {args.max_tokens}, temperature 0, {args.threads} threads, "
             f"median (min-max) of {args.runs} runs)", "",
             "| model | engine | streams | aggregate tok/s | vs 1 stream | per-stream decode tok/s | mean TTFT s "
             "| tokens/stream | corral vs transformers | corral vs llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["base"], r["engine"]): r for r in rows}
    bases = list(dict.fromkeys(r["base"] for r in rows))
    for r in sorted(rows, key=lambda r: (bases.index(r["base"]), r["engine"] != "corral")):  # Corral first
        base_agg = statistics.median(x["aggregate"] for x in r["runs"][1]) if 1 in r["runs"] else None
        for n, runs in sorted(r["runs"].items()):
            agg = statistics.median(x["aggregate"] for x in runs)
            vs1 = f"{agg / base_agg:.2f}x" if base_agg else "-"
            ratios = []
            for peer in ("transformers", "llama.cpp"):
                p = by_key.get((r["base"], peer))
                if r["engine"] == "corral" and p and n in p["runs"]:
                    ratios.append(f"{agg / statistics.median(x['aggregate'] for x in p['runs'][n]):.2f}x")
                else:
                    ratios.append("-")
            tokens = statistics.mean(x["tokens"] / n for x in runs)
            short = min(x["min_tokens"] for x in runs)
            tok = f"{tokens:.1f}" + (f" (min {short})" if short < args.max_tokens else "")
            lines.append(f"| {r['label']} | {r['engine_label']} | {n} | "
                         f"{median_spread([x['aggregate'] for x in runs])} | {vs1} | "
                         f"{median_spread([x['per_stream'] for x in runs])} | "
                         f"{median_spread([x['ttft'] for x in runs], '{:.3f}')} | {tok} | {ratios[0]} | {ratios[1]} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--streams", default="1,2,4,8,16", help="concurrent stream counts (include 1 for the ratios)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per stream")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt tokens per stream")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median and min-max reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine")
    p.add_argument("--tests", default="throughput,ttft,memory", help="which of throughput,ttft,memory to run")
    p.add_argument("--skip-peers", action="store_true", help="Corral only: no transformers, no llama.cpp")
    p.add_argument("--peers", default="transformers,llama.cpp", help="peers to run beside Corral")
    p.add_argument("--conversation-tokens", type=int, default=2000, help="about this many tokens in turn 1")
    p.add_argument("--reply-tokens", type=int, default=32, help="max_tokens of turn 1's reply")
    p.add_argument("--rss-streams", type=int, default=32)
    p.add_argument("--rss-prompt-tokens", type=int, default=512)
    p.add_argument("--rss-max-tokens", type=int, help="completion tokens per memory-test stream (default --max-tokens)")
    p.add_argument("--kv-cache-mb", type=int, help="run-config kv_cache_mb (only passed when given)")
    p.add_argument("--max-num-seqs", type=int, help="run-config max_num_seqs (only passed when given)")
    p.add_argument("--max-batch-tokens", type=int, help="run-config max_batch_tokens (only passed when given)")
    p.add_argument("--server-max-tokens", type=int, help="run-config max_tokens, the per-request cap (when given)")
    p.add_argument("--context-length", type=int, help="run-config context_length (only passed when given)")
    p.add_argument("--llama-server", help=f"llama-server binary (default {CACHE}/build/bin/llama-server, built if missing)")
    p.add_argument("--no-build", action="store_true", help="do not build llama-server when it is missing")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "corral-bench",
                   help="where bench.py's weights are written (shared with bench/bench.py)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--child", choices=["transformers"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.stream_counts = sorted({int(s) for s in args.streams.split(",")})
    args.rss_max_tokens = args.rss_max_tokens or args.max_tokens
    if args.child:
        return transformers_child(args)
    models = args.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        p.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    tests = set(args.tests.split(","))
    peers = [] if args.skip_peers else [x for x in args.peers.split(",") if x]

    tmp = Path(tempfile.mkdtemp(prefix="corral-serve-bench-"))
    rows, ttft_rows, memory_rows, notes = [], [], [], []
    llama_binary, llama_why = (None, None)
    if "llama.cpp" in peers and "throughput" in tests:
        llama_binary, llama_why = find_llama_server(args)
        if llama_binary is None:
            notes.append(f"llama.cpp: skipped: {llama_why}")
            log(notes[-1])
    peers_done = set()
    for name in models:
        base, keys, label = MODELS[name]
        checkpoint = corral_checkpoint(base, args.workdir)
        log(f"{name}: starting corral serve ({checkpoint.name}, {keys or 'no quantization'})")
        with CorralServer(checkpoint, keys, args, tmp) as server:
            ignore_eos = server.accepts_ignore_eos()  # also the warm-up
            if not ignore_eos:
                notes.append(f"{name}: the server does not accept `ignore_eos`; tokens counted from `usage` "
                             f"(a stream may stop early: see tokens/stream)")
            if "throughput" in tests:
                rows.append(dict(base=base, engine="corral", label=label, engine_label="corral serve",
                                 runs=corral_throughput(server, args, ignore_eos)))
            if "ttft" in tests:
                runs = corral_followup_ttft(server, args)
                ttft_rows.append(dict(label=label, runs=runs))
            if "memory" in tests and args.rss_streams:
                log(f"  memory: {args.rss_streams} streams x {args.rss_prompt_tokens} prompt tokens ...")
                m = corral_memory(server, args, ignore_eos)
                m.update(label=label, kv_need=kv_need_mb(base, args.rss_streams,
                                                         args.rss_prompt_tokens + args.rss_max_tokens))
                memory_rows.append(m)
        if "throughput" in tests and base not in peers_done:
            peers_done.add(base)
            paths = weights.prepare(base, args.workdir)
            if "transformers" in peers:
                log(f"{base}: transformers generate_batch ...")
                try:
                    runs = transformers_throughput(paths["transformers"], "bf16" if base == "llama-1b" else "fp32",
                                                   args)
                    rows.append(dict(base=base, engine="transformers", label=label.rsplit(" (", 1)[0],
                                     engine_label=PEER_LABELS[base]["transformers"] + " generate_batch", runs=runs))
                except RuntimeError as e:
                    notes.append(f"{base}: transformers generate_batch failed: {str(e)[-400:]}")
                    log(notes[-1])
            if llama_binary is not None:
                log(f"{base}: llama-server ...")
                runs = llama_cpp_throughput(llama_binary, paths["llama.cpp"], args, tmp)
                rows.append(dict(base=base, engine="llama.cpp", label=label.rsplit(" (", 1)[0],
                                 engine_label=PEER_LABELS[base]["llama.cpp"] + " llama-server", runs=runs))

    lines = []
    if rows:
        lines += throughput_table(rows, args)
        for r in rows:
            if r["engine"] == "corral" and 1 in r["runs"] and 8 in r["runs"]:
                x = (statistics.median(v["aggregate"] for v in r["runs"][8])
                     / statistics.median(v["aggregate"] for v in r["runs"][1]))
                lines.append(f"\n{r['label']}: 8 streams = {x:.2f}x one stream (target >= 4x: "
                             f"{'met' if x >= 4 else 'not met'})")
    if ttft_rows:
        lines += ["", f"### Follow-up turn TTFT (streaming chat, ~{args.conversation_tokens}-token turn 1, "
                      f"median (min-max) of {args.runs} runs)", "",
                  "| model | turn-1 prompt tokens | turn-1 TTFT s | turn-2 prompt tokens | turn-2 TTFT s | turn 2 / turn 1 "
                  "| target <= 15% |", "|---|---:|---:|---:|---:|---:|---|"]
        for t in ttft_rows:
            ratio = [r["ttft2"] / r["ttft1"] for r in t["runs"]]
            med = statistics.median(ratio)
            lines.append(f"| {t['label']} | {t['runs'][0]['prompt1']} | {median_spread([r['ttft1'] for r in t['runs']], '{:.3f}')} "
                         f"| {t['runs'][0]['prompt2']} | {median_spread([r['ttft2'] for r in t['runs']], '{:.3f}')} | "
                         f"{median_spread([100 * x for x in ratio], '{:.1f}')}% | {'met' if med <= 0.15 else 'not met'} |")
    if memory_rows:
        lines += ["", f"### Server memory with {args.rss_streams} concurrent requests ({args.rss_prompt_tokens} prompt + "
                      f"{args.rss_max_tokens} new tokens each)", "",
                  "| model | KV pool (kv_cache_mb) | KV of all sequences (fp16) | RSS idle | peak RSS during | VmHWM "
                  "(incl. load) | aggregate tok/s | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for m in memory_rows:
            pool = f"{args.kv_cache_mb} MB" if args.kv_cache_mb else "auto"
            if m["kv"]:
                pool += f" ({m['kv']})"
            lines.append(f"| {m['label']} | {pool} | {m['kv_need']:.0f} MB | {m['idle_mb']:.0f} MB | "
                         f"{m['peak_mb']:.0f} MB | {m['hwm_mb']:.0f} MB | {m['aggregate']:.2f} | {m['wall_s']:.1f} |")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if args.json:
        args.json.write_text(json.dumps(dict(throughput=rows, ttft=ttft_rows, memory=memory_rows, notes=notes),
                                        indent=2, default=str))
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
