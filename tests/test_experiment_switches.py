"""The ME recipe switches (docs/experiments/ and the model's softmax), against computations written out by hand."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.vocab import PAD_ID, build_vocab
from trainer.data import Tokenizer, collate_episodes
from trainer.model import MetaSeq2Seq, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS, COLOURS = ["dax", "lug", "wif", "zup"], ["RED", "YELLOW", "GREEN", "BLUE"]
TOKENIZER = Tokenizer(tuple(build_vocab(WORDS)), tuple(build_vocab(COLOURS)))


def load_script(name: str):  # a script of docs/experiments/
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def me_batch(seed: int):
    rng = random.Random(seed)
    meaning = dict(zip(WORDS, rng.sample(COLOURS, 4)))
    pair = lambda words: {"input": " ".join(words), "output": " ".join(meaning[w] for w in words)}  # noqa: E731
    queries = [pair([rng.choice(WORDS) for _ in range(rng.randint(2, 6))]) for _ in range(6)]
    record = {"support": [pair([w]) for w in WORDS[:3]], "query": queries}
    return collate_episodes([record], TOKENIZER, support_as_queries=True)


def six_class_loss(model: MetaSeq2Seq, batch) -> torch.Tensor:
    """Token-mean cross-entropy over the classes other than <pad>, from the model's raw teacher-forced logits."""
    logits = model(batch)                                                   # (B, nq, T, V)
    keep = [c for c in range(logits.shape[-1]) if c != PAD_ID]
    log_probs = F.log_softmax(logits[..., keep], -1)
    targets = batch.query_out                                                # (B, nq, T)
    column = {c: i for i, c in enumerate(keep)}
    index = targets.clone().apply_(lambda c: column.get(c, 0))
    token = -log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    valid = torch.arange(targets.shape[-1]) < batch.query_out_len.unsqueeze(-1)
    return token[valid].mean()


def test_default_softmax_is_the_originals_six_classes():
    """Our default decoder has no <pad> class (the original's Lang has none); pad_in_softmax keeps it."""
    cfg = dict(input_vocab_size=len(TOKENIZER.input_vocab), output_vocab_size=len(TOKENIZER.output_vocab),
               emb_size=16, nlayers=2, dropout=0.0)
    torch.manual_seed(0)
    model = MetaSeq2Seq(ModelConfig(**cfg)).double()
    torch.manual_seed(0)
    with_pad = MetaSeq2Seq(ModelConfig(**cfg, pad_in_softmax=True)).double()
    batch = me_batch(1)
    loss = model.loss(batch)[0]
    torch.testing.assert_close(loss.double(), six_class_loss(model, batch), rtol=1e-6, atol=0)  # loss(): fp32
    assert not torch.isclose(with_pad.loss(batch).double(), six_class_loss(with_pad, batch), rtol=1e-4)  # <pad> counts
    loss.backward()
    assert model.out.weight.grad[PAD_ID].abs().max() == 0 and model.out.bias.grad[PAD_ID] == 0
    assert model.out.weight.grad.abs().sum() > 0
    assert (model.greedy_decode(batch, 8).tokens[..., 0] != PAD_ID).all()  # never decoded


def test_checkpoints_from_before_the_setting_keep_pad_in_their_softmax(tmp_path):
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    config = ModelConfig(len(TOKENIZER.input_vocab), len(TOKENIZER.output_vocab)).to_dict()
    del config["pad_in_softmax"]
    save_checkpoint(tmp_path / "old.pt", {"model_config": config, "train_config": {}})
    assert ModelConfig.from_dict(load_checkpoint(tmp_path / "old.pt")["model_config"]).pad_in_softmax


