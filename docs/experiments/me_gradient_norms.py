"""Issue 15, the clip: does the gradient clip at 50 ever act in ME training?

    python docs/experiments/me_gradient_norms.py [--every 500] [cli.py train flags, with --seeds]
        # e.g. --episode_type ME --seeds 0,1 --store 'runs/stores/seed{seed}/ME' --dir_model /tmp/norms
        #      --num_episodes 5000 --threads 1 --no_progress

Ours clips each model's whole gradient at norm 50; the original clips its encoder and its decoder at 50 each
(and its logs never print "Gradient clipped"). The two differ only for a step whose whole norm is over 50. This
is `cli.py train` (single model or stack) with the clip wrapped to record each model's norm before clipping:
every `--every` steps it prints the largest and the mean norm of those steps and how many were over the clip.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import trainer.train_stack as train_stack  # noqa: E402

CLIP = 50.0  # ours and the original's (train's --clip default)


def record_norms(every: int, clip: float = CLIP) -> list[torch.Tensor]:
    """Wrap the stack's clip so that each step's M norms are kept and summarised every `every` steps."""
    clip_grad_norms_, norms = train_stack.clip_grad_norms_, []

    def recorded(stacked, max_norm):
        step_norms = clip_grad_norms_(stacked, max_norm)
        norms.append(step_norms.detach().cpu())
        if len(norms) % every == 0:
            window = torch.stack(norms[-every:])                             # (every, M)
            print(f"steps {len(norms) - every + 1}-{len(norms)}: largest norm {window.max():.2f}, mean "
                  f"{window.mean():.2f}, over {clip:g}: {(window > clip).sum().item()}", flush=True)
        return step_norms

    train_stack.clip_grad_norms_ = recorded
    return norms


def main(args: list[str]) -> int:
    every = 500
    if args[:1] == ["--every"]:
        every, args = int(args[1]), args[2:]
    norms = record_norms(every)
    import cli
    code = cli.run_cli(cli.cli, ["train", *args])
    if norms:
        everything = torch.stack(norms)
        print(f"all {len(norms)} steps: largest norm {everything.max():.2f}, over {CLIP:g}: "
              f"{(everything > CLIP).sum().item()}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
