"""Issue 15, the recipe question: continue runs trained with --keep_adam_at_decay and stopped at the lr decay as
if they had trained with the original's fresh Adam at each decay (today's default).

    python docs/experiments/me_fresh_adam_at_decay.py CHECKPOINT...   # each at exactly a multiple of the decay

Up to the decay a run with the reset is the run without it: the reset happens in the step that reaches the
decay (the moments are cleared after that step's update). So a checkpoint written at episode
k x lr_decay_schedule, trained with --keep_adam_at_decay, becomes the checkpoint of the same run with the reset
by clearing Adam's moments and clearing keep_adam_at_decay in its train config (atomically; nothing else
changes). `cli.py train --resume` or the same `reproduce` without --keep_adam_at_decay then continues it.
A checkpoint that is not at a decay, or already has the setting, is refused.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from pipeline.errors import UserError  # noqa: E402
from trainer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def fresh_adam(path: Path) -> str:
    ckpt = load_checkpoint(path)
    config, done = ckpt["train_config"], int(ckpt["episodes_done"])
    if not config["keep_adam_at_decay"]:
        raise SystemExit(f"{path}: already trained with a fresh Adam at each decay")
    if done == 0 or done % config["lr_decay_schedule"]:
        raise SystemExit(f"{path}: at episode {done}, not at a decay (every {config['lr_decay_schedule']})")
    ckpt["optimizer"]["state"] = {}  # what the reset leaves after the step that reached the decay
    config["keep_adam_at_decay"] = False
    save_checkpoint(path, ckpt)  # atomic
    return f"{path}: Adam's moments cleared at episode {done}, keep_adam_at_decay = False"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1].strip())
    try:
        for name in sys.argv[1:]:
            print(fresh_adam(Path(name)))
    except UserError as err:  # no checkpoint there, or not one of ours: one line
        sys.exit(str(err))
