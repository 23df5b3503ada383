"""What a training run is asked to do: TrainConfig, its defaults, and the checks made before any work.

Each training setting is declared once, here, with its default and its --help text; the tags in its metadata
say where else it matters (`resume`: must match to --resume a run; `run`: identifies a run of a reproduce
grid; `grid`: `cli.py reproduce` passes it through to train). The CLI and the grid read them from here.
Torch-free, so that the CLI can read the defaults without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from pipeline import store as episode_store
from pipeline.errors import UserError
from pipeline.samplers import get_sampler

# The default recipe is the paper's, one episode per optimizer step with lr 1e-3, for every experiment: over
# seeds it generalized sooner and more often than larger batches (docs/results.md has the runs). Other batch
# sizes are for experiments: they get lr 2e-3 unless --lr says otherwise.
PAPER_LR, BATCHED_LR = 1e-3, 2e-3
PAPER_BATCH_SIZE = 1
DEFAULT_EPISODE_TYPE = "ME"      # when neither --episode_type nor --store is given
SEED_FIELD = "{seed}"            # in --store of a stack: each model's own store, e.g. runs/stores/seed{seed}/ME
# What a checkpoint written before a setting existed was trained with.
LEGACY_SETTINGS = {"mask_query_padding": True, "keep_adam_at_decay": True, "pad_in_softmax": True}
# Settings that earlier checkpoints record under another name, with the opposite meaning.
NEGATED_NAMES = {"attend_query_padding": "mask_query_padding", "reset_adam_at_decay": "keep_adam_at_decay"}


def upgrade_settings(saved: dict, names) -> dict:
    """A checkpoint's saved config in today's names: renamed settings translated, and each of `names` that it
    lacks filled in with what it was trained with then (LEGACY_SETTINGS). Applied once, when it is loaded."""
    settings = dict(saved)
    for old, new in NEGATED_NAMES.items():
        if old in settings:
            settings[new] = not settings.pop(old)
    return {**{k: v for k, v in LEGACY_SETTINGS.items() if k in names}, **settings}


def default_batch_size(episode_type: str) -> int:
    return PAPER_BATCH_SIZE


def default_lr(batch_size: int) -> float:
    return PAPER_LR if batch_size == 1 else BATCHED_LR


def setting(default, help: str = "", *, resume: bool = False, run: bool = False, grid: bool = False,
            flag: str | None = None, metavar: str | None = None, choices: tuple[str, ...] | None = None,
            minimum: int | None = None):
    """A TrainConfig field: its default, its --help text, where else it matters (see the module doc), and how
    `train` takes it: `--NAME` of the field's type, or `flag` ("" for none: not a command-line setting)."""
    return field(default=default, metadata={"help": help, "resume": resume, "run": run, "grid": grid,
                                            "flag": flag, "metavar": metavar, "choices": choices,
                                            "minimum": minimum})


# Settings that must match for --resume to continue the same run, and identify a run of a grid.
SAME_RUN = dict(resume=True, run=True)


@dataclass
class TrainConfig:
    episode_type: str | None = setting(
        None, "What to train on.  [default: the type of --store (its manifest), else ME]", **SAME_RUN,
        metavar="ME|scan_...|module:family")
    store: str | None = setting(
        None, "Episode store directory, generated there if missing.  [default: shards/<episode_type>]")
    # Not a resume setting: resuming with a larger one extends a run (data order and lr schedule continue).
    num_episodes: int = setting(10000, "Training episodes in all.", grid=True)
    batch_size: int | None = setting(
        None, "Episodes per optimizer step, all processes together; 1 = the paper.  "
              "[default: 1, the paper's protocol]", **SAME_RUN, grid=True)
    lr: float | None = setting(
        None, "Adam learning rate.  [default: 1e-3 (the paper's) at batch size 1, else 2e-3]", **SAME_RUN, grid=True)
    lr_decay_schedule: int = setting(
        5000, "Multiply the learning rate by 0.1 every this many episodes.", **SAME_RUN, grid=True)
    nlayers: int = setting(2, **SAME_RUN, grid=True)
    emb_size: int = setting(200, **SAME_RUN, grid=True)
    dropout: float = setting(0.5, **SAME_RUN, grid=True)
    max_length_eval: int = setting(50, "Greedy decoding limit.")
    fn_out_model: str = setting("", "Checkpoint file name [default: net_<episode_type>.pt].")
    dir_model: str = setting("out_models")
    disable_memory: bool = setting(False, "Ablation: plain seq2seq that ignores the support set.", **SAME_RUN)
    disable_attention: bool = setting(False, "Ablation: decoder without attention.", **SAME_RUN)
    disable_recon_loss: bool = setting(False, "Do not add the support items as queries.", **SAME_RUN)
    # The default is the original's: the decoder attention covers the padded steps of an episode's shorter
    # queries, up to its longest. Masking them trained ME to 100% on fewer seeds (docs/results.md).
    mask_query_padding: bool = setting(
        False, "Not as the original: the decoder attention covers each query's own steps only, not the padded "
               "steps of an episode's shorter queries.", **SAME_RUN, grid=True)
    # Off, as in the original: its output language has no padding symbol, so its decoder's softmax runs over the
    # output symbols, <sos> and <eos> only (6 classes on ME). This project's first models had <pad> as a class.
    pad_in_softmax: bool = setting(
        False, "Not as the original: <pad> is one of the decoder's output classes, as in this project's first "
               "models.", **SAME_RUN, grid=True)
    keep_adam_at_decay: bool = setting(
        False, "Not as the original: Adam keeps its moment estimates across each lr decay (the original starts "
               "a fresh Adam there).", **SAME_RUN, grid=True)
    workers: int = setting(1, "DataLoader worker processes per process.", **SAME_RUN, grid=True)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (one GPU of several).", grid=True,
                          metavar="auto|cpu|cuda|cuda:N")
    gpu: int | None = setting(None, "As the original code: train on GPU N, the same as --device cuda:N.", metavar="N",
                              minimum=0)
    seed: int = setting(0, **SAME_RUN)
    resume: bool = setting(
        False, "Continue from the checkpoint at dir_model/fn_out_model; a larger --num_episodes extends it.")
    overwrite: bool = setting(False, "Replace an existing checkpoint (and its metrics log and curve).")
    clip: float = setting(50.0, resume=True, flag="")  # gradient-norm clip, the paper's
    val_every: int = setting(100, "Validate and log a line every this many episodes.", grid=True)
    checkpoint_every: int = setting(
        1000, "Write the checkpoint (and redraw the curve) every this many episodes.", grid=True)
    amp: str = setting("none", "bf16 autocast of matrix products (CUDA, or a CPU where a bf16 training step runs).",
                       choices=("none", "bf16"), run=True, grid=True)
    compile: bool = setting(False, "torch.compile the model.")
    generate_missing_store: bool = setting(True, "Generate a missing store first (--no_generate: fail instead).",
                                           flag="--generate_missing_store/--no_generate")
    progress: bool = setting(True, "Show a progress bar.", flag="--progress/--no_progress")
    stop_after: int | None = setting(None, flag="")  # stop (with a checkpoint) after this many episodes: for tests
    seeds: tuple[int, ...] | None = setting(
        None, "Train these seeds as one stack, in one process: model k is the run `--seed k` would make, written "
              "to DIR_MODEL/seed<k>/. --store may contain {seed} for each model's own store. Under torchrun the "
              "seeds are split over the processes.", metavar="0,1,...")

    def __post_init__(self):
        if self.episode_type is None and self.store is None:
            self.episode_type = DEFAULT_EPISODE_TYPE
        if self.episode_type is None:  # the store's manifest decides it: with_store_episode_type
            return
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.episode_type)
        if self.lr is None:
            self.lr = default_lr(self.batch_size)

    @property
    def store_path(self) -> Path:
        return Path(self.store or Path("shards") / self.episode_type)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.dir_model) / (self.fn_out_model or f"net_{self.episode_type}.pt")


