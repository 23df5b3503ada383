"""A stack of M models (`train --seeds`) is M single runs: the same numbers, step by step, side by side.

Model level, in float64 so that the comparison measures the algebra and not float32 rounding: each stacked
model's loss, every parameter's gradient and the greedy outputs equal those of the single model with the same
weights on the same episodes, for every variant, with episodes of different sizes in one stack. Run level:
the stack follows the separate runs' logged losses, writes checkpoints that `eval` and a single `--resume`
take unchanged, and resumes exactly.
"""
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
from trainer.model import MetaSeq2Seq, ModelConfig, clip_grad_norms_, stack_models, strip_decoded

from test_model import V_IN, V_OUT, batch_of, random_episodes

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": {}, "no_memory": {"disable_memory": True}, "no_attention": {"disable_attention": True},
            "mask_query_padding": {"mask_query_padding": True}, "pad_in_softmax": {"pad_in_softmax": True}}
# Three models, two episodes each, of different sizes: every model pads to the stack, and within itself.
SIZES = ((3, 4), (5, 2), (2, 6), (4, 1), (1, 3), (3, 3))


def single_models(M: int, dtype=torch.float64, **kwargs) -> list[MetaSeq2Seq]:
    models = []
    for seed in range(M):
        torch.manual_seed(seed)
        models.append(MetaSeq2Seq(ModelConfig(V_IN, V_OUT, emb_size=24, **kwargs)).to(dtype))
    return models


def stacked_grads(stack: MetaSeq2Seq) -> list[torch.Tensor]:
    """Each parameter's gradient with a leading model dimension (a stack of one has none of its own)."""
    return [p.grad if stack.num_models > 1 else p.grad.unsqueeze(0) for p in stack.parameters()]


