"""An episode family of one's own, defined in a module outside the package, through every command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.families import family_problems
from pipeline.samplers import get_sampler

ROOT = Path(__file__).resolve().parent.parent
FAMILY = "colour_tasks:colours"

# Words mean colours anew in every episode; a query is a sequence of words, its output their colours.
MODULE = textwrap.dedent('''
    from pipeline.families import EpisodeFamily

    WORDS, COLOURS = ("dax", "wif", "lug", "zup"), ("RED", "GREEN", "BLUE", "YELLOW")

    def sample(rng, split):
        meaning = dict(zip(WORDS, rng.permutation(COLOURS)))
        support = [(w, meaning[w]) for w in WORDS[:3]]
        queries = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 4)))) for _ in range(4)]
        return {"support": support, "query": [(q, [meaning[w] for w in q.split()]) for q in queries],
                "identifier": ", ".join(f"{w} -> {c}" for w, c in sorted(meaning.items())),
                "mapping": sorted(meaning.items())}

    colours = EpisodeFamily(sample, input_symbols=WORDS, output_symbols=COLOURS, params={"nquery": 4})
''')


@pytest.fixture
def family_dir(tmp_path, monkeypatch) -> Path:
    """The family's module in a folder of its own (importable from there, as a user's would be)."""
    (tmp_path / "colour_tasks.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("colour_tasks", None)
    get_sampler.cache_clear()


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_family_samples_as_a_pure_function_of_its_generator(family_dir):
    sampler = get_sampler(FAMILY)
    first, again = (sampler.sample_train(np.random.default_rng(3), frozenset()) for _ in range(2))
    assert first == again
    assert first["support"][0].keys() == {"input", "output"} and first["mapping"][0].keys() == {"src", "tgt"}
    assert sampler.params["family"]["import"] == FAMILY and sampler.params["nquery"] == 4
    # Training episodes avoid the validation identifiers.
    held = {sampler.sample_validation(np.random.default_rng(s), 1)[0]["identifier"] for s in range(20)}
    assert all(sampler.sample_train(np.random.default_rng(s), frozenset(held))["identifier"] not in held
               for s in range(20))


@pytest.mark.parametrize("name, message", [
    ("no_such_module:colours", "cannot load the episode family 'no_such_module:colours': ModuleNotFoundError"),
    ("colour_tasks:nothing", "cannot load the episode family 'colour_tasks:nothing': AttributeError"),
    ("colour_tasks:WORDS", "colour_tasks:WORDS is a tuple, not a pipeline.families.EpisodeFamily"),
    ("nope", "unknown episode type 'nope'"),
])
def test_a_family_that_cannot_be_loaded_is_one_line(family_dir, name, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_sampler(name)


def test_a_changed_family_source_is_a_problem_of_its_stores(family_dir):
    manifest = {"params": {"sampler": get_sampler(FAMILY).params}}
    assert family_problems(manifest) == []
    (family_dir / "colour_tasks.py").write_text(MODULE.replace("range(4)", "range(5)"))
    sys.modules.pop("colour_tasks")
    assert "has changed since this store was generated" in family_problems(manifest)[0]


@pytest.mark.slow
def test_a_family_goes_through_generate_verify_train_eval_and_reproduce(tmp_path):
    (tmp_path / "colour_tasks.py").write_text(MODULE)
    store = tmp_path / "shards" / FAMILY
    steps = [("generate", "--episode_type", FAMILY, "--num_episodes", "64", "--shard_size", "32", "--no_progress"),
             ("verify", "--store", str(store)),
             ("publish", "--store", str(store), "--to", "parquet"),
             ("train", "--episode_type", FAMILY, "--num_episodes", "64", "--emb_size", "16", "--batch_size", "8",
              "--val_every", "32", "--no_progress"),
             ("eval", "--checkpoint", f"out_models/net_{FAMILY}.pt"),
             ("eval", "--checkpoint", f"out_models/net_{FAMILY}.pt", "--scan_file", "test.txt", "--support",
              "dax=RED,wif=GREEN,lug=BLUE", "--out", "file_report"),
             ("reproduce", "--experiments", FAMILY, "--num_episodes", "32", "--emb_size", "16", "--nlayers", "1",
              "--batch_size", "8", "--threads", "1", "--out", "grid")]
    (tmp_path / "test.txt").write_text("IN: dax wif OUT: RED GREEN\nIN: lug dax lug OUT: BLUE RED BLUE\n")
    for step in steps:
        result = cli(tmp_path, *step)
        assert result.returncode == 0, (step, result.stderr)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["episode_type"] == FAMILY and manifest["params"]["sampler"]["family"]["import"] == FAMILY
    report = json.loads((tmp_path / "out_models" / f"net_{FAMILY}.eval" / "results.json").read_text())
    assert list(report["splits"]) == ["validation"] and report["splits"]["validation"]["n"] > 0
    assert json.loads((tmp_path / "file_report" / "results.json").read_text())["splits"]["scan_file"]["n"] == 2
    import datasets
    published = datasets.load_dataset(str(tmp_path / "parquet"))
    assert published["train"].num_rows == 64 and published["train"][0]["episode_type"] == FAMILY
    grid = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert [run["status"] for run in grid["runs"]] == ["done"]

    # The family's source changes: its store is refused, in one line, until it is generated again.
    (tmp_path / "colour_tasks.py").write_text(MODULE.replace("range(4)", "range(5)"))
    for step in (("verify", "--store", str(store)),
                 ("train", "--episode_type", FAMILY, "--num_episodes", "64", "--resume", "--no_progress")):
        result = cli(tmp_path, *step)
        assert result.returncode == 1 and "has changed since this store was generated" in result.stdout + result.stderr
