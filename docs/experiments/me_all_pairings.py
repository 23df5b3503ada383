"""ME trained on all 24 pairings: docs/results.md, "Not the validation pairings". (Written when the original's tabu
identifier was thought to be ordered; it is not, and the original excludes the validation pairings as ours does.
What this measures stands: training on them does not change how fast ME leaves the plateau.)

    python docs/experiments/me_all_pairings.py generate SEED OUT    # store OUT/ME; its training may use them
    python docs/experiments/me_all_pairings.py train [train flags]  # `cli.py train` on such a store

An episode family of its own (pipeline/families.py), `me_all_pairings:all_pairings`: ME's episodes, with the
split in the identifier, so that a training episode's pairing is never tabu and the store stays a valid one.
A training episode is the one that ME's sampler draws from the same generator with nothing tabu; the
validation episodes are drawn one at a time, so two of them may share a pairing. This script's folder must be
importable wherever the store is read (the commands below put it on sys.path; elsewhere, PYTHONPATH).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # the family's module, by the name the store records
import cli  # noqa: E402
from pipeline import samplers, store  # noqa: E402
from pipeline.families import EpisodeFamily  # noqa: E402

FAMILY = "me_all_pairings:all_pairings"
ME = samplers.MESampler()


def sample(rng, split: str) -> dict:
    episode = ME.sample_validation(rng, 1)[0] if split == "val" else ME.sample_train(rng, frozenset())
    return {"support": episode["support"], "query": episode["query"],
            "mapping": [(pair["src"], pair["tgt"]) for pair in episode["mapping"]],
            "identifier": f"{split}: {episode['identifier']}"}


all_pairings = EpisodeFamily(sample, samplers.ME_INPUTS, samplers.ME_OUTPUTS, params=ME.params)


def generate(seed: int, out: str, num_episodes: int = 10000) -> Path:
    return store.generate(store.GenerateConfig(FAMILY, num_episodes=num_episodes, seed=seed,
                                               store=str(Path(out) / "ME"), progress=False, workers=1))


def train(args: list[str]) -> int:
    return cli.run_cli(cli.cli, ["train", *args])


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        print(generate(int(sys.argv[2]), sys.argv[3], *(int(a) for a in sys.argv[4:5])))
    else:
        sys.exit(train(sys.argv[2:]))
