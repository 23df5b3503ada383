"""Training metrics as TensorBoard scalars: the same numbers as the metrics JSONL, not doubled by a resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import store as episode_store
from trainer.config import TrainConfig
from trainer.train import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(emb_size=16, nlayers=1, dropout=0.5, batch_size=8, progress=False, val_every=8, checkpoint_every=1000,
            workers=1, num_episodes=48)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=64, shard_size=32, out=str(tmp_path_factory.mktemp("tb")), progress=False, workers=1))


def run(store: Path, model_dir: Path, **overrides) -> dict:
    return train(TrainConfig(store=str(store), dir_model=str(model_dir), **{**TINY, **overrides}))


def jsonl_rows(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "net_ME.metrics.jsonl").read_text().splitlines()]


def scalars_as_tensorboard_shows_them(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard reads from the run's folder, every events file of it, purges applied."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def rows_as_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The JSONL rows as tag -> [(episodes, value)]: "loss" is train/loss, "val_generalization" val/generalization."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "episodes" and value is not None:
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                expected.setdefault(tag, []).append((row["episodes"], value))
    return expected


def wait_for_the_next_second() -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the writer's whole second.
    A resumed run is a new process, seconds later; writers of this one process must not share a second either,
    or their per-process counters decide the order, and ".10" sorts before ".9"."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def first_wall_time(path: Path) -> float:
    return next(iter(EventFileLoader(str(path)).Load())).wall_time


def assert_same(shown: dict, expected: dict) -> None:
    assert shown.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in shown[tag]] == [step for step, _ in points], tag
        assert [value for _, value in shown[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_a_run_writes_its_metrics_rows_as_tensorboard_scalars(store, tmp_path):
    run(store, tmp_path)
    rows = jsonl_rows(tmp_path)
    assert [r["episodes"] for r in rows] == [8, 16, 24, 32, 40, 48]
    log_dir = tmp_path / "tb" / "net_ME"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    shown = scalars_as_tensorboard_shows_them(log_dir)
    assert {"train/loss", "train/lr", "train/episodes_per_s", "val/generalization", "val/retrieval"} <= shown.keys()
    assert_same(shown, rows_as_scalars(rows))


def test_a_resumed_run_does_not_double_its_curves(store, tmp_path):
    run(store, tmp_path, stop_after=16)  # checkpoint at 16
    kept = tmp_path.parent / f"{tmp_path.name}-checkpoint16.pt"
    shutil.copy(tmp_path / "net_ME.pt", kept)
    wait_for_the_next_second()
    run(store, tmp_path, stop_after=32, resume=True)  # rows 24 and 32 logged ...
    shutil.copy(kept, tmp_path / "net_ME.pt")         # ... then killed with its last checkpoint at 16
    wait_for_the_next_second()
    run(store, tmp_path, resume=True)                 # trains 24 and 32 again, then on to 48

    rows = jsonl_rows(tmp_path)
    assert [r["episodes"] for r in rows] == [8, 16, 24, 32, 40, 48]
    log_dir = tmp_path / "tb" / "net_ME"
    # In write order. Not by name: the writer's name ends in a per-process counter, and ".10" sorts before ".9"
    # when the three writers of this process open within one second.
    files = sorted(log_dir.glob("events.out.tfevents.*"), key=first_wall_time)
    assert len(files) == 3
    shown = scalars_as_tensorboard_shows_them(log_dir)
    assert_same(shown, rows_as_scalars(rows))  # each step once, with the value of the run that was kept
    # The last writer opened with purge_step just after its checkpoint (16): TensorBoard drops the old events
    # from there on. Read from the file itself, not through the accumulator that applies it.
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load()
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [17]
    logged = [e.step for path in files for e in EventFileLoader(str(path)).Load()
              if e.HasField("summary") and e.summary.value[0].tag == "train/loss"]
    assert logged == [8, 16, 24, 32, 24, 32, 40, 48]  # on disk twice, shown once


def test_a_new_run_in_the_same_folder_leaves_no_old_events(store, tmp_path):
    run(store, tmp_path, num_episodes=24)
    run(store, tmp_path, num_episodes=16, overwrite=True)
    log_dir = tmp_path / "tb" / "net_ME"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in scalars_as_tensorboard_shows_them(log_dir)["train/loss"]] == [8, 16]


@pytest.mark.slow
def test_training_runs_without_tensorboard(store, tmp_path):
    # A Python where `import tensorboard` fails, as where the package is not installed.
    script = (f"import sys; sys.modules['tensorboard'] = None; sys.path.insert(0, {str(ROOT)!r}); "
              "from trainer.config import TrainConfig; from trainer.train import train; "
              f"train(TrainConfig(store={str(store)!r}, dir_model={str(tmp_path)!r}, **{dict(TINY, num_episodes=16)!r}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert [r["episodes"] for r in jsonl_rows(tmp_path)] == [8, 16] and not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_a_stack_writes_each_seed_its_own_tensorboard_run(store, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--store", str(store), "--seeds", "0,1",
                             "--dir_model", str(tmp_path), "--num_episodes", "16", "--emb_size", "16", "--nlayers",
                             "1", "--batch_size", "8", "--val_every", "8", "--no_progress"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    losses = []
    for seed in (0, 1):
        rows = jsonl_rows(tmp_path / f"seed{seed}")
        shown = scalars_as_tensorboard_shows_them(tmp_path / f"seed{seed}" / "tb" / "net_ME")
        assert_same(shown, rows_as_scalars(rows))
        losses.append(shown["train/loss"])
    assert losses[0] != losses[1]  # each seed's own curve
