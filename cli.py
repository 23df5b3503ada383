"""Command line: a thin layer. Each command builds its config and calls one entry function.

Every failure the user can cause (UserError, OSError, bad flags, Ctrl-C) ends as one `error: ...` line on
stderr and a non-zero exit, never a traceback: `main()` runs the group under that handler, so commands added
later (train, eval) get it for free.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.errors import UserError
from pipeline.scan import SPLITS as SCAN_SPLITS, export_split
from pipeline.samplers import EPISODE_TYPES
from pipeline.store import GenerateConfig, generate as generate_store, verify_store
from trainer.config import PASS_THROUGH, SETTINGS, TrainConfig  # torch-free: the training settings' one home

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _apply_thread_policy(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    from pipeline.threads import apply  # runs while parsing, before the command body imports torch
    apply(value)


# Every command that runs torch takes this one line: `@threads_option`. Its callback runs even when the
# option is not given, so the policy (pipeline/threads.py) is set once, before torch loads.
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, expose_value=False, callback=_apply_thread_policy,
    help="CPU threads for torch, fixed.  [default: $OMP_NUM_THREADS, else adapted to the load: the cores "
         "other processes leave free when it starts; a resumed run keeps the count it was trained with]")


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pipeline.provenance import git_commit, project_version
    commit = git_commit()
    click.echo(f"metaseq2seq {project_version()}" + (f" (git {commit})" if commit else ""))
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version (and the git commit of a checkout) and exit.")
def cli() -> None:
    """Meta sequence-to-sequence learning (Lake 2019): episode store, training, evaluation."""


@cli.command()
@click.option("--episode_type", required=True, metavar="|".join(EPISODE_TYPES), help="Which episodes to make.")
@click.option("--num_episodes", type=int, default=GenerateConfig.num_episodes, show_default=True,
              help="Training episodes.")
@click.option("--num_val_episodes", type=int, default=GenerateConfig.num_val_episodes, show_default=True,
              help="Validation episodes (their identifiers never occur in training).")
@click.option("--seed", type=int, default=GenerateConfig.seed, show_default=True)
@click.option("--shard_size", type=int, default=GenerateConfig.shard_size, show_default=True,
              help="Episodes per tar shard.")
@click.option("--workers", type=int, default=GenerateConfig.workers, show_default=True,
              help="Processes; the output bytes do not depend on it.")
@click.option("--out", default=GenerateConfig.out, show_default=True, help="The store goes to OUT/<episode_type>.")
@click.option("--store", default=None, help="The store directory itself, instead of OUT/<episode_type>.")
@click.option("--overwrite", is_flag=True, help="Replace a store that was made with other parameters.")
@click.option("--progress/--no_progress", default=True, help="Show a progress bar.")
def generate(**kwargs) -> None:
    """Generate the episode store OUT/<episode_type> (or --store): shards, manifest.json, dataset card."""
    click.echo(generate_store(GenerateConfig(**kwargs)))


@cli.command()
@click.option("--store", required=True, help="A store directory, e.g. shards/scan_prim_augmentation.")
def verify(store: str) -> None:
    """Check a store against its manifest: shard hashes, counts, every record's schema. Exit 1 on problems."""
    problems = verify_store(store)
    for problem in problems:
        click.echo(problem)
    if problems:
        raise UserError(f"{store}: {len(problems)} problem(s)")
    click.echo(f"{store}: ok")


@cli.command()
@click.option("--store", required=True, help="A store directory, e.g. shards/scan_prim_augmentation.")
@click.option("--to", default=None, help="Write the parquet export to this directory.")
@click.option("--repo_id", default=None, help="Push the parquet export to this Hub dataset (USER/NAME).")
def publish(store: str, to: str | None, repo_id: str | None) -> None:
    """Export a verified store as parquet with a dataset card: to a directory or to the Hugging Face Hub."""
    from pipeline.publish import publish as run_publish  # here: it loads pyarrow
    click.echo(run_publish(store, to=to, repo_id=repo_id))


