"""Corral's Python API: load a model, generate text, chat with tools, stream.

    from corral.api import LLM
    llm = LLM.load()                                   # the built-in SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", max_tokens=8, temperature=0).text)
    reply = llm.chat([{"role": "user", "content": "Say hi"}], max_tokens=20)
    print(reply.message.content, reply.message.tool_calls)
    for chunk in llm.chat([{"role": "user", "content": "Count to 5"}], stream=True):
        print(chunk.text, end="", flush=True)

    outs = llm.generate_many(["Once upon a time", "The sky is"], max_tokens=16)   # batched together

This layer turns text into token ids (tokenizer, chat format), submits them to the model's serving
engine (`corral.engine.Engine`: paged KV cache, continuous batching, prefix caching), and turns the ids
back into text: a UTF-8-safe stream decoder (a character split across tokens is released whole), stop
strings cut with a holdback buffer (`engine.stop`), logprobs with their token text, and timings. An
`LLM` is thread-safe: generations from any number of threads run together in the engine's loop, and a
follow-up chat turn prefills only its new tokens.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


from corral.engine.engine import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_NUM_SEQS, Engine, RequestHandle
from corral.engine.sampling import SamplingParams
from corral.engine.scheduler import LogitsProcessor, TokenStep
from corral.engine.stop import StopStringMatcher
from corral.models.config import DEFAULT_MODEL
from corral.tokenizer.base import AssistantMessage


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    top_logprobs: list[tuple[str, float]]  # (token text, logprob), most likely first


@dataclass
class Chunk:
    """A streamed text delta; the last chunk has finish_reason "stop" | "length"."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    message: AssistantMessage | None = None  # chat streams: the parsed reply, on the last chunk
    completion: Completion | None = None  # the whole result with usage and timings, on the last chunk


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # every token the model produced, a final stop token included
    finish_reason: str  # "stop" (stop token or stop string) | "length" (max_tokens or the context)
    logprobs: list[TokenLogprob] | None
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled again)


@dataclass
class ChatCompletion(Completion):
    message: AssistantMessage = field(default_factory=lambda: AssistantMessage(""))  # content + tool_calls


