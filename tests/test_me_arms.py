"""docs/experiments/me_arms.py (the ME recipe comparisons) on run logs written here, against values worked by hand."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab  # a lab script of docs/experiments/, apart from the product's suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def me_arms():
    spec = importlib.util.spec_from_file_location("me_arms", ROOT / "docs" / "experiments" / "me_arms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["me_arms"] = module  # its dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["me_arms"]


def write_ours(path: Path, curve: dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"episodes": ep, "loss": 1.0, "val_generalization": acc}) + "\n"
                            for ep, acc in curve.items()))


def write_original(path: Path, curve: dict[int, float]) -> None:
    path.write_text("".join(f"TrainLoss: 0.1, ValAccRetrieval: 100.0, ValAccGeneralize: {acc}\n"
                            .replace("TrainLoss", f"1m 2s ({ep} {ep // 100}% finished) TrainLoss")
                            for ep, acc in curve.items()))


def test_separated_arms_give_the_exact_p_values_and_the_table(me_arms, tmp_path, capsys):
    for seed in range(5):  # ours: 100% at 1000 + 100 * seed, before the decay at 5000
        write_ours(tmp_path / "fast" / f"seed{seed}" / "m.jsonl", {500: 50.0, 1000 + 100 * seed: 100.0, 6000: 100.0})
        write_original(tmp_path / f"slow{seed}.log", {1000: 10.0, 5000: 60.0, 7000 + 100 * seed: 100.0})  # after it
    assert me_arms.main([f"F={tmp_path}/fast/seed*/m.jsonl", f"S={tmp_path}/slow*.log", "--at", "500,5000",
                         "--table", "--pairs", "F:S"]) == 0
    out = capsys.readouterr().out
    # Complete separation, 5 against 5, no ties: both exact two-sided tests give 2 / C(10, 5) = 2 / 252.
    assert "F vs S: first 100% by 5000: 5/5 vs 0/5, Fisher p = 0.00794; Mann-Whitney on the first-100% episode p = 0.00794" in out
    assert "| seed | 0 | 1 | 2 | 3 | 4 |" in out
    assert "| 500 | 50 | 50 | 50 | 50 | 50 |" in out
    assert "| first 100% | 1,000 | 1,100 | 1,200 | 1,300 | 1,400 |" in out
    assert "| 5,000 | 60 | 60 | 60 | 60 | 60 |" in out  # the original's log lines, arm S's table
    assert "| first 100% | 7,000 | 7,100 | 7,200 | 7,300 | 7,400 |" in out
