"""Fast greedy decoding of many queries that share one support set (the SCAN test splits).

The queries are sorted by input length and cut into chunks; each chunk is one pseudo-episode (the support
set plus up to `chunk_size` queries) decoded in a single `greedy_decode` call. Sorting keeps the padding of a
chunk small and, since output length grows with input length, lets a chunk's rows reach EOS at about the
same step, so the decoder's running batch shrinks quickly and the chunk stops early. The predictions are put
back in the original order of the queries.
"""
from __future__ import annotations

from collections.abc import Callable
import torch

from trainer.batch import EpisodeBatch, make_batch
from trainer.model import MetaSeq2Seq, strip_decoded

Ids = list[int]
# Measured on a 2-core CPU with E=200, 2 layers (benchmarks/eval.py): 512-2048 are within noise of each
# other; smaller chunks pay Python overhead per decoder step, larger ones gain nothing more.
DEFAULT_CHUNK_SIZE = 1024


def bucket_order(queries: list[Ids]) -> list[int]:
    """Indices of `queries` sorted by length (stable, so equal lengths keep their order)."""
    return sorted(range(len(queries)), key=lambda i: len(queries[i]))


def decode_shared_support(model: MetaSeq2Seq, support: list[tuple[Ids, Ids]], queries: list[Ids],
                          max_length: int, device: torch.device, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          bucket: bool = True, on_chunk: Callable[[int], object] | None = None) -> list[Ids]:
    """Greedy outputs (ids without EOS) of every query against the one support set, in query order.
    `on_chunk(n)` is called after each chunk of n queries (a progress bar)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    order = bucket_order(queries) if bucket else list(range(len(queries)))
    predictions: list[Ids | None] = [None] * len(queries)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), chunk_size):
                chunk = order[start:start + chunk_size]
                for index, prediction in zip(chunk, _decode_chunk(model, support, [queries[i] for i in chunk],
                                                                  max_length, device)):
                    predictions[index] = prediction
                if on_chunk is not None:
                    on_chunk(len(chunk))
    finally:
        model.train(was_training)
    return predictions


def _decode_chunk(model: MetaSeq2Seq, support: list[tuple[Ids, Ids]], queries: list[Ids], max_length: int,
                  device: torch.device) -> list[Ids]:
    batch = shared_support_batch(support, queries).to(device)
    return strip_decoded(model.greedy_decode(batch, max_length))[0]


def shared_support_batch(support: list[tuple[Ids, Ids]], queries: list[Ids]) -> EpisodeBatch:
    """One pseudo-episode: the support set and the queries, whose targets the decoder does not see."""
    return make_batch([support], [[(q, []) for q in queries]])