def option_of(name: str):
    """The `train` option of the TrainConfig field `name`, made from the field alone (one home per setting):
    its flag, type, default and help text."""
    spec = SETTINGS[name]
    meta, kind = spec.metadata, str(spec.type)
    kwargs = {"default": spec.default, "help": meta["help"] or None, "metavar": meta["metavar"]}
    if meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    elif kind == "bool" and not meta["flag"]:
        kwargs["is_flag"] = True
    elif kind.startswith("int"):
        kwargs["type"] = int if meta["minimum"] is None else click.IntRange(min=meta["minimum"])
    elif kind.startswith("float"):
        kwargs["type"] = float
    kwargs["show_default"] = spec.default not in (None, "") and not isinstance(spec.default, bool)
    return click.option(meta["flag"] or f"--{name}", name, **kwargs)


def train_options(command):
    """Every TrainConfig field that is a command-line setting, as an option of `train`, in the fields' order."""
    for name in reversed([n for n, spec in SETTINGS.items() if spec.metadata["flag"] != ""]):
        command = option_of(name)(command)
    return command


@cli.command()
@train_options
@threads_option
def train(**kwargs) -> None:
    """Train the meta seq2seq model on the episode store; checkpoints go to dir_model.
    Ctrl-C (SIGINT) or SIGTERM: the current step ends, the checkpoint is saved, exit 130."""
    from trainer.signals import TrainingInterrupted  # here: torch is slow to import
    from trainer.train import train as run_train
    given = {name: value for name, value in kwargs.items() if value is not None}  # None: TrainConfig's default
    if "seeds" in given:
        given["seeds"] = parse_seeds(given["seeds"])
    try:
        result = run_train(TrainConfig(**given))
    except TrainingInterrupted as err:  # saved: one line from rank 0, not click's generic "Aborted"
        if err.is_main:
            click.echo(str(err), err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if "seeds" in given:
        for seed, run in result.items():
            click.echo(f"checkpoint (seed {seed}): {run['checkpoint']}")
    elif result["is_main"]:
        click.echo(f"checkpoint: {result['checkpoint']}")


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds must be non-negative integers, got {text!r}")
    return seeds


def passed_to_train(command):
    """`reproduce`'s options for the training settings it passes through (PASS_THROUGH), made from `train`'s
    own: the same flag and type, no default of their own (train's applies)."""
    options = {param.name: param for param in train.params}
    for name in reversed([n for n in PASS_THROUGH if n != "num_episodes"]):
        option = options[name]
        where = "train and eval; jobs share one GPU" if name == "device" else "train"
        if option.is_flag:
            command = click.option(f"--{name}", is_flag=True, help=f"Passed to train: {option.help}")(command)
        else:
            default = "" if SETTINGS[name].default is None else f", {SETTINGS[name].default}"
            command = click.option(f"--{name}", type=option.type, default=None,
                                   help=f"Passed to {where}.  [default: train's{default}]")(command)
    return command


@cli.command("eval")
@click.option("--checkpoint", default=None,
              help="A checkpoint written by `train`, e.g. out_models/net_ME.pt, or the original code's net_T.tar "
                   "(or give --dir_model/--fn_in_model).")
@click.option("--dir_model", default=None,
              help="As the original's test.py: the checkpoint's directory.  [default with --fn_in_model: out_models]")
@click.option("--fn_in_model", default=None,
              help="As the original's test.py: the checkpoint's file name in --dir_model; the original's net_T.tar "
                   "is read as it is, and where it is missing, net_T.pt (the name train writes) is taken.  "
                   "[default: net_<episode_type>.pt]")
@click.option("--episode_type", default=None, metavar="|".join(EPISODE_TYPES),
              help="Check that the checkpoint was trained on these episodes (the original's test.py flag).  "
                   "[default: the checkpoint's]")
@click.option("--split", default=None, metavar="NAME",
              help="validation, addprim_jump, template_around_right or length (must fit the checkpoint's "
                   "episode type). Default: validation and the type's SCAN test split.")
@click.option("--out", default=None,
              help="Report directory; replaced whole by each run.  [default: <checkpoint dir>/<checkpoint stem>.eval]")
@click.option("--scan_file", default=None,
              help="Evaluate any file of `IN: ... OUT: ...` lines (needs --support).")
@click.option("--support", default=None, metavar="SPEC",
              help='Support set for --scan_file: "jump=I_JUMP,walk=I_WALK".')
@click.option("--plot", type=int, default=0, show_default=True, metavar="N",
              help="Attention heatmaps (PNG) of the first N queries of each split.")
@click.option("--max_length_eval", "max_length", type=int, default=None,
              help="Greedy decoding steps.  [default: the checkpoint's]")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--store", default=None,
              help="The episode store, if it moved since training.  [default: the checkpoint's]")
