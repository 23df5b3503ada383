"""The samplers against independent facts: the SCAN interpretation function, the split rules, the sizes in method.md."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline import scan
from pipeline.errors import UserError
from pipeline.samplers import EPISODE_TYPES, ME_INPUTS, ME_OUTPUTS, TabuError, get_sampler

N_TRAIN = 400
TRUE_PAIRS = {**scan.TRUE_PRIMITIVES, **scan.TRUE_DIRECTIONS}


def sample_store_like(episode_type: str, n_train: int = N_TRAIN, n_val: int = 5, seed: int = 0):
    sampler = get_sampler(episode_type)
    val = sampler.sample_validation(np.random.default_rng([seed, 1, 0]), n_val)
    tabu = frozenset(e["identifier"] for e in val)
    rng = np.random.default_rng([seed, 0, 0])
    return val, [sampler.sample_train(rng, tabu) for _ in range(n_train)]


@pytest.fixture(scope="module", params=EPISODE_TYPES)
def episodes(request):
    return (request.param, *sample_store_like(request.param))


def expected_output(episode_type: str, mapping: dict[str, str], command: str) -> str:
    """An independent translation: the SCAN interpreter (or ME's symbol-by-symbol rule) under the pairing."""
    if episode_type == "ME":
        return " ".join(mapping[w] for w in command.split())
    if episode_type == "scan_around_right":
        return " ".join(scan.interpret(command, directions=mapping))
    return " ".join(scan.interpret(command, primitives=mapping))


def test_every_output_is_the_interpretation_under_the_mapping(episodes):
    episode_type, val, train = episodes
    for episode in val + train:
        mapping = {m["src"]: m["tgt"] for m in episode["mapping"]}
        for item in episode["support"] + episode["query"]:
            assert item["output"] == expected_output(episode_type, mapping, item["input"]), item


def test_set_sizes_and_disjointness(episodes):
    episode_type, val, train = episodes
    nsupport, nquery = {"ME": (3, 20), "scan_length": (100, 20)}.get(episode_type, (20, 20))
    for episode in val + train:
        support = [s["input"] for s in episode["support"]]
        query = [q["input"] for q in episode["query"]]
        assert (len(support), len(query)) == (nsupport, nquery)
        assert len(set(query)) == nquery and len(set(support)) == nsupport
        if episode_type != "ME":  # ME queries are 2-6 symbol sequences, so they cannot be support items
            assert not set(support) & set(query)
        assert len(episode["mapping"]) == (4 if episode_type != "scan_around_right" else 2)


def test_validation_episodes_use_true_meanings(episodes):
    episode_type, val, _ = episodes
    if episode_type == "ME":
        assert len({e["identifier"] for e in val}) == len(val)  # five distinct random pairings
        return
    for episode in val:
        assert all(TRUE_PAIRS[m["src"]] == m["tgt"] for m in episode["mapping"])
        for item in episode["support"] + episode["query"]:
            assert item["output"] == " ".join(scan.interpret(item["input"]))


def test_training_never_carries_a_validation_identifier(episodes):
    episode_type, val, train = episodes
    tabu = {e["identifier"] for e in val}
    assert not tabu & {e["identifier"] for e in train}
    forbidden = {"scan_prim_augmentation": ("jump", "I_JUMP"), "scan_around_right": ("right", "I_TURN_RIGHT")}
    if episode_type in forbidden:
        assert not any(forbidden[episode_type] in {(m["src"], m["tgt"]) for m in e["mapping"]} for e in train)
    if episode_type in ("scan_prim_permutation", "scan_length"):
        true_pairing = {(w, TRUE_PAIRS[w]) for w in scan.ACTION_WORDS}
        assert all({(m["src"], m["tgt"]) for m in e["mapping"]} != true_pairing for e in train)


def test_scan_length_draws_from_the_length_split():
    train_split, test_split = scan.split_pairs("length")
    train_true = {p.command: len(p.actions.split()) for p in train_split}
    test_true = {p.command for p in test_split}
    val, train = sample_store_like("scan_length", n_train=50)
    for episode in val:
        assert all(s["input"] in train_true for s in episode["support"])
        assert all(q["input"] in test_true for q in episode["query"])
    for episode in train:  # substitution keeps the number of actions, so count them in the output
        assert all(len(s["output"].split()) < 12 for s in episode["support"])
        assert all(len(q["output"].split()) >= 12 for q in episode["query"])


def test_prim_augmentation_distribution():
    _, train = sample_store_like("scan_prim_augmentation", n_train=3000)
    with_jump = np.mean([any(m["src"] == "jump" for m in e["mapping"]) for e in train])
    assert abs(with_jump - 4 / 24) < 0.03  # ~4 standard deviations at n=3000
    extras = np.mean([sum(m["src"].isdigit() for m in e["mapping"]) for e in train])
    assert abs(extras - 4 * 20 / 24) < 0.1
    jump_meanings = {m["tgt"] for e in train for m in e["mapping"] if m["src"] == "jump"}
    assert "I_JUMP" not in jump_meanings and len(jump_meanings) > 15


def test_me_pairings_are_uniform_over_the_allowed_ones():
    val, train = sample_store_like("ME", n_train=1900)
    counts = {}
    for e in train:
        counts[e["identifier"]] = counts.get(e["identifier"], 0) + 1
    assert len(counts) == 24 - 5
    assert min(counts.values()) > 100 * 0.6 and max(counts.values()) < 100 * 1.4
    for e in train:
        lengths = [len(q["input"].split()) for q in e["query"]]
        assert min(lengths) >= 2 and max(lengths) <= 6
        assert set(" ".join(q["input"] for q in e["query"]).split()) <= set(ME_INPUTS)


def test_scan_commands_stay_in_scan_after_substitution():
    all_commands = set(scan.all_commands())
    _, train = sample_store_like("scan_prim_permutation", n_train=50)
    assert all(item["input"] in all_commands for e in train for item in e["support"] + e["query"])


def test_same_generator_state_gives_the_same_episodes():
    for episode_type in EPISODE_TYPES:
        assert sample_store_like(episode_type, n_train=5) == sample_store_like(episode_type, n_train=5)
        assert sample_store_like(episode_type, n_train=5) != sample_store_like(episode_type, n_train=5, seed=1)


def test_impossible_tabu_is_a_clear_error():
    sampler = get_sampler("ME")
    with pytest.raises(TabuError, match="24 pairings"):
        sampler.sample_validation(np.random.default_rng(0), 24)
    everything = frozenset(
        ", ".join(f"{w} -> {a}" for w, a in sorted(zip(ME_INPUTS, p))) for p in itertools.permutations(ME_OUTPUTS))
    with pytest.raises(TabuError):
        sampler.sample_train(np.random.default_rng(0), everything)
    augmentation = get_sampler("scan_prim_augmentation")
    all_jump = frozenset(["no jump"] + [f"jump -> {a}" for a in augmentation.output_symbols])
    with pytest.raises(TabuError, match="100 tries"):
        augmentation.sample_train(np.random.default_rng(0), all_jump)


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(UserError, match="scan_prim_augmentation"):
        get_sampler("scan_jump")
