"""The aggregate of a grid of runs: OUT/results.json, OUT/results.md and OUT/results.png.

Each run contributes what its eval report says: validation retrieval and generalization, and the accuracy
on its SCAN test split. Per (experiment, variant), each metric is the mean and the sample standard deviation
(n - 1 in the denominator; none for a single seed) over the seeds that finished, beside the paper's number.

Every path in results.json and results.md is relative to OUT (the grid's folder), so the aggregate can be
committed or moved without naming a machine's folders: a run's "dir" is "ME/full/seed0", the grid's "out" is
".", and the command line in the provenance names its paths the same way (a path outside OUT by its last
part only).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evalsuite.report import RESULTS_NAME
from evalsuite.splits import PAPER_NUMBERS, SCAN_TEST_SPLITS, VALIDATION, type_splits
from pipeline import provenance
from pipeline.errors import UserError
from pipeline.families import is_family_name
from pipeline.samplers import EPISODE_TYPES
from pipeline.shardio import write_bytes_atomically

RUN_RECORD = "run.json"
VARIANTS = ("full", "no_memory", "no_attention", "no_support_loss")  # the paper's ablations after the full model
VAL_GENERALIZATION, VAL_RETRIEVAL = "validation_generalization", "validation_retrieval"

# The paper's numbers for the full model (evalsuite/splits.py holds them, for eval too), by metric name.
PAPER = {(episode_type, VAL_GENERALIZATION if split == VALIDATION else split): number.accuracy
         for (episode_type, split), number in PAPER_NUMBERS.items()}
METRIC_LABELS = {VAL_GENERALIZATION: "val generalization", VAL_RETRIEVAL: "val retrieval",
                 "addprim_jump": "add jump", "template_around_right": "around right", "length": "length"}


@dataclass(frozen=True)
class Run:
    experiment: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.variant}/seed{self.seed}"

    def dir(self, out: str | Path) -> Path:
        return Path(out) / self.experiment / self.variant / f"seed{self.seed}"

    def checkpoint(self, out: str | Path) -> Path:
        return self.dir(out) / f"net_{self.experiment}.pt"

    def eval_dir(self, out: str | Path) -> Path:
        return self.dir(out) / "eval"

    def sort_key(self) -> tuple:
        """The paper's types in its order, then families of one's own by name."""
        built_in = self.experiment in EPISODE_TYPES
        return (not built_in, EPISODE_TYPES.index(self.experiment) if built_in else self.experiment,
                VARIANTS.index(self.variant), self.seed)


def runs_in(out: Path) -> list[Run]:
    """Every run folder under OUT that a grid has worked on (it has a run.json), whatever the grid."""
    found = []
    for path in Path(out).glob(f"*/*/seed*/{RUN_RECORD}"):
        experiment, variant, seed = path.parts[-4], path.parts[-3], path.parts[-2][len("seed"):]
        if (experiment in EPISODE_TYPES or is_family_name(experiment)) and variant in VARIANTS and seed.isdigit():
            found.append(Run(experiment, variant, int(seed)))
    return found


def scan_test_split(experiment: str) -> str | None:
    return next((s for s in type_splits(experiment) if s != VALIDATION), None)


def run_metrics(results: dict) -> dict[str, float | None]:
    """The numbers a run contributes, from its eval results.json."""
    splits = results["splits"]
    metrics = {}
    if VALIDATION in splits:
        metrics[VAL_GENERALIZATION] = splits[VALIDATION].get("generalization")
        metrics[VAL_RETRIEVAL] = splits[VALIDATION].get("retrieval")
    for name, scores in splits.items():
        if name in SCAN_TEST_SPLITS:
            metrics[name] = scores.get("accuracy")
    return metrics


def read_run(out: Path, run) -> dict:
    """One run's row: its status and times from run.json, its metrics from its eval report."""
    folder = run.dir(out)
    record = json.loads((folder / RUN_RECORD).read_text()) if (folder / RUN_RECORD).is_file() else {}
    row = {"experiment": run.experiment, "variant": run.variant, "seed": run.seed,
           "status": record.get("status", "missing"), "error": record.get("error"),
           "train_seconds": record.get("train_seconds"), "eval_seconds": record.get("eval_seconds"),
           "metrics": {}, "dir": grid_relative(folder, out)}
    row["error"] = without_folders(row["error"], out)
    results_path = run.eval_dir(out) / RESULTS_NAME
    if row["status"] == "done" and results_path.is_file():
        results = json.loads(results_path.read_text())
        row["metrics"] = run_metrics(results)
        row["episodes"] = results["checkpoint"].get("episodes_done")
        origin = results["checkpoint"].get("provenance") or {}
        row["trained_on"] = trained_on(origin)
        row["commit"] = (origin.get("git_commit") or "")[:7] or None  # the short hash
    return row


