"""Tokenizers (Meta tiktoken, Hugging Face tokenizer.json, GGUF vocabularies), chat formats and tool calls."""

from corral.tokenizer.base import AssistantMessage, ChatFormat, StreamDecoder, Tokenizer, ToolCall
from corral.tokenizer.chat import JinjaChatFormat, Llama3ChatFormat, chat_format_for, dialog_images
from corral.tokenizer.gguf import read_gguf_metadata, tokenizer_from_gguf
from corral.tokenizer.hf import HFTokenizer
from corral.tokenizer.llama3 import Llama3Tokenizer
from corral.tokenizer.tool_calls import extract_tool_calls
from corral.tokenizer.tool_stream import ToolCallStreamer, ToolStreamEvent

__all__ = ["AssistantMessage", "ChatFormat", "HFTokenizer", "JinjaChatFormat", "Llama3ChatFormat", "Llama3Tokenizer",
           "StreamDecoder", "Tokenizer", "ToolCall", "ToolCallStreamer", "ToolStreamEvent", "chat_format_for",
           "dialog_images", "extract_tool_calls", "read_gguf_metadata", "tokenizer_from_gguf"]
