"""The five episode samplers of Lake (2019), as pure functions of an explicit numpy Generator.

SCAN commands are abstracted once into templates whose changing primitives are slots
(`"{0} twice after turn left"` -> `"I_TURN_LEFT {0} {0}"`); an episode fills the slots with its pairing.
That is what makes sampling cheap: no copy of the command list per episode, only string formatting.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from pipeline import families, scan
from pipeline.errors import UserError

EPISODE_TYPES = ("ME", "scan_prim_permutation", "scan_prim_augmentation", "scan_around_right", "scan_length")
MAX_TABU_TRIES = 100  # as in the original: resample this often, then fail with a clear error
ME_INPUTS = ("dax", "lug", "wif", "zup")
ME_OUTPUTS = ("RED", "YELLOW", "GREEN", "BLUE")


class TabuError(UserError):
    """No episode can be sampled that avoids the validation identifiers."""


def pairing_identifier(words, actions) -> str:
    """Canonical name of a full pairing: pairs sorted by source word."""
    return ", ".join(f"{w} -> {a}" for w, a in sorted(zip(words, actions)))


def _mapping(words, actions) -> list[dict]:
    return [{"src": w, "tgt": a} for w, a in zip(words, actions)]


@dataclass(frozen=True)
class TemplatePool:
    """SCAN commands with their slot words abstracted to `{k}` format fields."""
    commands: tuple[str, ...]
    outputs: tuple[str, ...]
    n_actions: np.ndarray  # (n,) action-sequence length of each command

    def __len__(self) -> int:
        return len(self.commands)

    def fill(self, indices, words, actions) -> list[dict]:
        cmds, outs = self.commands, self.outputs
        return [{"input": cmds[i].format(*words), "output": outs[i].format(*actions)} for i in indices]

    def subset(self, keep: np.ndarray) -> "TemplatePool":
        idx = np.flatnonzero(keep)
        return TemplatePool(tuple(self.commands[i] for i in idx), tuple(self.outputs[i] for i in idx),
                            self.n_actions[idx])


def make_template_pool(pairs: list[scan.ScanPair], slot_words: tuple[str, ...], slot_kind: str) -> TemplatePool:
    """Abstract `slot_words` (action words, or direction words when slot_kind == "direction")."""
    fields = {w: f"{{{k}}}" for k, w in enumerate(slot_words)}
    commands, outputs = [], []
    for pair in pairs:
        commands.append(" ".join(fields.get(t, t) for t in pair.command.split()))
        if slot_kind == "direction":
            actions = scan.interpret(pair.command, directions=fields)
        else:
            actions = scan.interpret(pair.command, primitives=fields)
        outputs.append(" ".join(actions))
    n_actions = np.array([len(p.actions.split()) for p in pairs], dtype=np.int64)
    return TemplatePool(tuple(commands), tuple(outputs), n_actions)


class EpisodeSampler:
    """Base: subclasses define the pairing of an episode and where its commands come from."""
    episode_type: str
    input_symbols: tuple[str, ...]
    output_symbols: tuple[str, ...]
    params: dict

    def sample_validation(self, rng: np.random.Generator, n: int) -> list[dict]:
        return [self._validation_episode(rng) for _ in range(n)]

    def sample_train(self, rng: np.random.Generator, tabu: frozenset[str]) -> dict:
        for _ in range(MAX_TABU_TRIES):
            pairing = self._random_pairing(rng)
            if self._identifier(*pairing) not in tabu:
                return self._episode(rng, *pairing, split="train")
        raise TabuError(f"{self.episode_type}: no training episode avoids the validation identifiers "
                        f"after {MAX_TABU_TRIES} tries ({len(tabu)} identifiers are tabu)")

    def sample_more_validation(self, rng: np.random.Generator, pairings: list[tuple[list[str], list[str]]],
                               n: int) -> list[dict]:
        """`n` more validation episodes, each on one of `pairings` (words, actions), picked with `rng`: the
        pairings of a store's validation episodes, whose identifiers its training episodes avoid. Each is made
        as the store made its validation episodes (the "val" split's pools), so only the draw differs."""
        if not pairings:
            raise UserError(f"{self.episode_type}: no validation pairing to draw episodes on")
        return [self._episode(rng, *pairings[int(rng.integers(len(pairings)))], split="val") for _ in range(n)]

    def _validation_episode(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def _random_pairing(self, rng: np.random.Generator) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def _identifier(self, words, actions) -> str:
        raise NotImplementedError

    def _episode(self, rng, words, actions, split: str) -> dict:
        raise NotImplementedError


class MESampler(EpisodeSampler):
    """Mutual exclusivity: 3 of the 4 pairs in the support set, 20 distinct sequences as queries."""
    episode_type = "ME"
    input_symbols, output_symbols = ME_INPUTS, ME_OUTPUTS
    n_pairings = 24  # 4!

    def __init__(self, nquery: int = 20, min_len: int = 2, max_len: int = 6):
        self.nquery, self.min_len, self.max_len = nquery, min_len, max_len
        self.params = {"nsupport": len(ME_INPUTS) - 1, "nquery": nquery, "query_min_len": min_len,
                       "query_max_len": max_len}

    def sample_validation(self, rng: np.random.Generator, n: int) -> list[dict]:
        # ME validation episodes are ordinary random episodes, with distinct pairings.
        if n >= self.n_pairings:
            raise TabuError(f"ME has only {self.n_pairings} pairings: {n} distinct validation episodes would "
                            "leave none for training")
        episodes, seen = [], set()
        while len(episodes) < n:
            words, actions = self._random_pairing(rng)
            if self._identifier(words, actions) not in seen:
                seen.add(self._identifier(words, actions))
                episodes.append(self._episode(rng, words, actions, split="val"))
        return episodes

    def sample_train(self, rng: np.random.Generator, tabu: frozenset[str]) -> dict:
        if len(tabu) >= self.n_pairings:
            raise TabuError(f"ME: all {self.n_pairings} pairings are validation identifiers; none is left "
                            "for training")
        return super().sample_train(rng, tabu)

    def _random_pairing(self, rng):
        return list(ME_INPUTS), [ME_OUTPUTS[i] for i in rng.permutation(len(ME_OUTPUTS))]

    def _identifier(self, words, actions) -> str:
        return pairing_identifier(words, actions)

    def _episode(self, rng, words, actions, split):
        meaning = dict(zip(words, actions))
        support_words = [words[i] for i in rng.permutation(len(words))[:len(words) - 1]]
        queries: dict[str, None] = {}  # insertion-ordered set
        while len(queries) < self.nquery:
            length = int(rng.integers(self.min_len, self.max_len + 1))
            queries[" ".join(words[i] for i in rng.integers(0, len(words), size=length))] = None
        return {"identifier": self._identifier(words, actions), "mapping": _mapping(words, actions),
                "support": [{"input": w, "output": meaning[w]} for w in support_words],
                "query": [{"input": q, "output": " ".join(meaning[w] for w in q.split())} for q in queries]}


@dataclass(frozen=True)
class ScanSpec:
    """What changes per episode in a SCAN episode type, and where its commands come from."""
    episode_type: str
    slot_words: tuple[str, ...]    # the true words of the slots, in slot order
    slot_actions: tuple[str, ...]  # their true meanings
    extra_words: tuple[str, ...]
    extra_actions: tuple[str, ...]
    slot_kind: str                 # "action" or "direction"
    identifier_word: str | None    # None: the identifier is the full pairing
    nsupport: int = 20
    nquery: int = 20


def _extras(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(i) for i in range(1, n + 1)), tuple(f"I_{i}" for i in range(1, n + 1))


SCAN_SPECS = {
    "scan_prim_permutation": ScanSpec("scan_prim_permutation", scan.ACTION_WORDS, scan.ACTIONS, (), (),
                                      "action", None),
    "scan_prim_augmentation": ScanSpec("scan_prim_augmentation", scan.ACTION_WORDS, scan.ACTIONS, *_extras(20),
                                       "action", "jump"),
    "scan_around_right": ScanSpec("scan_around_right", scan.DIRECTION_WORDS, scan.TURNS, *_extras(2),
                                  "direction", "right"),
    "scan_length": ScanSpec("scan_length", scan.ACTION_WORDS, scan.ACTIONS, *_extras(20), "action", None,
                            nsupport=100),
}
LENGTH_SUPPORT_MAX_ACTIONS = 12  # scan_length: support commands have fewer actions, queries at least this many


class ScanSampler(EpisodeSampler):
    def __init__(self, spec: ScanSpec):
        self.spec = spec
        self.episode_type = spec.episode_type
        self.input_symbols = scan.INPUT_WORDS + spec.extra_words
        self.output_symbols = scan.OUTPUT_WORDS + spec.extra_actions
        self.params = {"nsupport": spec.nsupport, "nquery": spec.nquery, "nextra": len(spec.extra_words)}
        self.pools = self._make_pools()

    def _make_pools(self) -> dict[str, tuple[TemplatePool, TemplatePool]]:
        """(support pool, query pool) per split; the same object twice means "draw both from one pool"."""
        spec = self.spec
        if spec.episode_type != "scan_length":
            everything = make_template_pool(scan.all_pairs(), spec.slot_words, spec.slot_kind)
            return {"train": (everything, everything), "val": (everything, everything)}
        train, test = scan.split_pairs("length")
        train_pool = make_template_pool(train, spec.slot_words, spec.slot_kind)
        short = train_pool.n_actions < LENGTH_SUPPORT_MAX_ACTIONS
        test_pool = make_template_pool(test, spec.slot_words, spec.slot_kind)
        return {"train": (train_pool.subset(short), train_pool.subset(~short)), "val": (train_pool, test_pool)}

    def _random_pairing(self, rng):
        spec, k = self.spec, len(self.spec.slot_words)
        words, actions = spec.slot_words + spec.extra_words, spec.slot_actions + spec.extra_actions
        return ([words[i] for i in rng.permutation(len(words))[:k]],
                [actions[i] for i in rng.permutation(len(actions))[:k]])

    def _identifier(self, words, actions) -> str:
        word = self.spec.identifier_word
        if word is None:
            return pairing_identifier(words, actions)
        return f"{word} -> {actions[words.index(word)]}" if word in words else f"no {word}"

    def _validation_episode(self, rng):
        return self._episode(rng, list(self.spec.slot_words), list(self.spec.slot_actions), split="val")

    def _episode(self, rng, words, actions, split):
        support_pool, query_pool = self.pools[split]
        ns, nq = self.spec.nsupport, self.spec.nquery
        if support_pool is query_pool:  # one draw without replacement keeps support and query disjoint
            idx = rng.choice(len(support_pool), ns + nq, replace=False)
            support_idx, query_idx = idx[:ns], idx[ns:]
        else:
            support_idx = rng.choice(len(support_pool), ns, replace=False)
            query_idx = rng.choice(len(query_pool), nq, replace=False)
        return {"identifier": self._identifier(words, actions), "mapping": _mapping(words, actions),
                "support": support_pool.fill(support_idx, words, actions),
                "query": query_pool.fill(query_idx, words, actions)}


class FamilySampler(EpisodeSampler):
    """An episode family of one's own (pipeline/families.py) behind the samplers' interface."""

    def __init__(self, name: str, family: families.EpisodeFamily):
        self.episode_type, self.family = name, family
        self.input_symbols, self.output_symbols = tuple(family.input_symbols), tuple(family.output_symbols)
        self.params = {**family.params, "family": families.family_record(name)}

    def sample_validation(self, rng: np.random.Generator, n: int) -> list[dict]:
        return [self._draw(rng, "val") for _ in range(n)]

    def sample_train(self, rng: np.random.Generator, tabu: frozenset[str]) -> dict:
        for _ in range(MAX_TABU_TRIES):
            episode = self._draw(rng, "train")
            if episode["identifier"] not in tabu:
                return episode
        raise TabuError(f"{self.episode_type}: no training episode avoids the validation identifiers "
                        f"after {MAX_TABU_TRIES} tries ({len(tabu)} identifiers are tabu)")

    def sample_more_validation(self, rng, pairings, n: int) -> list[dict]:
        raise UserError(f"{self.episode_type}: --val_episodes draws on the pairings of the built-in types; a "
                        "family of one's own has none (score its validation episodes, or a file of its own)")

    def _draw(self, rng: np.random.Generator, split: str) -> dict:
        raw = self.family.sample(rng, split)
        try:
            support, query = _pairs(raw["support"]), _pairs(raw["query"])
            mapping = [{"src": s, "tgt": t} for s, t in raw.get("mapping", ())]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{self.episode_type}: an episode must be a dict of support and query pairs "
                            f"(input, output): {type(err).__name__}: {err}") from None
        identifier = raw.get("identifier") or "support " + hashlib.sha256(
            json.dumps(support, sort_keys=True).encode()).hexdigest()[:16]
        return {"identifier": str(identifier), "mapping": mapping, "support": support, "query": query}


def _pairs(items) -> list[dict]:
    """[(input, output) or {"input", "output"}, ...] with each side a string or a list of tokens."""
    def text(side) -> str:
        return side if isinstance(side, str) else " ".join(side)
    return [{"input": text(it["input"]), "output": text(it["output"])} if isinstance(it, dict)
            else {"input": text(it[0]), "output": text(it[1])} for it in items]


@functools.lru_cache(maxsize=None)
def get_sampler(episode_type: str) -> EpisodeSampler:
    """The sampler of an episode type, built in or a family of one's own (built once per process: SCAN
    templates take a moment)."""
    if episode_type == "ME":
        return MESampler()
    if episode_type in SCAN_SPECS:
        return ScanSampler(SCAN_SPECS[episode_type])
    if families.is_family_name(episode_type):
        return FamilySampler(episode_type, families.load_family(episode_type))
    raise UserError(f"unknown episode type {episode_type!r}; choose one of: "
                    f"{', '.join(EPISODE_TYPES + tuple(families.BUILT_IN))}, or name a family of your own as "
                    "module:attribute")
