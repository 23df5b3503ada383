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

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--overwrite", is_flag=True, help="Replace a store that was made with other parameters.")
@click.option("--progress/--no_progress", default=True, help="Show a progress bar.")
def generate(**kwargs) -> None:
    """Generate the episode store OUT/<episode_type>: shards, manifest.json, dataset card."""
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


def run_cli(group: click.Group, args: list[str] | None = None) -> int:
    """Run `group` and turn every expected failure into one `error:` line; returns the exit code."""
    try:
        result = group.main(args=args, prog_name="cli.py", standalone_mode=False)
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
