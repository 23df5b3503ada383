"""manifest.json: what a store holds and how it was made. Written last, so its presence means "complete"."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.shardio import write_bytes_atomically

# Bump whenever a code change alters the bytes generated for the same arguments (samplers, record format,
# tar layout): a store made by another version then counts as "different parameters", never as identical.
GENERATOR_VERSION = "1"
MANIFEST_NAME = "manifest.json"
MANIFEST_FIELDS = {"episode_type": str, "generator_version": str, "params": dict, "input_vocab": list,
                   "output_vocab": list, "counts": dict, "shards": list}
SHARD_FIELDS = {"name": str, "split": str, "count": int, "sha256": str}


def encode_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_manifest(store: Path, manifest: dict) -> None:
    write_bytes_atomically(store / MANIFEST_NAME, encode_manifest(manifest))


def load_manifest(store: Path | str) -> dict:
    """The parsed manifest of a store; UserError if it is missing or not valid JSON."""
    path = Path(store) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest (not a store, or its generation did not finish)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object")
    return manifest


def manifest_sha256(store: Path | str) -> str:
    """sha256 of the manifest's bytes: names a store's exact content (checkpoints record it)."""
    path = Path(store) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: no manifest (not a store, or its generation did not finish)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_problems(manifest: dict) -> list[str]:
    """Missing or mistyped manifest fields (shard entries included)."""
    problems = [f"manifest.json: field {name!r} missing or not a {kind.__name__}"
                for name, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(name), kind)]
    for i, entry in enumerate(manifest.get("shards") or []):
        if not isinstance(entry, dict) or any(type(entry.get(k)) is not t for k, t in SHARD_FIELDS.items()):
            problems.append(f"manifest.json: shards[{i}] needs the fields {', '.join(SHARD_FIELDS)}, "
                            "of the right types")
    return problems


def comparable_params(manifest: dict) -> dict:
    """What must match for a re-run to count as identical: the parameters and the generator version."""
    return {"params": manifest.get("params"), "generator_version": manifest.get("generator_version")}
