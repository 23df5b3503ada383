"""The grid of `reproduce`: what it asks for (ReproduceConfig), its runs and where each stands on disk, their
records (run.json), and how they are grouped into jobs.

A run is (experiment, variant, seed). Each seed has its own store (`generate --seed k`), and the run trains
with `--seed k` (model init and data order), so the spread over seeds is honest. Every run lives in
`OUT/<experiment>/<variant>/seed<k>/`: the checkpoint, its metrics log and curve, the eval report in `eval/`,
the train and eval logs, and `run.json` (what was run, how long it took, how it ended).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evalsuite.aggregate import METRIC_LABELS, RUN_RECORD, VAL_RETRIEVAL, Run, format_duration, run_metrics
from evalsuite.report import RESULTS_NAME
from pipeline import store as episode_store
from pipeline.errors import UserError
from pipeline.families import is_family_name
from pipeline.samplers import EPISODE_TYPES, get_sampler
from pipeline.shardio import check_writable_dir, file_sha256, write_bytes_atomically
from pipeline.threads import usable_cores
from trainer.checkpoint import load_checkpoint
from trainer.config import PASS_THROUGH, RUN_KEYS, SETTINGS, TrainConfig

# The paper's ablations, as flags of `cli.py train`.
VARIANT_FLAGS = {  # keys in the order of aggregate.VARIANTS
    "full": {},
    "no_memory": {"disable_memory": True},
    "no_attention": {"disable_attention": True},
    "no_support_loss": {"disable_recon_loss": True},
}
# RUN_KEYS (the settings that make two runs the same run) and PASS_THROUGH (the `cli.py train` settings a grid
# passes through when given) are tags on TrainConfig's fields (trainer/config.py).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # an attempt's start, local time
LAUNCHERS = ("local", "slurm")
SUBMITIT_CLUSTER_ENV = "METASEQ2SEQ_SUBMITIT_CLUSTER"  # the tests' hook: "local" (see ReproduceConfig.slurm_cluster)
SLURM_OPTIONS = ("partition", "time", "gpus_per_job", "cpus_per_job", "slurm_extra", "no_wait", "slurm_folder")


@dataclass
class ReproduceConfig:
    experiments: tuple[str, ...] = EPISODE_TYPES
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = ("full",)
    jobs: int | None = None            # None: the cores, for separate runs on a CPU; else 1
    out: str = "runs"
    threads: int | None = None         # threads for the whole grid, split over the jobs [default: all cores]
    num_episodes: int = TrainConfig.num_episodes
    # Train's other settings that the grid passes through (PASS_THROUGH), by name: {"lr": 2e-3, ...}; one left
    # out takes train's default.
    train: dict = field(default_factory=dict)
    num_val_episodes: int = episode_store.GenerateConfig.num_val_episodes
    stack_size: int = 16               # most seeds trained in one stack
    separate: bool | None = None       # every run in its own `train` process; None: on a CPU yes, on GPUs stacks
    # --launcher slurm: every job (a stack, or one run) is one Slurm job, through submitit (evalsuite/launch_slurm.py)
    launcher: str = "local"            # local | slurm
    partition: str | None = None
    time: int = 24 * 60                # minutes per Slurm job
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    slurm_extra: tuple[str, ...] = ()  # KEY=VALUE, passed as sbatch's --KEY=VALUE
    no_wait: bool = False              # submit and return; the same command again aggregates
    slurm_folder: str | None = None    # submitit's pickles and logs [default: OUT/slurm]
    # Not a flag: "local" runs the slurm path through submitit's local executor (processes on this machine).
    slurm_cluster: str = field(default_factory=lambda: os.environ.get(SUBMITIT_CLUSTER_ENV, "slurm"))

    def __post_init__(self):
        if self.separate is None:
            self.separate = not trains_on_gpu(self)
        if self.jobs is None:
            self.jobs = usable_cores() if self.separate and self.launcher == "local" else 1
        check_grid(self)

    @property
    def threads_per_job(self) -> int | None:
        """None (one job, no --threads): the job's own adaptive thread policy decides, and follows the load.
        A Slurm job has its node's share to itself: --threads (or --cpus_per_job) is each job's."""
        if self.launcher == "slurm":
            return self.threads or self.cpus_per_job
        if self.threads is None and self.jobs == 1:
            return None
        return max(1, (self.threads or usable_cores()) // self.jobs)

    @property
    def slurm_path(self) -> Path:
        return Path(self.slurm_folder or Path(self.out) / "slurm")

    def slurm_parameters(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.slurm_extra)

    def train_setting(self, name: str):
        """A setting that the grid's runs train with: given, or train's default."""
        return self.train.get(name, SETTINGS[name].default)


def trains_on_gpu(cfg: ReproduceConfig) -> bool:
    """Whether the grid's runs train on a GPU: there a B=1 step is bound by launches and a stack of seeds pays;
    on a CPU one-thread runs side by side are faster (docs/benchmarks.md)."""
    if cfg.launcher == "slurm":
        return cfg.gpus_per_job > 0
    device = cfg.train_setting("device")
    if device == "auto":
        import torch  # here: the rest of the grid's set-up does not need it
        return torch.cuda.is_available()
    return device.startswith("cuda")


def check_grid(cfg: ReproduceConfig) -> None:
    """Every mistake in the grid is one line, before any work."""
    for name, given, known in (("experiment", cfg.experiments, EPISODE_TYPES), ("variant", cfg.variants, VARIANT_FLAGS)):
        unknown = [x for x in given if x not in known and not (name == "experiment" and is_family_name(x))]
        if unknown or not given:
            raise UserError(f"unknown {name} {unknown[0] if unknown else '(none given)'!r}; choose from: "
                            f"{', '.join(known)}" + (", or a family of your own as module:attribute"
                                                     if name == "experiment" else ""))
    for experiment in set(cfg.experiments) - set(EPISODE_TYPES):
        get_sampler(experiment)  # a family that cannot be loaded is one line, before any work
    if not cfg.seeds or any(not isinstance(s, int) or s < 0 for s in cfg.seeds):
        raise UserError(f"--seeds must be non-negative integers, got {cfg.seeds!r}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds lists a seed twice: {cfg.seeds!r}")
    if cfg.jobs < 1 or (cfg.threads is not None and cfg.threads < 1):
        raise UserError(f"--jobs and --threads must be at least 1, got {cfg.jobs} and {cfg.threads}")
    if cfg.num_episodes < 1:
        raise UserError(f"--num_episodes must be positive, got {cfg.num_episodes}")
    if cfg.stack_size < 1:
        raise UserError(f"--stack_size must be at least 1, got {cfg.stack_size}")
    check_train_settings(cfg)
    if not cfg.separate and (cfg.train_setting("amp") != "none" or cfg.train_setting("workers") > 1):
        raise UserError("stacks train in fp32 with one loader process: leave out --amp and --workers above 1, or "
                        "pass --separate")
    check_slurm(cfg)


def check_train_settings(cfg: ReproduceConfig) -> None:
    unknown = sorted(set(cfg.train) - set(PASS_THROUGH) | set(cfg.train) & {"num_episodes"})
    if unknown:
        raise UserError(f"reproduce does not pass {unknown[0]!r} to train; it passes: "
                        f"{', '.join(n for n in PASS_THROUGH if n != 'num_episodes')}")


def check_slurm(cfg: ReproduceConfig) -> None:
    if cfg.launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {cfg.launcher!r}")
    defaults = ReproduceConfig.__dataclass_fields__
    given = [name for name in SLURM_OPTIONS if getattr(cfg, name) != defaults[name].default]
    if cfg.launcher == "local":
        if given:
            raise UserError(f"--{given[0]} is an option of --launcher slurm")
        return
    if cfg.time < 1 or cfg.gpus_per_job < 0 or (cfg.cpus_per_job is not None and cfg.cpus_per_job < 1):
        raise UserError(f"--time and --cpus_per_job must be at least 1 and --gpus_per_job at least 0, got "
                        f"{cfg.time}, {cfg.cpus_per_job} and {cfg.gpus_per_job}")
    bad = [item for item in cfg.slurm_extra if not re.fullmatch(r"[A-Za-z][\w-]*=.+", item)]
    if bad:
        raise UserError(f"--slurm_extra takes KEY=VALUE such as constraint=volta32gb, got {bad[0]!r}")
    if cfg.partition == "":
        raise UserError("--partition must not be empty")
    check_submitter(cfg)


def check_submitter(cfg: ReproduceConfig) -> None:
    if cfg.slurm_cluster not in ("slurm", "local"):
        raise UserError(f"{SUBMITIT_CLUSTER_ENV} must be slurm or local, got {cfg.slurm_cluster!r}")
    if cfg.slurm_cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--launcher slurm submits with sbatch, which is not on the PATH: run it on a Slurm login "
                        "node")


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def grid_runs(cfg: ReproduceConfig) -> list[Run]:
    return [Run(e, v, s) for e in cfg.experiments for v in cfg.variants for s in cfg.seeds]


def store_path(cfg: ReproduceConfig, experiment: str, seed: int) -> Path:
    return Path(cfg.out) / "stores" / f"seed{seed}" / experiment


def expected_config(cfg: ReproduceConfig, run: Run) -> TrainConfig:
    """The TrainConfig `cli.py train` will resolve for this run (its defaults included)."""
    return TrainConfig(episode_type=run.experiment, seed=run.seed, store=str(store_path(cfg, run.experiment, run.seed)),
                       dir_model=str(run.dir(cfg.out)), num_episodes=cfg.num_episodes, **VARIANT_FLAGS[run.variant],
                       **cfg.train)


# ---- the state of a run on disk ---------------------------------------------------------------------------

@dataclass
class RunState:
    status: str            # new | partial | trained | done
    episodes_done: int = 0


def run_state(cfg: ReproduceConfig, run: Run) -> RunState:
    """Where a run stands, from its files; a run of other settings in its folder is an error."""
    path = run.checkpoint(cfg.out)
    if not path.is_file():
        return RunState("new")
    ckpt = load_checkpoint(path)
    want, have = asdict(expected_config(cfg, run)), ckpt["train_config"]
    for key in RUN_KEYS:
        trained_with = have.get(key, want[key])
        if trained_with != want[key]:
            raise UserError(f"{run.dir(cfg.out)} holds a run with {key}={trained_with!r}, this grid asks for "
                            f"{want[key]!r}: use another --out, or remove that folder")
    done = int(ckpt["episodes_done"])
    if done > cfg.num_episodes:
        raise UserError(f"{run.dir(cfg.out)} was trained for {done} episodes, more than --num_episodes "
                        f"{cfg.num_episodes}: use another --out, or remove that folder")
    if done < cfg.num_episodes:
        return RunState("partial", done)
    return RunState("done" if eval_is_current(cfg, run) else "trained", done)


def eval_is_current(cfg: ReproduceConfig, run: Run) -> bool:
    results = run.eval_dir(cfg.out) / RESULTS_NAME
    if not results.is_file():
        return False
    try:
        recorded = json.loads(results.read_text())["checkpoint"]["sha256"]
    except (ValueError, KeyError, TypeError):
        return False
    return recorded == file_sha256(run.checkpoint(cfg.out))


def check_runs(cfg: ReproduceConfig, runs: list[Run]) -> dict[Run, RunState]:
    check_writable_dir(Path(cfg.out), "--out")
    return {run: run_state(cfg, run) for run in runs}


# ---- stores -----------------------------------------------------------------------------------------------

def prepare_stores(cfg: ReproduceConfig, runs: list[Run], say) -> None:
    """One store per (experiment, seed) that a run still trains on, generated once before any training."""
    for experiment, seed in dict.fromkeys((r.experiment, r.seed) for r in runs):
        path = store_path(cfg, experiment, seed)
        if (path / "manifest.json").is_file():
            held = episode_store.load_manifest(path)["counts"]["train"]
            if held < cfg.num_episodes:
                raise UserError(f"the store {path} holds {held} training episodes, fewer than --num_episodes "
                                f"{cfg.num_episodes}: remove it to have it generated again")
            continue
        say(f"generating {path} ({cfg.num_episodes} episodes, seed {seed})")
        episode_store.generate(episode_store.GenerateConfig(
            episode_type=experiment, num_episodes=cfg.num_episodes, num_val_episodes=cfg.num_val_episodes,
            seed=seed, out=str(path.parent), progress=False))



# ---- run records and jobs ---------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """run.json: what a run is and how its attempts went, kept across invocations."""
    experiment: str
    variant: str
    seed: int
    status: str = "new"                   # new | partial | trained | done | failed | interrupted
    train_seconds: float = 0.0            # summed over the attempts that trained
    eval_seconds: float = 0.0
    attempts: list[dict] = field(default_factory=list)
    error: str | None = None
    note: str | None = None               # e.g. how a run that was trained outside the grid was adopted

    @classmethod
    def load(cls, cfg: ReproduceConfig, run: Run) -> "RunRecord":
        path = run.dir(cfg.out) / RUN_RECORD
        if not path.is_file():
            return cls(run.experiment, run.variant, run.seed)
        record = cls(**json.loads(path.read_text()))
        record.close_cut_off_attempts(cfg)
        return record

    def close_cut_off_attempts(self, cfg: ReproduceConfig) -> None:
        """An attempt is written when it starts and completed when it ends; one still open was cut off by a hard
        kill (SIGKILL, the machine going away) that left no exit code. Its time is estimated as the time from its
        start to its log's last write, and counted: the step ran that long, at least."""
        for attempt in self.attempts:
            if attempt.get("seconds") is not None:
                continue
            log = Path(cfg.out) / attempt["log"]
            started = time.mktime(time.strptime(attempt["started"], TIME_FORMAT))
            seconds = round(max(0.0, log.stat().st_mtime - started), 1) if log.is_file() else 0.0
            attempt |= {"seconds": seconds, "cut_off": True}
            self.count_time(attempt["step"], seconds)

    def count_time(self, step: str, seconds: float) -> None:
        """Add an attempt's time to the step's total (train_seconds or eval_seconds)."""
        name = f"{step}_seconds"
        setattr(self, name, round(getattr(self, name) + seconds, 1))

    def save(self, cfg: ReproduceConfig, run: Run) -> None:
        path = run.dir(cfg.out) / RUN_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, (json.dumps(asdict(self), indent=2) + "\n").encode())


