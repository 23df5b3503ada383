"""docs/experiments/me_arms.py (the ME recipe comparisons) on run logs written here, against values worked by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab  # a lab script of docs/experiments/, apart from the product's suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def me_arms(load_lab_script):
    yield load_lab_script("me_arms")
    sys.modules.pop("me_arms")


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


def test_a_lower_target_counts_a_run_that_never_reaches_100(me_arms, tmp_path, capsys):
    for seed in range(3):  # ours: 95% from 4000 on, never 100; the original's: never above 85
        write_ours(tmp_path / "ours" / f"seed{seed}" / "m.jsonl", {1000: 15.0, 4000: 95.0, 10000: 99.0})
        write_original(tmp_path / f"orig{seed}.log", {1000: 15.0, 4000: 85.0, 10000: 85.0})
    assert me_arms.main([f"N={tmp_path}/ours/seed*/m.jsonl", f"O={tmp_path}/orig*.log", "--target", "90",
                         "--at", "4000", "--table"]) == 0
    out = capsys.readouterr().out
    # 3 of 3 against 0 of 3: Fisher's exact test gives 2 / C(6, 3) = 0.1. Mann-Whitney sees two tied groups, so
    # scipy takes the tie-corrected normal approximation: U = 9, mean 4.5, variance 9/12 * (7 - 48/30) = 4.05,
    # z = (9 - 4.5 - 0.5) / sqrt(4.05) = 1.988 with the continuity correction, two-sided p = 0.0469.
    assert ("N vs O: first 90% by 5000: 3/3 vs 0/3, Fisher p = 0.1; Mann-Whitney on the first-90% episode "
            "p = 0.0469") in out
    assert "| 4,000 | **95** | **95** | **95** |" in out
    assert "| first 90% | 4,000 | 4,000 | 4,000 |" in out
    assert "reach 90%: 0 of 3" in out
    assert me_arms.main([f"N={tmp_path}/ours/seed*/m.jsonl", "--at", "4000", "--table"]) == 0
    assert "| first 100% | never | never | never |" in capsys.readouterr().out  # the default target is 100


def test_an_arm_of_several_globs_holds_the_runs_of_each(me_arms, tmp_path):
    write_ours(tmp_path / "ours" / "seed1" / "m.jsonl", {1000: 100.0})
    write_original(tmp_path / "a2.log", {2000: 100.0})
    write_original(tmp_path / "a10.log", {3000: 100.0})
    runs = me_arms.load_arm(f"{tmp_path}/a*.log,{tmp_path}/ours/seed*/m.jsonl,{tmp_path}/none*.log")
    assert [Path(r.name).name for r in runs] == ["a2.log", "a10.log", "m.jsonl"]  # numeric order within a glob
    assert [max(r.curve) for r in runs] == [2000, 3000, 1000]
