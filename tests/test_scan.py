"""`cli.py scan export` against the official SCAN files (../shared/scan, BSD licence) and the split rules."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cli import cli, run_cli
from pipeline.scan import parse_line

OFFICIAL = Path(__file__).parents[2] / "shared" / "scan"
SIZES = {  # (train, test) lines; addprim_turn_left has no official file, its sizes follow from the rule
    "all": (20910, 0), "addprim_jump": (14670, 7706), "addprim_turn_left": (21890, 1208),
    "length": (16990, 3920), "template_around_right": (15225, 4476),
}


def export(split: str, out: Path) -> dict[str, list[str]]:
    assert run_cli(cli, ["scan", "export", "--split", split, "--out", str(out)]) == 0
    return {p.name: p.read_text().splitlines() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict[str, list[str]]]:
    return {split: export(split, tmp_path_factory.mktemp(split)) for split in SIZES}


@pytest.mark.parametrize("split", list(SIZES))
def test_split_sizes(exports, split):
    files = exports[split]
    if split == "all":
        assert list(files) == ["tasks.txt"] and len(files["tasks.txt"]) == SIZES[split][0]
        return
    assert len(files[f"tasks_train_{split}.txt"]) == SIZES[split][0]
    assert len(files[f"tasks_test_{split}.txt"]) == SIZES[split][1]


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"official SCAN files not found at {OFFICIAL}")
@pytest.mark.parametrize("split", ["all", "addprim_jump", "length", "template_around_right"])
def test_export_equals_official_files(exports, split):
    for name, lines in exports[split].items():
        official = (OFFICIAL / name).read_text().splitlines()
        assert Counter(lines) == Counter(line.strip() for line in official), name


def test_addprim_turn_left_follows_the_rule(exports):
    files = exports["addprim_turn_left"]
    train = [parse_line(line).command for line in files["tasks_train_addprim_turn_left.txt"]]
    test = [parse_line(line).command for line in files["tasks_test_addprim_turn_left.txt"]]
    assert all("turn left" in c and c != "turn left" for c in test)
    assert len(set(test)) == len(test)
    bare = sum(c == "turn left" for c in train)
    assert all("turn left" not in c for c in train if c != "turn left")
    assert bare / len(train) >= 0.1 > (bare - 1) / (len(train) - 1)  # just enough copies for 10%
    assert len(set(train)) + len(test) == SIZES["all"][0]  # together they cover SCAN exactly once
