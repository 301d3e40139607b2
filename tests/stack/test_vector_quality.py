"""Retrieval quality on the labelled corpus that ships in tests/stack/data/rag (recall@k per search mode).

The floors are below what the pipeline measures today (python -m corral.stack.rag.quality), so this
fails when chunking, embedding, ranking or fusion regress, not when one query moves.
"""

from __future__ import annotations

from corral.stack.rag.quality import DEFAULT_CORPUS, evaluate


def test_recall_floors():
    assert DEFAULT_CORPUS.is_file()
    r = evaluate(ks=(1, 5))
    assert r["vector"][5] >= 0.9 and r["keyword"][5] >= 0.8 and r["hybrid"][5] >= 0.9, r
    assert r["vector"][1] >= 0.75 and r["hybrid"][1] >= 0.7, r
    assert r["hybrid"][5] >= r["keyword"][5], r  # fusion adds what the words miss
