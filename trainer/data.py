"""Streaming episodes from the store into padded batches.

The stream is a webdataset pipeline over the store's train shards: split by rank, then by DataLoader
worker, shuffled with seeds that depend only on (seed, epoch, rank, worker). Workers decode, tokenize and
collate B episodes; the main process only moves tensors to the device. So for a fixed number of ranks
and workers the order of batches is a pure function of the seed, which is what makes resume exact.
"""
from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from pipeline.errors import UserError
from trainer.batch import EpisodeBatch, make_batch


@dataclass(frozen=True)
class Tokenizer:
    input_vocab: tuple[str, ...]
    output_vocab: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "_in", {t: i for i, t in enumerate(self.input_vocab)})
        object.__setattr__(self, "_out", {t: i for i, t in enumerate(self.output_vocab)})

    def encode_input(self, text: str) -> list[int]:
        return self._encode(text, self._in, "input")

    def encode_output(self, text: str) -> list[int]:
        return self._encode(text, self._out, "output")

    def encode_pairs(self, pairs) -> list[tuple[list[int], list[int]]]:
        """(input ids, output ids) of each (input, output) text pair: a support set as the model takes it."""
        return [(self.encode_input(i), self.encode_output(o)) for i, o in pairs]

    @staticmethod
    def _encode(text: str, table: dict[str, int], side: str) -> list[int]:
        try:
            return [table[t] for t in text.split()]
        except KeyError as err:
            raise UserError(f"token {err.args[0]!r} in {text!r} is not in the model's {side} vocabulary") from None

    def decode_output(self, ids) -> str:
        return " ".join(self.output_vocab[i] for i in ids)


def episode_pairs(items: list[dict], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    return tokenizer.encode_pairs((it["input"], it["output"]) for it in items)


def collate_episodes(records: list[dict], tokenizer: Tokenizer, support_as_queries: bool) -> EpisodeBatch:
    """Records -> one padded batch. With `support_as_queries` the support items are also queries (the
    original's support loss, and how validation measures retrieval)."""
    support = [episode_pairs(r["support"], tokenizer) for r in records]
    query = [episode_pairs(r["query"], tokenizer) for r in records]
    if support_as_queries:
        query = [q + s for q, s in zip(query, support)]
    return make_batch(support, query)


def _decode_sample(sample: dict) -> dict:
    record = json.loads(sample["json"])
    record["__key__"] = sample["__key__"]
    return record


def _seeded_shuffle(what: str, seed: int, epoch: int, bufsize: int, by_node: bool = True):
    """A shuffle whose RNG is fixed by (seed, epoch, rank, worker), never by time or pid. Without by_node the
    rank counts as 0: a process of a stack under torchrun reads its models' streams as a lone process would."""
    def stage(items):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rank = rank if by_node else 0
        rng = random.Random(f"{what}-{seed}-{epoch}-{rank}-{worker}")
        buffer: list = []
        for item in items:
            if len(buffer) < bufsize:
                buffer.append(item)
                continue
            slot = rng.randrange(bufsize)
            yield buffer[slot]
            buffer[slot] = item
        rng.shuffle(buffer)
        yield from buffer
    return stage


def _collate_stage(batch_size: int, tokenizer: Tokenizer, support_as_queries: bool):
    def stage(records):
        batch: list[dict] = []
        for record in records:
            batch.append(record)
            if len(batch) == batch_size:
                yield [r["__key__"] for r in batch], collate_episodes(batch, tokenizer, support_as_queries)
                batch = []
        if batch:
            yield [r["__key__"] for r in batch], collate_episodes(batch, tokenizer, support_as_queries)
    return stage


@dataclass(frozen=True)
class StreamConfig:
    shards: tuple[str, ...]
    batch_size: int               # episodes per batch on this rank
    tokenizer: Tokenizer
    support_as_queries: bool = True
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 1000
    workers: int = 0
    by_node: bool = True          # split the shards over torchrun's processes (off for a stack's models)


def record_stages(cfg: StreamConfig) -> list:
    """The pipeline up to shuffled records; each shard is read by exactly one (rank, worker)."""
    return [
        wds.SimpleShardList(list(cfg.shards)),
        *([wds.split_by_node] if cfg.by_node else []),
        wds.split_by_worker,
        _seeded_shuffle("shards", cfg.seed, cfg.epoch, len(cfg.shards), cfg.by_node),
        wds.tarfile_to_samples(),
        wds.map(_decode_sample),
        _seeded_shuffle("episodes", cfg.seed, cfg.epoch, cfg.shuffle_buffer, cfg.by_node),
    ]


def episode_stream(cfg: StreamConfig) -> wds.DataPipeline:
    """Yields (keys, EpisodeBatch)."""
    return wds.DataPipeline(*record_stages(cfg), _collate_stage(cfg.batch_size, cfg.tokenizer, cfg.support_as_queries))


class StackStream(torch.utils.data.IterableDataset):
    """The streams of a stack's M models, read side by side: each step yields model m's next batch_size
    records for every m, collated into one batch of M * batch_size episodes (model-major). Model m's
    records come in the order that its own `episode_stream` gives a single run with the same seed."""

    def __init__(self, streams: list[StreamConfig]):
        self.streams = streams

    def __iter__(self):
        first = self.streams[0]
        sources = [iter(wds.DataPipeline(*record_stages(s))) for s in self.streams]
        while True:
            groups = [list(itertools.islice(source, s.batch_size)) for source, s in zip(sources, self.streams)]
            count = min(len(g) for g in groups)
            if count == 0:
                return
            groups = [g[:count] for g in groups]
            yield ([[r["__key__"] for r in g] for g in groups],
                   collate_episodes([r for g in groups for r in g], first.tokenizer, first.support_as_queries))


def make_stack_loader(streams: list[StreamConfig], workers: int, pin_memory: bool = False):
    """One loader for all the models of a stack (`workers` is 0 or 1: one process reads every stream)."""
    return torch.utils.data.DataLoader(
        StackStream(streams), batch_size=None, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(streams[0].seed),
        worker_init_fn=_leave_stop_signals_to_the_main_process if workers else None)


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C (and a SIGTERM to the group) reaches every process of the terminal's process group. The main
    process finishes its step and saves (trainer.train), but a worker killed by it would fail the loader
    under that step. So each worker leaves the group; the main process still ends it (DataLoader shutdown,
    or SIGTERM at exit), and a worker whose main process died exits on its own (DataLoader's watchdog)."""
    os.setpgid(0, 0)


def make_loader(cfg: StreamConfig, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    # Its own generator, so that starting workers does not consume the global RNG that dropout uses:
    # otherwise a resumed run would draw different dropout masks.
    return torch.utils.data.DataLoader(
        episode_stream(cfg), batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
        prefetch_factor=4 if cfg.workers else None, generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_leave_stop_signals_to_the_main_process if cfg.workers else None)


def read_records(shards: list[Path]) -> list[dict]:
    """All records of some shards, in store order (used for the small validation split)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(s) for s in shards]), wds.tarfile_to_samples(),
                                wds.map(_decode_sample))
    return sorted(pipeline, key=lambda r: r["__key__"])
