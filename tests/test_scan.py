"""`cli.py scan export` against the official SCAN files ($METASEQ2SEQ_SCAN, else ../shared/scan; BSD licence)
and the split rules."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from cli import cli, run_cli
from pipeline.scan import parse_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from references import scan_file, scan_missing  # noqa: E402
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


@pytest.mark.parametrize("split", ["all", "addprim_jump", "length", "template_around_right"])
def test_export_equals_official_files(exports, split):
    for name, lines in exports[split].items():
        if scan_file(name) is None:
            pytest.skip(scan_missing(name))
        official = scan_file(name).read_text().splitlines()
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


def test_official_files_are_found_through_the_variable_in_a_clones_layout(tmp_path, monkeypatch):
    """METASEQ2SEQ_SCAN may name a clone of brendenlake/SCAN as it is: its files sit in split folders."""
    (tmp_path / "length_split").mkdir()
    (tmp_path / "length_split" / "tasks_test_length.txt").write_text("IN: walk OUT: I_WALK\n")
    (tmp_path / "tasks.txt").write_text("")
    monkeypatch.setenv("METASEQ2SEQ_SCAN", str(tmp_path))
    assert scan_file("tasks_test_length.txt") == tmp_path / "length_split" / "tasks_test_length.txt"
    assert scan_file("tasks.txt") == tmp_path / "tasks.txt"
    assert scan_file("tasks_test_addprim_jump.txt") is None
    assert "METASEQ2SEQ_SCAN" in scan_missing("tasks_test_addprim_jump.txt") and str(tmp_path) in scan_missing()
