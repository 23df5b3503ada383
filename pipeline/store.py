"""The episode store `out/<episode_type>/`: parallel, byte-deterministic generation (docs/method.md, "The store").

Every shard is a pure function of (seed, split, shard index): training shard i draws its episodes one after
another from `default_rng([seed, 0, i])`, and all validation episodes come from `default_rng([seed, 1, 0])`.
So the bytes never depend on the number of workers or on which worker wrote which shard.
Write order: shards (each atomically), then the dataset card, then manifest.json, whose presence marks the
store as complete. All of it goes to a fresh directory beside the store (`.<name>.tmp-PID`), which replaces
the store whole (rename) only once complete: an interrupted run, even with --overwrite, leaves the earlier
store as it was. One `generate` at a time per store: a file lock beside it (`.<name>.lock`) serializes them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from pipeline.card import store_card
from pipeline.errors import UserError
from pipeline.manifest import (GENERATOR_VERSION, MANIFEST_NAME, comparable_params, load_manifest,
                               manifest_sha256, write_manifest)
from pipeline.records import SHARD_RE, SPLIT_CODES, encode_record, make_record, sample_key, shard_name
from pipeline.samplers import get_sampler
from pipeline.shardio import is_temp_name, swap_dir_in, write_bytes_atomically, write_shard
from pipeline.verify import verify_store
from pipeline.vocab import build_vocab

__all__ = ["GenerateConfig", "generate", "verify_store", "load_manifest", "manifest_sha256", "shard_paths",
           "val_shards_sha256", "draw_validation", "GENERATOR_VERSION"]
CARD_NAME = "README.md"


@dataclass
class GenerateConfig:
    episode_type: str
    num_episodes: int = 10000
    num_val_episodes: int = 5
    seed: int = 0
    shard_size: int = 1000
    workers: int = 2          # never changes the output, only the speed
    out: str = "shards"
    overwrite: bool = False   # replace a store made with other parameters
    progress: bool = True
    store: str | None = None  # the exact store directory, instead of out/<episode_type> (train --store PATH)


def generate(cfg: GenerateConfig) -> Path:
    """Write the store `cfg.out/cfg.episode_type` (or find it already identical) and return its path."""
    _check_config(cfg)
    sampler = get_sampler(cfg.episode_type)
    store = Path(cfg.store) if cfg.store else Path(cfg.out) / cfg.episode_type
    head = _manifest_head(cfg, sampler)
    with _store_lock(store):
        if _is_identical_store(store, head, cfg.overwrite):
            _say(f"{store}: identical, nothing to do")
            return store
        _check_replaceable(store)
        fresh = _beside(store, "tmp")
        try:
            _remove_stale_builds(store)  # what a killed run (SIGKILL) left beside the store; we hold the lock
            fresh.mkdir(parents=True)
            shards = _write_shards(cfg, fresh)
            manifest = {**head, "counts": _counts(shards), "shards": shards}
            write_bytes_atomically(fresh / CARD_NAME, store_card(manifest).encode("utf-8"))
            write_manifest(fresh, manifest)  # last: only now is the new store complete
            _swap_in(fresh, store)
        except OSError as err:
            raise UserError(f"cannot write the store {store}: {_os_error_text(err, store)}") from err
        finally:
            shutil.rmtree(fresh, ignore_errors=True)  # an interrupted or failed run: the old store stays
    return store


def lock_path(store: Path) -> Path:
    """Beside the store, not in it: the store directory holds only what its manifest and card describe.
    Resolved first, so `.`, `x/..` or a symlink name the same lock as the plain path."""
    store = Path(store).resolve()
    return store.parent / f".{store.name}.lock"


@contextlib.contextmanager
def _store_lock(store: Path):
    """Hold the store's lock while checking and writing it. A second `generate` on the same store waits
    (it then finds the store identical, or rebuilds it) instead of deleting the first one's temp files.
    The OS drops the lock when its holder dies, so a killed run never blocks the next one. Where no lock
    file can be made (a read-only place), nobody can write the store either: it is checked without one."""
    lock = FileLock(lock_path(store))
    try:
        lock_path(store).parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _say(f"{store}: another generate is writing this store (lock {lock_path(store)}); waiting for it")
            lock.acquire()
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not (store / MANIFEST_NAME).is_file():
            raise UserError(f"cannot write the store {store}: {_os_error_text(err, store)}") from err
        yield  # an existing store in a read-only place: it can still be found identical
        return
    try:
        yield
    finally:
        lock.release()


def shard_paths(store: Path | str, split: str) -> list[Path]:
    """The shard files of `split` ("train", or "val"/"validation"), in index order, as the manifest lists them."""
    split = {"validation": "val"}.get(split, split)
    if split not in SPLIT_CODES:
        raise UserError(f"unknown split {split!r}; choose train or val")
    manifest = load_manifest(store)
    return [Path(store) / s["name"] for s in sorted(manifest["shards"], key=lambda s: s["name"])
            if s["split"] == split]


def val_shards_sha256(manifest: dict) -> dict[str, str]:
    """{validation shard name: sha256}, as the manifest lists them: names the validation data exactly, and
    stays the same when only the training episodes change (checkpoints record it, eval checks it)."""
    return {s["name"]: s["sha256"] for s in sorted(manifest["shards"], key=lambda s: s["name"]) if s["split"] == "val"}


def _check_config(cfg: GenerateConfig) -> None:
    for name in ("num_episodes", "num_val_episodes", "shard_size", "workers"):
        value = getattr(cfg, name)
        if type(value) is not int or value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value!r}")
    if type(cfg.seed) is not int or cfg.seed < 0:  # numpy seeds must be non-negative
        raise UserError(f"--seed must be a non-negative integer, got {cfg.seed!r}")


def _manifest_head(cfg: GenerateConfig, sampler) -> dict:
    """Everything in the manifest that is known before generating: the identity of the store."""
    params = {"episode_type": cfg.episode_type, "seed": cfg.seed, "num_episodes": cfg.num_episodes,
              "num_val_episodes": cfg.num_val_episodes, "shard_size": cfg.shard_size,
              "sampler": dict(sampler.params)}
    return {"episode_type": cfg.episode_type, "generator_version": GENERATOR_VERSION,
            "params": json.loads(json.dumps(params)),  # as a reloaded manifest would hold them (lists, not tuples)
            "input_vocab": build_vocab(sampler.input_symbols), "output_vocab": build_vocab(sampler.output_symbols)}


def _is_identical_store(store: Path, head: dict, overwrite: bool) -> bool:
    """True if `store` is complete, made with the same parameters and intact. Refuses to replace a store
    made with other parameters unless `overwrite`. A store without manifest is an unfinished run: replaced."""
    if not (store / MANIFEST_NAME).exists():
        return False
    try:
        old = comparable_params(load_manifest(store))
    except UserError as err:
        if overwrite:
            return False
        raise UserError(f"{err}; pass --overwrite to regenerate the store") from None
    new = comparable_params(head)
    if old != new:
        if overwrite:
            return False
        raise UserError(f"{store} holds a store made with other parameters ({_difference(old, new)}); "
                        "pass --overwrite to replace it")
    problems = verify_store(store)
    if problems:
        _say(f"{store}: same parameters but damaged ({problems[0]}); regenerating")
    return not problems


def _difference(old: dict, new: dict) -> str:
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in (d or {}).items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out
    a, b = flat(old), flat(new)
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _is_store_file(name: str) -> bool:
    return bool(SHARD_RE.match(name)) or name in (CARD_NAME, MANIFEST_NAME) or is_temp_name(name)


def _check_replaceable(store: Path) -> None:
    """The new store replaces the directory whole: refuse one that holds anything a store does not."""
    if store.exists() and not store.is_dir():
        raise UserError(f"cannot write the store {store}: it exists and is not a directory")
    foreign = sorted(p.name for p in store.iterdir() if not _is_store_file(p.name)) if store.is_dir() else []
    if foreign:
        raise UserError(f"{store} holds files that are not part of an episode store "
                        f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                        "move them or choose another store directory")


def _beside(store: Path, kind: str) -> Path:
    """A hidden sibling of the store, on the same file system, so that a rename can swap it in."""
    store = store.resolve()  # `.` has no name to put beside; a symlink's target is the store
    return store.with_name(f".{store.name}.{kind}-{os.getpid()}")


def _remove_stale_builds(store: Path) -> None:
    """Unfinished builds (`.<name>.tmp-PID`) of killed runs go; a store set aside by a run killed between
    its two renames (`.<name>.old-PID`) is put back if nothing took its place, else removed."""
    store = store.resolve()
    for path in sorted(store.parent.glob(f".{store.name}.tmp-*")):
        shutil.rmtree(path, ignore_errors=True)
    for path in sorted(store.parent.glob(f".{store.name}.old-*")):
        if not store.exists() and (path / MANIFEST_NAME).is_file():
            os.replace(path, store)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(fresh: Path, store: Path) -> None:
    """Put the complete `fresh` directory in the place of `store`: the earlier store goes whole, and if the
    swap fails or is interrupted, it stays whole."""
    old = _beside(store, "old")
    swap_dir_in(fresh, store.resolve(), old)
    shutil.rmtree(old, ignore_errors=True)


def _write_shards(cfg: GenerateConfig, store: Path) -> list[dict]:
    """All shards, validation first (its identifiers are the training tabu); returns manifest entries."""
    total = cfg.num_episodes + cfg.num_val_episodes
    with tqdm(total=total, unit="ep", unit_scale=True, desc=cfg.episode_type, disable=not cfg.progress,
              file=sys.stderr) as bar:
        val_entries, tabu = _write_val_shards(cfg, store)
        bar.update(cfg.num_val_episodes)
        job = TrainShardJob(cfg.episode_type, cfg.seed, tabu, str(store))
        train_entries = []
        for entry in _run_jobs(job, _train_tasks(cfg), cfg.workers):
            train_entries.append(entry)
            bar.update(entry["count"])
    return sorted(train_entries, key=lambda e: e["name"]) + val_entries


def _write_val_shards(cfg: GenerateConfig, store: Path) -> tuple[list[dict], frozenset[str]]:
    sampler = get_sampler(cfg.episode_type)
    rng = np.random.default_rng([cfg.seed, SPLIT_CODES["val"], 0])
    episodes = sampler.sample_validation(rng, cfg.num_val_episodes)
    entries = []
    for shard, start in enumerate(range(0, len(episodes), cfg.shard_size)):
        chunk = episodes[start:start + cfg.shard_size]
        samples = (_sample(cfg.episode_type, "val", start + j, ep) for j, ep in enumerate(chunk))
        entries.append(_entry(store, "val", shard, samples))
    return entries, frozenset(ep["identifier"] for ep in episodes)


def draw_validation(episode_type: str, val_records: list[dict], n: int, seed: int) -> list[dict]:
    """`n` validation episodes more than a store holds, as records: drawn from `default_rng(seed)` by the
    store's sampler with its validation rule, each on the pairing of one of the store's validation episodes
    (`val_records`), picked at random. Their identifiers are therefore the store's validation identifiers,
    the ones its training episodes were generated to avoid (the tabu of `_write_shards`): held out from
    training, as the store's own validation episodes are, but with fresh support sets and queries."""
    if type(n) is not int or n < 1 or type(seed) is not int or seed < 0:
        raise UserError(f"the number of validation episodes must be positive and the seed non-negative, got "
                        f"{n!r} and {seed!r}")
    sampler = get_sampler(episode_type)
    pairings = {}
    for record in val_records:
        words, actions = [m["src"] for m in record["mapping"]], [m["tgt"] for m in record["mapping"]]
        if sampler._identifier(words, actions) != record["identifier"]:
            raise UserError(f"validation episode {record.get('index')} names its pairing {record['identifier']!r} "
                            "but its mapping makes another: the store was made by another generator")
        pairings[record["identifier"]] = (words, actions)
    held_out = [pairings[identifier] for identifier in sorted(pairings)]
    episodes = sampler.sample_more_validation(np.random.default_rng(seed), held_out, n)
    return [json.loads(encode_record(make_record(episode_type, "val", i, ep))) for i, ep in enumerate(episodes)]


