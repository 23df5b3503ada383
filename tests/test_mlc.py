"""MLC's algebraic episodes (pipeline/mlc.py) and its few-shot task scored through remappings (evalsuite/mlc.py).

The tests that read MLC's own files ($METASEQ2SEQ_MLC, else ../shared/mlc; benchmarks/references.py) skip
where they are absent: the gold episode, whose *GRAMMAR* block our interpreter must turn into exactly its
study and query outputs, and the human-response files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evalsuite.mlc import (UNDEFINED, HumanResponses, MlcEpisode, draw_remappings, read_episode, read_human,
                           score_gold, score_human)
from pipeline import mlc
from pipeline.errors import UserError
from pipeline.samplers import get_sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from references import mlc_dir, mlc_missing  # noqa: E402

GOLD = mlc_dir() / "few_shot_gold.txt"
HUMANS = sorted(mlc_dir().glob("few_shot_human_*.txt"))
needs_gold = pytest.mark.skipif(not GOLD.is_file(), reason=mlc_missing())
needs_humans = pytest.mark.skipif(not HUMANS, reason=mlc_missing("few_shot_human_00.txt"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


# ---- the family ------------------------------------------------------------------------------------------

def test_the_family_samples_as_a_pure_function_of_its_generator():
    sampler = get_sampler("mlc_algebraic")
    first, again = (sampler.sample_train(np.random.default_rng(7), frozenset()) for _ in range(2))
    assert first == again
    assert sampler.params["family"]["import"] == "pipeline.mlc:algebraic" and sampler.params["nsupport"] == 14
    # Training episodes avoid the validation episodes' grammars.
    held = {sampler.sample_validation(np.random.default_rng(s), 1)[0]["identifier"] for s in range(10)}
    assert all(sampler.sample_train(np.random.default_rng(s), frozenset(held))["identifier"] not in held
               for s in range(10))


def test_episodes_follow_the_rules_of_mlc_algebraic_episodes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        episode = mlc.sample_episode(rng, "train")
        grammar_lines = episode["identifier"].splitlines()
        assert len(episode["support"]) == 14 and len(episode["query"]) == 10 and len(grammar_lines) == 4 + 3 + 1
        pairs = episode["support"] + episode["query"]
        assert len({i for i, _ in pairs}) == 24  # distinct commands
        for command, output in pairs:
            assert set(command.split()) <= set(mlc.WORDS) and set(output.split()) <= set(mlc.COLOURS)
            assert 1 <= len(command.split()) <= 8 and 1 <= len(output.split()) <= 8
        assert "u1 x1 -> [u1] [x1]" in grammar_lines
        assert len(episode["mapping"]) == 4 and len({c for _, c in episode["mapping"]}) == 4


def test_the_interpreter_takes_rules_in_order_and_string_variables_as_long_as_they_can_be():
    grammar = mlc.parse_grammar("dax -> RED\nlug -> BLUE\nx1 fep x2 -> [x2] [x1]\nu1 kiki -> [u1] [u1]\n"
                                "u1 x1 -> [u1] [x1]", mlc.WORDS)
    assert grammar.interpret("dax fep lug fep dax".split()) == ("RED", "BLUE", "RED")  # x1 = "dax fep lug"
    assert grammar.interpret("dax lug kiki".split()) == ("RED", "BLUE", "BLUE")  # concatenation, then "u1 kiki"
    # "u1 kiki" needs the whole string: concatenation splits off "lug", and then "kiki" (an atom too) off "dax".
    assert grammar.interpret("lug kiki dax".split()) == ("BLUE", "kiki", "RED")
    assert grammar.interpret(["wif"]) == ("wif",)  # no rule: a command stands for itself
    with pytest.raises(ValueError, match="variable the left side lacks"):
        mlc.parse_grammar("u1 kiki -> [x1]", mlc.WORDS)


def test_a_grammar_with_the_few_shot_functions_is_never_sampled(monkeypatch):
    few_shot = mlc.parse_grammar("dax -> RED\nlug -> BLUE\nwif -> GREEN\nzup -> PINK\nu1 kiki -> [u1] [u1] [u1]\n"
                                 "u1 fep u2 -> [u1] [u2] [u1]\nx1 tufa x2 -> [x2] [x1]\nu1 x1 -> [u1] [x1]", mlc.WORDS)
    assert mlc.is_few_shot_grammar(few_shot, mlc.AlgebraicConfig())
    drawn = iter([few_shot, mlc.sample_grammar(np.random.default_rng(0), mlc.AlgebraicConfig())])
    monkeypatch.setattr(mlc, "sample_grammar", lambda rng, cfg: next(drawn))
    episode = mlc.sample_episode(np.random.default_rng(0), "train")
    assert episode["identifier"] != few_shot.identifier() and next(drawn, None) is None


@needs_gold
def test_the_gold_episodes_grammar_gives_exactly_its_outputs():
    """MLC's own file: interpreting its *GRAMMAR* block gives every study and query output it lists."""
    episode = read_episode(str(GOLD))
    grammar = mlc.parse_grammar(episode.grammar, episode.input_symbols())
    assert len(episode.support) == 14 and len(episode.query) == 10
    for command, output in episode.support + episode.query:
        assert " ".join(grammar.interpret(command.split())) == output, command
    assert mlc.is_few_shot_grammar(grammar, mlc.AlgebraicConfig())  # the grammar training never sees


