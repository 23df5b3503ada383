"""The original code's checkpoints (its train.py's `net_<type>.tar`) taken where ours are: eval (also with
test.py's flags), predict, eval's plots, and `convert` to ours, which evaluates alike and resumes.

Most tests write checkpoints in the original's format without its code: a pickle of the dict its train.py
saves, whose vocabularies name `__main__.Lang` (its train.py ran as __main__) and whose weights carry its
module names. The last test runs the original itself ($METASEQ2SEQ_ORIGINAL): its train.py writes the
checkpoints, its test.py scores them, and our eval must print the same accuracy, query by query.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli import cli, run_cli
from pipeline import scan
from pipeline.samplers import ME_INPUTS, ME_OUTPUTS, get_sampler
from pipeline.store import GenerateConfig, generate, load_manifest
from trainer.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from references import original_dir, original_missing  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py
E, NLAYERS = 8, 1


# ---- a checkpoint in the original's format ----------------------------------------------------------------

class Lang:
    """What the original's pickle holds of a vocabulary: ids 0..n-1 for its symbols, then SOS and EOS."""

    def __init__(self, symbols: list[str]):
        self.symbols = list(symbols)
        self.index2symbol = {**dict(enumerate(symbols)), len(symbols): "SOS", len(symbols) + 1: "EOS"}
        self.symbol2index = {s: i for i, s in self.index2symbol.items()}
        self.n_symbols = len(symbols) + 2


@contextlib.contextmanager
def named_as_main(cls):
    """`cls` pickles as `__main__.<name>`, as a class of a script run as __main__ does."""
    main, saved = sys.modules["__main__"], cls.__module__
    cls.__module__ = "__main__"
    setattr(main, cls.__name__, cls)
    try:
        yield
    finally:
        cls.__module__ = saved
        delattr(main, cls.__name__)


def seq_encoder(vocab_size: int, bidirectional: bool = True) -> nn.Module:
    module = nn.Module()
    module.embedding = nn.Embedding(vocab_size, E)
    module.lstm = nn.LSTM(E, E, NLAYERS, bidirectional=bidirectional)
    return module


def original_modules(n_in: int, n_out: int) -> tuple[nn.Module, nn.Module]:
    """An encoder and a decoder with the original's module names (its full model), random weights."""
    encoder, decoder = nn.Module(), nn.Module()
    encoder.suppport_embedding = seq_encoder(n_in)
    encoder.query_embedding = encoder.suppport_embedding  # tied, as the original's; its state dict lists both
    encoder.output_embedding = seq_encoder(n_out)
    encoder.hidden = nn.Linear(2 * E, E)
    decoder.embedding = nn.Embedding(n_out, E)
    decoder.rnn = nn.LSTM(E, E, NLAYERS)
    decoder.concat = nn.Linear(2 * E, E)
    decoder.out = nn.Linear(E, n_out)
    with torch.no_grad():  # larger than the default init, so that outputs vary
        for p in list(encoder.parameters()) + list(decoder.parameters()):
            p.normal_(0.0, 0.7)
    return encoder, decoder


def original_sample(record: dict) -> dict:
    """An episode as the original's build_sample keeps it: word lists, its support items appended to the queries
    (its support loss), and padded tensors."""
    xs, ys = [s["input"].split() for s in record["support"]], [s["output"].split() for s in record["support"]]
    xq = [q["input"].split() for q in record["query"]] + xs
    yq = [q["output"].split() for q in record["query"]] + ys
    identifier = "\n".join(sorted(f"{m['src']} -> {m['tgt']}" for m in record["mapping"]))
    return {"identifier": identifier, "xs": xs, "ys": ys, "xq": xq, "yq": yq, "grammar": "",
            "xs_padded": torch.zeros(len(xs), 3, dtype=torch.long), "xs_lengths": [len(x) + 1 for x in xs]}


def write_original(path: Path, episode_type: str, symbols: tuple[list, list], records: list[dict],
                   episode: int, seed: int = 0) -> Path:
    """A checkpoint as the original's train.py writes it (the keys of its torch.save)."""
    torch.manual_seed(seed)
    encoder, decoder = original_modules(len(symbols[0]) + 2, len(symbols[1]) + 2)
    args = argparse.Namespace(num_episodes=10000, lr=0.001, lr_decay_schedule=5000, nlayers=NLAYERS,
                              max_length_eval=12, emb_size=E, dropout=0.0, fn_out_model="", dir_model=str(path.parent),
                              episode_type=episode_type, disable_memory=False, disable_attention=False,
                              disable_recon_loss=False, gpu=0)
    state = {"encoder_state_dict": encoder.state_dict(), "decoder_state_dict": decoder.state_dict(),
             "input_lang": Lang(symbols[0]), "output_lang": Lang(symbols[1]),
             "episodes_validation": [original_sample(r) for r in records], "episode_type": episode_type,
             "emb_size": E, "dropout": 0.0, "nlayers": NLAYERS, "episode": episode, "disable_memory": False,
             "disable_recon_loss": False, "use_attention": True, "max_length_eval": 12, "num_episodes": 10000,
             "args": args}
    path.parent.mkdir(parents=True, exist_ok=True)
    with named_as_main(Lang):
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def me_tar(tmp_path_factory) -> Path:
    """ME, 3 validation episodes, after 6,000 episodes (one lr decay behind it)."""
    records = get_sampler("ME").sample_validation(np.random.default_rng(0), 3)
    return write_original(tmp_path_factory.mktemp("me") / "net_ME.tar", "ME", (list(ME_INPUTS), list(ME_OUTPUTS)),
                          records, episode=6000)


