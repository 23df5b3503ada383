"""SCAN (Lake & Baroni 2018) from its grammar and interpretation function.

    C -> S and S | S after S | S
    S -> V twice | V thrice | V
    V -> D opposite DIR | D around DIR | D | U      (D's first word is U or `turn`)
    D -> U DIR | turn DIR
    U -> walk | look | run | jump ;  DIR -> left | right

Nothing is downloaded: all 20,910 commands and the rule-defined splits come from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.shardio import write_bytes_atomically

ACTION_WORDS = ("walk", "look", "run", "jump")
ACTIONS = ("I_WALK", "I_LOOK", "I_RUN", "I_JUMP")
DIRECTION_WORDS = ("left", "right")
TURNS = ("I_TURN_LEFT", "I_TURN_RIGHT")
TRUE_PRIMITIVES = dict(zip(ACTION_WORDS, ACTIONS))
TRUE_DIRECTIONS = dict(zip(DIRECTION_WORDS, TURNS))
INPUT_WORDS = ("turn", *ACTION_WORDS, *DIRECTION_WORDS, "opposite", "around", "twice", "thrice", "and", "after")
OUTPUT_WORDS = (*ACTIONS, *TURNS)
SPLITS = ("all", "addprim_jump", "addprim_turn_left", "length", "template_around_right")


class ScanParseError(ValueError):
    """A command that the SCAN grammar does not produce."""


def _enumerate_v() -> list[str]:
    heads = list(ACTION_WORDS) + ["turn"]
    phrases = []
    for head in heads:
        for direction in DIRECTION_WORDS:
            phrases += [f"{head} opposite {direction}", f"{head} around {direction}", f"{head} {direction}"]
    return phrases + list(ACTION_WORDS)


def all_commands() -> list[str]:
    """Every SCAN command, in a fixed grammar order (20,910 of them)."""
    verb_phrases = _enumerate_v()
    sentences = [f"{v}{suffix}" for v in verb_phrases for suffix in ("", " twice", " thrice")]
    commands = list(sentences)
    for conj in ("and", "after"):
        commands += [f"{a} {conj} {b}" for a in sentences for b in sentences]
    return commands


def interpret(command: str, primitives: dict[str, str] | None = None,
              directions: dict[str, str] | None = None) -> list[str]:
    """The action sequence of `command`; `primitives`/`directions` give each word's meaning."""
    prims = TRUE_PRIMITIVES if primitives is None else primitives
    dirs = TRUE_DIRECTIONS if directions is None else directions
    tokens = command.split()
    for conj in ("and", "after"):
        if conj in tokens:
            i = tokens.index(conj)
            first, second = _interpret_s(tokens[:i], prims, dirs), _interpret_s(tokens[i + 1:], prims, dirs)
            return first + second if conj == "and" else second + first
    return _interpret_s(tokens, prims, dirs)


def _interpret_s(tokens: list[str], prims: dict[str, str], dirs: dict[str, str]) -> list[str]:
    repeats = {"twice": 2, "thrice": 3}
    if tokens and tokens[-1] in repeats:
        return _interpret_v(tokens[:-1], prims, dirs) * repeats[tokens[-1]]
    return _interpret_v(tokens, prims, dirs)


def _interpret_v(tokens: list[str], prims: dict[str, str], dirs: dict[str, str]) -> list[str]:
    def action(head: str) -> list[str]:
        if head == "turn":
            return []
        if head not in prims:
            raise ScanParseError(f"not an action word: {head!r} in {' '.join(tokens)!r}")
        return [prims[head]]

    def turn(word: str) -> str:
        if word not in dirs:
            raise ScanParseError(f"not a direction: {word!r} in {' '.join(tokens)!r}")
        return dirs[word]

    if len(tokens) == 1 and tokens[0] != "turn":
        return action(tokens[0])
    if len(tokens) == 2:
        return [turn(tokens[1])] + action(tokens[0])
    if len(tokens) == 3 and tokens[1] == "opposite":
        return [turn(tokens[2])] * 2 + action(tokens[0])
    if len(tokens) == 3 and tokens[1] == "around":
        return ([turn(tokens[2])] + action(tokens[0])) * 4
    raise ScanParseError(f"not a SCAN phrase: {' '.join(tokens)!r}")


@dataclass(frozen=True)
class ScanPair:
    command: str
    actions: str  # space-separated action sequence


def all_pairs() -> list[ScanPair]:
    return [ScanPair(c, " ".join(interpret(c))) for c in all_commands()]


def _addprim_split(pairs: list[ScanPair], primitive: str) -> tuple[list[ScanPair], list[ScanPair]]:
    """Test: every command containing `primitive` except the bare one. Train: the rest, with the bare
    primitive repeated until it makes up 10% of the train file (as in the official files)."""
    def contains(command: str) -> bool:
        return f" {primitive} " in f" {command} "

    test = [p for p in pairs if contains(p.command) and p.command != primitive]
    rest = [p for p in pairs if not contains(p.command)]
    bare = next(p for p in pairs if p.command == primitive)
    n_bare = math.ceil(len(rest) / 9)  # smallest n with n >= 0.1 * (len(rest) + n)
    return rest + [bare] * n_bare, test


def split_pairs(split: str, pairs: list[ScanPair] | None = None) -> tuple[list[ScanPair], list[ScanPair]]:
    """(train, test) of a rule-defined SCAN split; for `all`, (all pairs, [])."""
    pairs = all_pairs() if pairs is None else pairs
    if split == "all":
        return list(pairs), []
    if split == "addprim_jump":
        return _addprim_split(pairs, "jump")
    if split == "addprim_turn_left":
        return _addprim_split(pairs, "turn left")
    if split == "length":
        n_actions = [len(p.actions.split()) for p in pairs]
        return ([p for p, n in zip(pairs, n_actions) if n <= 22], [p for p, n in zip(pairs, n_actions) if n >= 24])
    if split == "template_around_right":
        test = [p for p in pairs if "around right" in p.command and "turn around right" not in p.command]
        train = [p for p in pairs if "around right" not in p.command]
        return train, test
    raise ValueError(f"unknown SCAN split {split!r}; choose from {', '.join(SPLITS)}")


def format_line(pair: ScanPair) -> str:
    return f"IN: {pair.command} OUT: {pair.actions}"


def parse_line(line: str) -> ScanPair:
    """One `IN: ... OUT: ...` line; raises ValueError if it is not of that form."""
    text = line.strip()
    if not text.startswith("IN: ") or " OUT: " not in text:
        raise ValueError("expected 'IN: <command> OUT: <actions>'")
    command, actions = text[4:].split(" OUT: ", 1)
    if not command.strip() or not actions.strip():
        raise ValueError("empty command or action sequence")
    return ScanPair(command.strip(), actions.strip())


def export_split(split: str, out_dir: Path) -> list[Path]:
    """Write the split in the official file layout; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = split_pairs(split)
    files = {"tasks.txt": train} if split == "all" else {
        f"tasks_train_{split}.txt": train, f"tasks_test_{split}.txt": test}
    written = []
    for name, pairs in files.items():
        path = out_dir / name
        write_bytes_atomically(path, "".join(format_line(p) + "\n" for p in pairs).encode())
        written.append(path)
    return written