# ---- the text format and the remappings ----------------------------------------------------------------

EPISODE = "*SUPPORT*\nIN: a OUT: A\nIN: b OUT: B\nIN: a f OUT: A A\n\n*QUERY*\nIN: b f OUT: B B\n\n*GRAMMAR*\n"


@pytest.mark.parametrize("text, message", [
    (EPISODE.replace("*QUERY*\n", ""), r"needs one \*QUERY\* line \(found 0"),
    (EPISODE.replace("IN: b OUT: B", "IN: b B"), r"line 3: not of the form `IN: <words> OUT: <symbols>`"),
    (EPISODE.replace("IN: b f OUT: B B", ""), "each need at least one"),
    ("*QUERY*\nIN: a OUT: A\n*SUPPORT*\nIN: a OUT: A\n*GRAMMAR*\n", "must come in the order"),
])
def test_a_malformed_episode_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "episode.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as caught:
        read_episode(str(path))
    assert "\n" not in str(caught.value)


def test_remappings_are_seeded_bijections_onto_the_models_symbols(tmp_path):
    (tmp_path / "e.txt").write_text(EPISODE)
    episode = read_episode(str(tmp_path / "e.txt"))
    first = draw_remappings(episode, list(mlc.WORDS), list(mlc.COLOURS), 100, seed=3)
    assert first == draw_remappings(episode, list(mlc.WORDS), list(mlc.COLOURS), 100, seed=3)
    assert len({tuple(r.inputs.values()) for r in first}) > 10
    for remapping in first:
        assert sorted(remapping.inputs) == ["a", "b", "f"] and len(set(remapping.inputs.values())) == 3
        assert set(remapping.outputs.values()) <= set(mlc.COLOURS) and sorted(remapping.order) == [0, 1, 2]
        unused = next(c for c in mlc.COLOURS if c not in remapping.outputs.values())
        assert remapping.unmap_output(f"{remapping.outputs['B']} {unused}") == f"B {UNDEFINED}"
    with pytest.raises(UserError, match="3 distinct input symbols, more than the 2"):
        draw_remappings(episode, ["dax", "lug"], list(mlc.COLOURS), 1, seed=0)


def test_a_model_that_gives_the_gold_answers_scores_100_percent():
    episode = MlcEpisode("e", (("a", "A"), ("a f", "A A")), (("b f", "B B"), ("b", "B")), "")
    gold = dict(episode.support + episode.query)
    scores = score_gold(episode, [gold] * 100)
    assert (scores["accuracy"], scores["accuracy_sd"], scores["retrieval"]) == (100.0, 0.0, 100.0)
    assert [q["accuracy"] for q in scores["per_query"]] == [100.0, 100.0]
    # One remapping in two gets "b f" wrong: 50% there, 75% on the queries, sd over remappings.
    wrong = {**gold, "b f": "B"}
    scores = score_gold(episode, [gold, wrong] * 50)
    assert scores["accuracy"] == 75.0 and scores["per_query"][0]["accuracy"] == 50.0
    assert scores["per_query"][0]["outputs"] == {"B B": 50, "B": 50} and scores["accuracy_sd"] > 0


def test_human_agreement_is_the_share_of_answers_equal_to_the_models(tmp_path):
    episode = MlcEpisode("e", (("a", "A"),), (("b f", "B B"), ("b", "B")), "")
    (tmp_path / "h.txt").write_text("x")
    humans = [HumanResponses(str(tmp_path / "h.txt"), (("b f", "B B"), ("b f", "B"), ("b f", "B B"), ("b", "B")))]
    gold = dict(episode.support + episode.query)
    scores = score_human(episode, humans, [gold] * 10)
    rows = {row["input"]: row for row in scores["per_query"]}
    assert rows["b f"]["gold_accuracy"] == pytest.approx(200 / 3) and rows["b"]["gold_accuracy"] == 100.0
    assert scores["gold_accuracy"] == pytest.approx((200 / 3 + 100) / 2) and scores["gold_accuracy_pooled"] == 75.0
    assert scores["agreement"] == pytest.approx(scores["gold_accuracy"])  # the model gives the gold outputs
    one_to_one = {**gold, "b f": "B"}
    assert score_human(episode, humans, [one_to_one] * 10)["per_query"][0]["agreement"] == pytest.approx(100 / 3)