def _train_tasks(cfg: GenerateConfig) -> list[tuple[int, int, int]]:
    """(shard index, first episode index, episode count) of every training shard; the last may be short."""
    starts = range(0, cfg.num_episodes, cfg.shard_size)
    return [(i, start, min(cfg.shard_size, cfg.num_episodes - start)) for i, start in enumerate(starts)]


def _sample(episode_type: str, split: str, index: int, episode: dict) -> tuple[str, bytes]:
    return sample_key(split, index), encode_record(make_record(episode_type, split, index, episode))


def _entry(store: Path, split: str, shard: int, samples) -> dict:
    name = shard_name(split, shard)
    count, sha256 = write_shard(store / name, samples)
    return {"name": name, "split": split, "count": count, "sha256": sha256}


@dataclass(frozen=True)
class TrainShardJob:
    """Writes one training shard; small and picklable, so the pool ships it to workers (each of which
    builds its sampler once: get_sampler is cached per process)."""
    episode_type: str
    seed: int
    tabu: frozenset[str]
    store: str

    def __call__(self, task: tuple[int, int, int]) -> dict:
        shard, start, count = task
        sampler = get_sampler(self.episode_type)
        rng = np.random.default_rng([self.seed, SPLIT_CODES["train"], shard])
        samples = (_sample(self.episode_type, "train", start + j, sampler.sample_train(rng, self.tabu))
                   for j in range(count))
        return _entry(Path(self.store), "train", shard, samples)


def _run_jobs(job: TrainShardJob, tasks: list, workers: int):
    """Yield job(task) for every task, in completion order; one worker runs in this process."""
    if workers == 1 or len(tasks) == 1:
        yield from map(job, tasks)
        return
    # Workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker that dies of it mid-queue can
    # leave Pool.terminate() waiting on the queue's lock forever. The main process alone stops the pool:
    # __exit__ terminates the workers on any error, KeyboardInterrupt included.
    with multiprocessing.Pool(min(workers, len(tasks)), initializer=_ignore_sigint) as pool:
        yield from pool.imap_unordered(job, tasks)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _counts(entries: list[dict]) -> dict:
    return {split: sum(e["count"] for e in entries if e["split"] == split) for split in SPLIT_CODES}


def _os_error_text(err: OSError, store: Path) -> str:
    if not err.strerror:
        return str(err)
    return err.strerror if err.filename in (None, str(store)) else f"{err.strerror} ({err.filename})"


def _say(message: str) -> None:
    print(message, file=sys.stderr)