@pytest.fixture(scope="module")
def perm(tmp_path_factory) -> tuple[Path, Path]:
    """scan_prim_permutation with vocabularies in another order than our store's, and a store of ours."""
    root = tmp_path_factory.mktemp("perm")
    rng = random.Random(0)
    symbols = tuple(rng.sample(words, len(words)) for words in (scan.INPUT_WORDS, scan.OUTPUT_WORDS))
    records = get_sampler("scan_prim_permutation").sample_validation(np.random.default_rng(1), 2)
    tar = write_original(root / "net_scan_prim_permutation.tar", "scan_prim_permutation", symbols, records, episode=4)
    store = root / "store"
    generate(GenerateConfig(episode_type="scan_prim_permutation", num_episodes=10, shard_size=10, store=str(store),
                            progress=False))
    return tar, store


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *expected: str) -> None:
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def report(out: Path) -> tuple[dict, dict[str, bytes]]:
    results = json.loads((out / "results.json").read_text())
    return results, {p.name: p.read_bytes() for p in sorted(out.glob("predictions_*.jsonl"))}


# ---- eval, predict and convert take it ---------------------------------------------------------------------

def test_eval_scores_the_tar_as_its_conversion(me_tar, tmp_path, capsys):
    assert invoke(capsys, "eval", "--checkpoint", me_tar, "--out", tmp_path / "tar", "--plot", "1")[0] == 0
    assert invoke(capsys, "convert", "--from_original", me_tar, "--out", tmp_path / "net_ME.pt")[0] == 0
    assert invoke(capsys, "eval", "--checkpoint", tmp_path / "net_ME.pt", "--out", tmp_path / "pt")[0] == 0
    from_tar, tar_predictions = report(tmp_path / "tar")
    from_pt, pt_predictions = report(tmp_path / "pt")
    assert tar_predictions == pt_predictions and from_tar["splits"]["validation"]["accuracy"] is not None
    for key in ("accuracy", "retrieval", "generalization", "n"):
        assert from_tar["splits"]["validation"][key] == from_pt["splits"]["validation"][key]
    # Its 20 queries and 3 support items per episode, each once (the support loss had appended them).
    assert from_tar["splits"]["validation"]["n"] == 3 * 23
    assert (tmp_path / "tar" / "attention_validation_0.png").is_file()
    config = from_tar["checkpoint"]["model_config"]
    assert (config["mask_query_padding"], config["pad_in_softmax"], config["emb_size"]) == (False, False, E)
    source = from_tar["checkpoint"]["provenance"]["original_checkpoint"]
    assert source["episode"] == 6000 and source["path"] == str(me_tar.resolve())


def test_eval_takes_the_tar_by_test_py_flags(me_tar, tmp_path, capsys):
    args = ["eval", "--episode_type", "ME", "--fn_in_model", me_tar.name, "--dir_model", me_tar.parent,
            "--out", tmp_path / "report"]
    code, out, _ = invoke(capsys, *args)
    assert code == 0 and f"{me_tar} (ME, 6000 episodes)" in out
    code, _, err = invoke(capsys, "eval", "--episode_type", "scan_length", "--fn_in_model", me_tar.name,
                          "--dir_model", me_tar.parent, "--out", tmp_path / "other")
    assert_one_error_line(code, err, "--episode_type scan_length differs", "(ME)")


def test_predict_reads_the_tar_as_its_conversion(me_tar, tmp_path, capsys):
    assert invoke(capsys, "convert", "--from_original", me_tar, "--out", tmp_path / "net_ME.pt")[0] == 0
    lines = {}
    for checkpoint in (me_tar, tmp_path / "net_ME.pt"):
        code, out, _ = invoke(capsys, "predict", "--checkpoint", checkpoint, "--support", "dax=RED,lug=BLUE",
                              "dax lug", "lug wif wif dax", "--attention")
        assert code == 0
        lines[checkpoint] = out
    assert len(set(lines.values())) == 1 and "memory attention" in lines[me_tar]


