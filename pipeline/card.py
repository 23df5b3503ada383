"""Dataset cards (README.md with YAML front matter) that let `datasets.load_dataset(DIR)` load a store or a
parquet export offline, with a pinned schema.

Why pin `dataset_info.features`: without it the loader infers the schema from the first 5 records and
silently drops anything it did not see. The webdataset loader names a sample's columns after its members:
`json` (our record, decoded), plus `__key__` and `__url__`.
"""
from __future__ import annotations

from pipeline.records import HF_SPLIT_NAMES

PAIR = {"mapping": (("src", "string"), ("tgt", "string")),
        "support": (("input", "string"), ("output", "string")),
        "query": (("input", "string"), ("output", "string"))}
# A feature is ("name", dtype) or ("name", ("list" | "struct", sub-features)); order = column order.
RECORD_FEATURES = (("episode_type", "string"), ("split", "string"), ("index", "int64"), ("identifier", "string"),
                   *((name, ("list", fields)) for name, fields in PAIR.items()))
STORE_FEATURES = (("json", ("struct", RECORD_FEATURES)), ("__key__", "string"), ("__url__", "string"))


def features_yaml(features, indent: int = 0) -> list[str]:
    """The `features:` list in the YAML layout of `datasets.Features._to_yaml_list()`."""
    pad, lines = " " * indent, []
    for name, kind in features:
        lines.append(f"{pad}- name: {name}")
        if isinstance(kind, str):
            lines.append(f"{pad}  dtype: {kind}")
        else:
            lines.append(f"{pad}  {kind[0]}:")
            lines += features_yaml(kind[1], indent + 2)
    return lines


def front_matter(patterns: dict[str, str], features, pretty_name: str) -> str:
    """YAML front matter: one default config with a data-file pattern per split, and the pinned features."""
    lines = ["---", f"pretty_name: \"{pretty_name}\"", "configs:", "- config_name: default", "  data_files:"]
    for split, pattern in patterns.items():
        lines += [f"  - split: {HF_SPLIT_NAMES[split]}", f"    path: \"{pattern}\""]
    lines += ["dataset_info:", "  config_name: default", "  features:", *features_yaml(features, 2), "---", ""]
    return "\n".join(lines)


def _parameter_lines(manifest: dict) -> list[str]:
    params = {k: v for k, v in manifest["params"].items() if k != "sampler"}
    params.update({f"sampler.{k}": v for k, v in manifest["params"].get("sampler", {}).items()})
    return [f"| `{k}` | `{v}` |" for k, v in sorted(params.items())]


def _body(manifest: dict, layout: str, load_hint: str) -> str:
    t, counts = manifest["episode_type"], manifest["counts"]
    return "\n".join([
        f"# Meta seq2seq episodes: `{t}`", "",
        f"Episodes for meta sequence-to-sequence learning (Lake 2019, NeurIPS), type `{t}`: "
        f"{counts['train']} training and {counts['val']} validation episodes. "
        "Each episode has a support set and a query set of input -> output pairs; `mapping` lists the "
        "primitive meanings in effect and `identifier` names them (no training episode carries a validation "
        "identifier). SCAN material (Lake & Baroni 2018) is under its BSD licence.", "",
        layout, "", load_hint, "",
        f"Generator version `{manifest['generator_version']}`; the same parameters give the same bytes.", "",
        "| parameter | value |", "|---|---|", *_parameter_lines(manifest), "",
    ])


def store_card(manifest: dict) -> str:
    """README.md of a store `shards/<episode_type>/`."""
    head = front_matter({"train": "train-*.tar", "val": "val-*.tar"}, STORE_FEATURES,
                        f"meta-seq2seq episodes: {manifest['episode_type']}")
    layout = ("Layout: uncompressed webdataset tars `train-NNNNNN.tar` and `val-NNNNNN.tar`, one sample per "
              "episode (key `<split>-<index:08d>`, one `json` member with sorted keys); `manifest.json` has "
              "the vocabularies, the parameters and the sha256 of every shard.")
    where = f"shards/{manifest['episode_type']}"
    hint = (f"Load: `datasets.load_dataset(\"{where}\")` (columns `json`, `__key__`, `__url__`), or "
            "stream the tars with webdataset. Check: `python cli.py verify --store DIR`.")
    return head + _body(manifest, layout, hint)


def parquet_card(manifest: dict) -> str:
    """README.md of a parquet export (flat columns, one per record field)."""
    head = front_matter({"train": "data/train-*.parquet", "val": "data/validation-*.parquet"}, RECORD_FEATURES,
                        f"meta-seq2seq episodes: {manifest['episode_type']}")
    layout = ("Layout: parquet files under `data/`, one row per episode with the columns "
              "`episode_type`, `split`, `index`, `identifier`, `mapping`, `support`, `query`.")
    hint = "Load: `datasets.load_dataset(DIR)` or `datasets.load_dataset(\"USER/NAME\")`."
    return head + _body(manifest, layout, hint)