@click.option("--val_episodes", type=int, default=0, metavar="N",
              help="Also score N validation episodes drawn afresh on the store's held-out pairings, which "
                   "training never saw (split validation_N).")
@click.option("--val_seed", type=int, default=0, show_default=True,
              help="The seed of the --val_episodes draw (numpy default_rng).")
@click.option("--progress/--no_progress", default=True, help="Show a progress bar.")
@threads_option
def eval_command(checkpoint: str | None, dir_model: str | None, fn_in_model: str | None, **kwargs) -> None:
    """Score a checkpoint on its validation episodes and SCAN test split; write DIR/results.json,
    predictions_<split>.jsonl and (with --plot) attention heatmaps. The original's
    `test.py --episode_type T --fn_in_model net_T.tar --dir_model out_models` works with `cli.py eval` too."""
    from evalsuite.evaluate import EvalConfig, evaluate, resolve_checkpoint  # here: it loads torch
    from evalsuite.report import summary_table
    checkpoint = resolve_checkpoint(checkpoint, dir_model, fn_in_model, kwargs["episode_type"])
    cfg = EvalConfig(checkpoint=checkpoint, **kwargs)
    results = evaluate(cfg)
    click.echo(summary_table(results))
    click.echo(f"report: {cfg.out_dir}")


@cli.command("eval-mlc")
@click.option("--checkpoint", required=True,
              help="A checkpoint written by `train`, e.g. out_models/net_mlc_algebraic.pt.")
@click.option("--mlc_episode", "episode", required=True, metavar="PATH",
              help="The task as one episode in MLC's text format (*SUPPORT*, *QUERY*, *GRAMMAR* blocks of "
                   "`IN: ... OUT: ...` lines), gold outputs: e.g. MLC's few-shot task, val_gold/mini_scan.txt.")
@click.option("--mlc_human", "human", multiple=True, metavar="PATH",
              help="An MLC human-response file of that episode (repeatable): also report how often people "
                   "answered what the model answers.")
@click.option("--mlc_remappings", "remappings", type=int, default=100, show_default=True,
              help="Random remappings of the episode's words and output symbols onto the model's.")
@click.option("--seed", type=int, default=0, show_default=True, help="The remappings' seed (numpy default_rng).")
@click.option("--out", default=None,
              help="Report directory; replaced whole by each run.  [default: <checkpoint dir>/<checkpoint stem>.mlc]")
@click.option("--max_length_eval", "max_length", type=int, default=None,
              help="Greedy decoding steps.  [default: the checkpoint's]")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@threads_option
def eval_mlc(**kwargs) -> None:
    """MLC's few-shot instruction task (Lake & Baroni 2023): greedy exact match on the episode's queries through
    random remappings, mean and sd over them; write DIR/results.json and predictions (docs/mlc.md)."""
    from evalsuite.mlc import MlcEvalConfig, evaluate_mlc, summary_table  # here: it loads torch
    cfg = MlcEvalConfig(**kwargs)
    click.echo(summary_table(evaluate_mlc(cfg)))
    click.echo(f"report: {cfg.out_dir}")