@needs_gold
@needs_humans
def test_the_human_files_give_the_papers_human_accuracy():
    """People gave the gold output for 80.7% of a query's responses, averaged over the 10 queries."""
    episode = read_episode(str(GOLD))
    humans = [read_human(str(path), episode) for path in HUMANS]
    gold = dict(episode.support + episode.query)
    scores = score_human(episode, humans, [gold])
    assert round(scores["gold_accuracy"], 1) == 80.7 and len(scores["per_query"]) == len(HUMANS)
    assert scores["agreement"] == pytest.approx(scores["gold_accuracy"])


@needs_gold
def test_a_human_file_of_another_episode_is_refused(tmp_path):
    episode = read_episode(str(GOLD))
    other = tmp_path / "other.txt"
    other.write_text(GOLD.read_text().replace("IN: 1 OUT: 1", "IN: 1 OUT: 2"))
    with pytest.raises(UserError, match="study examples .* differ"):
        read_human(str(other), episode)


# ---- on a checkpoint ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for a few episodes of the family (it scores near 0%: the point is the path)."""
    folder = tmp_path_factory.mktemp("mlc_model")
    done = cli("train", "--episode_type", "mlc_algebraic", "--num_episodes", "16", "--batch_size", "8",
               "--emb_size", "16", "--nlayers", "1", "--val_every", "16", "--no_progress", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "out_models" / "net_mlc_algebraic.pt"


@pytest.mark.slow
@needs_gold
def test_eval_mlc_scores_a_checkpoint_through_100_remappings(checkpoint, tmp_path):
    human = [str(p) for p in HUMANS[:2]]
    args = ["eval-mlc", "--checkpoint", str(checkpoint), "--mlc_episode", str(GOLD), "--out", "report"]
    done = cli(*args, *[a for path in human for a in ("--mlc_human", path)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "all queries" in done.stdout and "support items (retrieval)" in done.stdout
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    scores = results["splits"]["mlc_few_shot"]
    assert scores["remappings"] == {"n": 100, "seed": 0, "rng": "numpy default_rng(0)"}
    assert scores["n"] == 10 and 0 <= scores["accuracy"] <= 100 and len(scores["per_query"]) == 10
    assert scores["human"]["n_responses"] > 0 and [f["path"] for f in scores["human"]["files"]] == human
    lines = (tmp_path / "report" / "predictions_mlc_few_shot.jsonl").read_text().splitlines()
    assert len(lines) == 100 * 24 and json.loads(lines[0])["remapping"] == 0
    # The same command again gives the same outputs: the remappings are seeded.
    again = cli(*args, *[a for path in human for a in ("--mlc_human", path)], cwd=tmp_path)
    assert again.returncode == 0
    assert (tmp_path / "report" / "predictions_mlc_few_shot.jsonl").read_text().splitlines() == lines


def test_eval_mlc_refuses_a_malformed_episode_in_one_line(tmp_path):
    """Before any checkpoint is read: the episode file is checked first."""
    (tmp_path / "bad.txt").write_text("*SUPPORT*\nIN: 1 OUT: 1\n")
    done = cli("eval-mlc", "--checkpoint", "no_such.pt", "--mlc_episode", "bad.txt", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: bad.txt: not an MLC episode")


@pytest.mark.slow
def test_the_family_goes_through_generate_verify_train_eval_and_reproduce(tmp_path):
    store = tmp_path / "shards" / "mlc_algebraic"
    steps = [("generate", "--episode_type", "mlc_algebraic", "--num_episodes", "32", "--shard_size", "16",
              "--no_progress"),
             ("verify", "--store", str(store)),
             ("train", "--episode_type", "mlc_algebraic", "--num_episodes", "32", "--emb_size", "16",
              "--batch_size", "8", "--val_every", "16", "--no_progress"),
             ("eval", "--checkpoint", "out_models/net_mlc_algebraic.pt"),
             ("reproduce", "--experiments", "mlc_algebraic", "--num_episodes", "32", "--emb_size", "16",
              "--nlayers", "1", "--batch_size", "8", "--threads", "1", "--out", "grid")]
    for step in steps:
        done = cli(*step, cwd=tmp_path)
        assert done.returncode == 0, (step, done.stderr)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["params"]["sampler"]["family"]["import"] == "pipeline.mlc:algebraic"
    assert manifest["input_vocab"][3:] == list(mlc.WORDS) and manifest["output_vocab"][3:] == list(mlc.COLOURS)
    report = json.loads((tmp_path / "out_models" / "net_mlc_algebraic.eval" / "results.json").read_text())
    assert list(report["splits"]) == ["validation"] and report["splits"]["validation"]["n"] > 0
    grid = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert [run["status"] for run in grid["runs"]] == ["done"]
