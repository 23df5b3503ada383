"""The eval report: results.json, one predictions file per split, and the summary table for the terminal.

Files are written atomically (temp file + rename), so a killed run never leaves a half-written report.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from evalsuite.metrics import QueryResult
from pipeline.shardio import check_writable_dir, file_sha256, write_bytes_atomically

RESULTS_NAME = "results.json"


def header(checkpoint_path: str, ckpt: dict, max_length: int, device: str) -> dict:
    """The checkpoint's identity, so a results file always says exactly what was evaluated."""
    return {"checkpoint": {"path": str(checkpoint_path), "sha256": file_sha256(Path(checkpoint_path)),
                           "episode_type": ckpt["episode_type"], "episodes_done": ckpt.get("episodes_done"),
                           "model_config": ckpt["model_config"], "store": ckpt.get("store"),
                           "manifest_sha256": ckpt.get("manifest_sha256")},
            "max_length": max_length, "device": device, "splits": {}}


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


def check_writable(out_dir: Path) -> None:
    check_writable_dir(out_dir, "--out")


def remove_results(out_dir: Path) -> None:
    (Path(out_dir) / RESULTS_NAME).unlink(missing_ok=True)


def write_results(out_dir: Path, results: dict) -> Path:
    path = Path(out_dir) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: an empty group must already be None (null), never NaN, or this raises.
    write_bytes_atomically(path, (json.dumps(results, indent=2, allow_nan=False) + "\n").encode())
    return path


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
