"""The eval report: results.json, one predictions file per split, and the summary table for the terminal.

A report is written into a fresh directory beside its destination and then swapped in whole, so a killed
run leaves the earlier report as it was, and no file of an earlier report survives beside a newer
results.json. results.json lists every file of its report ("files"); only such files are ever replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import provenance
from pipeline.errors import UserError
from pipeline.shardio import check_writable_dir, file_sha256, is_temp_name, swap_dir_in, write_bytes_atomically
from trainer.metrics import QueryResult

RESULTS_NAME = "results.json"


def header(checkpoint_path: str, ckpt: dict, max_length: int, device: str) -> dict:
    """The checkpoint's identity and how it was trained, and where this eval ran, so a results file always
    says exactly what was evaluated, by which code, on which machine."""
    return {"checkpoint": {"path": str(checkpoint_path), "sha256": file_sha256(Path(checkpoint_path)),
                           "episode_type": ckpt["episode_type"], "episodes_done": ckpt.get("episodes_done"),
                           "model_config": ckpt["model_config"], "store": ckpt.get("store"),
                           "manifest_sha256": ckpt.get("manifest_sha256"),
                           "val_shards_sha256": ckpt.get("val_shards_sha256"),
                           "provenance": ckpt.get("provenance")},
            "provenance": provenance.collect(device), "max_length": max_length, "device": device, "splits": {}}


def predictions_name(split: str) -> str:
    return f"predictions_{split}.jsonl"


def prediction_lines(per_episode: list[list[QueryResult]], episodic: bool) -> list[str]:
    lines = []
    for episode, results in enumerate(per_episode):
        for r in results:
            row = {"input": r.input, "target": r.target, "prediction": r.prediction, "correct": r.correct,
                   "retrieval": r.retrieval}
            lines.append(json.dumps({**row, "episode": episode} if episodic else row))
    return lines


def write_predictions(out_dir: Path, split: str, per_episode: list[list[QueryResult]], episodic: bool) -> Path:
    path = Path(out_dir) / predictions_name(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, "".join(line + "\n" for line in prediction_lines(per_episode, episodic)).encode())
    return path


def episodes_name(split: str) -> str:
    return f"episodes_{split}.jsonl"


def write_episodes(out_dir: Path, split: str, records: list[dict]) -> Path:
    """The episode records of a split that no store holds (`--val_episodes`), one JSON line each."""
    path = Path(out_dir) / episodes_name(split)
    lines = (json.dumps({k: v for k, v in r.items() if k != "__key__"}, sort_keys=True) + "\n" for r in records)
    write_bytes_atomically(path, "".join(lines).encode())
    return path


def write_results(out_dir: Path, results: dict) -> Path:
    """results.json, last: its "files" lists what is in the directory then, itself included."""
    path = Path(out_dir) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    results["files"] = sorted({RESULTS_NAME, *(p.name for p in path.parent.iterdir() if not _is_temp(p.name))})
    # allow_nan=False: an empty group must already be None (null), never NaN, or this raises.
    write_bytes_atomically(path, (json.dumps(results, indent=2, allow_nan=False) + "\n").encode())
    return path


def read_report(out_dir: Path) -> dict | None:
    """The results.json of an eval report in `out_dir`; None when there is none (or it is not one)."""
    try:
        results = json.loads((Path(out_dir) / RESULTS_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ours = isinstance(results, dict) and isinstance(results.get("checkpoint"), dict) and "splits" in results
    return results if ours else None


def report_files(results: dict) -> set[str]:
    """The files of a report, as its results.json lists them; reports written before that list have
    results.json, one predictions file per split and its plots."""
    if isinstance(results.get("files"), list):
        return {str(name) for name in results["files"]}
    names = {RESULTS_NAME}
    for split in (results.get("splits") or {}).values():
        names |= {split.get("predictions"), *split.get("plots", [])} if isinstance(split, dict) else set()
    return {name for name in names if isinstance(name, str)}


def _is_temp(name: str) -> bool:
    """A temp file of ours (shardio's, or an older version's plot `.attention_*.tmp.png`), left by a killed run."""
    return is_temp_name(name) or (name.startswith(".") and name.endswith(".tmp.png"))


def check_destination(out_dir: Path) -> None:
    """Before any decoding: `out_dir` must be new, empty, or an earlier report holding nothing but its own
    files, since the new report replaces it whole. Anything else is refused, never deleted."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    entries = {p.name for p in out_dir.iterdir() if not _is_temp(p.name)} if out_dir.is_dir() else set()
    if entries:
        old = read_report(out_dir)
        if old is None:
            raise UserError(f"--out {out_dir} is not empty and holds no eval report (results.json); "
                            "choose another directory")
        foreign = sorted(entries - report_files(old))
        if foreign:
            raise UserError(f"--out {out_dir} holds files that are not part of its eval report "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                            "move them or choose another directory")
    check_writable_dir(out_dir.parent, "--out")


def replace_report(out_dir: Path, write_files: Callable[[Path], object]) -> None:
    """Fill a fresh directory beside `out_dir` with `write_files(directory)`, then swap it in for `out_dir`:
    the earlier report goes whole, and on any failure it stays whole."""
    out_dir = Path(out_dir).resolve()  # `.` has no name to put beside; a symlink's target is the report
    fresh = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        write_files(fresh)
        check_destination(out_dir)  # again: a file may have appeared there while we decoded
        swap_dir_in(fresh, out_dir, old)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        if out_dir.exists():  # the new report, or the earlier one put back: `old` is no longer needed
            shutil.rmtree(old, ignore_errors=True)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _paper(scores: dict) -> str:
    paper = scores.get("paper")
    if not paper or paper.get("accuracy") is None:
        return "-"
    return f"{paper['accuracy']:.2f}% ({paper['note']})"


def summary_table(results: dict) -> str:
    """One row per split: our accuracy (and its retrieval / generalization parts) next to the paper's."""
    rows = [("split", "n", "accuracy", "retrieval", "generalization", "episodes", "paper")]
    for name, s in results["splits"].items():
        rows.append((name, str(s["n"]), _percent(s["accuracy"]), _percent(s["retrieval"]),
                     _percent(s["generalization"]), str(s.get("n_episodes", "-")), _paper(s)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    ckpt = results["checkpoint"]
    per_episode = [f"{name} per episode: " + ", ".join(_percent(e["accuracy"]) for e in s["episodes"])
                   for name, s in results["splits"].items() if "episodes" in s]
    return "\n".join([f"{ckpt['path']} ({ckpt['episode_type']}, {ckpt['episodes_done']} episodes)", *lines,
                      *per_episode])


def progress_bar(total: int, name: str, enabled: bool):
    """A progress bar over `total` queries on stderr (the length split decodes 5 x 3,920 of them)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=name, unit="query", unit_scale=True, file=sys.stderr, leave=False,
                disable=not enabled)
