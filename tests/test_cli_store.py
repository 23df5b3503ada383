"""cli.py for the store: every command has --help; bad input is one `error:` line and a non-zero exit."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from filelock import FileLock

from cli import cli, run_cli
from pipeline.errors import UserError
from pipeline.samplers import EPISODE_TYPES
from pipeline.store import load_manifest, lock_path, verify_store

ROOT = Path(__file__).parents[1]


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, expected: str) -> None:
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert "Traceback" not in err


def command_paths(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *command_paths(cli)], ids=lambda p: " ".join(p) or "cli")
def test_every_command_has_help(capsys, path):
    code, out, _ = invoke(capsys, *path, "--help")
    assert code == 0 and out.startswith("Usage: cli.py")


def test_version_names_the_project_version_and_commit(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--version"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        assert result.stdout == f"metaseq2seq {version}\n"
        return
    assert result.stdout.startswith(f"metaseq2seq {version} (git {head.stdout.strip()}")
    assert result.stdout.endswith(")\n") and result.stdout.count("\n") == 1


def test_generate_verify_publish(tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["generate", "--episode_type", "ME", "--num_episodes", "12", "--shard_size", "5", "--out", str(out),
            "--no_progress"]
    code, stdout, _ = invoke(capsys, *args)
    store = out / "ME"
    assert (code, stdout) == (0, f"{store}\n")
    code, _, err = invoke(capsys, *args)
    assert code == 0 and "identical, nothing to do" in err
    code, _, err = invoke(capsys, *args[:4], "13", *args[5:])
    assert_one_error_line(code, err, "pass --overwrite")
    assert invoke(capsys, "verify", "--store", str(store))[:2] == (0, f"{store}: ok\n")
    code, stdout, _ = invoke(capsys, "publish", "--store", str(store), "--to", str(tmp_path / "export"))
    assert code == 0 and (tmp_path / "export" / "data" / "train-00000-of-00001.parquet").is_file()


@pytest.mark.slow
def test_two_concurrent_generates_end_with_one_complete_store(tmp_path):
    """Both processes start while the store is locked (here by the test), so both must wait; once it is
    released, one writes the store and the other waits for it and then finds it identical."""
    out, store = tmp_path / "shards", tmp_path / "shards" / "ME"
    args = [sys.executable, str(ROOT / "cli.py"), "generate", "--episode_type", "ME", "--num_episodes", "3000",
            "--shard_size", "500", "--workers", "1", "--out", str(out), "--no_progress"]
    lock = FileLock(lock_path(store))
    out.mkdir()
    with lock:
        procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        first_lines = [proc.stderr.readline() for proc in procs]  # EOF ('') if a process never waits
    results = [(proc.wait(timeout=120), proc.stdout.read(), line + proc.stderr.read())
               for proc, line in zip(procs, first_lines)]
    for line in first_lines:
        assert line.startswith(f"{store}: another generate is writing this store"), results
    assert [code for code, _, _ in results] == [0, 0], results
    assert all(stdout == f"{store}\n" for _, stdout, _ in results)
    assert sum("identical, nothing to do" in err for _, _, err in results) == 1, results
    assert verify_store(store) == [] and load_manifest(store)["counts"] == {"train": 3000, "val": 5}
    assert sorted(p.name for p in store.iterdir()) == ["README.md", "manifest.json", *[
        f"train-{i:06d}.tar" for i in range(6)], "val-000000.tar"]


def test_publish_to_an_unreachable_hub_is_one_error_line(tmp_path, capsys):
    """HF_ENDPOINT points at a closed local port (never at a real host): the push fails to connect."""
    invoke(capsys, "generate", "--episode_type", "ME", "--num_episodes", "10", "--out", str(tmp_path / "shards"),
           "--no_progress")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_x"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "publish", "--store", str(tmp_path / "shards" / "ME"),
                             "--repo_id", "someone/episodes"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert_one_error_line(result.returncode, result.stderr, "cannot push to someone/episodes on http://127.0.0.1:9")
    assert "HF_ENDPOINT" in result.stderr


def test_verify_lists_problems_and_exits_1(tmp_path, capsys):
    out = tmp_path / "shards"
    invoke(capsys, "generate", "--episode_type", "ME", "--num_episodes", "12", "--shard_size", "5",
           "--out", str(out), "--no_progress")
    store = out / "ME"
    (store / "train-000001.tar").unlink()
    (store / "train-000002.tar").write_bytes(b"x" * 2048)
    code, stdout, err = invoke(capsys, "verify", "--store", str(store))
    assert code == 1
    lines = stdout.splitlines()
    assert lines[0] == "train-000001.tar: missing"
    assert any(line.startswith("train-000002.tar: sha256") for line in lines)
    assert_one_error_line(code, err, f"{store}: {len(lines)} problem(s)")


@pytest.mark.parametrize("args, expected", [
    (["generate", "--episode_type", "nope"], "choose one of: " + ", ".join(EPISODE_TYPES)),
    (["generate", "--episode_type", "ME", "--num_episodes", "0"], "--num_episodes must be a positive integer"),
    (["generate", "--episode_type", "ME", "--num_episodes", "many"], "'many' is not a valid integer"),
    (["generate"], "Missing option '--episode_type'"),
    (["generate", "--episode_type", "ME", "--bogus"], "--bogus"),
    (["verify"], "Missing option '--store'"),
    (["publish", "--store", "x"], "exactly one of --to DIR or --repo_id USER/NAME"),
    (["publish", "--store", "x", "--repo_id", "nobody"], "USER/NAME"),
    (["scan", "export", "--split", "nope", "--out", "x"], "'nope' is not one of"),
])
def test_bad_input_is_one_error_line(capsys, args, expected):
    code, _, err = invoke(capsys, *args)
    assert_one_error_line(code, err, expected)


def test_unwritable_out_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = invoke(capsys, "generate", "--episode_type", "ME", "--out", str(tmp_path / "file" / "x"))
    assert_one_error_line(code, err, "cannot write the store")


def test_user_error_oserror_and_interrupt_become_one_line(capsys):
    """The handler that train/eval will share, on a throwaway group."""
    @click.group()
    def group():
        pass

    @group.command()
    @click.argument("what")
    def fail(what):
        raise {"user": UserError("bad\nthing"), "os": FileNotFoundError(2, "No such file", "f.pt"),
               "interrupt": KeyboardInterrupt()}[what]

    for what, expected, code in (("user", "error: bad | thing", 1), ("os", "error: No such file: f.pt", 1),
                                 ("interrupt", "error: interrupted", 130)):
        assert run_cli(group, ["fail", what]) == code
        assert capsys.readouterr().err.splitlines()[-1] == expected


def test_real_process_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", "--episode_type", "nope", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: unknown episode type 'nope'") and result.stderr.count("\n") == 1
