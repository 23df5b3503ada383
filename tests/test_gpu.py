"""The CUDA paths against the CPU ones: gradients, training, bf16, a checkpoint that moves between devices,
and a grid whose jobs share one GPU. Every test here skips where no CUDA device is available."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import store as episode_store
from trainer.checkpoint import load_checkpoint
from test_model import CONFIGS, batch_of, grads_of, make_model, pad_with_garbage, random_episodes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--emb_size", "16", "--nlayers", "1", "--batch_size", "8", "--val_every", "16", "--no_progress"]


@pytest.fixture(autouse=True)
def exact_cuda():
    """fp32 on the GPU as on the CPU: no TF32 in matmuls or cuDNN, deterministic cuDNN kernels."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = matmul


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_gradients_match_cpu(name):
    # cuDNN's packed LSTM backward against our CPU recurrence's, on a batch padded with garbage.
    model = make_model(dropout=0.0, **CONFIGS[name]).train()  # cuDNN's RNN backward runs in train mode only
    batch = pad_with_garbage(batch_of(random_episodes(seed=21)), seed=3)
    cpu = grads_of(model, batch)
    gpu = grads_of(model.cuda(), batch.to("cuda"))
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def test_bf16_autocast_on_cuda_stays_near_fp32():
    model = make_model(dropout=0.0).cuda().train()
    batch = batch_of(random_episodes(seed=22)).to("cuda")
    fp32 = model.loss(batch).item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model.loss(batch)
    bf16.backward()
    assert abs(bf16.item() - fp32) < 0.02 * fp32  # bf16 keeps 8 bits of mantissa: ~0.4% per product
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=96, shard_size=24, out=str(tmp_path_factory.mktemp("gpu")), progress=False, workers=1))


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def losses(metrics: Path) -> list[float]:
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_training_on_cuda_follows_the_cpu_run(store, tmp_path):
    # Same seed, same store: the same episodes in the same order, so the losses logged along the way agree.
    for device in ("cpu", "cuda"):
        cli("train", "--store", str(store), "--num_episodes", "64", "--dropout", "0", "--dir_model",
            str(tmp_path / f"on_{device}"), "--device", device, *TINY)
    cpu, gpu = (losses(tmp_path / f"on_{d}" / "net_ME.metrics.jsonl") for d in ("cpu", "cuda"))
    assert len(cpu) == len(gpu) >= 2
    # fp32 on both sides: train turns cuDNN's default TF32 off, so only the order of sums differs.
    torch.testing.assert_close(torch.tensor(gpu), torch.tensor(cpu), rtol=1e-4, atol=0)


@pytest.mark.parametrize("flags", [["--gpu", "0"], ["--device", "cuda:0"], ["--gpu", "0", "--device", "cuda"]])
def test_the_originals_gpu_flag_and_cuda_n_train_on_that_gpu(store, tmp_path, flags):
    cli("train", "--store", str(store), "--num_episodes", "16", "--dir_model", str(tmp_path), *flags, *TINY)
    assert load_checkpoint(tmp_path / "net_ME.pt")["provenance"]["device"].startswith("cuda")


def test_a_cuda_checkpoint_resumes_on_cpu_and_evaluates_on_cuda(store, tmp_path):
    cli("train", "--store", str(store), "--num_episodes", "48", "--dir_model", str(tmp_path), "--device", "cuda",
        *TINY)
    assert all(t.device.type == "cpu" for t in load_checkpoint(tmp_path / "net_ME.pt")["model"].values())
    cli("train", "--store", str(store), "--num_episodes", "96", "--dir_model", str(tmp_path), "--device", "cpu",
        "--resume", *TINY)
    assert load_checkpoint(tmp_path / "net_ME.pt")["episodes_done"] == 96
    cli("eval", "--checkpoint", str(tmp_path / "net_ME.pt"), "--device", "cuda", "--no_progress")
    results = json.loads((tmp_path / "net_ME.eval" / "results.json").read_text())
    assert results["device"].startswith("cuda")


def test_reproduce_jobs_share_one_gpu(tmp_path):
    out = tmp_path / "runs"
    done = cli("reproduce", "--out", str(out), "--experiments", "ME", "--seeds", "0,1", "--jobs", "2",
               "--device", "cuda", "--num_episodes", "32", "--emb_size", "16", "--nlayers", "1", "--batch_size", "8")
    assert done.stdout.count("done (train") == 2
    for seed in (0, 1):
        record = json.loads((out / "ME" / "full" / f"seed{seed}" / "run.json").read_text())
        assert record["status"] == "done"
        assert "--device cuda" in (out / "ME" / "full" / f"seed{seed}" / "train.log").read_text()


@pytest.mark.parametrize("name", ["full", "no_memory", "no_attention"])
def test_cuda_stack_matches_the_cpu_stack(name):
    """The stacked recurrence is ours on both devices: the same losses and gradients on the GPU."""
    from trainer.model import stack_models
    models = [make_model(seed=s, dropout=0.0, **CONFIGS[name]).train() for s in range(3)]
    episodes = random_episodes(seed=4, sizes=((3, 4), (1, 2), (4, 5)))
    results = []
    for device in ("cpu", "cuda"):
        stack = stack_models([m.to(device) for m in models]).train()
        losses = stack.loss(batch_of(episodes).to(device))
        losses.sum().backward()
        results.append((losses.detach().cpu(), [p.grad.cpu() for p in stack.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    for g_gpu, g_cpu in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-4, atol=1e-5)


def test_cuda_stack_trains_and_writes_single_run_checkpoints(tmp_path):
    store = episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=32, shard_size=16, out=str(tmp_path / "stores"), progress=False))
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--store", str(store), "--seeds", "0,1",
                             "--num_episodes", "32", "--device", "cuda", "--dir_model", str(tmp_path / "m"),
                             "--emb_size", "16", "--val_every", "16", "--no_progress"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for seed in (0, 1):
        ckpt = load_checkpoint(tmp_path / "m" / f"seed{seed}" / "net_ME.pt")
        assert ckpt["episodes_done"] == 32 and ckpt["rng"]["cuda"] is not None
