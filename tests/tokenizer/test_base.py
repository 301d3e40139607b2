"""StreamDecoder: UTF-8-safe incremental decoding over any tokenizer's token_bytes."""

from corral.tokenizer.base import AssistantMessage, StreamDecoder, ToolCall
from tests.tokenizer.corpus import corpus


def test_stream_equals_full_decode(llama3_tokenizer):
    tok = llama3_tokenizer
    split_chars = 0
    for s in corpus(1000, seed=9):
        ids = tok.encode(s)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids) == s
        assert all("\ufffd" not in p for p in pieces if "\ufffd" not in s)  # never half a character
        split_chars += sum(1 for p in pieces if p == "")  # tokens that ended inside a character
    assert split_chars > 100  # the corpus really splits characters across tokens


def test_split_emoji_and_special_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.encode("🦙")
    assert len(ids) > 1  # the llama emoji is several byte tokens
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]
    assert stream.push(128009) == "<|eot_id|>"
    # an unfinished character is held back, then flushed as U+FFFD (as a full decode would show it)
    stream.push(ids[0])
    assert stream.flush() == "\ufffd" == tok.decode(ids[:1])
    assert stream.push(tok.encode("ok")[0]) == "ok"  # usable again after flush


def test_assistant_message_to_openai():
    msg = AssistantMessage(content="", tool_calls=[ToolCall(name="f", arguments={"a": 1}, id="call_x")])
    assert msg.to_openai() == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
