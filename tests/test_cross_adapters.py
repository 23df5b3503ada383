"""The two adapters of the ME cross runs (docs/experiments/me_original_loop_on_our_store.py, arm B, and
me_our_trainer_on_original_episodes.py, arm C) against the original code, which they import at run time.
Skips where the original is absent (benchmarks/references.py says where it is looked for).

C's store holds exactly the episodes that the original's generate_ME draws after random.seed(SEED), in the
order its train.py draws them (5 validation episodes with a growing tabu set, then training); and B turns
those records back into the original's own build_sample dicts, tensors included.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from references import original_dir, original_importable, original_missing  # noqa: E402

from pipeline.store import shard_paths, verify_store  # noqa: E402
from trainer.data import read_records  # noqa: E402

pytestmark = pytest.mark.lab  # a lab script of docs/experiments/, apart from the product's suite

SEED, N = 3, 40


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"cross_{name}", ROOT / "docs" / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def adapters():
    """(arm B's script, arm C's script, the original's train.py as a module); sys.path and the original's bare
    module names are restored afterwards."""
    if not (original_dir() / "train.py").is_file():
        pytest.skip(original_missing())
    with original_importable():  # the scripts put it on sys.path themselves; this takes it off again
        b, c = load_script("me_original_loop_on_our_store"), load_script("me_our_trainer_on_original_episodes")
        original = c.load_original()
        yield b, c, original


def original_draws(original):
    """What the original's train.py draws after random.seed(SEED), support copies in the queries (its default)."""
    original.use_resconstruct_loss = True
    random.seed(SEED)
    generate_train, generate_test, _, _ = original.get_episode_generator("ME")
    tabu, val = set(), []
    for _ in range(5):
        val.append(generate_test(tabu))
        tabu = original.tabu_update(tabu, val[-1]["identifier"])
    return val, [generate_train(tabu) for _ in range(N)]


def test_c_store_holds_the_originals_episodes_and_b_rebuilds_its_samples(adapters, tmp_path):
    b, c, original = adapters
    val, train = original_draws(original)
    store = c.generate(SEED, str(tmp_path), N, original=original)
    assert verify_store(store) == []
    _, _, input_lang, output_lang = original.get_episode_generator("ME")
    original.use_resconstruct_loss = True  # B's setting: the original's default
    for split, theirs in (("val", val), ("train", train)):
        records = read_records(shard_paths(store, split))
        assert len(records) == len(theirs)
        for record, sample in zip(records, theirs):
            ns = len(sample["xs"])
            assert [s["input"].split() for s in record["support"]] == sample["xs"]
            assert [s["output"].split() for s in record["support"]] == sample["ys"]
            assert [q["input"].split() for q in record["query"]] == sample["xq"][:-ns]  # its copies: the last ns
            assert [q["output"].split() for q in record["query"]] == sample["yq"][:-ns]
            rebuilt = b.to_sample(original, record, input_lang, output_lang)
            assert rebuilt["identifier"] == sample["identifier"]
            for key in ("xs", "ys", "xq", "yq", "xs_lengths", "ys_lengths", "xq_lengths", "yq_lengths"):
                assert rebuilt[key] == sample[key], key
            for key in ("xs_padded", "ys_padded", "xq_padded", "yq_padded"):
                assert torch.equal(rebuilt[key], sample[key]), key


def test_b_reads_a_perm_store_with_the_originals_perm_languages(adapters, tmp_path, monkeypatch):
    """Arm B on scan_prim_permutation (issue 23): our records become the original's samples with its SCAN Langs,
    20 support items appended to the 20 queries, and its tabu identifier of the record's pairing."""
    from pipeline.manifest import load_manifest
    from pipeline.store import GenerateConfig, generate
    b, _, original = adapters
    store = generate(GenerateConfig("scan_prim_permutation", num_episodes=3, out=str(tmp_path), workers=1,
                                    progress=False))
    monkeypatch.chdir(original_dir())  # its SCAN loader reads data/ there
    _, _, input_lang, output_lang = original.get_episode_generator("scan_prim_permutation")
    manifest = load_manifest(store)
    b.check_vocab(manifest, input_lang, output_lang)  # passes: the same 13 words and 6 actions
    _, _, me_input, me_output = original.get_episode_generator("ME")
    with pytest.raises(SystemExit, match="not the original's"):
        b.check_vocab(manifest, me_input, me_output)
    original.use_resconstruct_loss = True
    for record in read_records(shard_paths(store, "train")):
        sample = b.to_sample(original, record, input_lang, output_lang)
        assert sample["xs"] == [s["input"].split() for s in record["support"]] and len(sample["xs"]) == 20
        assert sample["xq"] == [q["input"].split() for q in record["query"] + record["support"]]
        assert sample["yq"] == [q["output"].split() for q in record["query"] + record["support"]]
        pairing = "\n".join(f"{w} -> {a}" for w, a in reversed([(m["src"], m["tgt"]) for m in record["mapping"]]))
        assert sample["identifier"] == original.make_hashable(pairing)  # as generate_prim_permutation names it
