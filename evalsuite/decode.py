"""Fast greedy decoding of many queries that share one support set (the SCAN test splits).

The queries are sorted by input length and cut into chunks; each chunk is one pseudo-episode (the support
set plus up to `chunk_size` queries) decoded in a single `greedy_decode` call. Sorting keeps the padding of a
chunk small and, since output length grows with input length, lets a chunk's rows reach EOS at about the
same step, so the decoder's running batch shrinks quickly and the chunk stops early. The predictions are put
back in the original order of the queries. Where the decoder attention covers padded query steps (the
original's), every chunk attends over as many steps as one batch of all the queries would (padding_companion).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.batch import EpisodeBatch, make_batch
from trainer.data import Tokenizer
from trainer.model import MetaSeq2Seq, evaluating, strip_decoded

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
    companion = padding_companion(model, queries)
    with evaluating(model), torch.inference_mode():
        for start in range(0, len(order), chunk_size):
            chunk = order[start:start + chunk_size]
            decoded = _decode_chunk(model, support, [queries[i] for i in chunk], max_length, device, companion)
            for index, prediction in zip(chunk, decoded):
                predictions[index] = prediction
            if on_chunk is not None:
                on_chunk(len(chunk))
    return predictions


def padding_companion(model: MetaSeq2Seq, queries: list[Ids]) -> Ids | None:
    """The longest query, decoded beside every chunk of shorter ones and then dropped, where the decoder attention
    covers the padded query steps (mask_query_padding off, the original's): so each query attends over as many
    steps as in one batch of all the queries, as the original's test.py decodes a split. None where it
    attends over each query's own steps only (or has no attention), and chunks do not change the outputs."""
    if model.cfg.mask_query_padding or model.cfg.disable_attention or not queries:
        return None
    return max(queries, key=len)


def _decode_chunk(model: MetaSeq2Seq, support: list[tuple[Ids, Ids]], queries: list[Ids], max_length: int,
                  device: torch.device, companion: Ids | None = None) -> list[Ids]:
    padded = companion is not None and len(companion) > max(len(q) for q in queries)
    batch = shared_support_batch(support, queries + [companion] if padded else queries).to(device)
    decoded = strip_decoded(model.greedy_decode(batch, max_length))[0]
    return decoded[:len(queries)]


def shared_support_batch(support: list[tuple[Ids, Ids]], queries: list[Ids]) -> EpisodeBatch:
    """One pseudo-episode: the support set and the queries, whose targets the decoder does not see."""
    return make_batch([support], [[(q, []) for q in queries]])


@dataclass
class QueryAttention:
    """Where the model looked while decoding one query (the heatmaps of --plot, the text of predict --attention)."""
    outputs: list[str]             # the output tokens it wrote, EOS included when emitted
    memory: torch.Tensor | None    # (Tqi, ns): query input token (then EOS) x support item; None: no memory
    decoder: torch.Tensor | None   # (len(outputs), Tqi): output token x query input token (then EOS)


def query_attention(model: MetaSeq2Seq, tokenizer: Tokenizer, support: list[tuple[str, str]], query: str,
                    max_length: int, device: torch.device, episode_queries: list[str] = ()) -> QueryAttention:
    """Greedy-decode one query against its support set, keeping both attentions (float32, on the CPU), as it
    was decoded among `episode_queries`: where the decoder attention covers padded query steps, the longest of
    them is decoded beside it and dropped, so its output and attention are the ones its episode scored."""
    ids = [tokenizer.encode_input(query)]
    companion = padding_companion(model, [tokenizer.encode_input(q) for q in episode_queries])
    if companion is not None and len(companion) > len(ids[0]):
        ids.append(companion)
    batch = make_batch([tokenizer.encode_pairs(support)], [[(q, []) for q in ids]]).to(device)
    with evaluating(model), torch.inference_mode():
        result = model.greedy_decode(batch, max_length, return_attention=True)
    length, width = int(result.lengths[0, 0]), len(ids[0]) + 1                  # the query's tokens and EOS
    outputs = [tokenizer.output_vocab[t] for t in result.tokens[0, 0, :length].tolist()]
    memory = None if result.memory_attention is None else result.memory_attention[0, 0, :width].float().cpu()
    decoder = None if result.decoder_attention is None else \
        result.decoder_attention[0, 0, :length, :width].float().cpu()
    return QueryAttention(outputs, memory, decoder)
