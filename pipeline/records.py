"""The episode record: one webdataset sample holding one JSON (docs/method.md, "The store").

Everything that knows the record's shape lives here: how a record is built and encoded, how samples and
shards are named, and the schema check that `verify` runs on every record.
"""
from __future__ import annotations

import json
import re

SPLITS = ("train", "val")
SPLIT_CODES = {"train": 0, "val": 1}          # part of the per-shard RNG seed: never renumber
HF_SPLIT_NAMES = {"train": "train", "val": "validation"}
SHARD_RE = re.compile(r"^(train|val)-(\d{6})\.tar$")
KEY_RE = re.compile(r"^(train|val)-(\d{8})$")
RECORD_FIELDS = ("episode_type", "split", "index", "identifier", "mapping", "support", "query")
PAIR_FIELDS = {"mapping": ("src", "tgt"), "support": ("input", "output"), "query": ("input", "output")}


def shard_name(split: str, shard_index: int) -> str:
    return f"{split}-{shard_index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def make_record(episode_type: str, split: str, index: int, episode: dict) -> dict:
    return {"episode_type": episode_type, "split": split, "index": index, **episode}


def encode_record(record: dict) -> bytes:
    # sort_keys at every level makes the bytes independent of how the sampler built its dicts.
    return json.dumps(record, sort_keys=True).encode("utf-8")


def record_problems(record, key: str, expected: dict, vocabs: tuple[set, set]) -> list[str]:
    """What is wrong with one decoded record (empty: nothing). `expected` holds episode_type and split."""
    if not isinstance(record, dict):
        return [f"not a JSON object but {type(record).__name__}"]
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        return [f"missing field(s) {', '.join(missing)}"]
    problems = [f"unknown field {f!r}" for f in sorted(set(record) - set(RECORD_FIELDS))]
    problems += _header_problems(record, key, expected)
    for field, names in PAIR_FIELDS.items():
        problems += _pair_list_problems(record[field], field, names)
    if not problems:
        problems += _token_problems(record, *vocabs)
    return problems


def _header_problems(record: dict, key: str, expected: dict) -> list[str]:
    problems = []
    for field in ("episode_type", "split"):
        if record[field] != expected[field]:
            problems.append(f"{field} is {record[field]!r}, expected {expected[field]!r}")
    match = KEY_RE.match(key)
    if match is None:
        problems.append(f"sample key {key!r} is not <split>-<index:08d>")
    elif type(record["index"]) is not int or record["index"] != int(match.group(2)):
        problems.append(f"index {record['index']!r} does not match its key {key!r}")
    if not isinstance(record["identifier"], str) or not record["identifier"]:
        problems.append("identifier is not a non-empty string")
    return problems


def _pair_list_problems(items, field: str, names: tuple[str, str]) -> list[str]:
    if not isinstance(items, list) or not (items or field == "mapping"):  # a family of one's own may have none
        return [f"{field} is not a {'list' if field == 'mapping' else 'non-empty list'}"]
    for i, item in enumerate(items):
        if not isinstance(item, dict) or sorted(item) != sorted(names):
            return [f"{field}[{i}] is not an object with exactly the fields {' and '.join(names)}"]
        if not all(isinstance(item[n], str) and item[n].strip() for n in names):
            return [f"{field}[{i}] has an empty or non-string value"]
    return []


def _token_problems(record: dict, input_tokens: set, output_tokens: set) -> list[str]:
    inputs = {t for it in record["support"] + record["query"] for t in it["input"].split()}
    inputs.update(m["src"] for m in record["mapping"])
    outputs = {t for it in record["support"] + record["query"] for t in it["output"].split()}
    outputs.update(m["tgt"] for m in record["mapping"])
    problems = []
    if inputs - input_tokens:
        problems.append(f"input tokens not in the input vocabulary: {sorted(inputs - input_tokens)}")
    if outputs - output_tokens:
        problems.append(f"output tokens not in the output vocabulary: {sorted(outputs - output_tokens)}")
    return problems