@pytest.mark.lab
def test_gradient_norms_are_summarised_from_the_metrics_log(tmp_path):
    script = load_script("me_gradient_norms")
    log = tmp_path / "net_ME.metrics.jsonl"
    rows = [{"episodes": 100, "loss": 1.0, "grad_norm": 2.0, "grad_norm_max": 4.0},
            {"episodes": 200, "loss": 0.5, "grad_norm": 6.0, "grad_norm_max": 60.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.summary(log) == (f"{log}: 2 rows to episode 200: largest norm 60.00, mean 4.00, rows with a step "
                                   "over 50: 1")
    log.write_text(json.dumps({"episodes": 100, "loss": 1.0}) + "\n")  # a log from before the norms were logged
    assert script.summary(log).endswith("no gradient norms logged")


@pytest.mark.lab
def test_adopted_six_class_runs_train_as_todays_default(tmp_path):
    """Arm F's checkpoints (<pad> bias -1e4, no pad_in_softmax key) are today's default in effect: once adopted
    they load without <pad> in the softmax, with the same loss and gradients as the switch gave."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    script = load_script("me_adopt_six_class_runs")
    cfg = ModelConfig(len(TOKENIZER.input_vocab), len(TOKENIZER.output_vocab), emb_size=16, dropout=0.0,
                      pad_in_softmax=True)
    torch.manual_seed(0)
    switched = MetaSeq2Seq(cfg)
    with torch.no_grad():
        switched.out.bias[PAD_ID] = -1e4
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "pad_in_softmax"}
    path = tmp_path / "net_ME.pt"
    save_checkpoint(path, {"model_config": legacy, "train_config": {"seed": 0}, "model": switched.state_dict()})
    assert ModelConfig.from_dict(load_checkpoint(path)["model_config"]).pad_in_softmax  # before: the old default
    script.adopt(path)
    ckpt = load_checkpoint(path)
    # Read under today's names: what it was trained with then (query padding masked, Adam kept), and the switch.
    assert ckpt["train_config"] == {"seed": 0, "pad_in_softmax": False, "mask_query_padding": True,
                                    "keep_adam_at_decay": True}
    adopted = MetaSeq2Seq(ModelConfig.from_dict(ckpt["model_config"]))
    adopted.load_state_dict(ckpt["model"])
    assert not adopted.cfg.pad_in_softmax
    batch = me_batch(2)
    switched.loss(batch).backward()
    adopted.loss(batch).backward()
    torch.testing.assert_close(adopted.loss(batch), switched.loss(batch), rtol=0, atol=0)
    for (name, a), b in zip(adopted.named_parameters(), switched.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    torch.manual_seed(0)
    save_checkpoint(path, {"model_config": legacy, "train_config": {}, "model": MetaSeq2Seq(cfg).state_dict()})
    with pytest.raises(SystemExit, match="not an arm F run"):
        script.adopt(path)


def test_one_fused_adam_makes_the_originals_two_adams_update():
    """The original steps two Adams (its encoder's and its decoder's, not fused); ours steps one fused Adam over
    the whole model. Adam is element-wise, so over many steps the weights agree to float32 rounding."""
    torch.manual_seed(0)
    ours = MetaSeq2Seq(ModelConfig(len(TOKENIZER.input_vocab), len(TOKENIZER.output_vocab), emb_size=16))
    theirs = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    initial = [p.detach().clone() for p in theirs]
    half = len(theirs) // 2  # any split into two groups: each parameter has its own moments
    fused = torch.optim.Adam(ours.parameters(), lr=1e-3, fused=True)
    two = [torch.optim.Adam(theirs[:half], lr=1e-3, foreach=False), torch.optim.Adam(theirs[half:], lr=1e-3, foreach=False)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        for p, q in zip(ours.parameters(), theirs):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        for optimizer in two:
            optimizer.step()
    for p, q in zip(ours.parameters(), theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert all((q.detach() - p0).abs().max() > 0.01 for q, p0 in zip(theirs, initial))  # 50 steps of lr 1e-3 moved every weight


@pytest.mark.slow
@pytest.mark.lab
def test_fresh_adam_at_the_decay_continues_as_the_run_with_the_reset(tmp_path):
    """A run stopped at the decay with --keep_adam_at_decay, passed through me_fresh_adam_at_decay.py and
    resumed without it, ends with the weights of the run trained with the reset from the start, bitwise."""
    from pipeline import store as episode_store
    from trainer.checkpoint import load_checkpoint
    from trainer.config import TrainConfig
    from trainer.train import train
    script = load_script("me_fresh_adam_at_decay")
    store = episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=64, shard_size=32, out=str(tmp_path / "store"), progress=False, workers=1))
    tiny = dict(store=str(store), emb_size=16, nlayers=1, dropout=0.5, batch_size=8, lr_decay_schedule=24,
                progress=False, val_every=8, workers=1)
    train(TrainConfig(dir_model=str(tmp_path / "reset"), num_episodes=40, **tiny))
    train(TrainConfig(dir_model=str(tmp_path / "later"), num_episodes=24, keep_adam_at_decay=True, **tiny))
    with pytest.raises(SystemExit, match="already"):
        script.fresh_adam(tmp_path / "reset" / "net_ME.pt")
    script.fresh_adam(tmp_path / "later" / "net_ME.pt")
    train(TrainConfig(dir_model=str(tmp_path / "later"), num_episodes=40, resume=True, **tiny))
    reset, later = (load_checkpoint(tmp_path / d / "net_ME.pt") for d in ("reset", "later"))
    assert reset["episodes_done"] == later["episodes_done"] == 40
    assert all(torch.equal(reset["model"][k], later["model"][k]) for k in reset["model"])
    train(TrainConfig(dir_model=str(tmp_path / "plain"), num_episodes=40, keep_adam_at_decay=True,
                      **tiny))  # the check can fail: no reset
    plain = load_checkpoint(tmp_path / "plain" / "net_ME.pt")
    assert not all(torch.equal(reset["model"][k], plain["model"][k]) for k in reset["model"])