@cli.command()
@click.option("--checkpoint", required=True,
              help="A checkpoint written by `train`, e.g. out_models/net_ME.pt, or the original code's net_T.tar.")
@click.option("--support", default=None, metavar="SPEC", help='The support set: "jump=I_JUMP,walk=I_WALK".')
@click.option("--support_file", default=None, metavar="PATH",
              help="Or a file of `IN: ... OUT: ...` lines (SCAN format) as the support set.")
@click.option("--attention", is_flag=True,
              help="Also show, as text, which support item each input word attends to and the decoder attention.")
@click.option("--max_length_eval", "max_length", type=int, default=None,
              help="Greedy decoding steps.  [default: the checkpoint's]")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@threads_option
@click.argument("commands", nargs=-1)
def predict(commands: tuple[str, ...], **kwargs) -> None:
    """Print the model's output for each COMMAND (quoted, e.g. "jump twice"), one line per command; with
    no COMMAND, read them from stdin, one per line (a blank line gives an empty output line)."""
    from evalsuite.predict import PredictConfig, commands_from_lines, predict as run_predict  # loads torch
    if not commands:
        if sys.stdin.isatty():
            click.echo("reading commands from stdin, one per line (Ctrl-D to end)", err=True)
        commands = tuple(sys.stdin)
    for line in run_predict(PredictConfig(commands=commands_from_lines(commands), **kwargs)):
        click.echo(line)


@cli.command()
@click.option("--from_original", required=True, metavar="net_T.tar",
              help="A checkpoint that the original code's train.py wrote.")
@click.option("--out", default=None, help="Our checkpoint to write.  [default: beside it, net_T.pt]")
@click.option("--store", default=None,
              help="The episode store to resume it on (train --resume --store PATH): the vocabularies take its "
                   "order, and the checkpoint records it.")
def convert(**kwargs) -> None:
    """Turn the original code's checkpoint (net_T.tar) into ours (.pt): its weights, settings, vocabularies and
    validation episodes, to evaluate, predict with, and (with --store) resume or extend with train --resume."""
    from evalsuite.original_checkpoint import ConvertConfig, convert as run_convert  # here: it loads torch
    click.echo(f"checkpoint: {run_convert(ConvertConfig(**kwargs))}")


@cli.command()
@click.option("--experiments", default=",".join(EPISODE_TYPES), show_default=True,
              help="Comma-separated episode types.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated integer seeds, e.g. 0,1,2.")
@click.option("--variants", default="full", show_default=True,
              help="Comma-separated: full, no_memory, no_attention, no_support_loss (the paper's ablations).")
@click.option("--jobs", type=int, default=None,
              help="Runs (or stacks) and evaluations at the same time, as separate processes; the threads are "
                   "split between them.  [default: separate runs on a CPU: its cores (one thread each); else 1]")
@click.option("--stack_size", type=int, default=16, show_default=True,
              help="Most seeds of one experiment and variant trained as one stack (train --seeds), one process.")
@click.option("--separate/--stacked", default=None,
              help="Train every run in its own process, or the seeds of one experiment and variant as stacks.  "
                   "[default: separate on a CPU, where one-thread runs side by side are faster; stacks on GPUs]")
@click.option("--out", default="runs", show_default=True, help="Runs go to OUT/<experiment>/<variant>/seed<k>/.")
@click.option("--threads", type=int, default=None,
              help="Threads for the whole grid, split over the jobs.  [default: all cores; one job alone adapts "
                   "to the load]")
@click.option("--num_episodes", type=int, default=TrainConfig.num_episodes, show_default=True,
              help="Training episodes per run.")
@passed_to_train
@click.option("--num_val_episodes", type=int, default=GenerateConfig.num_val_episodes, show_default=True,
              help="Validation episodes per store.")
