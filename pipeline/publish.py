"""publish: a verified store as a parquet dataset (flat columns, one per record field) with its own card,
written to a directory or pushed to the Hugging Face Hub."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline.card import parquet_card
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.records import HF_SPLIT_NAMES, SPLITS
from pipeline.shardio import read_shard
from pipeline.store import shard_paths
from pipeline.verify import verify_store

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
EXPORT_ENTRIES = {"README.md", "data"}


def publish(store: Path | str, to: str | None = None, repo_id: str | None = None) -> str:
    """Export `store` as parquet to the directory `to`, or push it to the Hub dataset `repo_id`;
    returns where it went."""
    if (to is None) == (repo_id is None):
        raise UserError("give exactly one of --to DIR or --repo_id USER/NAME")
    if repo_id is not None and not REPO_ID_RE.match(repo_id):
        raise UserError(f"--repo_id must look like USER/NAME, got {repo_id!r}")
    store = Path(store)
    problems = verify_store(store)
    if problems:
        raise UserError(f"{store} fails verification ({problems[0]}; `verify` lists all {len(problems)}); "
                        "not publishing")
    manifest = load_manifest(store)
    if repo_id is not None:
        return _push(store, manifest, repo_id)
    return str(export_parquet(store, manifest, Path(to)))


def export_parquet(store: Path, manifest: dict, dest: Path) -> Path:
    """Write `dest/README.md` and `dest/data/<split>-00000-of-00001.parquet`; `dest` appears complete or not
    at all, and replaces only an earlier export."""
    _check_destination(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        for split in SPLITS:
            name = f"{HF_SPLIT_NAMES[split]}-00000-of-00001.parquet"
            _write_parquet(shard_paths(store, split), tmp / "data" / name)
        (tmp / "README.md").write_text(parquet_card(manifest), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as err:
        raise UserError(f"cannot write the export {dest}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _check_destination(dest: Path) -> None:
    """Never overwrite anything but an earlier export (README.md and data/ only, with our card)."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--to {dest} exists and is not a directory")
    if not dest.exists() or not any(dest.iterdir()):
        return
    card = dest / "README.md"
    ours = card.is_file() and "meta-seq2seq episodes" in card.read_text(encoding="utf-8", errors="replace")
    if not ours or not {p.name for p in dest.iterdir()} <= EXPORT_ENTRIES:
        raise UserError(f"--to {dest} is not empty and not an earlier export; choose another directory")


def parquet_schema():
    import pyarrow as pa  # here: only publish needs it
    def pairs(a: str, b: str):
        return pa.list_(pa.struct([(a, pa.string()), (b, pa.string())]))
    return pa.schema([("episode_type", pa.string()), ("split", pa.string()), ("index", pa.int64()),
                      ("identifier", pa.string()), ("mapping", pairs("src", "tgt")),
                      ("support", pairs("input", "output")), ("query", pairs("input", "output"))])


def _write_parquet(shards: list[Path], path: Path) -> None:
    """One row group per shard, so memory holds one shard's records at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = parquet_schema()
    with pq.ParquetWriter(path, schema) as writer:
        for shard in shards:
            records = [json.loads(data) for _, data in read_shard(shard)]
            writer.write_table(pa.Table.from_pylist(records, schema=schema))


def _push(store: Path, manifest: dict, repo_id: str) -> str:
    """Push the same export to the Hub: the data with push_to_hub, then our card over the generated one
    (its data_files patterns match push_to_hub's `data/<split>-*.parquet` layout)."""
    from huggingface_hub import HfApi, constants
    with tempfile.TemporaryDirectory() as tmp:
        export = export_parquet(store, manifest, Path(tmp) / "export")
        try:
            _load_quietly(export).push_to_hub(repo_id)
            HfApi().upload_file(path_or_fileobj=str(export / "README.md"), path_in_repo="README.md",
                                repo_id=repo_id, repo_type="dataset")
        except hub_errors() as err:
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise UserError(f"cannot push to {repo_id} on {constants.ENDPOINT} ({type(err).__name__}: {detail}); "
                            "check the network, HF_ENDPOINT and `huggingface-cli login`") from None
    return f"{constants.ENDPOINT}/datasets/{repo_id}"


def _load_quietly(export: Path):
    """The export as a DatasetDict, without the progress bars of its local cache build (an error after it
    must stay one line); the upload's own bars are left as they were."""
    import datasets
    from datasets.utils import logging as ds_logging
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return datasets.load_dataset(str(export))
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises when the Hub cannot be reached, refuses the request or has no token for us.
    huggingface_hub has used requests and then httpx (httpx2 in some versions): take whichever is loaded,
    so the clause needs none of them installed."""
    from huggingface_hub import errors
    kinds = [ConnectionError, TimeoutError, errors.HfHubHTTPError]
    kinds += [getattr(errors, name) for name in ("LocalTokenNotFoundError", "OfflineModeIsEnabled")
              if hasattr(errors, name)]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)
