"""`cli.py eval`: score a checkpoint on its validation episodes and its SCAN test split, and write a report.

Everything that can fail on bad input (checkpoint, split, store, SCAN file, tokens) is checked before any
decoding starts, so an error costs nothing and leaves no half-written output behind.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evalsuite import report
from evalsuite.decode import DEFAULT_CHUNK_SIZE, decode_shared_support
from evalsuite.splits import (SCAN_FILE, SCAN_TEST_SPLITS, VALIDATION, drawn_validation, paper_number, parse_support,
                              read_scan_file, scan_test_pairs, splits_for)
from pipeline.errors import UserError
from pipeline.shardio import file_sha256
from pipeline.store import draw_validation, load_manifest, manifest_sha256, shard_paths, val_shards_sha256
from trainer.data import Tokenizer, read_records
from trainer.device import resolve_device
from trainer.evaluate import decode_records, episode_queries
from trainer.metrics import QueryResult, score_episodes, score_queries
from trainer.model import MetaSeq2Seq, ModelConfig
from evalsuite.original_checkpoint import VALIDATION_RECORDS, load_any_checkpoint
from trainer.precision import use_exact_fp32


@dataclass
class EvalConfig:
    checkpoint: str
    split: str | None = None        # default: the checkpoint's own splits (validation + its SCAN split)
    out: str | None = None          # default: <checkpoint dir>/<checkpoint stem>.eval
    scan_file: str | None = None    # any SCAN-format file, evaluated with `support`
    support: str | None = None      # "jump=I_JUMP,walk=I_WALK"
    plot: int = 0                   # attention heatmaps of the first N queries of each split
    max_length: int | None = None   # default: the checkpoint's max_length_eval
    device: str = "auto"
    store: str | None = None        # overrides the store path recorded in the checkpoint
    chunk_size: int = DEFAULT_CHUNK_SIZE  # queries per pseudo-episode when many share one support set
    progress: bool = False
    episode_type: str | None = None  # if given, the checkpoint's episode type must be this one
    val_episodes: int = 0           # also score this many freshly drawn validation episodes (split validation_N)
    val_seed: int = 0               # the seed of that draw
    write_report: bool = True       # False: only return the results (the Python API, unless it names `out`)

    @property
    def out_dir(self) -> Path:
        """Beside the checkpoint by default, named after it: two runs' `net_ME.pt` never share a report."""
        return Path(self.out) if self.out else default_out_dir(self.checkpoint)


def resolve_checkpoint(checkpoint: str | None, dir_model: str | None, fn_in_model: str | None,
                       episode_type: str | None) -> str:
    """The checkpoint file, from --checkpoint or from the original test.py's --dir_model/--fn_in_model: DIR/FN,
    DIR defaulting to out_models and FN to net_<episode_type>.pt. FN `net_T.tar` (the original's name) also
    finds `net_T.pt`, the name `train` writes. Given both ways, they must name the same file."""
    if dir_model is None and fn_in_model is None:
        if checkpoint is None:
            raise UserError("no checkpoint given: pass --checkpoint PATH, or --dir_model DIR and --fn_in_model FILE "
                            "(as the original's test.py)")
        return checkpoint
    if not fn_in_model and not episode_type:
        raise UserError("--dir_model needs --fn_in_model FILE (or --episode_type T, for net_T.pt)")
    folder = Path(dir_model if dir_model is not None else "out_models")
    named = folder / (fn_in_model or f"net_{episode_type}.pt")
    found = named
    if not named.is_file() and named.suffix == ".tar" and named.with_suffix(".pt").is_file():
        found = named.with_suffix(".pt")  # the original saved net_T.tar; our train writes net_T.pt
    if not found.is_file():
        also = f" nor {named.with_suffix('.pt')}" if named.suffix == ".tar" else ""
        raise UserError(f"no checkpoint at {named}{also} (from --dir_model {folder} and --fn_in_model "
                        f"{named.name})")
    if checkpoint is not None and Path(checkpoint).resolve() != found.resolve():
        raise UserError(f"--checkpoint {checkpoint} and --dir_model/--fn_in_model ({found}) name different files; "
                        "give one of them")
    return str(found)


