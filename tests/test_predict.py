"""Tests of `cli.py predict`: its outputs are eval's predictions for the same commands and support set, its
attention text is the model's attention, and bad input is one `error:` line.

The checkpoint is tiny (E=16, 8 episodes) with its weights scaled up, so that its outputs differ from
command to command and a mix-up of commands and outputs would show.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import cli, run_cli
from evalsuite.evaluate import EvalConfig, evaluate
from evalsuite.splits import scan_test_pairs
from trainer.batch import make_batch
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import Tokenizer
from trainer.model import MetaSeq2Seq, ModelConfig
from trainer.train import train

ROOT = Path(__file__).parents[1]
SUPPORT = "jump=I_JUMP,walk=I_WALK,run=I_RUN,look=I_LOOK"
PAIRS = scan_test_pairs("addprim_jump")[::97]  # 80 commands of all lengths


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    cfg = TrainConfig(episode_type="scan_prim_augmentation", store=str(root / "shards" / "scan_prim_augmentation"),
                      num_episodes=8, batch_size=8, emb_size=16, workers=0, progress=False,
                      dir_model=str(root / "models"))
    payload = load_checkpoint(Path(train(cfg)["checkpoint"]))
    payload["model"] = {k: v * 4 if v.is_floating_point() else v for k, v in payload["model"].items()}
    save_checkpoint(root / "scaled.pt", payload)
    return root / "scaled.pt"


def eval_scan_file(checkpoint: Path, pairs, root: Path) -> list[str]:
    """What `eval --scan_file` predicts for `pairs` with the support set SUPPORT: the file is one episode (where
    the decoder attention covers padded query steps, an output can depend on the longest query beside it)."""
    (root / "queries.txt").write_text("".join(f"IN: {p.command} OUT: {p.actions}\n" for p in pairs))
    evaluate(EvalConfig(str(checkpoint), out=str(root / "report"), scan_file=str(root / "queries.txt"),
                        support=SUPPORT))
    rows = [json.loads(line) for line in (root / "report" / "predictions_scan_file.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == [p.command for p in pairs]
    return [r["prediction"] for r in rows]


@pytest.fixture(scope="module")
def eval_predictions(checkpoint, tmp_path_factory) -> list[str]:
    return eval_scan_file(checkpoint, PAIRS, tmp_path_factory.mktemp("eval"))


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", *args], input=stdin, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_outputs_from_stdin_are_evals_predictions(checkpoint, eval_predictions):
    result = run("--checkpoint", str(checkpoint), "--support", SUPPORT, stdin="".join(f"{p.command}\n" for p in PAIRS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == eval_predictions
    assert len(set(eval_predictions)) > len(PAIRS) // 2  # outputs differ by command: a mix-up would show


@pytest.mark.slow
def test_blank_input_lines_give_empty_output_lines(checkpoint, tmp_path):
    """The output lines up with a file of commands (paste): a blank line (or one of spaces) in, an empty line out."""
    commands = tmp_path / "commands.txt"
    commands.write_text(f"{PAIRS[0].command}\n\n{PAIRS[1].command}\n   \n\n{PAIRS[2].command}\n")
    result = run("--checkpoint", str(checkpoint), "--support", SUPPORT, stdin=commands.read_text())
    assert result.returncode == 0, result.stderr
    outputs = result.stdout.splitlines()
    assert len(outputs) == len(commands.read_text().splitlines()) == 6
    expected = eval_scan_file(checkpoint, PAIRS[:3], tmp_path)
    assert outputs == [expected[0], "", expected[1], "", "", expected[2]]


@pytest.mark.slow
def test_support_file_from_scan_export_merges_repeated_pairs(checkpoint, eval_predictions, tmp_path):
    """`scan export` repeats pairs (addprim_jump's training file holds `IN: jump OUT: I_JUMP` 1,467 times): as a
    support file each pair counts once, so the outputs are those of the file with every pair once."""
    export = subprocess.run([sys.executable, str(ROOT / "cli.py"), "scan", "export", "--split", "addprim_jump",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    exported = tmp_path / "tasks_train_addprim_jump.txt"
    lines = exported.read_text().splitlines()
    assert lines.count("IN: jump OUT: I_JUMP") > 1
    once = tmp_path / "once.txt"
    once.write_text("".join(f"{line}\n" for line in dict.fromkeys(lines)))
    commands = [p.command for p in PAIRS[:3]]
    merged = run("--checkpoint", str(checkpoint), "--support_file", str(exported), *commands)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout == run("--checkpoint", str(checkpoint), "--support_file", str(once), *commands).stdout
    assert len(merged.stdout.splitlines()) == 3
    # Conflicting pairs (one input, two outputs) are still refused, naming both.
    conflict = tmp_path / "conflict.txt"
    conflict.write_text("IN: jump OUT: I_JUMP\nIN: walk OUT: I_WALK\nIN: jump OUT: I_WALK\n")
    refused = run("--checkpoint", str(checkpoint), "--support_file", str(conflict), "jump")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (f"error: {conflict}: the input 'jump' is given two different outputs (jump=I_JUMP and "
                              "jump=I_WALK); a support set gives each input one output\n")


def test_commands_as_arguments_and_support_from_a_scan_file(capsys, checkpoint, tmp_path):
    support_file = tmp_path / "support.txt"
    support_file.write_text("".join(f"IN: {pair.replace('=', ' OUT: ')}\n" for pair in SUPPORT.split(",")))
    commands = [p.command for p in PAIRS[:5]]
    expected = eval_scan_file(checkpoint, PAIRS[:5], tmp_path)
    for flags in (["--support", SUPPORT], ["--support_file", str(support_file)]):
        assert run_cli(cli, ["predict", "--checkpoint", str(checkpoint), *flags, *commands]) == 0
        assert capsys.readouterr().out.splitlines() == expected


def model_attention(checkpoint: Path, support: list[tuple[str, str]], command: str):
    """The attention straight from the model: (output tokens, memory (Tqi, ns), decoder (L, Tqi))."""
    ckpt = load_checkpoint(checkpoint)
    model = MetaSeq2Seq(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer(tuple(ckpt["input_vocab"]), tuple(ckpt["output_vocab"]))
    batch = make_batch([[(tokenizer.encode_input(i), tokenizer.encode_output(o)) for i, o in support]],
                       [[(tokenizer.encode_input(command), [])]])
    with torch.inference_mode():
        result = model.eval().greedy_decode(batch, int(ckpt["train_config"]["max_length_eval"]),
                                            return_attention=True)
    n = int(result.lengths[0, 0])
    return ([tokenizer.output_vocab[t] for t in result.tokens[0, 0, :n].tolist()],
            result.memory_attention[0, 0], result.decoder_attention[0, 0, :n])


@pytest.mark.slow
def test_attention_as_text(checkpoint, tmp_path):
    command = PAIRS[3].command
    result = run("--checkpoint", str(checkpoint), "--support", SUPPORT, "--attention", command)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == eval_scan_file(checkpoint, [PAIRS[3]], tmp_path)[0]
    support = [tuple(pair.split("=")) for pair in SUPPORT.split(",")]
    outputs, memory, decoder = model_attention(checkpoint, support, command)
    words = command.split() + ["<eos>"]
    memory_at = lines.index("  memory attention (input word -> the support item it attends to most):")
    for word, row, line in zip(words, memory, lines[memory_at + 1:memory_at + 1 + len(words)]):
        best = int(row.argmax())
        assert line.split() == [word, "->", support[best][0], "=", support[best][1], f"{float(row[best]):.2f}"]
    decoder_at = lines.index("  decoder attention (output token: weight of each input word):")
    rows = lines[decoder_at + 1:]
    assert len(rows) == len(outputs)
    for token, weights, line in zip(outputs, decoder, rows):
        assert line.split() == [f"{token}:", *[x for w, v in zip(words, weights) for x in (w, f"{float(v):.2f}")]]


@pytest.mark.slow
def test_attention_is_that_of_the_printed_output_among_longer_commands(checkpoint):
    # Where the decoder attention covers padded query steps, a command's output depends on the longest command
    # beside it: the attention shown must come from the decoding that wrote the printed output.
    commands = sorted((p.command for p in PAIRS), key=len)
    short, longest = commands[0], commands[-1]
    result = run("--checkpoint", str(checkpoint), "--support", SUPPORT, "--attention", short, longest)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    decoder_at = lines.index("  decoder attention (output token: weight of each input word):")
    written = []
    for line in lines[decoder_at + 1:]:
        if not line.startswith("  "):
            break
        written.append(line.split()[0].rstrip(":"))
    assert [t for t in written if t != "<eos>"] == lines[0].split()


@pytest.mark.parametrize("args, stdin, expected", [
    (["--support", SUPPORT, "jump twice", "jump blorp"], "", "command 2 ('jump blorp')"),
    (["--support", "jump=I_JUMP,jump=I_WALK", "jump"], "", "'jump' is given two different outputs"),
    (["--support", "jump=I_JUMP,walk", "jump"], "", "'walk' is not of the form INPUT=OUTPUT"),
    (["--support", "fly=I_FLY", "jump"], "", "--support"),
    (["jump"], "", "exactly one of --support"),
    (["--support", SUPPORT], "\n  \n", "no commands"),
])
def test_bad_input_is_one_error_line(capsys, monkeypatch, checkpoint, args, stdin, expected):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = run_cli(cli, ["predict", "--checkpoint", str(checkpoint), *args])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err


@pytest.mark.slow
def test_bad_input_in_a_real_process(checkpoint):
    result = run("--checkpoint", str(checkpoint), "--support", SUPPORT, stdin="jump twice\njump blorp\n")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: command 2 ('jump blorp'): token 'blorp'")
    assert result.stderr.count("\n") == 1 and "input vocabulary" in result.stderr


def test_bad_support_file_and_checkpoint(capsys, checkpoint, tmp_path):
    support_file = tmp_path / "support.txt"
    support_file.write_text("IN: jump OUT: I_JUMP\nIN: walk I_WALK\n")
    assert run_cli(cli, ["predict", "--checkpoint", str(checkpoint), "--support_file", str(support_file), "jump"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2" in err and err.count("\n") == 1
    assert run_cli(cli, ["predict", "--checkpoint", str(tmp_path / "none.pt"), "--support", SUPPORT, "jump"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
