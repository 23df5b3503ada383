"""`train` in daily use: no clobbering, Ctrl-C saves, resume says where, runs extend, --store is
exact, stores fit torchrun, bf16 is refused where it cannot run, and checkpoints say where they came from."""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import cli, run_cli
from pipeline import store as episode_store
from pipeline.errors import UserError
from pipeline.shardio import file_sha256
from pipeline.threads import SPIN_VAR, WAIT_POLICY_VAR
from trainer.checkpoint import load_checkpoint
from trainer.data import StreamConfig, Tokenizer, make_loader
from trainer.precision import amp_problem, use_exact_fp32
from trainer.config import RESUME_KEYS, TrainConfig
from trainer.signals import StopRequest
from trainer.state import TrainState
from trainer.stores import store_layout, train_shards
from trainer.train import resumed_batches, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(emb_size=16, nlayers=1, dropout=0.5, batch_size=8, progress=False, val_every=8, checkpoint_every=1000,
            workers=1)
CLI_TINY = ["--emb_size", "16", "--nlayers", "1", "--batch_size", "8", "--val_every", "8", "--workers", "1",
            "--no_progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("daily")
    return episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=400, shard_size=40, out=str(out), progress=False, workers=1))


def run(store: Path, model_dir: Path, **overrides) -> dict:
    return train(TrainConfig(store=str(store), dir_model=str(model_dir), **{**TINY, "num_episodes": 48, **overrides}))


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def cli_process(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**environ_without_wait_setting(), "OMP_NUM_THREADS": "1"}, **popen)


def environ_without_wait_setting() -> dict[str, str]:
    """This environment without a wait setting of the user's, so the policy's own (the short spin) is tested."""
    return {name: value for name, value in os.environ.items() if name not in (SPIN_VAR, WAIT_POLICY_VAR)}


# ---- 1. bf16 where the CPU cannot ---------------------------------------------------------------------------

def test_amp_problem_names_the_cpu_and_the_way_out():
    probe_says = "this CPU cannot train the model in bf16 (could not create a primitive descriptor)"
    message = amp_problem("bf16", "cpu", probe_says)
    assert message.startswith("--amp bf16: this CPU cannot") and message.endswith("use --amp none")
    assert "\n" not in message
    assert amp_problem("bf16", "cpu", None) is None           # the probe trained the model in bf16
    assert amp_problem("none", "cpu", probe_says) is None     # fp32 does not care
    assert amp_problem("bf16", "cuda", probe_says) is None    # the CPU probe says nothing about a GPU


def test_fp32_on_a_gpu_turns_off_cudnns_tf32_and_leaves_the_cpu_alone():
    # cuDNN's default (allow_tf32 True) runs fp32 LSTMs in TF32 on Ampere and later GPUs; --amp none must not.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        use_exact_fp32(torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        use_exact_fp32(torch.device("cuda", 0))  # sets flags only: needs no GPU
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


AVX2_PROBE = """
import json, torch
from trainer.precision import cpu_bf16_problem
lstm = torch.nn.LSTM(8, 8, batch_first=True, bidirectional=True)
try:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lstm(torch.randn(2, 3, 8))[0].float().sum().backward()
    nn_lstm = None
except RuntimeError as err:
    nn_lstm = str(err).splitlines()[0]
print(json.dumps({"nn_lstm": nn_lstm, "probe": cpu_bf16_problem()}))
"""


