"""Training data: assistant-only masks in both chat formats, packing, deterministic batches, clear errors."""

import json

import pytest

from corral.customize.data import (Batches, DatasetError, Sample, collate, load_samples, pack_text, read_records,
                                   split_samples, tokenize_chat)
from corral.tokenizer.chat import JinjaChatFormat, Llama3ChatFormat
from corral.tokenizer.hf import HFTokenizer
from corral.tokenizer.llama3 import Llama3Tokenizer
from tests.customize.tiny_chat import write_tiny_chat_model
from tests.customize.tiny_chat import one_thread  # noqa: F401 (an autouse fixture: one torch thread)
from tests.test_bos_formats import write_tokenizer_model

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say red"},
                {"role": "assistant", "content": "red red"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "red"}]


@pytest.fixture(scope="module")
def llama3_format(tmp_path_factory, llama3_tokenizer_model):
    path = write_tokenizer_model(llama3_tokenizer_model, tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Llama3ChatFormat(Llama3Tokenizer(path))


@pytest.fixture(scope="module")
def jinja_format(tmp_path_factory, llama3_tokenizer_model):
    directory = write_tiny_chat_model(tmp_path_factory.mktemp("chat") / "m", llama3_tokenizer_model)
    tok = HFTokenizer.from_dir(directory)
    return JinjaChatFormat(tok, tok.chat_template)


def trained_text(sample: Sample, tokenizer) -> list[str]:
    """The trained tokens, decoded run by run."""
    runs, current = [], []
    for tok, on in zip(sample.tokens, sample.trained):
        if on:
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("fmt", ["llama3_format", "jinja_format"])
def test_only_assistant_turns_are_trained(fmt, request):
    chat_format = request.getfixturevalue(fmt)
    sample = tokenize_chat(CONVERSATION, chat_format)
    assert sample.tokens == chat_format.encode_dialog(CONVERSATION, add_generation_prompt=False)
    assert trained_text(sample, chat_format.tokenizer) == ["red red<|eot_id|>", "red<|eot_id|>"]


def test_text_is_packed_into_windows():
    docs = [[1, 2, 3, 4, 5], [6, 7, 8]]
    samples = pack_text(docs, seq_len=3)
    assert [s.tokens for s in samples] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert all(s.trained == [False, True, True, True] for s in samples)
    inputs, labels = collate([samples[0], Sample([9, 10], [False, True])])
    assert inputs.tolist() == [[1, 2, 3], [9, 0, 0]]
    assert labels.tolist() == [[2, 3, 4], [10, -100, -100]]


def test_batches_are_a_function_of_the_step():
    samples = list(range(10))
    a = Batches(samples, batch_size=2, accum=2, seed=5)
    first = [a.micro_batch(s, m) for s in range(6) for m in range(2)]
    b = Batches(samples, batch_size=2, accum=2, seed=5)
    assert [b.micro_batch(s, m) for s in range(3, 6) for m in range(2)] == first[6:]  # resumed at step 3
    # an epoch visits every sample once
    assert sorted(x for batch in first[:5] for x in batch) == samples
    # two ranks of batch 1 take the two halves of one rank's batch 2
    one = Batches(samples, batch_size=2, accum=1, seed=5)
    ranks = [Batches(samples, batch_size=1, accum=1, seed=5, rank=r, world=2) for r in range(2)]
    for step in range(7):
        assert one.micro_batch(step, 0) == ranks[0].micro_batch(step, 0) + ranks[1].micro_batch(step, 0)


def test_split_is_disjoint():
    samples = [Sample([i, i + 1], [False, True]) for i in range(20)]
    train, held = split_samples(samples, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert not {id(s) for s in train} & {id(s) for s in held}


def test_text_files_and_directories(tmp_path, llama3_format):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.md").write_text("more text")
    records = read_records(tmp_path)
    assert len(records) == 2
    samples = load_samples(tmp_path, llama3_format.tokenizer, seq_len=16)
    assert all(len(s) <= 17 for s in samples)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:3: not valid JSON"),
    ("[1, 2]", r"bad.jsonl:3: expected a JSON object"),
    ('{"prompt": "x"}', r"bad.jsonl:3: expected \{\"messages\""),
    ('{"messages": []}', r"bad.jsonl:3: messages must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad.jsonl:3: messages\[0\] needs a role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"bad.jsonl:3: no assistant message"),
])
def test_malformed_lines_name_their_line(tmp_path, line, message):
    good = json.dumps({"messages": CONVERSATION})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DatasetError, match=message):
        read_records(path)


def test_missing_and_empty_data(tmp_path, llama3_format):
    with pytest.raises(DatasetError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DatasetError, match="empty"):
        load_samples(tmp_path / "empty.txt", llama3_format.tokenizer)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(DatasetError, match="chat.jsonl:1: chat data needs a model with a chat format"):
        load_samples(tmp_path / "chat.jsonl", llama3_format.tokenizer, None)
