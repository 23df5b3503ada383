"""Issue 15: let today's code resume the runs of arm F (the 6-class switch on top of the padded attention).

    python docs/experiments/me_adopt_six_class_runs.py CHECKPOINT...   # e.g. runs/switch/six_padded/seed*/net_ME.pt

Arm F ran before `pad_in_softmax` existed, through a switch script (since removed) that set `<pad>`'s output bias
to -1e4 after init. Its checkpoints therefore say nothing of pad_in_softmax, and a checkpoint without the key
loads as a model with `<pad>` in its softmax (the old default). In effect they have none: exp(-1e4) is 0 in
float32, so their losses, gradients and outputs are those of today's default, whose `<pad>` logit is -inf.
This writes pad_in_softmax = False into each checkpoint's model and train config (atomically, nothing else
changed), so that `cli.py train --resume` or `reproduce` continues them as runs of the original's
attention over the padded query steps. It refuses a checkpoint whose `<pad>` bias is not the switch's.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from pipeline.vocab import PAD_ID  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from trainer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

SWITCH_PAD_BIAS = -1e4


def adopt(path: Path) -> str:
    ckpt = load_checkpoint(path)
    if ckpt["model_config"].get("pad_in_softmax") is False:
        return f"{path}: already adopted"
    bias = float(ckpt["model"]["out.bias"][PAD_ID])
    if bias > SWITCH_PAD_BIAS / 2:
        raise SystemExit(f"{path}: <pad> output bias is {bias:g}, not the switch's {SWITCH_PAD_BIAS:g}: not an arm F run")
    ckpt["model_config"]["pad_in_softmax"] = False
    ckpt["train_config"]["pad_in_softmax"] = False
    save_checkpoint(path, ckpt)  # atomic
    return f"{path}: pad_in_softmax = False (bias {bias:g})"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1].strip())
    try:
        for name in sys.argv[1:]:
            print(adopt(Path(name)))
    except UserError as err:  # no checkpoint there, or not one of ours: one line
        sys.exit(str(err))