class ByteStreamDecoder:
    """Token ids -> text deltas that never split a UTF-8 character (used until corral.tokenizer has one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _stream_decoder(tokenizer):
    try:
        from corral.tokenizer import StreamDecoder
    except ImportError:
        return ByteStreamDecoder(tokenizer)
    return StreamDecoder(tokenizer)


class LLM:
    """A loaded model with its tokenizer, chat format and serving engine. Thread-safe."""

    def __init__(self, model, tokenizer, checkpoint=None, chat_format=None, *, kv_cache_mb: int | None = None,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.config = model.config
        self.name: str = self.config.name or (str(checkpoint.path) if checkpoint is not None else "model")
        self._chat_format = chat_format
        self.engine = Engine(model, kv_cache_mb=kv_cache_mb, max_num_seqs=max_num_seqs,
                             max_batch_tokens=max_batch_tokens, context_length=context_length, threaded=True)
        self.context_length: int = self.engine.context_length  # the model's, capped by the pool and the config

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL, *, dtype=None, device="cpu", quantize: str | None = None,
             kv_cache_mb: int | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
             max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, context_length: int | None = None,
             adapter: str | Path | None = None, threads: int | None = None) -> LLM:
        """A registry name (e.g. "SmolLM2-135M-Instruct", "Llama-3.2-1B-Instruct"), a checkpoint directory
        (Hugging Face or Meta) or a .gguf file. dtype: None (the file's; a GGUF file's Q8_0 / Q4_0 / Q4_1
        weights stay in their blocks, with fp32 activations), "bf16", "fp16", "fp32" or a torch.dtype (which
        dequantizes a GGUF file). quantize="int8": weight-only int8 per channel; "int4" (= "q4_0"), "q4_1",
        "q8_0": the blocks' linears in GGUF blocks of 32, head and embeddings int8 (corral/engine/qblock.py).

        The engine: kv_cache_mb is the KV-cache pool's memory (default: a fifth of the free memory, at
        most 8 GiB, no more than max_num_seqs full contexts); max_num_seqs sequences run together, with at
        most max_batch_tokens tokens per step (long prompts are prefilled in chunks of that size);
        context_length caps prompt + generation below the model's own context. adapter: a PEFT LoRA adapter
        directory (`corral finetune`), merged into the weights at load time (then quantized, with quantize).
        threads: CPU threads (default: the cores other processes are not using, corral/engine/threads.py)."""
        from corral.checkpoints import load_model, load_tokenizer
        from corral.engine.threads import use_threads

        use_threads(threads)

        if adapter is not None:  # a PEFT LoRA adapter, merged into the weights at load time
            from corral.customize.lora import load_model_with_adapter

            net, checkpoint = load_model_with_adapter(model, adapter, dtype=dtype, device=device, quantize=quantize)
        else:
            net, checkpoint = load_model(model, dtype=dtype, device=device, quantize=quantize)
        checkpoint.state_dict = {}  # the model holds the tensors; do not keep a second reference around
        return cls(net, load_tokenizer(checkpoint), checkpoint, kv_cache_mb=kv_cache_mb, max_num_seqs=max_num_seqs,
                   max_batch_tokens=max_batch_tokens, context_length=context_length)

    @property
    def chat_format(self):
        if self._chat_format is None:
            from corral.tokenizer.chat import chat_format_for

            template = self.checkpoint.chat_template if self.checkpoint is not None else None
            self._chat_format = chat_format_for(self.config, self.tokenizer, template)
        return self._chat_format

    # --- tokens ------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Text -> ids. add_bos adds the BOS token where the checkpoint's tokenizer does by default
        (Llama: yes; SmolLM2: no)."""
        bos = add_bos and self.tokenizer.bos_id is not None and getattr(self.tokenizer, "add_bos", True)
        return self.tokenizer.encode(text, bos=bos)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_chat(self, messages: list[dict], *, tools=None, tool_choice=None) -> list[int]:
        """The prompt ids of a conversation, ending with the assistant header."""
        return self.chat_format.encode_dialog(messages, tools=tools, tool_choice=tool_choice,
                                              add_generation_prompt=True)

    def count_tokens(self, text_or_messages: str | list[dict]) -> int:
        if isinstance(text_or_messages, str):
            return len(self.encode(text_or_messages))
        return len(self.encode_chat(text_or_messages))

    def generate_tokens(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                        logits_processor: LogitsProcessor | None = None, images: list | None = None,
                        **sampling) -> RequestHandle:
        """Token-level access: the engine's TokenSteps for prompt ids, stopping on the model's stop tokens.
        images: for vision models, one image per `<|image|>` token of the prompt. close() cancels."""
        return self.submit(prompt_ids, _params(params, sampling), logits_processor, images=images)

    def submit(self, prompt_ids: list[int], params: SamplingParams, logits_processor: LogitsProcessor | None = None,
               *, images: list | None = None, prompt_logprobs: int | None = None,
               leader: RequestHandle | None = None) -> RequestHandle:
        """Queue one sequence in the engine. leader: a handle for the same prompt (n > 1) whose prefill this
        one waits for and reuses. prompt_logprobs: k, the log-probabilities of the prompt's tokens (echo)."""
        prompt_ids, cross_state = self._prepare_images(list(prompt_ids), images)
        return self.engine.submit(prompt_ids, params, stop_ids=self.tokenizer.stop_ids,
                                  logits_processor=self._vocab_guard(logits_processor), cross_state=cross_state,
                                  prompt_logprobs=prompt_logprobs, leader=leader)

    # --- text --------------------------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, *, stream: bool = False,
                 add_bos: bool = True, logits_processor: LogitsProcessor | None = None, images: list | None = None,
                 **sampling) -> Completion | Iterator[Chunk]:
        """Complete a raw prompt (text or ids). Sampling options as keywords (max_tokens=, temperature=,
        top_p=, top_k=, min_p=, seed=, stop=, repetition_penalty=, frequency_penalty=, presence_penalty=,
        ignore_eos=, logprobs=) or as a SamplingParams. stream=True yields Chunks. Vision models: images
        (paths, bytes, PIL images or data URLs), one per `<|image|>` in the prompt."""
        params = _params(params, sampling)
        if isinstance(prompt, str) and images:  # each `<|image|>` in the text marks where an image goes
            first, *rest = prompt.split("<|image|>")
            ids = self.encode(first, add_bos=add_bos)
            for piece in rest:
                ids += [self.tokenizer.special_tokens["<|image|>"], *self.tokenizer.encode(piece)]
        else:
            ids = list(prompt) if not isinstance(prompt, str) else self.encode(prompt, add_bos=add_bos)
        chunks = self.stream_text(self.submit(ids, params, logits_processor, images=images), params)
        if stream:
            return self._checked(chunks)
        return _collect(chunks)

    def generate_many(self, prompts: list[str | list[int]], params: SamplingParams | None = None, *,
                      add_bos: bool = True, **sampling) -> list[Completion]:
        """Complete many raw prompts together (continuous batching): all are queued at once."""
        params = _params(params, sampling)
        handles = [self.submit(list(p) if not isinstance(p, str) else self.encode(p, add_bos=add_bos), params)
                   for p in prompts]
        return [_collect(self.stream_text(h, params)) for h in handles]

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice=None,
             stream: bool = False, params: SamplingParams | None = None,
             logits_processor: LogitsProcessor | None = None, **sampling) -> ChatCompletion | Iterator[Chunk]:
        """Reply to OpenAI-style messages. The result's `message` holds the text and parsed tool calls;
        streamed, the last Chunk carries it."""
        params = _params(params, sampling)
        from corral.tokenizer.chat import dialog_images

        images = dialog_images(messages)  # image content items, in prompt order
        if images and tools:
            raise ValueError("tool calling is not supported with images in the prompt (Llama 3.2 Vision); "
                             "send the images or the tools, not both")
        ids = self.encode_chat(messages, tools=tools, tool_choice=tool_choice)
        chunks = self.stream_text(self.submit(ids, params, logits_processor, images=images), params,
                                  parse_tools=tools, chat=True)
        if stream:
            return self._checked(chunks)
        return _collect(chunks)

    # --- internals ---------------------------------------------------------------------------------------

    def _checked(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Start the generator so that bad input raises at the call, not at the first next()."""
        first = next(chunks)

        def rest():
            try:
                yield first
                yield from chunks
            finally:
                chunks.close()  # closing the stream stops generation at once

        return rest()

    def _vocab_guard(self, processor: LogitsProcessor | None) -> LogitsProcessor | None:
        """Never sample ids the tokenizer cannot decode (padding rows of a larger embedding)."""
        limit = self.tokenizer.vocab_size
        if limit >= self.config.vocab_size:
            return processor

        def guard(generated, logits):
            logits = processor(generated, logits) if processor is not None else logits
            logits = logits.clone()
            logits[limit:] = float("-inf")
            return logits

        return guard

    def _token_logprob(self, step: TokenStep) -> TokenLogprob:
        def text(tid: int) -> str:
            return self.tokenizer.token_bytes(tid).decode("utf-8", errors="replace")

        raw = self.tokenizer.token_bytes(step.token_id)
        return TokenLogprob(token=raw.decode("utf-8", errors="replace"), token_id=step.token_id,
                            logprob=step.logprob, bytes=list(raw),
                            top_logprobs=[(text(t), lp) for t, lp in step.top_logprobs or []])

    @property
    def supports_images(self) -> bool:
        return getattr(self.config, "family", "llama") == "mllama"

    def _prepare_images(self, prompt_ids: list[int], images: list | None) -> tuple[list[int], object]:
        """Vision models: the prompt ids the model reads and this request's cross-attention state, computed
        once per request (None without images)."""
        if not self.supports_images:
            if images:
                raise ValueError(f"{self.name} is a text model and cannot take images; use a Llama 3.2 Vision model")
            return prompt_ids, None
        # Hugging Face tokenizers write <|image|> as 128256 (the model's first extra embedding row), which
        # the engine refuses as out of the vocabulary; the model reads Meta's 128011 as the same token.
        ids = [self.model.args.image_placeholder_id if t == self.model.image_token_id else t for t in prompt_ids]
        return ids, self.model.encode_images(list(images or []), ids)

    def stream_text(self, steps: RequestHandle, params: SamplingParams, *, parse_tools: list[dict] | None = None,
                    chat: bool = False) -> Iterator[Chunk]:
        """Engine steps -> text Chunks; the last chunk has finish_reason, the parsed message and the totals.
        Closing the iterator cancels the sequence."""
        prompt_ids = steps.seq.prompt
        want_logprobs = params.logprobs is not None
        decoder, stops = _stream_decoder(self.tokenizer), StopStringMatcher(params.stop)
        start = time.perf_counter()
        first_at = last_at = None
        text = pending = ""  # everything released so far / released but not yet yielded
        ids, logprobs = [], []  # since the last chunk
        all_ids, all_logprobs = [], []
        n_generated, finish, stop_token, hit = 0, "length", None, False
        try:
            for step in steps:
                last_at = time.perf_counter()
                first_at = first_at or last_at
                n_generated += 1
                if step.finish_reason == "stop":  # a stop token: not part of the text
                    finish, stop_token = "stop", step.token_id
                    break
                ids.append(step.token_id)
                if want_logprobs:
                    logprobs.append(self._token_logprob(step))
                delta, hit = stops.push(decoder.push(step.token_id))
                pending += delta
                if hit:
                    finish = "stop"
                    break
                if step.finish_reason is not None:
                    break
                if pending:
                    text += pending
                    all_ids += ids
                    all_logprobs += logprobs
                    yield Chunk(pending, ids, logprobs if want_logprobs else None, None)
                    pending, ids, logprobs = "", [], []
        finally:
            steps.close()
        if not hit:  # release what the decoder and the stop matcher still hold
            tail, hit = stops.push(decoder.flush())
            pending += tail if hit else tail + stops.flush()
            finish = "stop" if hit else finish
        text += pending
        all_ids += ids
        all_logprobs += logprobs
        ttft = (first_at - start) if first_at else 0.0
        decode_time = (last_at - first_at) if first_at else 0.0
        result = dict(text=text, token_ids=all_ids, prompt_tokens=len(prompt_ids),
                      completion_tokens=n_generated, finish_reason=finish,
                      logprobs=all_logprobs if want_logprobs else None,
                      prefill_tokens_per_s=(len(prompt_ids) - steps.cached_tokens) / ttft if ttft > 0 else 0.0,
                      decode_tokens_per_s=(n_generated - 1) / decode_time if decode_time > 0 else 0.0,
                      time_to_first_token_s=ttft, cached_prompt_tokens=steps.cached_tokens)
        message = None
        if chat:
            message = self.chat_format.parse_response(result["text"], tools=parse_tools)
            eom = self.tokenizer.special_tokens.get("<|eom_id|>")
            if stop_token is not None and stop_token == eom:
                message.stop_reason = "end_of_message"
            completion = ChatCompletion(**result, message=message)
        else:
            completion = Completion(**result)
        yield Chunk(pending, ids, logprobs if want_logprobs else None, finish, message=message,
                    completion=completion)


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise TypeError(f"pass sampling options either as params= or as keywords, not both ({', '.join(sampling)})")
    if params is None:
        try:
            params = SamplingParams(**sampling)
        except TypeError as e:
            raise TypeError(f"{e}; sampling options are: {', '.join(SamplingParams.__dataclass_fields__)}") from None
    params.validate()
    return params


def _collect(chunks: Iterator[Chunk]) -> Completion:
    for chunk in chunks:
        if chunk.finish_reason is not None:
            return chunk.completion
    raise RuntimeError("generation ended without a final chunk")