def grid_relative(path: str | Path, out: str | Path) -> str:
    """A path as the aggregate names it: relative to OUT when it is OUT or inside it ("." for OUT itself),
    else its last part only, so that no folder of the machine's is written down."""
    path, root = Path(os.path.abspath(Path(path).expanduser())), Path(os.path.abspath(out))
    if path == root or root in path.parents:
        return path.relative_to(root).as_posix() or "."
    return path.name or "."


def looks_like_path(word: str) -> bool:
    return word.startswith(("/", "~")) or os.path.exists(word)


def grid_command(argv: list[str], out: str | Path) -> str:
    """The command line with its program by name and its paths relative to OUT (`--out /work/runs` is
    `--out .`); the words that are no path are as given."""
    words = [Path(argv[0]).name] if argv else []
    for word in argv[1:]:
        name, eq, value = word.partition("=")
        if eq and word.startswith("-") and looks_like_path(value):
            words.append(f"{name}={grid_relative(value, out)}")
        elif not word.startswith("-") and looks_like_path(word):
            words.append(grid_relative(word, out))
        else:
            words.append(word)
    return shlex.join(words)


def without_folders(text: str | None, out: str | Path) -> str | None:
    """A message (a run's error) with OUT's path, absolute or as given (`--out runs`), written relative to OUT."""
    if not text:
        return text
    root = os.path.abspath(out)
    text = text.replace(root + os.sep, "").replace(root, ".")
    relative = os.path.relpath(root)  # as `--out runs` reaches train's messages
    if relative == ".":
        return text
    # Only where it starts a word of the message: `saved runs/ME/...`, not `old_runs/ME/...`.
    return re.sub(rf"(?<![\w./-]){re.escape(relative + os.sep)}", "", text)


