"""ME trained on all 24 pairings: docs/results.md, "Not the validation pairings". (Written when the original's tabu
identifier was thought to be ordered; it is not, and the original excludes the validation pairings as ours does.
What this measures stands: training on them does not change how fast ME leaves the plateau.)

    python docs/experiments/me_all_pairings.py generate SEED OUT    # store OUT/ME; its training may use them
    python docs/experiments/me_all_pairings.py train [train flags]  # `cli.py train`, tabu check switched off

Deliberately breaks the store's contract (the verifier refuses such a store, as it should), so it lives here and
not in the CLI.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cli  # noqa: E402
from pipeline import store, verify  # noqa: E402


def generate(seed: int, out: str) -> None:
    write_val_shards = store._write_val_shards
    store._write_val_shards = lambda cfg, path: (write_val_shards(cfg, path)[0], frozenset())  # empty tabu
    store.generate(store.GenerateConfig("ME", num_episodes=10000, seed=seed, out=out, progress=False, workers=1))


def train(args: list[str]) -> int:
    verify._RecordChecker._identifier_problems = lambda self, split, identifier: []
    return cli.run_cli(cli.cli, ["train", *args])


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(train(sys.argv[2:]))