@dataclass(frozen=True)
class Job:
    """What one worker of the grid does: train `runs` (one run, or the seeds of one stack) if they need it,
    then evaluate each."""
    runs: tuple[Run, ...]
    stacked: bool

    @property
    def name(self) -> str:
        first = self.runs[0]
        if len(self.runs) == 1:
            return first.name
        return f"{first.experiment}/{first.variant}/seeds{','.join(str(r.seed) for r in self.runs)}"


def plan_jobs(cfg: ReproduceConfig, todo: list[Run], states: dict[Run, RunState]) -> list[Job]:
    """Runs that train together form stacks: one experiment and variant, and one starting point (new, or
    resumed from the same episode), at most stack_size seeds each. Runs trained already are evaluated alone."""
    groups: dict[tuple, list[Run]] = {}
    for run in todo:
        state = states[run]
        trains = state.status in ("new", "partial")
        key = (run.experiment, run.variant, state.episodes_done if trains else None, trains and not cfg.separate)
        groups.setdefault(key, []).append(run)
    jobs = []
    for (_, _, _, stacked), runs in groups.items():
        # With --jobs N the seeds are spread over N stacks: on a CPU of few cores, N one-thread stacks side by
        # side beat one stack on N threads (docs/benchmarks.md, "Stacks of seeds").
        size = min(cfg.stack_size, -(-len(runs) // cfg.jobs)) if stacked else 1
        chunks = [tuple(runs[i:i + size]) for i in range(0, len(runs), size)]
        jobs += [Job(chunk, stacked and len(chunk) > 1) for chunk in chunks]  # a lone seed trains as plain train
    return jobs



def interrupted_at(cfg: ReproduceConfig, run: Run) -> str:
    path = run.checkpoint(cfg.out)
    if not path.is_file():
        return "before its first checkpoint"
    done = load_checkpoint(path)["episodes_done"]
    if done >= cfg.num_episodes:
        return "after its training, before its evaluation ended"
    return f"at episode {done} of {cfg.num_episodes}, with a checkpoint of every episode trained"


def describe(record: RunRecord, cfg: ReproduceConfig, run: Run) -> str:
    if record.status == "interrupted":
        return f"INTERRUPTED {interrupted_at(cfg, run)}; the same reproduce command resumes it"
    if record.status != "done":
        return f"{record.status.upper()}: {record.error or ''}".rstrip(": ")
    results = json.loads((run.eval_dir(cfg.out) / RESULTS_NAME).read_text())
    parts = [f"{METRIC_LABELS[name]} {'n/a' if value is None else f'{value:.2f}%'}"
             for name, value in run_metrics(results).items() if name != VAL_RETRIEVAL]
    return (f"done (train {format_duration(record.train_seconds)}, eval {format_duration(record.eval_seconds)}): "
            + ", ".join(parts))


def report(cfg: ReproduceConfig, records: dict[Run, RunRecord], say, total: int, done: int) -> int:
    """A progress line per finished run; returns the new count of finished runs."""
    for run, record in records.items():
        done += 1
        say(f"[{done}/{total}] {run.name}: {describe(record, cfg, run)}")
    return done