def per_model(episodes: list, M: int) -> list[list]:
    B = len(episodes) // M
    return [episodes[m * B:(m + 1) * B] for m in range(M)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_stacked_loss_and_gradient_equals_its_single_model(variant):
    models = single_models(3, dropout=0.0, **VARIANTS[variant])
    episodes = random_episodes(11, SIZES)
    stack = stack_models(models)
    losses = stack.loss(batch_of(episodes))
    losses.sum().backward()
    for m, (model, own) in enumerate(zip(models, per_model(episodes, 3))):
        loss = model.loss(batch_of(own))[0]
        loss.backward()
        torch.testing.assert_close(losses[m], loss, rtol=1e-5, atol=0)
        for k, (name, p) in enumerate(model.named_parameters()):
            torch.testing.assert_close(stacked_grads(stack)[k][m], p.grad, rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_greedy_decoding_equals_each_single_model(variant):
    models = [m.eval() for m in single_models(3, **VARIANTS[variant])]
    episodes = random_episodes(5, SIZES)
    stacked = strip_decoded(stack_models(models).eval().greedy_decode(batch_of(episodes), 12))
    for m, (model, own) in enumerate(zip(models, per_model(episodes, 3))):
        assert stacked[2 * m:2 * m + 2] == strip_decoded(model.greedy_decode(batch_of(own), 12))


def test_each_model_draws_the_dropout_masks_of_its_single_run():
    """With dropout on, model m's generator draws over its own tokens what the single model draws from the
    global generator: the training-mode losses agree, at one episode per model (the paper's protocol; a single
    model's batch of several episodes runs its padded rows, and draws for them). Different generators draw
    different masks."""
    models = [m.train() for m in single_models(3, dtype=torch.float32, dropout=0.5)]
    episodes = random_episodes(3, SIZES[:3])
    stack = stack_models(models).train()
    stack.generators = [torch.Generator().manual_seed(100 + m) for m in range(3)]
    losses = stack.loss(batch_of(episodes)).detach()
    for m, (model, own) in enumerate(zip(models, per_model(episodes, 3))):
        torch.manual_seed(100 + m)
        torch.testing.assert_close(losses[m], model.loss(batch_of(own))[0].detach(), rtol=1e-5, atol=0)
    # The same weights and episodes in every model: only the masks differ, and so do the losses.
    same = stack_models([models[0]] * 3).train()
    same.generators = [torch.Generator().manual_seed(7 + m) for m in range(3)]
    losses = same.loss(batch_of(episodes[:1] * 3)).detach()
    assert len({round(float(x), 6) for x in losses}) == 3


def test_each_model_is_clipped_on_its_own_norm():
    models = single_models(2, dropout=0.0)
    episodes = random_episodes(2, SIZES[:4])
    stack = stack_models(models)
    stack.loss(batch_of(episodes)).sum().backward()
    norms = clip_grad_norms_(stack, 0.01)
    for m, (model, own) in enumerate(zip(models, per_model(episodes, 2))):
        model.loss(batch_of(own)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        torch.testing.assert_close(norms[m], norm, rtol=1e-6, atol=0)
        for k, p in enumerate(model.parameters()):
            torch.testing.assert_close(stacked_grads(stack)[k][m], p.grad, rtol=1e-5, atol=1e-12)


def test_model_state_dicts_are_single_checkpoint_weights():
    models = single_models(2)
    stack = stack_models(models)
    for m, model in enumerate(models):
        state = stack.model_state_dict(m)
        assert list(state) == list(model.state_dict())
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---- runs ----------------------------------------------------------------------------------------------------

TINY = ["--emb_size", "16", "--no_progress", "--workers", "1"]


@pytest.fixture(scope="module")
def me_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores")
    return episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=60, shard_size=20, out=str(out), progress=False, workers=1))


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def losses(metrics: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in metrics.read_text().splitlines()]


def test_initial_weights_are_bitwise_those_of_train_seed(me_store, tmp_path):
    from trainer.config import TrainConfig
    from trainer import distributed
    from trainer.train import build_member, member_config
    cfg = TrainConfig(episode_type="ME", store=str(me_store), seeds=(4, 9), emb_size=16, dir_model=str(tmp_path))
    for seed in (4, 9):
        member = build_member(member_config(cfg, seed), distributed.DistContext(), torch.device("cpu"), own_generator=True)
        stack = stack_models([member.state.model])
        torch.manual_seed(seed)
        reference = MetaSeq2Seq(member.state.model.cfg)
        assert all(torch.equal(stack.model_state_dict(0)[k], v) for k, v in reference.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("dropout", ["0", "0.5"])
def test_a_stack_follows_the_separate_runs_step_by_step(me_store, tmp_path, dropout):
    """Logged every step for 30 steps: with dropout 0, and with dropout on (each model draws the single run's
    masks, so the runs stay together until rounding differences grow)."""
    common = ["--store", str(me_store), "--num_episodes", "30", "--val_every", "1", "--dropout", dropout, *TINY]
    result = run_cli("train", "--seeds", "0,1,2", "--dir_model", str(tmp_path / "stack"), *common)
    assert result.returncode == 0, result.stderr[-2000:]
    for seed in (0, 1, 2):
        single = run_cli("train", "--seed", str(seed), "--dir_model", str(tmp_path / f"single{seed}"), *common)
        assert single.returncode == 0, single.stderr[-2000:]
        # The loss, and the gradient norm before the clip (torch's clip_grad_norm_ alone, ours in the stack).
        for key, rtol in (("loss", 1e-4), ("grad_norm", 1e-3)):
            stacked = losses(tmp_path / "stack" / f"seed{seed}" / "net_ME.metrics.jsonl", key)
            alone = losses(tmp_path / f"single{seed}" / "net_ME.metrics.jsonl", key)
            assert len(stacked) == len(alone) == 30
            torch.testing.assert_close(torch.tensor(stacked), torch.tensor(alone), rtol=rtol, atol=0)
        rows = losses(tmp_path / f"single{seed}" / "net_ME.metrics.jsonl", "grad_norm_max")
        assert rows == losses(tmp_path / f"single{seed}" / "net_ME.metrics.jsonl", "grad_norm")  # one step a row


@pytest.mark.slow
def test_train_seeds_of_one_writes_the_checkpoint_of_train_seed(me_store, tmp_path):
    """A stack of one is a single run, bit for bit: weights, Adam's moments, the RNG state and the logged losses."""
    common = ["--store", str(me_store), "--num_episodes", "12", "--val_every", "4", "--dropout", "0.5", *TINY]
    stacked = run_cli("train", "--seeds", "1", "--dir_model", str(tmp_path / "stack"), *common)
    single = run_cli("train", "--seed", "1", "--dir_model", str(tmp_path / "single"), *common)
    assert stacked.returncode == 0 and single.returncode == 0, stacked.stderr[-2000:] + single.stderr[-2000:]
    a, b = (load_checkpoint(p) for p in (tmp_path / "stack" / "seed1" / "net_ME.pt", tmp_path / "single" / "net_ME.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    for k, moments in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][k][n], moments[n]) for n in moments)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert losses(tmp_path / "stack" / "seed1" / "net_ME.metrics.jsonl") == losses(tmp_path / "single" / "net_ME.metrics.jsonl")


@pytest.mark.slow
def test_stack_checkpoints_evaluate_resume_and_continue_as_single_runs(me_store, tmp_path):
    args = ["--store", str(me_store), "--seeds", "2,5", "--val_every", "10", "--checkpoint_every", "10", *TINY]
    straight = run_cli("train", "--dir_model", str(tmp_path / "straight"), "--num_episodes", "40", *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    part = run_cli("train", "--dir_model", str(tmp_path / "resumed"), "--num_episodes", "20", *args)
    resumed = run_cli("train", "--dir_model", str(tmp_path / "resumed"), "--num_episodes", "40", "--resume", *args)
    assert part.returncode == 0 and resumed.returncode == 0, resumed.stderr[-2000:]
    for seed in (2, 5):
        a = load_checkpoint(tmp_path / "straight" / f"seed{seed}" / "net_ME.pt")
        b = load_checkpoint(tmp_path / "resumed" / f"seed{seed}" / "net_ME.pt")
        assert a["episodes_done"] == b["episodes_done"] == 40 and a["train_config"]["seed"] == seed
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resume is exact"
        rows = [json.loads(line) for line in (tmp_path / "resumed" / f"seed{seed}" / "net_ME.metrics.jsonl")
                .read_text().splitlines()]
        assert [r["episodes"] for r in rows] == [10, 20, 30, 40]
        assert {r["stack_models"] for r in rows} == {2}  # episodes_per_s is the stack's, over its 2 models
    # eval takes a stack's checkpoint unchanged, and scores validation as the stack's own validation did.
    ckpt = tmp_path / "straight" / "seed5" / "net_ME.pt"
    report = run_cli("eval", "--checkpoint", str(ckpt), "--split", "validation", "--out", str(tmp_path / "ev"),
                     "--no_progress")
    assert report.returncode == 0, report.stderr[-2000:]
    scores = json.loads((tmp_path / "ev" / "results.json").read_text())["splits"]["validation"]
    val = load_checkpoint(ckpt)["val"]
    assert {k: scores[k] for k in val} == val
    # A single run resumes a stack's checkpoint and extends it.
    more = run_cli("train", "--store", str(me_store), "--seed", "5", "--dir_model", str(tmp_path / "straight" / "seed5"),
                   "--num_episodes", "50", "--val_every", "10", "--resume", *TINY)
    assert more.returncode == 0, more.stderr[-2000:]
    assert load_checkpoint(ckpt)["episodes_done"] == 50


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    pytest.param(["--seeds", "1,1"], "lists a seed twice", marks=pytest.mark.slow),
    pytest.param(["--seeds", "0,1", "--workers", "2"], "use 0 or 1", marks=pytest.mark.slow),
    pytest.param(["--seeds", "0,1", "--compile"], "leave out --amp and --compile", marks=pytest.mark.slow),
])
def test_stack_bad_input_is_one_line(me_store, tmp_path, args, message):
    result = run_cli("train", "--store", str(me_store), "--dir_model", str(tmp_path / "m"), "--num_episodes", "4",
                     *TINY[:-2], *args)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "m" / "seed0" / "net_ME.pt").exists()


@pytest.mark.slow
def test_torchrun_splits_the_seeds_over_the_processes(me_store, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               str(ROOT / "cli.py"), "train", "--store", str(me_store), "--seeds", "0,1,2", "--num_episodes", "10",
               "--val_every", "10", "--dir_model", str(tmp_path), *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for seed in (0, 1, 2):
        ckpt = load_checkpoint(tmp_path / f"seed{seed}" / "net_ME.pt")
        assert ckpt["episodes_done"] == 10 and ckpt["data_position"]["world_size"] == 1
    assert result.stdout.count("training stack:") == 2  # one stack per process: seeds 0,2 and 1


def test_torchrun_without_seeds_says_what_to_do():
    from trainer.config import TrainConfig, check_config
    from pipeline.errors import UserError
    with pytest.raises(UserError, match="give --seeds"):
        check_config(TrainConfig(episode_type="ME"), 2, "cpu")
