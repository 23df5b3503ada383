"""benchmarks/same_runs.py's comparison: equal checkpoints are equal, and any change to a weight, Adam's state,
a count or a logged loss is found."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from same_runs import differences  # noqa: E402


def write_run(folder: Path, weight: float = 1.0, moment: float = 0.5, episodes: int = 10, loss: float = 2.0) -> Path:
    folder.mkdir(parents=True)
    path = folder / "net_ME.pt"
    torch.save({"model": {"out.weight": torch.full((2, 2), weight)},
                "optimizer": {"state": {0: {"exp_avg": torch.full((2, 2), moment)}}},
                "episodes_done": episodes, "steps": episodes}, path)
    (folder / "net_ME.metrics.jsonl").write_text(json.dumps({"episodes": episodes, "loss": loss}) + "\n")
    return path


def test_equal_runs_have_no_differences_and_each_change_is_named(tmp_path):
    same = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    assert differences(*same) == []
    base = write_run(tmp_path / "base")
    changed = {"model.out.weight": dict(weight=1.0 + 1e-7), "optimizer.0.exp_avg": dict(moment=0.25),
               "episodes_done": dict(episodes=11), "metrics.loss": dict(loss=2.0000001)}
    for name, change in changed.items():
        found = differences(base, write_run(tmp_path / name, **change))
        assert name in found, (name, found)
