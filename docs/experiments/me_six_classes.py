"""Issue 15, a single-factor switch: the decoder's softmax without `<pad>`, as the original's 6 output classes.

    python docs/experiments/me_six_classes.py [cli.py train flags]
        # e.g. --episode_type ME --seeds 0,...,15 --store 'runs/stores/seed{seed}/ME' --dir_model runs/switch/six
        #      --num_episodes 5000 --attend_query_padding

Our output vocabulary has 7 classes (`<pad>`, `<sos>`, `<eos>` and the 4 colours) where the original's Lang has 6
(`<sos>`, `<eos>` and the colours): `<pad>` is never a target, but it takes a share of every softmax and its logit
is pushed down by every step. This script is `cli.py train` with one change, made right after each model's
initialisation (so every random draw stays where it was): the bias of `<pad>` in the output layer is set to
-1e4. Its probability is then exp(-1e4) = 0 in float32, so the loss, the gradients of every other class and the
greedy outputs are those of a softmax over the 6 other classes; the `<pad>` row's own gradients are exactly 0, and
Adam leaves a parameter with zero gradients where it is. It works for single runs and for stacks (a stack builds
each model as `train --seed k` would), and a checkpoint keeps the bias, so `--resume` continues the switch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from pipeline.vocab import PAD_ID  # noqa: E402
from trainer import model as model_module  # noqa: E402

PAD_BIAS = -1e4


def drop_pad_class() -> None:
    """Patch MetaSeq2Seq so that every model built from here on has no `<pad>` in its output softmax."""
    original_init = model_module.MetaSeq2Seq.__init__

    def init(self, cfg):
        original_init(self, cfg)
        with torch.no_grad():
            self.out.bias[PAD_ID] = PAD_BIAS

    model_module.MetaSeq2Seq.__init__ = init


def train(args: list[str]) -> int:
    drop_pad_class()
    import cli
    return cli.run_cli(cli.cli, ["train", *args])


if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
