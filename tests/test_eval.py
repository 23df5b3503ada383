"""Tests of `cli.py eval` (evalsuite/): metrics, SCAN test splits, faithfulness to the trainer's validation,
the report files, the chunked decoder, and one-line errors for bad input.

Models are tiny (E=16-32) and trained once per module; torch runs single-threaded here, which is faster
for models this small (and steadier on a shared machine).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import cli, run_cli
from evalsuite.decode import bucket_order, decode_shared_support, shared_support_batch
from evalsuite.evaluate import EvalConfig, evaluate
from evalsuite.report import summary_table
from evalsuite.splits import SCAN_TEST_SPLITS, TYPE_SPLITS, parse_support, scan_test_pairs
from pipeline.errors import UserError
from pipeline.scan import TRUE_PRIMITIVES
from pipeline.store import GenerateConfig, generate, load_manifest, manifest_sha256, val_shards_sha256
from pipeline.vocab import EOS_ID, PAD_ID
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import Tokenizer
from trainer.metrics import QueryResult, accuracy, score_episodes, score_queries
from trainer.model import MetaSeq2Seq, ModelConfig
from trainer.train import train

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from references import scan_file, scan_missing  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def make_checkpoint(root: Path, episode_type: str, num_episodes: int, **kwargs) -> Path:
    cfg = TrainConfig(episode_type=episode_type, store=str(root / "shards" / episode_type), num_episodes=num_episodes,
                      workers=0, progress=False, dir_model=str(root / "models"), **kwargs)
    return Path(train(cfg)["checkpoint"])


@pytest.fixture(scope="module")
def me_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("me")
    return make_checkpoint(root, "ME", 400, batch_size=8, emb_size=32, lr=3e-3, dropout=0.0, val_every=100)


@pytest.fixture(scope="module")
def aug_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aug")
    return make_checkpoint(root, "scan_prim_augmentation", 8, batch_size=8, emb_size=16)


@pytest.fixture(scope="module")
def length_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("length")
    return make_checkpoint(root, "scan_length", 8, batch_size=8, emb_size=16)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- metrics ---------------------------------------------------------------------------------------------

def q(target: str, prediction: str, retrieval: bool = False) -> QueryResult:
    return QueryResult("x", target, prediction, retrieval)


def test_exact_match_only():
    assert q("A B", "A B").correct and not q("A B", "A").correct and not q("A B", "A B C").correct
    assert accuracy([q("A", "A"), q("A", "B"), q("A B", "A B"), q("A B", "B A")]) == 50.0


def test_retrieval_and_generalization_split():
    scores = score_queries([q("A", "A", True), q("A", "B", True), q("A", "A"), q("A", "A"), q("A", "B")])
    assert scores["accuracy"] == 60.0 and scores["n"] == 5
    assert scores["retrieval"] == 50.0 and scores["n_retrieval"] == 2
    assert scores["generalization"] == pytest.approx(200 / 3) and scores["n_generalization"] == 3


def test_empty_groups_are_none_never_nan():
    assert accuracy([]) is None
    scores = score_queries([q("A", "A")])
    assert scores["retrieval"] is None and scores["generalization"] == 100.0
    json.dumps(scores, allow_nan=False)


def test_scores_are_averaged_over_episodes_not_queries():
    episodes = [[q("A", "A", True), q("A", "A")],                       # 100%: retrieval 100, generalization 100
                [q("A", "B")] * 3 + [q("A", "A")]]                      # 25%: no retrieval, generalization 25
    scores = score_episodes(episodes)
    assert scores["accuracy"] == pytest.approx(62.5)          # not 3 / 6 = 50
    assert scores["retrieval"] == 100.0                        # the episode without retrieval queries is left out
    assert scores["generalization"] == pytest.approx(62.5)
    assert [e["accuracy"] for e in scores["episodes"]] == [100.0, 25.0] and scores["n_episodes"] == 2


# ---- SCAN test splits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,size", [("addprim_jump", 7706), ("template_around_right", 4476), ("length", 3920)])
def test_scan_test_split_sizes(split, size):
    assert len(scan_test_pairs(split)) == size


@pytest.mark.parametrize("split", ["addprim_jump", "template_around_right", "length"])
def test_scan_test_splits_are_the_official_files(split):
    official = scan_file(f"tasks_test_{split}.txt")
    if official is None:
        pytest.skip(scan_missing(f"tasks_test_{split}.txt"))
    lines = [f"IN: {p.command} OUT: {p.actions}" for p in scan_test_pairs(split)]
    assert sorted(lines) == sorted(official.read_text().splitlines())  # the official files are shuffled


def test_support_sets_per_design():
    assert dict(SCAN_TEST_SPLITS["addprim_jump"].support) == {
        "walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"} == TRUE_PRIMITIVES
    assert dict(SCAN_TEST_SPLITS["template_around_right"].support) == {
        "turn left": "I_TURN_LEFT", "turn right": "I_TURN_RIGHT"}
    assert SCAN_TEST_SPLITS["length"].support is None  # the validation episodes' own support sets
    assert TYPE_SPLITS["ME"] == ("validation",)
    assert {t: s[1] for t, s in TYPE_SPLITS.items() if t != "ME"} == {
        "scan_prim_permutation": "addprim_jump", "scan_prim_augmentation": "addprim_jump",
        "scan_around_right": "template_around_right", "scan_length": "length"}


def test_parse_support():
    assert parse_support("jump=I_JUMP, turn left = I_TURN_LEFT") == [("jump", "I_JUMP"), ("turn left", "I_TURN_LEFT")]
    for bad in ("jump", "jump=", "=I_JUMP", "jump=I_JUMP,", "jump=I_JUMP=I_WALK"):
        with pytest.raises(UserError, match="not of the form INPUT=OUTPUT"):
            parse_support(bad)
    for conflict in ("jump=I_JUMP,jump=I_WALK", "jump=I_JUMP,walk=I_WALK, jump =I_RUN", "turn  left=I_TURN_LEFT,turn left=X"):
        with pytest.raises(UserError, match="given two different outputs"):
            parse_support(conflict)
    # The same pair again is the same support item: merged, in the order of first occurrence.
    assert parse_support("jump=I_JUMP,walk=I_WALK, jump =I_JUMP") == [("jump", "I_JUMP"), ("walk", "I_WALK")]


# ---- faithfulness: eval on validation == the trainer's last validation line ------------------------------

def test_validation_matches_the_trainers_numbers(me_checkpoint, tmp_path):
    recorded = load_checkpoint(me_checkpoint)["val"]
    results = evaluate(EvalConfig(str(me_checkpoint), out=str(tmp_path)))
    ours = results["splits"]["validation"]
    assert list(results["splits"]) == ["validation"]
    assert {k: ours[k] for k in recorded} == recorded  # exactly, not approximately
    assert ours["retrieval"] is not None and ours["generalization"] is not None
    assert len(ours["episodes"]) == 5 and ours["n"] == 5 * 23


# ---- the report ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_files_for_addprim_jump(aug_checkpoint, tmp_path):
    results = evaluate(EvalConfig(str(aug_checkpoint), out=str(tmp_path), plot=2))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["checkpoint"]["episode_type"] == "scan_prim_augmentation"
    assert len(written["checkpoint"]["sha256"]) == 64 and written["checkpoint"]["episodes_done"] == 8
    jump = written["splits"]["addprim_jump"]
    assert jump["n"] == 7706 and jump["retrieval"] is None and jump["n_generalization"] == 7706
    assert jump["paper"] is None  # the paper reports add jump for permutation meta-training, not augmentation
    assert jump["decode_seconds"] > 0 and "episodes" not in jump
    rows = read_jsonl(tmp_path / "predictions_addprim_jump.jsonl")
    assert [r["input"] for r in rows] == [p.command for p in scan_test_pairs("addprim_jump")]
    assert all(r["correct"] == (r["prediction"] == r["target"]) for r in rows)
    assert 100.0 * sum(r["correct"] for r in rows) / len(rows) == jump["accuracy"]
    for split in ("validation", "addprim_jump"):
        assert written["splits"][split]["plots"] == [f"attention_{split}_0.png", f"attention_{split}_1.png"]
        assert (tmp_path / f"attention_{split}_1.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))
    assert written["files"] == sorted(p.name for p in tmp_path.iterdir())  # every file, and only those
    table = summary_table(results)
    assert "addprim_jump" in table and "99.95%" not in table
    # A narrower rerun into the same directory: the first run's predictions and plots must not survive.
    rerun = evaluate(EvalConfig(str(aug_checkpoint), out=str(tmp_path), split="validation"))
    assert sorted(p.name for p in tmp_path.iterdir()) == rerun["files"] == ["predictions_validation.jsonl",
                                                                             "results.json"]
    assert not [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_length_reports_each_validation_episode_and_their_mean(length_checkpoint, tmp_path):
    results = evaluate(EvalConfig(str(length_checkpoint), split="length", out=str(tmp_path), max_length=8))
    length = results["splits"]["length"]
    assert length["n_episodes"] == 5 and length["n"] == 5 * 3920
    assert [e["n"] for e in length["episodes"]] == [3920] * 5
    assert length["accuracy"] == pytest.approx(sum(e["accuracy"] for e in length["episodes"]) / 5)
    assert length["paper"]["accuracy"] == 16.64 and results["max_length"] == 8
    rows = read_jsonl(tmp_path / "predictions_length.jsonl")
    assert [sum(r["episode"] == e for r in rows) for e in range(5)] == [3920] * 5
    assert all(len(r["prediction"].split()) <= 8 for r in rows)


def test_scan_file_with_support(aug_checkpoint, tmp_path):
    scan_file = tmp_path / "mine.txt"
    scan_file.write_text("IN: jump twice OUT: I_JUMP I_JUMP\n\nIN: walk OUT: I_WALK\n")
    results = evaluate(EvalConfig(str(aug_checkpoint), out=str(tmp_path / "out"), scan_file=str(scan_file),
                                  support="jump=I_JUMP,walk=I_WALK"))
    split = results["splits"]["scan_file"]
    assert split["n"] == 2 and split["n_retrieval"] == 1 and split["paper"] is None
    assert results["provenance"]["scan_file"] == {"path": str(scan_file.resolve()),
                                                  "sha256": hashlib.sha256(scan_file.read_bytes()).hexdigest()}
    rows = read_jsonl(tmp_path / "out" / "predictions_scan_file.jsonl")
    assert [r["input"] for r in rows] == ["jump twice", "walk"] and [r["retrieval"] for r in rows] == [False, True]


@pytest.mark.parametrize("ablation", ["disable_memory", "disable_attention", "both"])
def test_plots_skip_the_panel_an_ablated_model_lacks(tmp_path, ablation):
    from evalsuite.evaluate import Episode, Loaded, SplitTask
    from evalsuite.plots import plot_split, query_attention
    flags = {"disable_memory": ablation != "disable_attention", "disable_attention": ablation != "disable_memory"}
    tokenizer = Tokenizer(("<pad>", "<sos>", "<eos>", "dax", "lug"), ("<pad>", "<sos>", "<eos>", "RED", "BLUE"))
    model = MetaSeq2Seq(ModelConfig(5, 5, emb_size=8, nlayers=1, **flags)).eval()
    loaded = Loaded({}, model, tokenizer, torch.device("cpu"), 5)
    task = SplitTask("validation", [Episode([("dax", "RED")], [("dax lug", "RED BLUE")])], episodic=True)
    attention = query_attention(loaded, task.episodes[0], "dax lug")
    paths = plot_split(loaded, task, 3, tmp_path)
    if ablation == "both":
        assert attention is None and paths == []
        return
    _, memory, decoder = attention
    assert (memory is None) == flags["disable_memory"] and (decoder is None) == flags["disable_attention"]
    assert memory is None or memory.shape == (3, 1)  # query tokens + EOS, support items
    assert [p.name for p in paths] == ["attention_validation_0.png"] and paths[0].read_bytes()[:4] == b"\x89PNG"


def test_results_record_where_they_came_from(me_checkpoint, tmp_path):
    results = evaluate(EvalConfig(str(me_checkpoint), out=str(tmp_path / "o")))
    made = results["provenance"]
    assert (made["python"], made["torch"], made["device"]) == (platform.python_version(), torch.__version__, "cpu")
    assert made["version"] == importlib.metadata.version("metaseq2seq") and made["started"][:2] == "20"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert made["git_commit"].startswith(head.stdout.strip())
    assert results["checkpoint"]["provenance"] == load_checkpoint(me_checkpoint).get("provenance")


def readme_paper_numbers() -> dict[tuple[str, str], float | None]:
    """The paper column (the last) of the README's results table, by (episode type, split); the full model's rows,
    not the ablations'."""
    splits = {"add jump": "addprim_jump", "around right": "template_around_right", "length": "length"}
    numbers = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.startswith("| ") or " without " in cells[0]:
            continue
        experiment, paper = cells[0], cells[-1]
        if experiment.startswith("ME,"):
            key = ("ME", "validation")
        elif "`" in experiment and experiment.split(",")[0] in splits:
            key = (experiment.split("`")[1], splits[experiment.split(",")[0]])
        else:
            continue
        numbers[key] = None if paper in ("—", "-") else float(paper.rstrip("%"))
    return numbers


