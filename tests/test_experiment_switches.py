"""The single-factor switches of docs/experiments/ (issue 15), against a computation written out by hand."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.vocab import PAD_ID, build_vocab
from trainer.data import Tokenizer, collate_episodes
from trainer.model import MetaSeq2Seq, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS, COLOURS = ["dax", "lug", "wif", "zup"], ["RED", "YELLOW", "GREEN", "BLUE"]
TOKENIZER = Tokenizer(tuple(build_vocab(WORDS)), tuple(build_vocab(COLOURS)))


def load_script(name: str):
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


def test_six_classes_is_a_softmax_without_pad():
    script = load_script("me_six_classes")
    cfg = ModelConfig(len(TOKENIZER.input_vocab), len(TOKENIZER.output_vocab), emb_size=16, nlayers=2, dropout=0.0)
    init = MetaSeq2Seq.__init__
    try:
        script.drop_pad_class()
        torch.manual_seed(0)
        model = MetaSeq2Seq(cfg).double()
    finally:
        MetaSeq2Seq.__init__ = init
    torch.manual_seed(0)
    plain = MetaSeq2Seq(cfg).double()
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, plain.state_dict()[name])]
    assert changed == ["out.bias"]  # the same init draws, one entry moved
    batch = me_batch(1)
    loss = model.loss(batch)
    torch.testing.assert_close(loss.double(), six_class_loss(model, batch), rtol=1e-6, atol=0)  # loss(): fp32
    assert not torch.isclose(plain.loss(batch).double(), six_class_loss(plain, batch), rtol=1e-4)  # the check can fail: <pad> counts
    loss.backward()
    assert model.out.weight.grad[PAD_ID].abs().max() == 0 and model.out.bias.grad[PAD_ID] == 0
    assert model.out.weight.grad.abs().sum() > 0


def test_gradient_norms_are_each_models_norm_before_the_clip(capsys):
    from test_model import V_IN, V_OUT, batch_of, random_episodes
    import trainer.train_stack as train_stack
    from trainer.stacked import StackedMetaSeq2Seq
    script, clip = load_script("me_gradient_norms"), train_stack.clip_grad_norms_
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(MetaSeq2Seq(ModelConfig(V_IN, V_OUT, emb_size=16, dropout=0.0)).double())
    episodes = random_episodes(2, ((3, 4), (2, 5)))
    try:
        norms = script.record_norms(every=1, clip=0.5)
        stack = StackedMetaSeq2Seq(models)
        stack.loss(batch_of(episodes)).sum().backward()
        train_stack.clip_grad_norms_(stack, 0.5)
    finally:
        train_stack.clip_grad_norms_ = clip
    for m, model in enumerate(models):  # each model alone, on its own episode: the norm the clip saw
        model.loss(batch_of(episodes[m:m + 1])).backward()
        torch.testing.assert_close(norms[0][m], torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9),
                                   rtol=1e-6, atol=0)
    over = int((norms[0] > 0.5).sum())
    assert f"over 0.5: {over}" in capsys.readouterr().out