def grid_settings(grid_config: dict, out: str | Path) -> dict:
    """The grid's settings as JSON, its folders (out, slurm_folder) relative to OUT."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in grid_config.items()}
    for key in ("out", "slurm_folder"):
        if settings.get(key):
            settings[key] = grid_relative(settings[key], out)
    return settings


def trained_on(provenance: dict) -> str | None:
    """The training device from a checkpoint's provenance: "cuda (NVIDIA H200)", or "cpu (AMD EPYC)"."""
    device = provenance.get("device")
    if device == "cpu" and provenance.get("cpu"):
        return f"cpu ({provenance['cpu']})"
    return device


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def group_rows(rows: list[dict]) -> list[dict]:
    """One group per (experiment, variant), in grid order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["experiment"], row["variant"]), []).append(row)
    out = []
    for (experiment, variant), members in groups.items():
        done = [m for m in members if m["status"] == "done"]
        names = [VAL_GENERALIZATION, VAL_RETRIEVAL] + ([scan_test_split(experiment)] if scan_test_split(experiment) else [])
        metrics = {}
        for name in names:
            values = [m["metrics"][name] for m in done if m["metrics"].get(name) is not None]
            paper = PAPER.get((experiment, name)) if variant == "full" else None
            metrics[name] = {**summarize(values), "values": {m["seed"]: m["metrics"].get(name) for m in done},
                             "paper": paper}
        times = [m["train_seconds"] for m in done if m["train_seconds"]]
        out.append({"experiment": experiment, "variant": variant, "seeds": [m["seed"] for m in members],
                    "finished": len(done), "metrics": metrics, "train_seconds": summarize(times),
                    "failed": [{"seed": m["seed"], "status": m["status"], "error": m["error"]}
                               for m in members if m["status"] != "done"]})
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_stat(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    sd = f" ± {stat['sd']:.2f}" if stat["sd"] is not None else ""
    return f"{stat['mean']:.2f}{sd} (n={stat['n']})"


def trained_on_line(rows: list[dict]) -> list[str]:
    """Where the runs trained (the table may be aggregated elsewhere): [] when no run says."""
    devices = Counter(row["trained_on"] for row in rows if row.get("trained_on"))
    if not devices:
        return []
    counts = [f"{device} ({n} run{'s' if n != 1 else ''})" for device, n in devices.most_common()]
    return [f"Trained on: {', '.join(counts)}"]


def markdown_table(groups: list[dict], meta: dict) -> str:
    lines = [f"Aggregated on: {meta['provenance']['cpu']} · torch {meta['provenance']['torch']} · "
             f"commit {meta['provenance']['git_commit']}", *trained_on_line(meta["runs"]), "",
             "Accuracy in %: mean ± sd over seeds (n seeds finished). Paper: Lake (2019), as widely cited.", "",
             "| experiment | variant | val generalization | val retrieval | SCAN test split | test accuracy | paper | "
             "train time per run |",
             "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        split = scan_test_split(g["experiment"])
        m = g["metrics"]
        headline = split or VAL_GENERALIZATION
        paper = m[headline]["paper"]
        lines.append(f"| {g['experiment']} | {g['variant']} | {format_stat(m[VAL_GENERALIZATION])} | "
                     f"{format_stat(m[VAL_RETRIEVAL])} | {METRIC_LABELS.get(split, '-') if split else '-'} | "
                     f"{format_stat(m[split]) if split else '-'} | {'-' if paper is None else f'{paper:.2f}'} | "
                     f"{format_duration(g['train_seconds']['mean'])} |")
    lines += per_run_table(meta["runs"])
    failures = [f"- {g['experiment']}/{g['variant']}/seed{f['seed']}: {f['status']}" + (f" ({f['error']})" if f['error'] else "")
                for g in groups for f in g["failed"]]
    if failures:
        lines += ["", "Runs not finished:", *failures]
    return "\n".join(lines) + "\n"


def per_run_table(rows: list[dict]) -> list[str]:
    """Every finished run's own numbers under the aggregate, so that a mean is read with the seeds behind it."""
    done = [row for row in rows if row["status"] == "done"]
    if not done:
        return []
    lines = ["", "Per run:", "",
             "| experiment | variant | seed | val generalization | val retrieval | test accuracy | episodes | "
             "train time | trained on | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in done:
        split = scan_test_split(row["experiment"])
        cells = [row["metrics"].get(name) for name in (VAL_GENERALIZATION, VAL_RETRIEVAL, split)]
        numbers = ["-" if value is None else f"{value:.2f}" for value in cells]
        lines.append(f"| {row['experiment']} | {row['variant']} | {row['seed']} | {' | '.join(numbers)} | "
                     f"{row.get('episodes') or '-'} | {format_duration(row['train_seconds'])} | "
                     f"{row.get('trained_on') or '-'} | {row.get('commit') or '-'} |")
    return lines


def aggregate_grid(out: str | Path, runs: list[Run], grid_config: dict) -> dict:
    """Write OUT/results.json, results.md and results.png for these runs and every other run under OUT
    (so that several grids into one OUT make one table); return the aggregate."""
    out = Path(out)
    runs = sorted(set(runs) | set(runs_in(out)), key=Run.sort_key)
    rows = [read_run(out, run) for run in runs]
    groups = group_rows(rows)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    origin = provenance.collect() | {"command": grid_command(sys.argv, out)}
    summary = {"grid": grid_settings(grid_config, out), "provenance": origin, "groups": groups, "runs": rows,
               "paths": {k: grid_relative(v, out) for k, v in paths.items()}}
    write_bytes_atomically(paths["json"], (json.dumps(summary, indent=2) + "\n").encode())
    write_bytes_atomically(paths["md"], markdown_table(groups, summary).encode())
    plot_grid(groups, paths["png"])
    return summary


def aggregate_folder(out: str | Path) -> dict:
    """The aggregate of every run under OUT, whatever grids trained them: runs of several `reproduce` commands,
    folders or machines, copied into one folder, make one table. Each run needs only its small files (run.json
    and eval/results.json), not its checkpoint; nothing is trained or evaluated."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"no folder {out}")
    runs = runs_in(out)
    if not runs:
        raise UserError(f"no run under {out}: a run is a folder <experiment>/<variant>/seed<k>/ with its "
                        f"{RUN_RECORD}")
    return aggregate_grid(out, runs, {"out": str(out)})


def plot_grid(groups: list[dict], path: Path) -> None:
    """One panel per metric; each (experiment, variant) a column, each seed a dot, the paper's number a cross."""
    from trainer.report import save_png
    save_png(grid_figure(groups), path)


def grid_figure(groups: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in METRIC_LABELS if any(n in g["metrics"] for g in groups)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 4.6), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], names):
        columns = [g for g in groups if name in g["metrics"]]
        for x, g in enumerate(columns):
            values = [v for v in g["metrics"][name]["values"].values() if v is not None]
            ax.scatter([x] * len(values), values, color="tab:blue", zorder=3, label="seed" if x == 0 else None)
            if g["metrics"][name]["paper"] is not None:
                ax.scatter([x], [g["metrics"][name]["paper"]], marker="x", s=80, color="tab:red", zorder=4,
                           label="paper")
        ax.set_xticks(range(len(columns)), [f"{g['experiment']}\n{g['variant']}" for g in columns],
                      rotation=60, ha="right", fontsize=7)
        ax.set(title=METRIC_LABELS[name], ylim=(-3, 103), xlim=(-0.6, len(columns) - 0.4), ylabel="accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    # Below the panels, outside them: in a corner it covered dots and crowded the tick labels.
    fig.legend(by_label.values(), by_label.keys(), loc="outside lower center", ncols=max(1, len(by_label)))
    return fig
