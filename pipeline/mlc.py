"""MLC's algebraic episodes (Lake & Baroni 2023, Nature, "Human-like systematic generalization through a
meta-learning neural network") as an episode family: `--episode_type mlc_algebraic`.

Each episode has a grammar of its own: 4 of 9 pseudo-words are primitives that mean one colour each, 3 more
are functions with a rewrite rule each, and a last rule concatenates; 24 distinct commands of at most 8 words
whose outputs have at most 8 colours are drawn from the grammar and split into 14 study (support) examples
and 10 queries. These are the facts of MLC's generate_datasets.py (`algebraic` episodes, rule sampling,
example sampling) and its interpret_grammar.py (how a grammar rewrites a command); docs/mlc.md names each.
Nothing here is their code: the interpreter works on tokens where theirs works on regular expressions, with
the same first-match order (rules in order, each string variable as long as it can be).
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.families import EpisodeFamily

WORDS = ("dax", "lug", "wif", "zup", "fep", "blicket", "kiki", "tufa", "gazzer")  # MLC's input pool
COLOURS = ("RED", "YELLOW", "GREEN", "BLUE", "PURPLE", "PINK")                   # MLC's output pool
ATOM_VARS, STRING_VARS = ("u1", "u2"), ("x1", "x2")  # u: one word; x: any non-empty sequence of words
MAX_REWRITES = 50  # MLC's recursion budget for one command: a command that needs more does not interpret
# The few-shot task's three functions (thrice, surround, after) with the function word as F: a grammar with
# exactly these is never sampled, so no training episode is the test episode under other names.
FEW_SHOT_FUNCTIONS = frozenset({"u1 F -> [u1] [u1] [u1]", "u1 F u2 -> [u1] [u2] [u1]", "x1 F x2 -> [x2] [x1]"})


@functools.lru_cache(maxsize=4096)  # a handful of distinct tokens, asked about again and again
def is_atom_var(token: str) -> bool:
    return re.fullmatch(r"u[0-9]*", token.strip("[]")) is not None


@functools.lru_cache(maxsize=4096)
def is_string_var(token: str) -> bool:
    return re.fullmatch(r"x[0-9]*", token.strip("[]")) is not None


def is_var(token: str) -> bool:
    return is_atom_var(token) or is_string_var(token)


@dataclass(frozen=True)
class Rule:
    """`lhs -> rhs`: a left side of words and variables; a right side of output symbols and `[v]` (interpret
    what v is bound to) or `[words]` (interpret those words)."""
    lhs: tuple[str, ...]
    rhs: tuple[str, ...]

    def __str__(self) -> str:
        return f"{' '.join(self.lhs)} -> {' '.join(self.rhs)}"

    @property
    def uses_only_bound_vars(self) -> bool:
        """Every variable of the right side is on the left (MLC rejects a grammar whose rule drops one)."""
        return {t.strip("[]") for t in self.rhs if is_var(t)} <= {t for t in self.lhs if is_var(t)}


CONCAT = Rule(("u1", "x1"), ("[u1]", "[x1]"))  # MLC's last rule: a word, then the rest


class TooLong(Exception):
    """The command needs more than MAX_REWRITES rewrites."""


@dataclass(frozen=True)
class Grammar:
    """Rules tried in order; the first whose left side matches the whole command rewrites it."""
    rules: tuple[Rule, ...]
    atoms: frozenset[str]  # the words an atom variable u may stand for

    def __str__(self) -> str:
        return "\n".join(str(rule) for rule in self.rules)

    def identifier(self) -> str:
        """MLC's episode identifier: the rules sorted, so the same rule set is one identifier."""
        return "\n".join(sorted(str(rule) for rule in self.rules))

    def interpret(self, command: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """The output of a command (a command no rule matches stands for itself); TooLong past the budget."""
        budget = [MAX_REWRITES]
        return tuple(self._rewrite(tuple(command), budget))

    def _rewrite(self, tokens: tuple[str, ...], budget: list[int]) -> list[str]:
        budget[0] -= 1
        if budget[0] < 0:
            raise TooLong
        for rule in self.rules:
            bound = match(rule.lhs, tokens, self.atoms)
            if bound is not None:
                return self._expand(rule, bound, budget)
        return list(tokens)

    def _expand(self, rule: Rule, bound: dict[str, tuple[str, ...]], budget: list[int]) -> list[str]:
        out: list[str] = []
        for item in rule.rhs:
            if is_var(item):
                out += self._rewrite(bound[item.strip("[]")], budget)
            elif item.startswith("[") and item.endswith("]"):
                out += self._rewrite(tuple(item[1:-1].split()), budget)
            else:
                out.append(item)
        return out


def match(lhs: tuple[str, ...], tokens: tuple[str, ...], atoms: frozenset[str]) -> dict | None:
    """The variables' values where `lhs` matches all of `tokens`, else None. Of several matches, the one a
    regular expression finds: each string variable, left to right, as long as it can be."""
    def walk(p: int, t: int, bound: dict) -> dict | None:
        if p == len(lhs):
            return bound if t == len(tokens) else None
        item = lhs[p]
        if is_string_var(item):
            for end in range(len(tokens), t, -1):
                found = walk(p + 1, end, {**bound, item: tokens[t:end]})
                if found is not None:
                    return found
            return None
        if t == len(tokens) or not (tokens[t] in atoms if is_atom_var(item) else tokens[t] == item):
            return None
        return walk(p + 1, t + 1, {**bound, item: tokens[t:t + 1]} if is_atom_var(item) else bound)
    return walk(0, 0, {})


def parse_grammar(text: str, atoms) -> Grammar:
    """A grammar written as MLC writes one (a `LHS -> RHS` rule a line, in the order they are tried); a
    line of another form, or a rule whose right side uses a variable its left side lacks, is an error."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        sides = line.split("->")
        if len(sides) != 2 or not sides[0].split() or not sides[1].split():
            raise ValueError(f"grammar line {number} is not of the form `LHS -> RHS`: {line.strip()!r}")
        rule = Rule(tuple(sides[0].split()), tuple(sides[1].split()))
        if not rule.uses_only_bound_vars:
            raise ValueError(f"grammar line {number}: the right side uses a variable the left side lacks: {rule}")
        rules.append(rule)
    return Grammar(tuple(rules), frozenset(atoms))


# ---- sampling an episode -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlgebraicConfig:
    """MLC's `algebraic` episodes (generate_datasets.py): its numbers are the defaults."""
    nsupport: int = 14
    nquery: int = 10
    nprims: int = 4
    nfunctions: int = 3
    maxlen: int = 8            # most words of a command, colours of an output, and items of a rule's right side
    p_one_arg: float = 0.5     # a function takes one argument (else two)
    p_stop_rhs: float = 0.6    # stop growing a right side once it has two items
    max_draws: int = 10000     # draws of a command in a row that give no valid example: a new grammar


def sample_grammar(rng: np.random.Generator, cfg: AlgebraicConfig) -> Grammar:
    """Primitives first (a word, a colour), then the functions, then the concatenation rule."""
    words = [str(w) for w in rng.permutation(WORDS)]
    colours = [str(c) for c in rng.permutation(COLOURS)]
    rules = [Rule((w,), (c,)) for w, c in zip(words[:cfg.nprims], colours[:cfg.nprims])]
    for name in words[cfg.nprims:cfg.nprims + cfg.nfunctions]:
        lhs = sample_lhs(rng, name, cfg)
        rules.append(Rule(lhs, sample_rhs(rng, tuple(f"[{v}]" for v in lhs if is_var(v)), cfg)))
    return Grammar(tuple(rules) + (CONCAT,), frozenset(WORDS))


def sample_lhs(rng: np.random.Generator, name: str, cfg: AlgebraicConfig) -> tuple[str, ...]:
    """`v F` or `v F w`: the variables taken in turn from the atom and string lists, each step from one of
    the two at random, so the first is u1 or x1 and a second differs from it."""
    atoms, strings, order = list(ATOM_VARS), list(STRING_VARS), []
    while atoms and strings:
        order.append((atoms if rng.random() < 0.5 else strings).pop(0))
    order += atoms + strings
    return (order[0], name) if rng.random() < cfg.p_one_arg else (order[0], name, order[1])


def sample_rhs(rng: np.random.Generator, used: tuple[str, ...], cfg: AlgebraicConfig) -> tuple[str, ...]:
    """Each left-side variable once, then more of them (at least two items, at most maxlen), shuffled."""
    items = list(used)
    while len(items) < cfg.maxlen and not (len(items) >= 2 and rng.random() < cfg.p_stop_rhs):
        items.append(used[int(rng.integers(len(used)))])
    return tuple(str(items[i]) for i in rng.permutation(len(items)))


def command_grammar(grammar: Grammar) -> dict[str, list[tuple[str, ...]]]:
    """The grammar of the commands: U is a primitive word; X is U or any rule's left side, its variables
    made U and X again (so the concatenation rule gives `U X`)."""
    def symbol(token: str) -> str:
        return "U" if is_atom_var(token) else "X" if is_string_var(token) else token
    sides = [tuple(symbol(t) for t in rule.lhs) for rule in grammar.rules]
    return {"U": [s for s in sides if len(s) == 1], "X": [("U",)] + [s for s in sides if len(s) > 1]}


def sample_command(rng: np.random.Generator, symbols: dict, maxlen: int) -> tuple[str, ...] | None:
    """Expand every U and X at once, round after round, each by a uniform choice; None once it is longer
    than maxlen words (it can only grow)."""
    tokens: tuple[str, ...] = ("X",)
    while any(t in symbols for t in tokens):
        expanded: list[str] = []
        for token in tokens:
            options = symbols.get(token)
            expanded += options[int(rng.integers(len(options)))] if options else [token]
        tokens = tuple(expanded)
        if len(tokens) > maxlen:
            return None
    return tokens


def sample_examples(rng: np.random.Generator, grammar: Grammar, cfg: AlgebraicConfig) -> list | None:
    """nsupport + nquery distinct (command, output) pairs, both at most maxlen long, in a random order;
    None when max_draws draws in a row give no valid one."""
    wanted, found, failed = cfg.nsupport + cfg.nquery, {}, 0
    symbols = command_grammar(grammar)
    while len(found) < wanted:
        command = sample_command(rng, symbols, cfg.maxlen)
        output = _output(grammar, command, cfg.maxlen) if command else None
        if output is None:
            failed += 1
            if failed > cfg.max_draws:
                return None
            continue
        failed = 0
        found.setdefault(command, output)
    pairs = list(found.items())
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _output(grammar: Grammar, command: tuple[str, ...], maxlen: int) -> tuple[str, ...] | None:
    try:
        output = grammar.interpret(command)
    except TooLong:
        return None
    return output if len(output) <= maxlen else None


def is_few_shot_grammar(grammar: Grammar, cfg: AlgebraicConfig) -> bool:
    """Its functions are the few-shot task's (thrice, surround, after) under other names."""
    functions = grammar.rules[cfg.nprims:cfg.nprims + cfg.nfunctions]
    return {str(Rule(r.lhs[:1] + ("F",) + r.lhs[2:], r.rhs)) for r in functions} >= FEW_SHOT_FUNCTIONS


def sample_episode(rng: np.random.Generator, split: str, cfg: AlgebraicConfig = AlgebraicConfig()) -> dict:
    """One episode of the split ("train" and "val" are drawn alike; the store keeps training episodes off
    the validation episodes' grammars, by identifier)."""
    while True:
        grammar = sample_grammar(rng, cfg)
        if is_few_shot_grammar(grammar, cfg):
            continue
        examples = sample_examples(rng, grammar, cfg)
        if examples is not None:
            break
    pairs = [(" ".join(command), " ".join(output)) for command, output in examples]
    return {"support": pairs[:cfg.nsupport], "query": pairs[cfg.nsupport:],
            "identifier": grammar.identifier(),
            "mapping": [(r.lhs[0], r.rhs[0]) for r in grammar.rules[:cfg.nprims]]}


algebraic = EpisodeFamily(sample_episode, input_symbols=WORDS, output_symbols=COLOURS,
                          params={"mlc": "algebraic", **asdict(AlgebraicConfig())})