@click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: jobs are processes here; slurm: each stack (or run) is a Slurm job, one job array.")
@click.option("--partition", default=None, help="Slurm partition.  [default: the cluster's]")
@click.option("--time", type=int, default=24 * 60, show_default=True, help="Minutes per Slurm job.")
@click.option("--gpus_per_job", type=int, default=0, show_default=True, help="GPUs per Slurm job.")
@click.option("--cpus_per_job", type=int, default=None,
              help="CPUs per Slurm job (and its threads, unless --threads).  [default: the cluster's]")
@click.option("--slurm_extra", multiple=True, metavar="KEY=VALUE",
              help="More sbatch options, e.g. --slurm_extra constraint=volta32gb (repeatable).")
@click.option("--no_wait", is_flag=True, help="Submit the Slurm jobs and return; the same command aggregates later.")
@click.option("--slurm_folder", default=None, help="submitit's pickles and logs.  [default: OUT/slurm]")
def reproduce(experiments: str, seeds: str, variants: str, **kwargs) -> None:
    """Train and evaluate the paper's grid (experiment x variant x seed), then aggregate it into
    OUT/results.{json,md,png}. Finished runs are skipped, interrupted ones resumed: run it again after a kill."""
    from evalsuite.grid import ReproduceConfig, parse_list, parse_seeds
    from evalsuite.reproduce import reproduce as run_reproduce
    passed = {name: kwargs.pop(name) for name in PASS_THROUGH if name != "num_episodes"}
    given = {name: value for name, value in passed.items() if value is not None and value is not False}
    cfg = ReproduceConfig(experiments=parse_list(experiments), seeds=parse_seeds(seeds), variants=parse_list(variants),
                          train=given, **kwargs)
    run_reproduce(cfg, say=lambda line: click.echo(line))


@cli.command()
@click.option("--out", required=True, help="A folder of runs, <experiment>/<variant>/seed<k>/ as reproduce writes.")
def aggregate(out: str) -> None:
    """Aggregate every evaluated run under OUT into OUT/results.{json,md,png}, training and evaluating nothing:
    for runs of several reproduce commands or machines copied into one folder (run.json and eval/results.json
    of each are enough)."""
    from evalsuite.aggregate import aggregate_folder
    summary = aggregate_folder(out)
    click.echo(f"aggregate: {Path(out) / summary['paths']['md']} ({len(summary['runs'])} runs)")


@cli.group()
def scan() -> None:
    """SCAN (Lake & Baroni 2018), generated from its grammar."""


@scan.command("export")
@click.option("--split", required=True, type=click.Choice(SCAN_SPLITS), help="Which SCAN split.")
@click.option("--out", required=True, help="Directory for the files, named as the official ones.")
def scan_export(split: str, out: str) -> None:
    """Write a SCAN split in the official file layout (tasks_train_<split>.txt, tasks_test_<split>.txt)."""
    for path in export_split(split, Path(out)):
        click.echo(path)


def _one_line(message: str) -> str:
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "failed"


def _os_error_text(err: OSError) -> str:
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)


def program_name(args: list[str] | None) -> str:
    """How usage lines name the program: `metaseq2seq` as installed, `cli.py` in a checkout (and in-process)."""
    invoked = Path(sys.argv[0]).name if args is None else ""
    return "metaseq2seq" if invoked == "metaseq2seq" else "cli.py"


def run_cli(group: click.Group, args: list[str] | None = None) -> int:
    """Run `group` and turn every expected failure into one `error:` line; returns the exit code."""
    try:
        result = group.main(args=args, prog_name=program_name(args), standalone_mode=False)
    except click.ClickException as err:  # bad flags: click's one-line message, without its usage block
        click.echo(f"error: {_one_line(err.format_message())}", err=True)
        return err.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except UserError as err:
        click.echo(f"error: {_one_line(str(err))}", err=True)
        return EXIT_ERROR
    except OSError as err:
        click.echo(f"error: {_one_line(_os_error_text(err))}", err=True)
        return EXIT_ERROR
    return result if isinstance(result, int) else 0  # --help returns its exit code (0)


def main() -> None:
    sys.exit(run_cli(cli))


if __name__ == "__main__":
    main()