SETTINGS = {f.name: f for f in fields(TrainConfig)}


def tagged(tag: str) -> tuple[str, ...]:
    return tuple(name for name, f in SETTINGS.items() if f.metadata[tag])


RESUME_KEYS = tagged("resume")   # must match for --resume to continue the same run
RUN_KEYS = tagged("run")         # a checkpoint that differs in one of them is another run of a grid
PASS_THROUGH = tagged("grid")    # `cli.py reproduce` passes them to train when given


# The settings that depart from the original's training, as train's start-up summary names them.
DEPARTURES = {"mask_query_padding": "query padding masked", "keep_adam_at_decay": "Adam kept across lr decays",
              "pad_in_softmax": "<pad> in the softmax", "disable_memory": "ablation: no memory",
              "disable_attention": "ablation: no decoder attention",
              "disable_recon_loss": "ablation: no support loss"}


def recipe(cfg: TrainConfig) -> str:
    """The training recipe in a few words: the original's, or what departs from it."""
    departures = [words for name, words in DEPARTURES.items() if getattr(cfg, name)]
    if not departures:
        return "the original's (padded query steps attended, fresh Adam at each lr decay)"
    return "the original's, except: " + ", ".join(departures)


def with_store_episode_type(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the episode type of its store's manifest; --episode_type may only repeat it."""
    if cfg.store is None:
        return cfg
    if not (Path(cfg.store) / "manifest.json").is_file():
        if cfg.episode_type is None:
            raise UserError(f"no episode store at {cfg.store}; pass --episode_type to generate one there")
        return cfg
    stored = episode_store.load_manifest(cfg.store).get("episode_type")
    if not isinstance(stored, str):
        raise UserError(f"store {cfg.store} fails verification: its manifest names no episode type "
                        f"(run `metaseq2seq verify --store {cfg.store}`)")
    if cfg.episode_type not in (None, stored):
        raise UserError(f"--episode_type {cfg.episode_type} conflicts with the store {cfg.store}, which holds "
                        f"{stored} episodes: leave --episode_type out, or choose another --store")
    return replace(cfg, episode_type=stored)


def check_config(cfg: TrainConfig, world_size: int, device_type: str) -> None:
    from trainer.precision import check_amp  # here: it loads torch
    get_sampler(cfg.episode_type)  # an unknown type fails here, listing the valid ones, before any work
    for name in ("num_episodes", "batch_size", "lr_decay_schedule", "nlayers", "emb_size", "max_length_eval",
                 "val_every", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be non-negative, got {cfg.workers}")
    if cfg.batch_size % world_size:
        raise UserError(f"--batch_size {cfg.batch_size} must divide evenly over {world_size} processes: to train "
                        f"several models, give --seeds (each process trains its share, one episode per step "
                        f"each); to train one model on several processes, make --batch_size a multiple of "
                        f"{world_size}")
    check_amp(cfg.amp, device_type)  # e.g. bf16 where a tiny bf16 training step fails: one line, no files


def check_checkpoint_target(cfg: TrainConfig) -> None:
    """Never replace a run's checkpoint by accident; never look for one to resume that is not there."""
    path = cfg.checkpoint_path
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the checkpoint and --overwrite replaces it: give one of them")
    if cfg.resume and not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    if path.exists() and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{path} already exists: pass --resume to continue that run, or --overwrite to "
                        "replace it (and its metrics log)")