@pytest.mark.slow
def test_the_bf16_probe_trains_the_models_own_path():
    # oneDNN limited to AVX2 stands in for an AVX2-only CPU (the one of the refusal): there a bf16 nn.LSTM
    # fails, and the probe, which runs what CPU training runs (trainer/lstm.py's recurrence), must not.
    result = subprocess.run([sys.executable, "-c", AVX2_PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if answer["nn_lstm"] is None:
        pytest.skip("this oneDNN runs bf16 LSTMs even when limited to AVX2: nothing tells the two probes apart")
    assert "primitive descriptor" in answer["nn_lstm"]
    assert answer["probe"] is None


def test_the_bf16_probe_is_a_real_bf16_step_and_leaves_the_rng_alone():
    from trainer.precision import bf16_training_step, cpu_bf16_problem
    state = torch.get_rng_state()
    assert cpu_bf16_problem() is None  # this CPU (avx512_bf16) trains the model in bf16
    bf16 = bf16_training_step()
    assert torch.equal(torch.get_rng_state(), state)  # a run's draws do not depend on whether it probed
    assert torch.equal(bf16, bf16_training_step())  # deterministic
    # The same step in fp32 (same init and dropout draws) differs by bf16 rounding: autocast was in effect.
    fp32 = bf16_training_step(autocast=False)
    assert bf16.item() != fp32.item() and abs(bf16.item() - fp32.item()) < 0.05 * abs(fp32.item())


@pytest.mark.slow
def test_amp_bf16_trains_where_onednn_has_no_bf16_lstm(store, tmp_path):
    # Under oneDNN limited to AVX2 (see above), `train --amp bf16` was refused; it now trains, in bf16.
    runs = {}
    for amp in ("bf16", "none"):
        model_dir = tmp_path / amp
        result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--amp", amp, "--device", "cpu",
                                 "--store", str(store), "--no_generate", "--num_episodes", "16", "--dir_model",
                                 str(model_dir), *CLI_TINY],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert load_checkpoint(model_dir / "net_ME.pt")["train_config"]["amp"] == amp
        runs[amp] = [json.loads(line)["loss"] for line in open(model_dir / "net_ME.metrics.jsonl")]
    assert len(runs["bf16"]) == 2 and all(math.isfinite(x) for x in runs["bf16"])
    assert runs["bf16"] != runs["none"]  # the products did run in bf16


# ---- 2. no clobber -------------------------------------------------------------------------------------------

def test_train_refuses_to_replace_a_run_unless_told(store, tmp_path, capsys):
    run(store, tmp_path, num_episodes=16)
    files = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = run_cli(cli, ["train", "--store", str(store), "--dir_model", str(tmp_path), "--num_episodes", "16",
                         *CLI_TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--resume" in err and "--overwrite" in err, err
    assert {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing touched
    run(store, tmp_path, num_episodes=24, overwrite=True)
    rows = [json.loads(line) for line in open(tmp_path / "net_ME.metrics.jsonl")]
    assert load_checkpoint(tmp_path / "net_ME.pt")["episodes_done"] == 24
    assert [r["episodes"] for r in rows] == [8, 16, 24]  # the old run's rows are gone, not mixed in
    with pytest.raises(UserError, match="give one of them"):
        run(store, tmp_path, resume=True, overwrite=True)


# ---- 3. interrupt, resume, extend ----------------------------------------------------------------------------

def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def interrupt(process: subprocess.Popen, metrics: Path, after: int, send) -> tuple[str, str]:
    """Send a signal once the run has logged an episode beyond `after`; (stdout, stderr) when it has ended."""
    def logged_beyond() -> bool:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return bool(lines) and json.loads(lines[-1])["episodes"] > after
    wait_for(logged_beyond, process)
    send()
    return process.communicate(timeout=120)


@pytest.fixture
def one_thread():
    """As many threads as the CLI processes get (OMP_NUM_THREADS=1): matmuls may sum in another order else."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_after_the_step_and_resuming_ends_like_an_uninterrupted_run(store, tmp_path,
                                                                                             one_thread):
    model_dir = tmp_path / "cut"
    args = ["--store", str(store), "--num_episodes", "400", "--dir_model", str(model_dir), *CLI_TINY]
    metrics, checkpoint = model_dir / "net_ME.metrics.jsonl", model_dir / "net_ME.pt"
    # Ctrl-C: its own session, so that the signal goes to the whole group as a terminal's does (the loader's
    # worker included).
    process = cli_process(*args, start_new_session=True)
    out, err = interrupt(process, metrics, 0, lambda: os.killpg(process.pid, signal.SIGINT))
    first = load_checkpoint(checkpoint)["episodes_done"]
    assert process.returncode == 130, err
    assert err.strip() == (f"interrupted at episode {first} of 400: saved {checkpoint} with every episode "
                           "trained; continue with --resume")
    assert 8 <= first < 400 and load_checkpoint(checkpoint)["data_position"]["batches"] == first // 8
    assert [json.loads(line)["episodes"] for line in open(metrics)] == list(range(8, first + 1, 8))  # on disk
    assert (model_dir / "net_ME.curve.png").stat().st_size > 1000  # drawn at the checkpoint, not at the end
    # The start-of-run summary came first, with this process's facts.
    assert "  threads      1, GOMP_SPINCOUNT=1000\n" in out and "  episode type ME\n" in out
    assert f"{store} (manifest sha256 {episode_store.manifest_sha256(store)})" in out

    # SIGTERM to the main process alone (as `kill PID` sends it), during a resumed run.
    process = cli_process(*args, "--resume")
    out, err = interrupt(process, metrics, first, process.terminate)
    second = load_checkpoint(checkpoint)["episodes_done"]
    assert process.returncode == 130 and err.strip().startswith(f"interrupted at episode {second} of 400"), err
    assert f"resuming from episode {first}" in out and first < second < 400

    # 400 episodes leave the signals time to land mid-run; a shorter --num_episodes ends the run sooner, as
    # it would have ended uninterrupted (num_episodes is not a setting that resume must match).
    end = second + 16
    run(store, model_dir, num_episodes=end, val_every=1000, resume=True)
    run(store, tmp_path / "straight", num_episodes=end, val_every=1000)  # validating changes no weights
    assert same_weights(checkpoint, tmp_path / "straight" / "net_ME.pt")
    assert load_checkpoint(checkpoint)["val"] == load_checkpoint(tmp_path / "straight" / "net_ME.pt")["val"]
    assert len(load_checkpoint(checkpoint)["provenance_history"]) == 2  # the sessions before this one


def test_a_signal_asks_to_stop_and_a_second_one_later_aborts():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # at once: torchrun's forward of the same Ctrl-C, not a second one
        stop.requested_at -= StopRequest.GRACE_S + 1  # as if the first had come earlier
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_a_larger_num_episodes_extends_it(store, tmp_path, capsys):
    run(store, tmp_path / "straight", num_episodes=80)
    run(store, tmp_path / "grown", num_episodes=40)
    before = (tmp_path / "grown" / "net_ME.pt").read_bytes()
    capsys.readouterr()
    result = run(store, tmp_path / "grown", num_episodes=40, resume=True)
    assert "is a finished run: 40 episodes trained" in capsys.readouterr().out
    assert result["episodes_done"] == 40 and (tmp_path / "grown" / "net_ME.pt").read_bytes() == before
    run(store, tmp_path / "grown", num_episodes=80, resume=True)
    assert same_weights(tmp_path / "grown" / "net_ME.pt", tmp_path / "straight" / "net_ME.pt")
    grown = load_checkpoint(tmp_path / "grown" / "net_ME.pt")
    assert grown["optimizer"]["param_groups"][0]["lr"] == load_checkpoint(
        tmp_path / "straight" / "net_ME.pt")["optimizer"]["param_groups"][0]["lr"]
    assert len(grown["provenance_history"]) == 1  # the first session's, kept beside this one's
    assert "num_episodes" not in RESUME_KEYS


@pytest.mark.slow
def test_lr_decays_by_episodes_seen_across_an_extension(store, tmp_path):
    # 20 episodes: two steps of 8 and one cut to 4; the decay at episode 16 comes at the second step.
    run(store, tmp_path, num_episodes=20, lr=1e-3, lr_decay_schedule=16)
    first = load_checkpoint(tmp_path / "net_ME.pt")
    assert first["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert first["data_position"]["batches"] == 2 and first["data_position"]["partial"] == 4
    run(store, tmp_path, num_episodes=36, lr=1e-3, lr_decay_schedule=16, resume=True)  # the cut batch's 4, 8, 4
    grown = load_checkpoint(tmp_path / "net_ME.pt")
    assert grown["episodes_done"] == 36 and grown["steps"] == 3 + 3
    assert grown["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)  # 32 episodes seen: decayed twice


def test_resumed_batches_continue_the_episode_order_inside_a_cut_batch(store):
    manifest = episode_store.load_manifest(store)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    stream = StreamConfig(tuple(str(p) for p in episode_store.shard_paths(store, "train")), 8, tokenizer, seed=0)
    order = [key for keys, _ in make_loader(stream) for key in keys]
    state = TrainState(model=None, optimizer=None, batches=2, partial=4)  # 20 episodes trained
    pieces = list(resumed_batches(make_loader(stream), state))
    assert [key for keys, _, _ in pieces for key in keys] == order[20:]
    keys, batch, offset = pieces[0]
    assert (len(keys), batch.num_episodes, offset) == (4, 4, 4)


# ---- 4. stores that fit torchrun -----------------------------------------------------------------------------

@pytest.mark.parametrize("episodes, parts", [(160, 1), (160, 2), (10000, 2), (10000, 4), (170, 6), (7, 3)])
def test_store_layout_gives_every_process_and_worker_equal_shards(episodes, parts):
    total, size = store_layout(episodes, parts)
    if parts == 1:
        assert (total, size) == (episodes, episode_store.GenerateConfig.shard_size)  # generate's defaults
        return
    shards = -(-total // size)
    assert total >= episodes and total % size == 0 and shards % parts == 0 and size <= 1000
    assert total - episodes < shards  # rounded up by less than one episode per shard


def test_a_store_with_too_few_shards_says_how_to_regenerate_it(tmp_path, capsys):
    small = episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=16, out=str(tmp_path), progress=False, workers=1))  # one shard
    cfg = TrainConfig(store=str(small), num_episodes=16, workers=1)
    with pytest.raises(UserError) as err:
        train_shards(episode_store.load_manifest(small), small, cfg, world_size=2)
    message = str(err.value)
    assert "\n" not in message and "--shard_size 8 " in message and message.endswith(" --overwrite")
    command = message[message.index("python cli.py generate"):].split()[2:]
    assert run_cli(cli, [*command, "--no_progress"]) == 0  # the advice, followed, works
    assert len(train_shards(episode_store.load_manifest(small), small, cfg, world_size=2)) == 2


# ---- 5. --store is the store ---------------------------------------------------------------------------------

def test_store_with_a_custom_name_is_generated_there_and_names_the_type(tmp_path):
    custom = tmp_path / "stores" / "my ME episodes"
    result = train(TrainConfig(episode_type="ME", store=str(custom), dir_model=str(tmp_path / "a"),
                               **{**TINY, "num_episodes": 16}))
    assert episode_store.load_manifest(custom)["counts"]["train"] == 16
    assert not (tmp_path / "stores" / "ME").exists() and not Path("shards", "my ME episodes").exists()
    assert result["episodes_done"] == 16
    # Without --episode_type, the manifest says what the store holds.
    cfg = TrainConfig(store=str(custom), dir_model=str(tmp_path / "b"), **{**TINY, "num_episodes": 16})
    assert cfg.episode_type is None
    assert Path(train(cfg)["checkpoint"]) == tmp_path / "b" / "net_ME.pt"
    assert TrainConfig(store=str(custom)).batch_size is None  # decided by the store's type, in train()
    with pytest.raises(UserError, match="conflicts with the store .* which holds ME episodes"):
        train(TrainConfig(episode_type="scan_prim_permutation", store=str(custom), dir_model=str(tmp_path / "c"),
                          **{**TINY, "num_episodes": 16}))
    assert not (tmp_path / "c").exists()
    with pytest.raises(UserError, match="pass --episode_type to generate one there"):
        train(TrainConfig(store=str(tmp_path / "nowhere"), dir_model=str(tmp_path / "d"), **TINY))


# ---- 6, 9. what a checkpoint records -------------------------------------------------------------------------

def test_checkpoint_records_validation_shard_hashes_and_provenance(store, tmp_path):
    ckpt = load_checkpoint(Path(run(store, tmp_path, num_episodes=8)["checkpoint"]))
    assert ckpt["val_shards_sha256"] == {"val-000000.tar": file_sha256(store / "val-000000.tar")}
    assert ckpt["manifest_sha256"] == episode_store.manifest_sha256(store)
    prov = ckpt["provenance"]
    assert prov["python"] == platform.python_version() and torch.__version__.startswith(prov["torch"])
    assert prov["device"].startswith("cpu (") and prov["command"] and prov["started"]
    assert ckpt["provenance_history"] == []


# ---- 7. --help -----------------------------------------------------------------------------------------------

def test_train_help_shows_the_real_defaults(capsys):
    assert run_cli(cli, ["train", "--help"]) == 0
    assert "see README" not in capsys.readouterr().out
    fields = TrainConfig.__dataclass_fields__
    for param in cli.commands["train"].params:
        if param.name in fields and not param.is_flag:
            assert param.default == fields[param.name].default, param.name


@pytest.mark.slow
def test_an_older_checkpoint_resumes_with_the_settings_it_was_trained_with(store, tmp_path):
    # Written before the attention setting existed: trained with the query padding masked and Adam kept.
    run(store, tmp_path)
    path = tmp_path / "net_ME.pt"
    ckpt = torch.load(path, weights_only=True)
    for config in ("train_config", "model_config"):
        del ckpt[config]["mask_query_padding"]
    del ckpt["train_config"]["keep_adam_at_decay"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="mask_query_padding=True"):
        run(store, tmp_path, num_episodes=96, resume=True)
    run(store, tmp_path, num_episodes=96, resume=True, mask_query_padding=True, keep_adam_at_decay=True)
    resumed = load_checkpoint(path)
    assert resumed["episodes_done"] == 96 and resumed["model_config"]["mask_query_padding"] is True


@pytest.mark.slow
def test_each_decay_starts_adam_again_unless_keep_adam_at_decay(store, tmp_path):
    # 5 steps of 8 episodes, decay at 24: Adam's step count restarts at the decay, or runs on through it.
    for reset in (False, True):
        run(store, tmp_path / str(reset), num_episodes=40, lr_decay_schedule=24, keep_adam_at_decay=not reset)
        ckpt = load_checkpoint(tmp_path / str(reset) / "net_ME.pt")
        steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
        assert steps == ({2} if reset else {5})
        assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(ckpt["train_config"]["lr"] * 0.1)


# ---- 10. one train per checkpoint; a failed train leaves nothing; advice that rebuilds the store; --gpu ------

@pytest.mark.slow
def test_a_second_train_on_the_same_checkpoint_fails_at_once_in_one_line(store, tmp_path, capsys):
    args = ["--store", str(store), "--dir_model", str(tmp_path), "--num_episodes", "400", *CLI_TINY]
    args[args.index("--batch_size") + 1] = "1"  # a long run: 400 steps
    first = cli_process(*args)
    metrics = tmp_path / "net_ME.metrics.jsonl"
    wait_for(metrics.exists, first)
    code = run_cli(cli, ["train", *args, "--overwrite"])
    err = capsys.readouterr().err
    still_running = first.poll() is None
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert still_running, "the first run ended before the second started: make it longer"
    assert code == 1 and err.count("\n") == 1 and "another train is writing" in err and "net_ME.pt" in err, err
    episodes = [json.loads(line)["episodes"] for line in metrics.read_text().splitlines()]
    assert episodes == sorted(set(episodes))  # one run's rows, none twice


def test_a_train_that_fails_its_checks_leaves_no_dir_model_behind(store, tmp_path):
    new = tmp_path / "new" / "models"
    with pytest.raises(UserError, match="more than the 400 training episodes"):
        run(store, new, num_episodes=1000)
    assert not (tmp_path / "new").exists()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(store, corrupt)
    shard = next(corrupt.glob("train-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-600])
    with pytest.raises(UserError, match="fails verification"):
        run(corrupt, new)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError):
        run(store, tmp_path / "kept", num_episodes=1000)
    assert (tmp_path / "kept").is_dir()  # a directory that was there stays


def test_the_advice_for_a_store_too_small_rebuilds_that_store(tmp_path, capsys):
    path = tmp_path / "sp ace" / "store x"
    episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=40, num_val_episodes=3, seed=7, shard_size=20, store=str(path), progress=False,
        workers=1))
    code = run_cli(cli, ["train", "--store", str(path), "--num_episodes", "100", "--dir_model",
                         str(tmp_path / "m"), *CLI_TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    command = err[err.index("`") + 1:err.rindex("`")]
    assert command.startswith("python cli.py generate ") and shlex.quote(str(path)) in command
    words = shlex.split(command)
    subprocess.run([sys.executable, *words[1:], "--no_progress"], cwd=ROOT, check=True, capture_output=True)
    manifest = episode_store.load_manifest(path)
    assert manifest["counts"]["train"] == 100 and manifest["params"]["seed"] == 7
    assert manifest["params"]["num_val_episodes"] == 3 and manifest["params"]["shard_size"] == 20
    assert not (tmp_path / "m").exists() and not (ROOT / "shards" / "store x").exists()


@pytest.mark.parametrize("flags, message", [
    (["--gpu", "1", "--device", "cpu"], "--gpu 1 conflicts with --device cpu"),
    (["--gpu", "1", "--device", "cuda:0"], "--gpu 1 conflicts with --device cuda:0"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_gpu_and_device_that_disagree_are_one_line(store, tmp_path, capsys, flags, message):
    code = run_cli(cli, ["train", "--store", str(store), "--dir_model", str(tmp_path / "m"), *flags, *CLI_TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_alone_without_cuda_trains_on_the_cpu_with_one_warning(store, tmp_path, capsys):
    code = run_cli(cli, ["train", "--store", str(store), "--dir_model", str(tmp_path / "m"), "--gpu", "0",
                         "--num_episodes", "16", *CLI_TINY])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.splitlines() == ["warning: --gpu 0 asked for, but no CUDA device is available: training on the CPU"]
    assert load_checkpoint(tmp_path / "m" / "net_ME.pt")["provenance"]["device"].startswith("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags", [["--device", "cuda:0"], ["--gpu", "0", "--device", "cuda"]])
def test_cuda_asked_for_without_cuda_is_one_line(store, tmp_path, capsys, flags):
    code = run_cli(cli, ["train", "--store", str(store), "--dir_model", str(tmp_path / "m"), *flags, *CLI_TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no CUDA device is available" in err, err
    assert not (tmp_path / "m").exists()
