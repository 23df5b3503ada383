"""verify_store: check a store against its manifest, down to every record. Each problem is one line that
names the file (and sample) and what is wrong."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from pipeline.errors import UserError
from pipeline.families import family_problems
from pipeline.manifest import load_manifest, manifest_problems
from pipeline.records import SPLITS, record_problems, sample_key, shard_name
from pipeline.shardio import file_sha256, read_shard
from pipeline.vocab import SPECIAL_TOKENS

MAX_RECORD_PROBLEMS = 5  # per shard: enough to see the pattern without flooding the terminal
CARD_NAME = "README.md"


def verify_store(store: Path | str) -> list[str]:
    """Problems of the store at `store` (empty: it is complete and intact)."""
    store = Path(store)
    if not store.is_dir():
        return [f"{store}: not a directory"]
    try:
        manifest = load_manifest(store)
    except UserError as err:
        return [str(err)]
    problems = manifest_problems(manifest) or family_problems(manifest)
    if problems:
        return problems
    problems += _layout_problems(store, manifest)
    checker = _RecordChecker(manifest)
    for split in ("val", "train"):  # val first: its identifiers are what train must avoid
        first_index = 0
        for entry in [e for e in manifest["shards"] if e["split"] == split]:
            # Each shard's keys start where the manifest says, not where the shard before stopped: a
            # truncated shard must not shift the expected keys of the intact shards after it.
            checker.start_shard(split, first_index)
            problems += _shard_problems(store, entry, checker)
            first_index += entry["count"]
    return problems


def _layout_problems(store: Path, manifest: dict) -> list[str]:
    return _manifest_consistency_problems(manifest) + _file_problems(store, manifest)


def _manifest_consistency_problems(manifest: dict) -> list[str]:
    """Shard names in order, and counts that agree with the shards and with the parameters."""
    problems, entries = [], manifest["shards"]
    if any(e["split"] not in SPLITS for e in entries):
        problems.append(f"manifest.json: a shard has a split other than {' or '.join(SPLITS)}")
    for split in SPLITS:
        names = [e["name"] for e in entries if e["split"] == split]
        if names != [shard_name(split, i) for i in range(len(names))]:
            problems.append(f"manifest.json: {split} shards are not named {shard_name(split, 0)}, ... in order")
        total = sum(e["count"] for e in entries if e["split"] == split)
        if manifest["counts"].get(split) != total:
            problems.append(f"manifest.json: counts.{split} is {manifest['counts'].get(split)!r}, "
                            f"its shards hold {total}")
    params = manifest["params"]
    requested = {"train": params.get("num_episodes"), "val": params.get("num_val_episodes")}
    if manifest["counts"] != requested:
        problems.append(f"manifest.json: counts {manifest['counts']} differ from the parameters' {requested}")
    return problems


def _file_problems(store: Path, manifest: dict) -> list[str]:
    """Shard files on disk that the manifest does not list, and the dataset card."""
    listed = {e["name"] for e in manifest["shards"]}
    # The dataset card loads every file matching these patterns, so an unlisted one would leak into the data.
    on_disk = sorted([*store.glob("train-*.tar"), *store.glob("val-*.tar")])
    problems = [f"{p.name}: shard file not listed in the manifest" for p in on_disk if p.name not in listed]
    if not (store / CARD_NAME).is_file():
        problems.append(f"{CARD_NAME}: missing (the dataset card)")
    return problems


class _RecordChecker:
    """Schema checks of records in store order; remembers what it needs across shards (next index per
    split, validation identifiers)."""

    def __init__(self, manifest: dict):
        self.episode_type = manifest["episode_type"]
        specials = set(SPECIAL_TOKENS)
        self.vocabs = (set(manifest["input_vocab"]) - specials, set(manifest["output_vocab"]) - specials)
        self.next_index = {split: 0 for split in SPLITS}
        self.val_identifiers: set[str] = set()

    def start_shard(self, split: str, first_index: int) -> None:
        self.next_index[split] = first_index

    def problems(self, split: str, member: str, data: bytes | None) -> list[str]:
        key = sample_key(split, self.next_index[split])
        self.next_index[split] += 1
        if member != f"{key}.json":
            return [f"member {member!r}, expected {key}.json"]
        try:
            record = json.loads(data)
        except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return [f"{key}: not valid JSON ({err})"]
        expected = {"episode_type": self.episode_type, "split": split}
        problems = record_problems(record, key, expected, self.vocabs)
        if not problems:
            problems = self._identifier_problems(split, record["identifier"])
        return [f"{key}: {p}" for p in problems]

    def _identifier_problems(self, split: str, identifier: str) -> list[str]:
        if split == "val":
            self.val_identifiers.add(identifier)
        elif identifier in self.val_identifiers:
            return [f"training episode has the validation identifier {identifier!r}"]
        return []


def _shard_problems(store: Path, entry: dict, checker: _RecordChecker) -> list[str]:
    name, path = entry["name"], store / entry["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    sha256 = file_sha256(path)
    if sha256 != entry["sha256"]:
        problems.append(f"{name}: sha256 is {sha256[:16]}..., the manifest says {entry['sha256'][:16]}...")
    count, record_issues = _check_records(path, entry["split"], checker)
    if count != entry["count"]:
        problems.append(f"{name}: holds {count} records, the manifest says {entry['count']}")
    problems += [f"{name}: {p}" for p in record_issues[:MAX_RECORD_PROBLEMS]]
    if len(record_issues) > MAX_RECORD_PROBLEMS:
        problems.append(f"{name}: ... and {len(record_issues) - MAX_RECORD_PROBLEMS} more record problems")
    return problems


def _check_records(path: Path, split: str, checker: _RecordChecker) -> tuple[int, list[str]]:
    """(number of records read, problems); a damaged tar is one problem after the records read so far."""
    count, problems = 0, []
    try:
        for member, data in read_shard(path):
            count += 1
            problems += checker.problems(split, member, data)
    except (tarfile.TarError, EOFError, OSError) as err:
        problems.append(f"unreadable tar after {count} records ({err or type(err).__name__})")
    return count, problems
