"""Episode families of one's own: a sampler in any importable module, named by its import path or an entry point.

A family is an `EpisodeFamily`: a pure function of a numpy Generator that returns one episode, with the
vocabularies its episodes are written in. For example, in `mypkg/tasks.py`:

    from pipeline.families import EpisodeFamily

    def sample(rng, split):  # split: "train" or "val"
        ...
        return {"support": [("dax", "RED"), ...], "query": [("dax dax", "RED RED"), ...],
                "identifier": "dax -> RED, ..."}  # optional: training episodes avoid the validation ones'

    my_family = EpisodeFamily(sample, input_symbols=("dax", ...), output_symbols=("RED", ...))

`--episode_type mypkg.tasks:my_family` (with `mypkg` importable) then works wherever an episode type is taken,
and so does a short name declared as an entry point of the group `metaseq2seq.episode_types`
(`my_family = "mypkg.tasks:my_family"` in the package's pyproject.toml). A store records the family's import
path and the sha256 of its module's source; a store whose family's source has changed since is refused, so
that no store is read with another sampler than the one that made it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UserError

ENTRY_POINT_GROUP = "metaseq2seq.episode_types"
# Families that ship with the project, by short name: they take the same path as one's own (the store records
# the import path and the module's source hash), with no install step for the name to work in a checkout.
BUILT_IN = {"mlc_algebraic": "pipeline.mlc:algebraic"}
Pairs = list  # [(input, output), ...] or [{"input": ..., "output": ...}, ...]; a side is a str or a list of tokens


@dataclass(frozen=True)
class EpisodeFamily:
    """sample(rng, split) -> {"support": pairs, "query": pairs, "identifier": str (optional)}: one episode of
    the split "train" or "val", drawn with `rng` alone. Tokens are separated by spaces, and every token must
    be one of the symbols of its side. `params` are recorded in the store's manifest."""
    sample: Callable[[np.random.Generator, str], dict]
    input_symbols: tuple[str, ...]
    output_symbols: tuple[str, ...]
    params: dict = field(default_factory=dict)


def is_family_name(name: str) -> bool:
    """A name that is not one of the five samplers: an import path `module:attribute`, a family that ships
    with the project, or an entry point's name."""
    return ":" in name or name in BUILT_IN or name in entry_point_names()


def entry_point_names() -> tuple[str, ...]:
    return tuple(sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)))


def import_path(name: str) -> str:
    """`module:attribute` of a family named by its import path or by an entry point."""
    if ":" in name:
        return name
    if name in BUILT_IN:
        return BUILT_IN[name]
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        return entry_point.value
    raise UserError(f"unknown episode type {name!r}")


def load_family(name: str) -> EpisodeFamily:
    """The family `name` names; one line when it cannot be imported or is not an EpisodeFamily."""
    path = import_path(name)
    module_name, _, attribute = path.partition(":")
    try:
        family = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot load the episode family {path!r}: {type(err).__name__}: {err}") from None
    if not isinstance(family, EpisodeFamily):
        raise UserError(f"{path} is a {type(family).__name__}, not a pipeline.families.EpisodeFamily")
    return family


def source_sha256(name: str) -> str:
    """sha256 of the source of the module that defines the family (what a store records of its sampler)."""
    module = importlib.import_module(import_path(name).partition(":")[0])
    try:
        return hashlib.sha256(inspect.getsource(module).encode("utf-8")).hexdigest()
    except (OSError, TypeError):  # no source to read (a compiled or built-in module)
        raise UserError(f"the episode family {name!r} has no readable source, which a store records") from None


def family_record(name: str) -> dict:
    """What a store's manifest records of a family: its import path and its module's source hash."""
    return {"import": import_path(name), "source_sha256": source_sha256(name)}


def family_problems(manifest: dict) -> list[str]:
    """A store made by a family whose source has changed since (or cannot be loaded now) is not to be read."""
    recorded = manifest.get("params", {}).get("sampler", {}).get("family")
    if not recorded:
        return []
    try:
        now = source_sha256(recorded["import"])
    except (UserError, ImportError) as err:
        return [f"manifest.json: the episode family {recorded['import']} cannot be loaded ({err})"]
    if now != recorded["source_sha256"]:
        return [f"manifest.json: the source of the episode family {recorded['import']} has changed since this "
                f"store was generated (sha256 {recorded['source_sha256'][:12]}... then, {now[:12]}... now); "
                "generate it again (--overwrite)"]
    return []
