"""Generation speed per episode type, written to disk: prints JSON {episode_type: episodes_per_s}.

    python benchmarks/generate.py [--num_episodes 20000] [--workers 2] [--types ME,scan_length]

Times one `generate()` call per type into a fresh temp dir: sampling, encoding, tar writing, hashing, fsync,
manifest and card. The SCAN templates are built before the clock starts (each process builds them once).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.samplers import EPISODE_TYPES, get_sampler  # noqa: E402
from pipeline.store import GenerateConfig, generate  # noqa: E402


def episodes_per_second(episode_type: str, num_episodes: int, workers: int) -> float:
    get_sampler(episode_type)
    with tempfile.TemporaryDirectory() as out:
        cfg = GenerateConfig(episode_type, num_episodes=num_episodes, workers=workers, out=out, progress=False)
        start = time.perf_counter()
        generate(cfg)
        return num_episodes / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_episodes", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--types", default=",".join(EPISODE_TYPES))
    args = parser.parse_args()
    speeds = {t: round(episodes_per_second(t, args.num_episodes, args.workers))
              for t in args.types.split(",")}
    print(json.dumps(speeds))


if __name__ == "__main__":
    main()
