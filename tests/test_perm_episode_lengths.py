"""docs/experiments/perm_episode_lengths.py: its statistics by hand, and our sampler beside the original's."""
from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.lab  # a lab script of docs/experiments/, apart from the product's suite


@pytest.fixture(scope="module")
def lengths(load_lab_script):
    yield load_lab_script("perm_episode_lengths")
    sys.modules.pop("perm_episode_lengths")


def test_length_stats_by_hand(lengths):
    episode = ([("walk", "I_WALK"), ("walk twice", "I_WALK I_WALK")], [("jump thrice", "I_JUMP I_JUMP I_JUMP")])
    stats = lengths.length_stats([episode])
    assert stats["support in"] == (1.5, 0.5, 2) and stats["support out"] == (1.5, 0.5, 2)
    assert stats["query in"] == (2, 0.0, 2) and stats["query out"] == (3, 0.0, 3)


def test_our_lengths_are_the_originals(lengths):
    if not lengths.original_available():
        pytest.skip(lengths.original_missing())
    ours, theirs = lengths.length_stats(lengths.our_episodes(300)), lengths.length_stats(lengths.original_episodes(300))
    # Both samplers are seeded, so this is deterministic; 6,000 queries a side agree within a tenth of an sd.
    for side in ("query in", "query out"):
        assert abs(ours[side][0] - theirs[side][0]) < 0.1 * theirs[side][1], side
        assert ours[side][2] == theirs[side][2], side