def test_converted_checkpoint_starts_a_fresh_adam_at_the_lr_of_its_episode(me_tar, tmp_path, capsys):
    assert invoke(capsys, "convert", "--from_original", me_tar, "--out", tmp_path / "net_ME.pt")[0] == 0
    ckpt = load_checkpoint(tmp_path / "net_ME.pt")
    assert ckpt["episodes_done"] == 6000 and ckpt["data_position"]["batches"] == 6000
    assert ckpt["optimizer"]["state"] == {}
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # x0.1 at episode 5,000
    assert (ckpt["store"], ckpt["manifest_sha256"]) == (None, None)
    code, _, err = invoke(capsys, "convert", "--from_original", me_tar, "--out", tmp_path / "net_ME.pt")
    assert_one_error_line(code, err, "already exists")


def test_resume_without_a_store_says_what_is_missing(me_tar, tmp_path, capsys):
    assert invoke(capsys, "convert", "--from_original", me_tar, "--out", tmp_path / "models" / "net_ME.pt")[0] == 0
    code, _, err = invoke(capsys, "train", "--resume", "--dir_model", tmp_path / "models", "--emb_size", E,
                          "--nlayers", NLAYERS, "--dropout", "0", "--no_progress")
    assert_one_error_line(code, err, "records no episode store", "convert it again with --store PATH")
    assert not Path("shards").exists()  # refused before any store was generated


def test_convert_onto_a_store_takes_its_order_and_resumes(perm, tmp_path, capsys):
    tar, store = perm
    converted = tmp_path / "models" / "net.pt"
    assert invoke(capsys, "convert", "--from_original", tar, "--out", converted, "--store", store)[0] == 0
    ckpt, manifest = load_checkpoint(converted), load_manifest(store)
    assert ckpt["input_vocab"] == manifest["input_vocab"] and ckpt["store"] == str(store)
    for checkpoint, out in ((tar, "tar"), (converted, "pt")):
        code = invoke(capsys, "eval", "--checkpoint", checkpoint, "--split", "validation", "--out", tmp_path / out)[0]
        assert code == 0
    assert report(tmp_path / "tar")[1] == report(tmp_path / "pt")[1]

    code, out, err = invoke(capsys, "train", "--resume", "--store", store, "--dir_model", converted.parent,
                            "--fn_out_model", converted.name, "--num_episodes", "8", "--emb_size", E,
                            "--nlayers", NLAYERS, "--dropout", "0", "--no_progress", "--val_every", "4")
    assert code == 0, err
    assert "resuming from episode 4" in out
    resumed = load_checkpoint(converted)
    assert resumed["episodes_done"] == 8
    assert resumed["provenance_history"][-1]["original_checkpoint"]["episode"] == 4


def test_length_split_takes_the_support_sets_saved_in_the_tar(tmp_path, capsys):
    """As the original's test.py (scan_evaluation_val_support): each saved validation episode's support set in
    turn, against all 3,920 length test commands."""
    records = get_sampler("scan_length").sample_validation(np.random.default_rng(2), 2)
    symbols = (list(get_sampler("scan_length").input_symbols), list(get_sampler("scan_length").output_symbols))
    tar = write_original(tmp_path / "net_scan_length.tar", "scan_length", symbols, records, episode=3)
    assert invoke(capsys, "eval", "--checkpoint", tar, "--split", "length", "--out", tmp_path / "report",
                  "--max_length_eval", "4")[0] == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())["splits"]["length"]
    assert (results["n_episodes"], results["n"]) == (2, 2 * 3920)


def test_convert_refuses_a_store_of_another_type(me_tar, perm, tmp_path, capsys):
    code, _, err = invoke(capsys, "convert", "--from_original", me_tar, "--out", tmp_path / "x.pt", "--store", perm[1])
    assert_one_error_line(code, err, "holds scan_prim_permutation episodes", "trained on ME")


# ---- what is not the original's checkpoint: one line, and nothing of it is run ---------------------------

class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path: Path, marker: Path, zipped: bool) -> None:
    state = {"encoder_state_dict": {}, "input_lang": RunsACommand(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=zipped)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("command", ["eval", "convert"])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, capsys, zipped, command):
    marker, path = tmp_path / "MARKER", tmp_path / "net_ME.tar"
    malicious(path, marker, zipped)
    flag = "--checkpoint" if command == "eval" else "--from_original"
    code, _, err = invoke(capsys, command, flag, path)
    assert_one_error_line(code, err, "asks for", "system", "refused, and nothing in it was run")
    assert not marker.exists()


