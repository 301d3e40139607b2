"""The KV-cache pool's bookkeeping: which blocks are free, whose they are, and which hold a known prefix.

The tensors live in `corral.models.llama.PagedKVCache`; this file only hands out block numbers.
  - A sequence's keys/values live in a block table: block i holds positions i*B .. i*B+B-1.
  - A full block is keyed by hash(previous block's key, its B tokens), so a key names the whole prefix
    up to the block's end. A new sequence whose prompt starts with the same tokens takes those blocks
    (ref count + 1) instead of computing them again: follow-up chat turns, agent steps, shared system
    prompts.
  - A block nobody uses any more keeps its contents and its key, in LRU order, until a new block is
    needed and no never-used block is left: then the least recently used one is evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

BLOCK_SIZE = 16  # tokens per block (vLLM's default)


def block_key(parent: bytes | None, tokens: list[int]) -> bytes:
    """The key of a full block: its tokens and, through the parent key, everything before them."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


@dataclass
class PoolStats:
    n_blocks: int
    free: int  # never used or evicted
    cached: int  # unused, holding a known prefix (evictable)
    used: int  # referenced by at least one sequence
    hit_tokens: int  # prompt tokens served from the prefix cache since start
    queried_tokens: int  # prompt tokens looked up since start


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int = BLOCK_SIZE):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # pop() takes the lowest first
        self.refs = [0] * n_blocks
        self.key_of: list[bytes | None] = [None] * n_blocks
        self.block_of: dict[bytes, int] = {}  # prefix key -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # unused blocks that hold a key, oldest first
        self.hit_tokens = self.queried_tokens = 0

    def available(self) -> int:
        """Blocks that can be handed out now (free, or evictable)."""
        return len(self.free) + len(self.lru)

    def stats(self) -> PoolStats:
        return PoolStats(self.n_blocks, len(self.free), len(self.lru),
                         self.n_blocks - len(self.free) - len(self.lru), self.hit_tokens, self.queried_tokens)

    def allocate(self) -> int:
        """A fresh block (ref 1); evicts the least recently used cached prefix when nothing is free."""
        if self.free:
            block = self.free.pop()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            del self.block_of[self.key_of[block]]
            self.key_of[block] = None
        else:
            raise MemoryError("the KV-cache pool is full")
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks with a key stay cached (most recent last)."""
        for block in reversed(blocks):  # a sequence's last blocks are evicted before its first ones
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.key_of[block] is not None:
                    self.lru[block] = None
                else:
                    self.free.append(block)

    def lookup(self, tokens: list[int], limit: int) -> tuple[list[int], bytes | None]:
        """The cached blocks of the longest prefix of tokens[:limit] made of full blocks, referenced for the
        caller, and the key of the last one."""
        blocks, key = [], None
        for i in range(limit // self.block_size):
            next_key = block_key(key, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.block_of.get(next_key)
            if block is None:
                break
            if self.refs[block] == 0:
                self.lru.pop(block, None)
            self.refs[block] += 1
            blocks.append(block)
            key = next_key
        self.queried_tokens += limit
        self.hit_tokens += len(blocks) * self.block_size
        return blocks, key

    def register(self, block: int, parent: bytes | None, tokens: list[int]) -> bytes:
        """Key a block that just became full. If the same prefix is already cached in another block, this
        block keeps no key (one block per prefix); the caller keeps using its own copy."""
        key = block_key(parent, tokens)
        if key not in self.block_of and self.key_of[block] is None:
            self.block_of[key] = block
            self.key_of[block] = key
        return key
