"""What each evaluation split is made of (docs/method.md, "Evaluation").

A split is either `validation` (the store's validation episodes, scored as the trainer scores them), one of
the SCAN test splits (the test commands as queries against a support set), or `scan_file` (any file in the
SCAN `IN: ... OUT: ...` format, with a support set given on the command line).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pipeline import scan
from pipeline.errors import UserError

VALIDATION = "validation"
SCAN_FILE = "scan_file"


@dataclass(frozen=True)
class ScanTestSplit:
    name: str                                  # the SCAN split whose test commands are the queries
    support: tuple[tuple[str, str], ...] | None  # fixed support; None: each validation episode's support in turn


SCAN_TEST_SPLITS = {
    "addprim_jump": ScanTestSplit("addprim_jump", tuple(scan.TRUE_PRIMITIVES.items())),
    "template_around_right": ScanTestSplit(
        "template_around_right", (("turn left", "I_TURN_LEFT"), ("turn right", "I_TURN_RIGHT"))),
    "length": ScanTestSplit("length", None),
}


@dataclass(frozen=True)
class PaperNumber:
    accuracy: float  # percent, as reported in Lake (2019) and widely cited
    note: str        # what it was reported for


# The paper's numbers for the full model, the one home of them: eval's table, reproduce's results and the
# README's table all show these. (episode type, split) -> number; a pair not listed has none (add jump is
# reported for permutation meta-training only). ME's is validation generalization: solved, 100% on
# held-out episodes. Around right is cited as 98.71 (or 99.9).
PAPER_NUMBERS = {
    ("ME", VALIDATION): PaperNumber(100.0, "ME, validation generalization"),
    ("scan_prim_permutation", "addprim_jump"): PaperNumber(99.95, "add jump, scan_prim_permutation"),
    ("scan_around_right", "template_around_right"): PaperNumber(98.71, "around right, scan_around_right"),
    ("scan_length", "length"): PaperNumber(16.64, "length, scan_length"),
}


def paper_number(episode_type: str | None, split: str) -> PaperNumber | None:
    """The paper's number for `split` of a model meta-trained on `episode_type`, if it reports one."""
    return PAPER_NUMBERS.get((episode_type, split))

def drawn_validation(n: int) -> str:
    """The split of `eval --val_episodes N`: N validation episodes drawn afresh on the held-out pairings."""
    return f"{VALIDATION}_{n}"


# The splits each episode type is evaluated on; the default of `--split` is all of them.
TYPE_SPLITS = {
    "ME": (VALIDATION,),
    "scan_prim_permutation": (VALIDATION, "addprim_jump"),
    "scan_prim_augmentation": (VALIDATION, "addprim_jump"),
    "scan_around_right": (VALIDATION, "template_around_right"),
    "scan_length": (VALIDATION, "length"),
}


def type_splits(episode_type: str) -> tuple[str, ...]:
    """The splits of an episode type: a family of one's own has its validation episodes (and --scan_file)."""
    return TYPE_SPLITS.get(episode_type, (VALIDATION,))


def splits_for(episode_type: str, requested: str | None) -> tuple[str, ...]:
    """The splits to evaluate a checkpoint of `episode_type` on; a split that does not fit is an error."""
    allowed = type_splits(episode_type)
    if requested is None:
        return allowed
    if requested not in allowed:
        raise UserError(f"split {requested!r} does not fit a {episode_type} checkpoint; choose "
                        f"{' or '.join(allowed)} (or --scan_file with --support)")
    return (requested,)


@functools.lru_cache(maxsize=None)
def scan_test_pairs(split: str) -> tuple[scan.ScanPair, ...]:
    """The test commands of a rule-defined SCAN split (those of the official file), in grammar order."""
    return tuple(scan.split_pairs(split)[1])


def parse_support(spec: str) -> list[tuple[str, str]]:
    """`"jump=I_JUMP,turn left=I_TURN_LEFT"` -> [(input, output), ...]. An input given two outputs is an error:
    the memory would hold two meanings for it, and which one wins would be up to the model."""
    pairs = []
    for item in spec.split(","):
        source, sep, target = item.partition("=")
        if not sep or "=" in target or not source.split() or not target.split():
            raise UserError(f"--support: {item.strip()!r} is not of the form INPUT=OUTPUT "
                            "(e.g. \"jump=I_JUMP,walk=I_WALK\")")
        pairs.append((" ".join(source.split()), " ".join(target.split())))
    return check_support(pairs, "--support")


def check_support(pairs: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    """`pairs` with repeats of the same pair merged (in the order of first occurrence: SCAN files, such as
    `scan export` writes, repeat some pairs). An input given two different outputs is an error."""
    seen: dict[str, str] = {}
    for source, target in pairs:
        if seen.get(source, target) != target:
            raise UserError(f"{where}: the input {source!r} is given two different outputs ({source}={seen[source]} "
                            f"and {source}={target}); a support set gives each input one output")
        seen.setdefault(source, target)
    return list(seen.items())


def read_scan_file(path: str) -> list[tuple[int, scan.ScanPair]]:
    """(line number, pair) of every non-blank line; a malformed line is an error that names it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pairs.append((number, scan.parse_line(line)))
        except ValueError as err:
            raise UserError(f"{path} line {number}: {err}, got {line.strip()[:80]!r}") from None
    if not pairs:
        raise UserError(f"{path}: no `IN: ... OUT: ...` lines")
    return pairs
