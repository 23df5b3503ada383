"""`cli.py predict`: decode commands against a support set with a trained checkpoint, to poke at a model.

The support set comes from `--support "jump=I_JUMP,walk=I_WALK"` or from a SCAN-format file (`IN: ... OUT:
...` lines); the commands from the command line or from stdin, one per line. Every input is checked before
anything is decoded. The outputs come from eval's own shared-support decoder (evalsuite.decode), so predict
and `eval --scan_file` give the same output for the same command and support set.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from evalsuite.decode import QueryAttention, decode_shared_support, query_attention
from evalsuite.evaluate import load_model
from evalsuite.splits import check_support, parse_support, read_scan_file
from pipeline.errors import UserError
from pipeline.vocab import EOS
from evalsuite.original_checkpoint import load_any_checkpoint


@dataclass
class PredictConfig:
    checkpoint: str
    commands: tuple[str, ...]        # one query each, e.g. "jump twice"
    support: str | None = None       # "jump=I_JUMP,walk=I_WALK"
    support_file: str | None = None  # or a SCAN-format file whose `IN: ... OUT: ...` lines are the support set
    attention: bool = False          # also describe the memory and decoder attention of each command
    max_length: int | None = None    # default: the checkpoint's max_length_eval
    device: str = "auto"


def commands_from_lines(lines: Iterable[str]) -> tuple[str, ...]:
    """One command per line, its words separated by single spaces; a blank line is the empty command, whose
    output is an empty line, so that the output lines up with the input (`paste commands.txt outputs.txt`)."""
    return tuple(" ".join(line.split()) for line in lines)


def predict(cfg: PredictConfig) -> list[str]:
    """The lines to print: each command's output, one line per command, in order; with `attention`, each
    output line is followed by indented lines describing where the model looked."""
    check_config(cfg)
    support = read_support(cfg)
    loaded = load_model(load_any_checkpoint(Path(cfg.checkpoint)), cfg)
    support_ids = encode_support(support, loaded.tokenizer, "--support_file" if cfg.support_file else "--support")
    query_ids = encode_commands(cfg.commands, loaded.tokenizer)
    decoded = iter(decode_shared_support(loaded.model, support_ids, [q for q in query_ids if q is not None],
                                         loaded.max_length, loaded.device))
    lines = []
    for command, ids in zip(cfg.commands, query_ids):
        if ids is None:  # the empty command: an empty line keeps the outputs in line with the inputs
            lines.append("")
            continue
        lines.append(loaded.tokenizer.decode_output(next(decoded)))
        if cfg.attention:
            found = query_attention(loaded.model, loaded.tokenizer, support, command, loaded.max_length,
                                    loaded.device, [c for c in cfg.commands if c.split()])
            lines += attention_lines(command, support, found)
    return lines


def check_config(cfg: PredictConfig) -> None:
    if (cfg.support is None) == (cfg.support_file is None):
        raise UserError("give exactly one of --support \"jump=I_JUMP,...\" or --support_file PATH")
    if not any(command.split() for command in cfg.commands):
        raise UserError("no commands: give them as arguments, or one per line on stdin")
    if cfg.max_length is not None and cfg.max_length < 1:
        raise UserError("--max_length_eval must be >= 1")


def read_support(cfg: PredictConfig) -> list[tuple[str, str]]:
    if cfg.support is not None:
        return parse_support(cfg.support)
    pairs = [(pair.command, pair.actions) for _, pair in read_scan_file(cfg.support_file)]
    return check_support(pairs, cfg.support_file)


def encode_support(support: list[tuple[str, str]], tokenizer, flag: str) -> list[tuple[list[int], list[int]]]:
    try:
        return tokenizer.encode_pairs(support)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None


def encode_commands(commands: tuple[str, ...], tokenizer) -> list[list[int] | None]:
    """Each command's input ids; None for an empty command (nothing to decode)."""
    encoded = []
    for number, command in enumerate(commands, start=1):
        if not command.split():
            encoded.append(None)
            continue
        try:
            encoded.append(tokenizer.encode_input(command))
        except UserError as err:
            raise UserError(f"command {number} ({command!r}): {err}") from None
    return encoded


def attention_lines(command: str, support: list[tuple[str, str]], found: QueryAttention) -> list[str]:
    """Memory: for each input word (then EOS), the support item it attends to most, with its weight.
    Decoder: for each output token, its weights over the input words (then EOS)."""
    words = command.split() + [EOS]
    lines = []
    if found.memory is None:
        lines.append("  memory attention: none (the model has no memory)")
    else:
        lines.append("  memory attention (input word -> the support item it attends to most):")
        width = max(len(w) for w in words)
        for word, row in zip(words, found.memory.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            source, target = support[best]
            lines.append(f"    {word.ljust(width)} -> {source} = {target}  {row[best]:.2f}")
    if found.decoder is None:
        lines.append("  decoder attention: none (the model has no decoder attention)")
    else:
        lines.append("  decoder attention (output token: weight of each input word):")
        width = max((len(t) for t in found.outputs), default=0)
        for token, row in zip(found.outputs, found.decoder.tolist()):
            weights = "  ".join(f"{word} {weight:.2f}" for word, weight in zip(words, row))
            lines.append(f"    {(token + ':').ljust(width + 1)} {weights}")
    return lines