def another_programs_tar(path: Path) -> None:
    source = path.with_name("readme.txt")
    source.write_text("not a checkpoint\n")
    with tarfile.open(path, "w") as archive:
        archive.add(source, arcname="readme.txt")


@pytest.mark.parametrize("make, expected", [
    (another_programs_tar, "is a tar archive of another program"),
    (lambda p: p.write_bytes(p.with_name("source.tar").read_bytes()[:4000]), "is truncated or damaged"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), "is not a checkpoint of the original code (it lacks"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2])), "is not a checkpoint of the original code, or is damaged"),
], ids=["other_tar", "truncated", "other_dict", "other_pickle"])
def test_what_is_not_an_original_checkpoint_is_one_line(me_tar, tmp_path, capsys, make, expected):
    (tmp_path / "source.tar").write_bytes(me_tar.read_bytes())
    path = tmp_path / "net_ME.tar"
    make(path)
    for command, flag in (("eval", "--checkpoint"), ("convert", "--from_original"), ("predict", "--checkpoint")):
        extra = ["--support", "dax=RED", "dax"] if command == "predict" else []
        code, _, err = invoke(capsys, command, flag, path, *extra)
        assert_one_error_line(code, err, str(path), expected)


# ---- side by side with the original code -----------------------------------------------------------------

ORIGINAL_LINE = re.compile(r"^     (.*?) -> (.*?)(?: \(\*\* target: (.*)\))?$")


def original_predictions(path: Path) -> dict[int, dict[str, str]]:
    """episode -> {query input: prediction}, from the report of the original's test.py (its verbose
    evaluation_battery: a line `input -> prediction (** target: ...)` per retrieval and generalization item)."""
    found, episode, in_queries = defaultdict(dict), 0, False
    for line in path.read_text().splitlines():
        if line.startswith("Evaluation episode"):
            episode, in_queries = int(line.split()[-1]), False
        elif line.startswith("  ") and line.strip().endswith(("correct", "support items:")):
            in_queries = line.strip().endswith("correct")
        elif in_queries and (match := ORIGINAL_LINE.match(line)):
            found[episode][match.group(1)] = match.group(2)
    return found


def our_predictions(path: Path) -> dict[int, dict[str, str]]:
    found = defaultdict(dict)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        found[row.get("episode", 0)][row["input"]] = row["prediction"]
    return found


def run_all(commands: list[tuple[list[str], Path]], env: dict) -> None:
    """Start every command (argv, working directory) at once, then wait for them all."""
    running = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for argv, cwd in commands]
    for (argv, _), process in zip(commands, running):
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{' '.join(argv)}:\n{output[-2000:]}"


# Episodes the original trains (its checkpoint is written at the last one), and the split its test.py scores.
SIDE_BY_SIDE = {"ME": (100, "validation"), "scan_prim_permutation": (5, "addprim_jump")}


@pytest.mark.slow
def test_our_eval_prints_what_the_originals_test_py_prints(tmp_path):
    folder = original_dir()
    if not (folder / "train.py").is_file():
        pytest.skip(f"{original_missing()}; this test runs its train.py and test.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # its evaluation runs on the CPU
    run_all([([sys.executable, "train.py", "--episode_type", kind, "--num_episodes", str(n), "--dir_model",
               str(tmp_path / kind)], folder) for kind, (n, _) in SIDE_BY_SIDE.items()], env)
    theirs = [([sys.executable, "test.py", "--episode_type", kind, "--fn_in_model", f"net_{kind}.tar",
                "--dir_model", str(tmp_path / kind)], folder) for kind in SIDE_BY_SIDE]
    ours = [([sys.executable, str(ROOT / "cli.py"), "eval", "--episode_type", kind, "--fn_in_model",
              f"net_{kind}.tar", "--dir_model", str(tmp_path / kind), "--split", split, "--no_progress",
              "--threads", "1"], tmp_path) for kind, (_, split) in SIDE_BY_SIDE.items()]
    run_all(theirs + ours, env)
    for kind, (_, split) in SIDE_BY_SIDE.items():
        printed = (tmp_path / kind / f"res_test_{kind}.txt").read_text()
        results = json.loads((tmp_path / kind / f"net_{kind}.eval" / "results.json").read_text())["splits"][split]
        if split == "validation":  # its line `Acc Generalize (val): 1.0`, the mean over episodes
            assert f"Acc Generalize (val): {round(results['generalization'], 1)}\n" in printed
        else:  # one episode of all the test commands: `generalization items; 0.0% correct`
            assert f"generalization items; {round(results['generalization'], 3)}% correct" in printed
        expected = original_predictions(tmp_path / kind / f"res_test_{kind}.txt")
        found = our_predictions(tmp_path / kind / f"net_{kind}.eval" / f"predictions_{split}.jsonl")
        assert found == expected and sum(len(e) for e in found.values()) == results["n"]