def default_out_dir(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.eval")


@dataclass
class Episode:
    support: list[tuple[str, str]]                    # (input, output)
    queries: list[tuple[str, str]]                    # (input, target)
    support_ids: list[tuple[list[int], list[int]]] = field(default_factory=list)
    query_ids: list[list[int]] = field(default_factory=list)


@dataclass
class SplitTask:
    name: str
    episodes: list[Episode]
    episodic: bool                    # several support sets: report each episode and their mean
    records: list[dict] | None = None  # validation: decoded by the trainer's own code path
    source: dict | None = None         # --scan_file: the file's path and sha256, for the provenance
    draw: dict | None = None           # validation_N: how its episodes were drawn


@dataclass
class Loaded:
    checkpoint: dict
    model: MetaSeq2Seq
    tokenizer: Tokenizer
    device: torch.device
    max_length: int


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate, write DIR/results.json, predictions and plots; return the results."""
    check_config(cfg)
    ckpt = load_any_checkpoint(Path(cfg.checkpoint))
    if cfg.episode_type is not None and cfg.episode_type != ckpt.get("episode_type"):
        raise UserError(f"--episode_type {cfg.episode_type} differs from the episode type of the checkpoint "
                        f"{cfg.checkpoint} ({ckpt.get('episode_type')})")
    names = requested_splits(cfg, ckpt.get("episode_type"))
    loaded = load_model(ckpt, cfg)
    tasks = [prepare_split(name, loaded, cfg) for name in names]
    if cfg.write_report:
        report.check_destination(cfg.out_dir)  # now, not after minutes of decoding
    results = report.header(cfg.checkpoint, ckpt, loaded.max_length, str(loaded.device))
    results["provenance"] |= {task.name: task.source for task in tasks if task.source is not None}
    decoded = {}
    for task in tasks:
        decoded[task.name], seconds = decode_task(task, loaded, cfg)
        results["splits"][task.name] = split_scores(task, decoded[task.name], seconds, ckpt.get("episode_type"))
    if cfg.write_report:
        write_report(cfg, loaded, tasks, decoded, results)
    return results


def write_report(cfg: EvalConfig, loaded: Loaded, tasks: list[SplitTask], decoded: dict, results: dict) -> None:
    """Only after all decoding, into a fresh directory that then replaces the earlier report whole: an
    interrupted run leaves the earlier report as it was, and no file of it survives beside the new one."""
    def write_files(directory: Path) -> None:
        for task in tasks:
            report.write_predictions(directory, task.name, decoded[task.name], task.episodic)
            if task.draw is not None:  # the drawn episodes themselves: they are in no store
                report.write_episodes(directory, task.name, task.records)
            if cfg.plot > 0:
                from evalsuite.plots import plot_split  # matplotlib takes a second to import: only when asked
                plots = plot_split(loaded, task, cfg.plot, directory)
                results["splits"][task.name]["plots"] = [p.name for p in plots]
        report.write_results(directory, results)
    report.replace_report(cfg.out_dir, write_files)


def check_config(cfg: EvalConfig) -> None:
    if (cfg.scan_file is None) != (cfg.support is None):
        raise UserError("--scan_file and --support go together: the file's queries need a support set")
    if cfg.scan_file is not None and cfg.split is not None:
        raise UserError("--split and --scan_file exclude each other")
    if cfg.plot < 0 or (cfg.max_length is not None and cfg.max_length < 1) or cfg.chunk_size < 1:
        raise UserError("--plot must be >= 0, and --max_length_eval and the chunk size >= 1")
    if type(cfg.val_episodes) is not int or cfg.val_episodes < 0 or type(cfg.val_seed) is not int or cfg.val_seed < 0:
        raise UserError(f"--val_episodes and --val_seed must be non-negative integers, got {cfg.val_episodes!r} "
                        f"and {cfg.val_seed!r}")


def requested_splits(cfg: EvalConfig, episode_type: str) -> tuple[str, ...]:
    names = (SCAN_FILE,) if cfg.scan_file is not None else splits_for(episode_type, cfg.split)
    return names + ((drawn_validation(cfg.val_episodes),) if cfg.val_episodes else ())


def load_model(ckpt: dict, cfg: EvalConfig) -> Loaded:
    try:
        model = MetaSeq2Seq(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        tokenizer = Tokenizer(tuple(ckpt["input_vocab"]), tuple(ckpt["output_vocab"]))
        max_length = cfg.max_length or int(ckpt["train_config"]["max_length_eval"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another format or model version
        raise UserError(f"checkpoint {cfg.checkpoint} does not hold a loadable model "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    device = resolve_device(cfg.device)
    use_exact_fp32(device)
    return Loaded(ckpt, model.to(device).eval(), tokenizer, device, max_length)


# ---- preparing the splits (all input checks happen here) -------------------------------------------------

def prepare_split(name: str, loaded: Loaded, cfg: EvalConfig) -> SplitTask:
    if name == VALIDATION:
        records = checkpoint_validation(loaded.checkpoint, cfg)
        episodes = [Episode(_items(r["support"]), _items(episode_queries(r, support_as_queries=True)))
                    for r in records]
        return SplitTask(name, episodes, episodic=True, records=records)
    if cfg.val_episodes and name == drawn_validation(cfg.val_episodes):
        return drawn_validation_task(name, loaded, cfg)
    if name == SCAN_FILE:
        return scan_file_task(cfg.scan_file, cfg.support, loaded.tokenizer)
    split = SCAN_TEST_SPLITS[name]
    queries = [(p.command, p.actions) for p in scan_test_pairs(name)]
    if split.support is not None:
        return SplitTask(name, [encoded(list(split.support), queries, loaded.tokenizer)], episodic=False)
    return length_task(name, checkpoint_validation(loaded.checkpoint, cfg), queries, loaded.tokenizer)


def drawn_validation_task(name: str, loaded: Loaded, cfg: EvalConfig) -> SplitTask:
    """`--val_episodes N`: N validation episodes drawn afresh (pipeline.store.draw_validation) on the pairings
    of the store's validation episodes, whose identifiers training never saw; scored as `validation` is."""
    held = checkpoint_validation(loaded.checkpoint, cfg)
    records = draw_validation(loaded.checkpoint["episode_type"], held, cfg.val_episodes, cfg.val_seed)
    episodes = [Episode(_items(r["support"]), _items(episode_queries(r, support_as_queries=True))) for r in records]
    draw = {"n_episodes": cfg.val_episodes, "seed": cfg.val_seed, "rng": f"numpy default_rng({cfg.val_seed})",
            "held_out_identifiers": sorted({r["identifier"] for r in held}),
            "episodes": report.episodes_name(name)}
    return SplitTask(name, episodes, episodic=True, records=records, draw=draw)


def length_task(name: str, records: list[dict], queries: list[tuple[str, str]], tokenizer: Tokenizer) -> SplitTask:
    """Each validation episode's support set in turn, against all the test commands (tokenized once)."""
    query_ids = encoded([], queries, tokenizer).query_ids
    episodes = []
    for record in records:
        support = encoded(_items(record["support"]), [], tokenizer)
        episodes.append(Episode(support.support, queries, support.support_ids, query_ids))
    return SplitTask(name, episodes, episodic=True)


def _items(items: list[dict]) -> list[tuple[str, str]]:
    return [(it["input"], it["output"]) for it in items]


def encoded(support: list[tuple[str, str]], queries: list[tuple[str, str]], tokenizer: Tokenizer) -> Episode:
    support_ids = tokenizer.encode_pairs(support)
    return Episode(support, queries, support_ids, [tokenizer.encode_input(i) for i, _ in queries])


def scan_file_task(path: str, support_spec: str, tokenizer: Tokenizer) -> SplitTask:
    support = parse_support(support_spec)
    try:
        support_ids = tokenizer.encode_pairs(support)
    except UserError as err:
        raise UserError(f"--support: {err}") from None
    queries, query_ids = [], []
    source = {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}
    for number, pair in read_scan_file(path):
        try:  # the target's tokens too: a target the model cannot write is a mistake in the file
            query_ids.append(tokenizer.encode_input(pair.command))
            tokenizer.encode_output(pair.actions)
        except UserError as err:
            raise UserError(f"{path} line {number}: {err}") from None
        queries.append((pair.command, pair.actions))
    return SplitTask(SCAN_FILE, [Episode(support, queries, support_ids, query_ids)], episodic=False, source=source)


def checkpoint_validation(ckpt: dict, cfg: EvalConfig) -> list[dict]:
    """The validation episodes that a checkpoint of the original code carries inside it (read from its .tar, or
    converted), which its test.py scores; else those of the checkpoint's store."""
    held = ckpt.get(VALIDATION_RECORDS)
    return held if held is not None else validation_records(ckpt, cfg)


def validation_records(ckpt: dict, cfg: EvalConfig) -> list[dict]:
    """The validation episodes of the store the checkpoint was trained on, and only of that store."""
    store = checkpoint_store(ckpt, cfg.checkpoint, cfg.store)
    check_validation_data(store, ckpt)
    expected = {e["name"]: e["sha256"] for e in load_manifest(store)["shards"]}
    paths = shard_paths(store, "val")
    for path in paths:
        if not path.is_file() or file_sha256(path) != expected[path.name]:
            raise UserError(f"validation shard {path} is missing or damaged "
                            f"(run `metaseq2seq verify --store {store}`)")
    return read_records(paths)


def checkpoint_store(ckpt: dict, checkpoint: str, override: str | None) -> Path:
    """--store, else the store the checkpoint records. A relative record is relative to where training ran,
    which the checkpoint's own place and its recorded --dir_model give, so it is found from any directory."""
    if override:
        candidates = [Path(override)]
    elif ckpt.get("store"):
        recorded, ran_in = Path(ckpt["store"]), training_directory(ckpt, checkpoint)
        candidates = [recorded] + ([ran_in / recorded] if ran_in and not recorded.is_absolute() else [])
    else:
        raise UserError("the checkpoint records no episode store; pass --store PATH")
    for store in candidates:
        if (store / "manifest.json").is_file():
            return store
    tried = " nor at ".join(str(c) for c in candidates)
    raise UserError(f"no episode store at {tried} (the checkpoint was trained on {ckpt.get('store')}); "
                    "pass --store PATH to point at it")


def training_directory(ckpt: dict, checkpoint: str) -> Path | None:
    """The directory `train` ran in, while the checkpoint lies where its relative --dir_model put it."""
    dir_model = Path(str(ckpt.get("train_config", {}).get("dir_model") or "."))
    folder = Path(checkpoint).resolve().parent
    depth = len(folder.parts) - len(dir_model.parts)
    if dir_model.is_absolute() or folder.parts[depth:] != dir_model.parts:
        return None
    return Path(*folder.parts[:depth])


def check_validation_data(store: Path, ckpt: dict) -> None:
    """The store's validation shards must be those the checkpoint was validated on. Checkpoints name them by
    their sha256, so a store regenerated with other training episodes still fits; older checkpoints have
    only the hash of the whole manifest, which any change to the store alters."""
    held, trained = load_manifest(store).get("episode_type"), ckpt.get("episode_type")
    if held != trained:  # say so first: every hash differs too, but this is the mistake to name
        raise UserError(f"the episode types differ: the store {store} holds {held} episodes and the checkpoint "
                        f"was trained on {trained}; pass --store PATH to its {trained} store")
    recorded = ckpt.get("val_shards_sha256")
    if recorded is None:
        if manifest_sha256(store) != ckpt.get("manifest_sha256"):
            raise UserError(f"the store {store} is not the one this checkpoint was trained on (its manifest hash "
                            "differs, and the checkpoint predates validation shard hashes); pass --store PATH "
                            "to the right one")
        return
    current = val_shards_sha256(load_manifest(store))
    if current != recorded:
        raise UserError(f"the validation shards of {store} are not the ones this checkpoint was validated on "
                        f"({_first_difference(current, recorded)}); pass --store PATH to the right store")


def _first_difference(current: dict, recorded: dict) -> str:
    name = next(n for n in sorted(set(current) | set(recorded)) if current.get(n) != recorded.get(n))
    def short(sha: str | None) -> str:
        return "none" if sha is None else f"{sha[:12]}..."
    return f"{name}: sha256 {short(current.get(name))} in the store, {short(recorded.get(name))} in the checkpoint"


# ---- decoding and scoring --------------------------------------------------------------------------------

def decode_task(task: SplitTask, loaded: Loaded, cfg: EvalConfig) -> tuple[list[list[QueryResult]], float]:
    start = time.perf_counter()
    if task.records is not None:  # the trainer's validation path, so both report the same numbers
        with torch.inference_mode():
            per_episode = decode_records(loaded.model, task.records, loaded.tokenizer, loaded.max_length,
                                         loaded.device)
    else:
        with report.progress_bar(sum(len(e.queries) for e in task.episodes), task.name, cfg.progress) as bar:
            per_episode = [decode_episode(episode, loaded, cfg, bar.update) for episode in task.episodes]
    return per_episode, time.perf_counter() - start


def decode_episode(episode: Episode, loaded: Loaded, cfg: EvalConfig,
                   on_chunk: Callable[[int], object] | None = None) -> list[QueryResult]:
    predictions = decode_shared_support(loaded.model, episode.support_ids, episode.query_ids, loaded.max_length,
                                        loaded.device, chunk_size=cfg.chunk_size, on_chunk=on_chunk)
    support_inputs = {i for i, _ in episode.support}
    return [QueryResult(i, t, loaded.tokenizer.decode_output(p), i in support_inputs)
            for (i, t), p in zip(episode.queries, predictions)]


def split_scores(task: SplitTask, per_episode: list[list[QueryResult]], seconds: float,
                 episode_type: str | None) -> dict:
    if task.episodic:
        scores = score_episodes(per_episode)
        scores = {"n": sum(len(e) for e in per_episode), **scores}
    else:
        scores = score_queries(per_episode[0])
        scores["support"] = [{"input": i, "output": o} for i, o in task.episodes[0].support]
    paper = paper_number(episode_type, VALIDATION if task.draw is not None else task.name)
    scores["paper"] = {"accuracy": paper.accuracy, "note": paper.note} if paper else None
    if task.draw is not None:
        scores["draw"] = task.draw
    return {**scores, "decode_seconds": round(seconds, 3), "predictions": report.predictions_name(task.name)}