def test_paper_numbers_agree_in_eval_reproduce_and_the_readme(me_checkpoint, tmp_path):
    from evalsuite.aggregate import PAPER, VAL_GENERALIZATION
    readme = readme_paper_numbers()
    assert readme[("ME", "validation")] == 100.0 and len(readme) == 5  # the README's five rows
    for (episode_type, split), number in readme.items():
        ours = PAPER.get((episode_type, VAL_GENERALIZATION if split == "validation" else split))
        assert ours == number, (episode_type, split)
    # eval's table shows ME's number beside the validation split, as reproduce's table and the README do.
    results = evaluate(EvalConfig(str(me_checkpoint), out=str(tmp_path / "o")))
    assert results["splits"]["validation"]["paper"]["accuracy"] == readme[("ME", "validation")]
    row = next(line for line in summary_table(results).splitlines() if line.startswith("validation "))
    assert row.split()[6] == "100.00%" and "generalization" in row.split("100.00%")[1]


def test_default_report_is_beside_its_checkpoint(capsys, me_checkpoint, tmp_path):
    """Two runs' checkpoints of the same name get two reports, each next to its checkpoint."""
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        shutil.copy(me_checkpoint, tmp_path / run / "net_ME.pt")
        assert run_cli(cli, ["eval", "--checkpoint", str(tmp_path / run / "net_ME.pt"), "--no_progress"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"report: {tmp_path / run / 'net_ME.eval'}"
    for run in ("a", "b"):
        written = json.loads((tmp_path / run / "net_ME.eval" / "results.json").read_text())
        assert written["checkpoint"]["path"] == str(tmp_path / run / "net_ME.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_directory_that_is_not_only_a_report_is_refused_untouched(capsys, me_checkpoint, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = invoke(capsys, "--checkpoint", str(me_checkpoint), "--out", str(mine))
    assert_one_error_line(code, err, "not empty and holds no eval report")
    report = tmp_path / "report"
    evaluate(EvalConfig(str(me_checkpoint), out=str(report)))
    (report / "notes.txt").write_text("keep me too")
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    code, err = invoke(capsys, "--checkpoint", str(me_checkpoint), "--out", str(report))
    assert_one_error_line(code, err, "not part of its eval report (notes.txt)")
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_report_from_before_the_file_list_is_replaced_whole(me_checkpoint, tmp_path):
    """Reports written before results.json listed its files: what their splits name is theirs."""
    evaluate(EvalConfig(str(me_checkpoint), out=str(tmp_path), plot=1))
    old = json.loads((tmp_path / "results.json").read_text())
    del old["files"]
    old["splits"]["addprim_jump"] = {"predictions": "predictions_addprim_jump.jsonl", "plots": []}
    (tmp_path / "results.json").write_text(json.dumps(old))
    (tmp_path / "predictions_addprim_jump.jsonl").write_text("{}\n")
    assert (tmp_path / "attention_validation_0.png").is_file()
    evaluate(EvalConfig(str(me_checkpoint), out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions_validation.jsonl", "results.json"]


# ---- chunked, bucketed decoding ------------------------------------------------------------------------

def test_shared_support_batch_pads_by_hand():
    support = [([4, 5], [6]), ([7], [8, 9, 10])]
    queries = [[3, 4, 5], [6], [7, 8, 9, 10, 3]]
    batch = shared_support_batch(support, queries)
    assert batch.support_in.tolist() == [[[4, 5, EOS_ID], [7, EOS_ID, PAD_ID]]]
    assert batch.support_out.tolist() == [[[6, EOS_ID, PAD_ID, PAD_ID], [8, 9, 10, EOS_ID]]]
    assert batch.query_in.tolist() == [[[3, 4, 5, EOS_ID, PAD_ID, PAD_ID], [6, EOS_ID] + [PAD_ID] * 4,
                                        [7, 8, 9, 10, 3, EOS_ID]]]
    assert batch.query_in_len.tolist() == [[4, 2, 6]] and batch.support_in_len.tolist() == [[3, 2]]
    assert batch.query_out.tolist() == [[[EOS_ID]] * 3] and batch.query_out_len.tolist() == [[1, 1, 1]]


def test_chunked_bucketed_decode_equals_one_unsorted_batch():
    torch.manual_seed(3)
    pairs = scan_test_pairs("addprim_jump")[::25]  # 309 queries of all lengths
    vocab = {w: i + 3 for i, w in enumerate(sorted({w for p in pairs for w in p.command.split()}))}
    model = MetaSeq2Seq(ModelConfig(len(vocab) + 3, 12, emb_size=32, nlayers=2)).eval()
    with torch.no_grad():  # a fresh model writes one sequence for every query; large weights make them differ
        for parameter in model.parameters():
            parameter.mul_(4)
    support = [([vocab["jump"]], [5]), ([vocab["walk"]], [6]), ([vocab["run"], vocab["twice"]], [7, 7])]
    queries = [[vocab[w] for w in p.command.split()] for p in pairs]
    assert bucket_order(queries) != list(range(len(queries)))  # the sort really reorders
    reference = decode_shared_support(model, support, queries, 20, torch.device("cpu"), chunk_size=10 ** 6,
                                      bucket=False)
    chunked = decode_shared_support(model, support, queries, 20, torch.device("cpu"), chunk_size=37)
    assert len({tuple(p) for p in reference}) > 100  # outputs differ by query, so a mix-up would show
    assert chunked == reference


# ---- bad input: one line on stderr, non-zero exit, no traceback --------------------------------------------

def invoke(capsys, *args: str) -> tuple[int, str]:
    code = run_cli(cli, ["eval", *args])
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *expected: str) -> None:
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_missing_checkpoint(capsys, tmp_path):
    assert_one_error_line(*invoke(capsys, "--checkpoint", str(tmp_path / "none.pt")), "no checkpoint")


@pytest.mark.slow
def test_corrupt_checkpoint_via_subprocess(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage\xff")
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "eval", "--checkpoint", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stderr, "corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]  # no report directory, not even empty


def test_store_missing(capsys, me_checkpoint, tmp_path):
    code, err = invoke(capsys, "--checkpoint", str(me_checkpoint), "--store", str(tmp_path / "gone"))
    assert_one_error_line(code, err, "no episode store", "--store")


def test_a_relative_store_is_found_from_any_directory(capsys, monkeypatch, tmp_path):
    # Trained with relative paths, as `cli.py train --dir_model ck` writes them; then evaluated from elsewhere,
    # and again after the whole tree has moved.
    ran_in = tmp_path / "project"
    ran_in.mkdir()
    monkeypatch.chdir(ran_in)
    train(TrainConfig(episode_type="ME", num_episodes=8, batch_size=8, emb_size=16, workers=0, progress=False,
                      dir_model="ck"))
    assert load_checkpoint(ran_in / "ck" / "net_ME.pt")["store"] == "shards/ME"
    monkeypatch.chdir(tmp_path)
    for moved in (False, True):
        root = shutil.move(ran_in, tmp_path / "moved") if moved else ran_in
        code = run_cli(cli, ["eval", "--checkpoint", str(Path(root) / "ck" / "net_ME.pt"), "--out", "report"])
        assert code == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "report" / "results.json").read_text())["splits"]["validation"]["n"] > 0
    shutil.rmtree(tmp_path / "moved" / "shards")
    code, err = invoke(capsys, "--checkpoint", str(tmp_path / "moved" / "ck" / "net_ME.pt"))
    assert_one_error_line(code, err, "no episode store at shards/ME nor at " + str(tmp_path / "moved" / "shards"))


def with_val_hashes(checkpoint: Path, path: Path, hashes: bool) -> Path:
    """A copy of the checkpoint with the validation shard hashes of its store (as `train` writes them
    now), or without them (as checkpoints written before that have it)."""
    payload = load_checkpoint(checkpoint)
    payload.pop("val_shards_sha256", None)
    if hashes:
        payload["val_shards_sha256"] = val_shards_sha256(load_manifest(payload["store"]))
    save_checkpoint(path, payload)
    return path


def test_store_with_another_manifest_and_an_older_checkpoint(capsys, me_checkpoint, tmp_path):
    older = with_val_hashes(me_checkpoint, tmp_path / "older.pt", hashes=False)
    store = tmp_path / "ME"
    shutil.copytree(load_checkpoint(me_checkpoint)["store"], store)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))  # same content, other bytes
    code, err = invoke(capsys, "--checkpoint", str(older), "--store", str(store), "--out", str(tmp_path / "o"))
    assert_one_error_line(code, err, "manifest hash differs")
    assert not (tmp_path / "o").exists()


def test_regenerated_store_with_the_same_validation_shards_is_accepted(me_checkpoint, tmp_path):
    """Other training episodes (here fewer), same seed: the validation shard is byte-identical, so the
    checkpoint's validation data is there, and eval gives the trainer's own last validation numbers."""
    checkpoint = with_val_hashes(me_checkpoint, tmp_path / "net_ME.pt", hashes=True)
    original = Path(load_checkpoint(checkpoint)["store"])
    regenerated = generate(GenerateConfig("ME", num_episodes=30, shard_size=10, out=str(tmp_path / "regen"),
                                          workers=1, progress=False))
    assert manifest_sha256(regenerated) != manifest_sha256(original)
    assert (regenerated / "val-000000.tar").read_bytes() == (original / "val-000000.tar").read_bytes()
    results = evaluate(EvalConfig(str(checkpoint), store=str(regenerated), out=str(tmp_path / "o")))
    recorded = load_checkpoint(checkpoint)["val"]
    assert {k: results["splits"]["validation"][k] for k in recorded} == recorded


def test_store_with_other_validation_shards_is_refused(capsys, me_checkpoint, tmp_path):
    checkpoint = with_val_hashes(me_checkpoint, tmp_path / "net_ME.pt", hashes=True)
    other = generate(GenerateConfig("ME", num_episodes=30, seed=1, out=str(tmp_path / "other"), workers=1,
                                    progress=False))  # another seed: other validation episodes
    code, err = invoke(capsys, "--checkpoint", str(checkpoint), "--store", str(other), "--out", str(tmp_path / "o"))
    assert_one_error_line(code, err, "validation shards", "val-000000.tar: sha256", "--store")
    assert not (tmp_path / "o").exists()


def test_store_of_another_episode_type_is_refused_as_such(capsys, aug_checkpoint, tmp_path):
    me_store = generate(GenerateConfig("ME", num_episodes=10, out=str(tmp_path / "stores"), workers=1, progress=False))
    code, err = invoke(capsys, "--checkpoint", str(aug_checkpoint), "--store", str(me_store), "--out", str(tmp_path / "o"))
    assert_one_error_line(code, err, "the episode types differ", "holds ME episodes",
                          "trained on scan_prim_augmentation")
    assert not (tmp_path / "o").exists()


def test_the_originals_test_py_flags_find_the_checkpoint(capsys, me_checkpoint, tmp_path):
    """`python test.py --episode_type ME --fn_in_model net_ME.tar --dir_model out_models`, with `cli.py eval` in
    place of `test.py`: out_models/net_ME.tar does not exist, the net_ME.pt that train writes does."""
    assert Path.cwd() == tmp_path  # tests/conftest.py: out_models/ here is the test's own
    (tmp_path / "out_models").mkdir()
    shutil.copy(me_checkpoint, tmp_path / "out_models" / "net_ME.pt")
    code = run_cli(cli, ["eval", "--episode_type", "ME", "--fn_in_model", "net_ME.tar", "--dir_model", "out_models"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].startswith("out_models/net_ME.pt (ME, 400 episodes)")
    assert out.splitlines()[-1] == "report: out_models/net_ME.eval"
    by_flags = json.loads((tmp_path / "out_models" / "net_ME.eval" / "results.json").read_text())
    by_path = evaluate(EvalConfig(str(me_checkpoint), out=str(tmp_path / "by_path")))
    assert by_flags["splits"]["validation"]["accuracy"] == by_path["splits"]["validation"]["accuracy"]
    assert by_flags["checkpoint"]["sha256"] == by_path["checkpoint"]["sha256"]
    # --dir_model alone with --episode_type: net_<type>.pt; --fn_in_model alone: in out_models, as test.py.
    assert run_cli(cli, ["eval", "--episode_type", "ME", "--dir_model", "out_models", "--out", "a"]) == 0
    assert run_cli(cli, ["eval", "--fn_in_model", "net_ME.pt", "--out", "b", "--split", "validation"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("args, expected", [
    (["--episode_type", "scan_length", "--fn_in_model", "net_ME.pt", "--dir_model", "models"],
     ["--episode_type scan_length differs", "(ME)"]),
    (["--episode_type", "scan_length", "--fn_in_model", "net_scan_length.tar", "--dir_model", "models"],
     ["no checkpoint at models/net_scan_length.tar nor models/net_scan_length.pt"]),
    ([], ["no checkpoint given", "--checkpoint PATH", "--dir_model DIR and --fn_in_model FILE"]),
    (["--episode_type", "ME"], ["no checkpoint given"]),
    (["--checkpoint", "models/net_ME.pt", "--dir_model", "models", "--fn_in_model", "other.pt"],
     ["no checkpoint at models/other.pt"]),
    (["--checkpoint", "elsewhere/net_ME.pt", "--dir_model", "models", "--fn_in_model", "net_ME.tar"],
     ["--checkpoint elsewhere/net_ME.pt and --dir_model/--fn_in_model (models/net_ME.pt) name different files"]),
])
def test_the_originals_flags_disagreeing_or_missing_are_one_line(capsys, me_checkpoint, tmp_path, args, expected):
    (tmp_path / "models").mkdir()
    shutil.copy(me_checkpoint, tmp_path / "models" / "net_ME.pt")
    (tmp_path / "models" / "other.pt").unlink(missing_ok=True)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(me_checkpoint, tmp_path / "elsewhere" / "net_ME.pt")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert_one_error_line(*invoke(capsys, *args), *expected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no report written


def test_split_that_does_not_fit_the_type(capsys, me_checkpoint):
    code, err = invoke(capsys, "--checkpoint", str(me_checkpoint), "--split", "addprim_jump")
    assert_one_error_line(code, err, "'addprim_jump' does not fit a ME checkpoint")


def test_scan_file_malformed_line(capsys, aug_checkpoint, tmp_path):
    scan_file = tmp_path / "bad.txt"
    scan_file.write_text("IN: jump OUT: I_JUMP\nIN: walk twice I_WALK I_WALK\n")
    code, err = invoke(capsys, "--checkpoint", str(aug_checkpoint), "--scan_file", str(scan_file),
                       "--support", "jump=I_JUMP")
    assert_one_error_line(code, err, "line 2")


@pytest.mark.parametrize("line,token", [("IN: jump blorp OUT: I_JUMP", "'blorp'"),
                                        ("IN: jump OUT: I_JUMP I_FLY", "'I_FLY'")])
def test_scan_file_oov_token(capsys, aug_checkpoint, tmp_path, line, token):
    scan_file = tmp_path / "oov.txt"
    scan_file.write_text(f"IN: walk OUT: I_WALK\n\n{line}\n")
    code, err = invoke(capsys, "--checkpoint", str(aug_checkpoint), "--scan_file", str(scan_file),
                       "--support", "jump=I_JUMP")
    assert_one_error_line(code, err, "line 3", token)


def test_support_oov_and_missing_support(capsys, aug_checkpoint, tmp_path):
    scan_file = tmp_path / "ok.txt"
    scan_file.write_text("IN: walk OUT: I_WALK\n")
    code, err = invoke(capsys, "--checkpoint", str(aug_checkpoint), "--scan_file", str(scan_file),
                       "--support", "fly=I_FLY")
    assert_one_error_line(code, err, "--support", "'fly'")
    assert_one_error_line(*invoke(capsys, "--checkpoint", str(aug_checkpoint), "--scan_file", str(scan_file)),
                          "--support")


# ---- --val_episodes: more held-out validation episodes ------------------------------------------------------

def store_identifiers(store: Path, split: str) -> list[str]:
    from pipeline.store import shard_paths
    from trainer.data import read_records
    return [r["identifier"] for r in read_records(shard_paths(store, split))]


def test_val_episodes_draws_held_out_episodes_scored_as_validation(me_checkpoint, tmp_path):
    from trainer.evaluate import decode_records
    results = evaluate(EvalConfig(str(me_checkpoint), split="validation", out=str(tmp_path), val_episodes=20))
    scores = results["splits"]["validation_20"]
    episodes = read_jsonl(tmp_path / scores["draw"]["episodes"])
    assert len(episodes) == scores["n_episodes"] == 20 and scores["draw"]["seed"] == 0

    # Every identifier is one of the store's validation identifiers, and none occurs in training.
    ckpt = load_checkpoint(me_checkpoint)
    store = Path(ckpt["store"])
    held_out, trained = set(store_identifiers(store, "val")), set(store_identifiers(store, "train"))
    drawn = [e["identifier"] for e in episodes]
    assert set(drawn) <= held_out and not set(drawn) & trained
    assert len(set(drawn)) > 1 and scores["draw"]["held_out_identifiers"] == sorted(held_out)
    for e in episodes:  # ME episodes as the store makes them: 3 support words, 20 distinct queries, true outputs
        meaning = {m["src"]: m["tgt"] for m in e["mapping"]}
        assert len({s["input"] for s in e["support"]}) == 3 and len({q["input"] for q in e["query"]}) == 20
        assert all(q["output"] == " ".join(meaning[w] for w in q["input"].split()) for q in e["support"] + e["query"])

    # The scores and predictions are those of decoding the same episodes through the trainer's validation.
    model = MetaSeq2Seq(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer(tuple(ckpt["input_vocab"]), tuple(ckpt["output_vocab"]))
    per_episode = decode_records(model, episodes, tokenizer, results["max_length"], torch.device("cpu"))
    expected = score_episodes(per_episode)
    for key in ("accuracy", "retrieval", "generalization"):
        assert scores[key] == pytest.approx(expected[key])
    assert [e["accuracy"] for e in scores["episodes"]] == [e["accuracy"] for e in expected["episodes"]]
    predictions = read_jsonl(tmp_path / scores["predictions"])
    assert [p["prediction"] for p in predictions] == [r.prediction for e in per_episode for r in e]
    assert 0 < expected["accuracy"] < 100  # a checkpoint that gets some right: the comparison means something
    assert "validation_20" in summary_table(results) and results["splits"]["validation"]["n_episodes"] == 5


def test_val_episodes_same_seed_same_episodes_other_seed_others(me_checkpoint, tmp_path):
    def draw(name: str, seed: int) -> tuple[bytes, dict]:
        results = evaluate(EvalConfig(str(me_checkpoint), split="validation", out=str(tmp_path / name),
                                      val_episodes=8, val_seed=seed))
        return (tmp_path / name / "episodes_validation_8.jsonl").read_bytes(), results["splits"]["validation_8"]
    first, again, other = draw("a", 3), draw("b", 3), draw("c", 4)
    assert first[0] == again[0] and first[1]["accuracy"] == again[1]["accuracy"]
    assert first[0] != other[0]


@pytest.mark.parametrize("args", [["--val_episodes", "-1"], ["--val_episodes", "4", "--val_seed", "-2"]])
def test_val_episodes_bad_input_is_one_line(me_checkpoint, tmp_path, capsys, args):
    out = tmp_path / "report"
    code = run_cli(cli, ["eval", "--checkpoint", str(me_checkpoint), "--out", str(out), "--no_progress", *args])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: --val_episodes and --val_seed") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("fixture", ["aug_checkpoint", "length_checkpoint"])
def test_val_episodes_of_scan_types_keep_the_held_out_pairing(fixture, request, tmp_path):
    checkpoint = request.getfixturevalue(fixture)
    results = evaluate(EvalConfig(str(checkpoint), split="validation", out=str(tmp_path), val_episodes=3))
    episodes = read_jsonl(tmp_path / "episodes_validation_3.jsonl")
    store = Path(load_checkpoint(checkpoint)["store"])
    assert {e["identifier"] for e in episodes} == set(store_identifiers(store, "val"))
    assert not {e["identifier"] for e in episodes} & set(store_identifiers(store, "train"))
    assert results["splits"]["validation_3"]["n_episodes"] == 3
    if fixture == "length_checkpoint":  # validation queries of scan_length come from SCAN's length test split
        test_commands = {p.command for p in scan_test_pairs("length")}
        assert all(q["input"] in test_commands for e in episodes for q in e["query"])
