"""docs/experiments/me_seen_pairings.py: new episodes of each of ME's 24 pairings, grouped by the store's
validation pairings."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.samplers import pairing_identifier

pytestmark = pytest.mark.lab  # a lab script of docs/experiments/, apart from the product's suite

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "me_seen_pairings.py"


def test_every_pairing_gets_its_episodes_in_its_group():
    spec = importlib.util.spec_from_file_location("me_seen_pairings", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    held_out = {"dax -> RED, lug -> YELLOW, wif -> GREEN, zup -> BLUE"}
    groups = script.episodes_by_group(held_out, 3)
    assert [len(groups["validation pairings"]), len(groups["seen in training"])] == [3, 69]
    for name, episodes in groups.items():
        for episode in episodes:
            words, actions = [m["src"] for m in episode["mapping"]], [m["tgt"] for m in episode["mapping"]]
            assert (pairing_identifier(words, actions) in held_out) == (name == "validation pairings")
            meaning = dict(zip(words, actions))
            assert all(q["output"] == " ".join(meaning[w] for w in q["input"].split()) for q in episode["query"])
    seen = {pairing_identifier([m["src"] for m in e["mapping"]], [m["tgt"] for m in e["mapping"]])
            for e in groups["seen in training"]}
    assert len(seen) == 23
