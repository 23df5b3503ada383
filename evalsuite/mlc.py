"""`cli.py eval-mlc`: MLC's few-shot instruction task (Lake & Baroni 2023) scored as MLC scores it.

The task is one episode in MLC's text format (`*SUPPORT*`, `*QUERY*`, `*GRAMMAR*` blocks of `IN: ... OUT: ...`
lines) written in canonical symbols (1, 2, 3, DAX, thrice, ...). Each of N random remappings shuffles the
support set and maps the episode's words onto the model's input words and its output symbols onto the model's
output symbols, as MLC's evaluation maps them onto its pseudo-words and colours; every query (and every
support input, for retrieval) is then decoded greedily against the remapped support set, and the outputs are
mapped back. An output symbol the episode does not use maps back to `undefined_action`, as in MLC, which is
also how its human-response files write a colour the study examples never showed.

Reported (docs/mlc.md): exact-match accuracy on the queries, per remapping, as mean and sd over the
remappings, and per query; with human-response files, the share of human answers that equal the model's
output (per remapping, in canonical form) beside the share that equal the gold output.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evalsuite import report
from pipeline.errors import UserError
from pipeline.shardio import file_sha256
from pipeline.vocab import SPECIAL_TOKENS

SPLIT = "mlc_few_shot"
UNDEFINED = "undefined_action"  # MLC's name for an output symbol that the episode does not use
BLOCKS = ("*SUPPORT*", "*QUERY*", "*GRAMMAR*")
LINE = re.compile(r"IN:\s*(?P<input>.*?)\s+OUT:(?P<output>.*)")
# Lake & Baroni (2023), the few-shot instruction task (its Results and Fig. 2): what they report, and what
# each number measures. The human figure is also what the human-response files give (see docs/mlc.md).
PAPER = {"humans": {"accuracy": 80.7, "note": "human participants: per query, the share of their responses "
                                              "that are the gold (algebraic) output, averaged over the 10 queries"},
         "mlc": {"accuracy": 82.4, "note": "MLC (the paper's main model), responses sampled from it, scored as "
                                          "the humans' (quoted from the paper: docs/mlc.md)"}}


@dataclass
class MlcEvalConfig:
    checkpoint: str
    episode: str                        # the task in MLC's text format, gold outputs (e.g. few_shot_gold.txt)
    human: tuple[str, ...] = ()         # MLC's human-response files: the same episode, human answers as queries
    remappings: int = 100
    seed: int = 0                       # of the numpy Generator that draws the remappings
    out: str | None = None              # default: <checkpoint dir>/<checkpoint stem>.mlc
    max_length: int | None = None       # default: the checkpoint's max_length_eval
    device: str = "auto"

    @property
    def out_dir(self) -> Path:
        checkpoint = Path(self.checkpoint)
        return Path(self.out) if self.out else checkpoint.with_name(f"{checkpoint.stem}.mlc")


# ---- MLC's episode text format -------------------------------------------------------------------------

@dataclass(frozen=True)
class MlcEpisode:
    path: str
    support: tuple[tuple[str, str], ...]  # (input, output), canonical symbols
    query: tuple[tuple[str, str], ...]
    grammar: str                          # the *GRAMMAR* block as written (a response file's is empty)

    def input_symbols(self) -> list[str]:
        return sorted({t for i, _ in self.support + self.query for t in i.split()})

    def output_symbols(self) -> list[str]:
        return sorted({t for _, o in self.support + self.query for t in o.split()})


def read_episode(path: str) -> MlcEpisode:
    """An episode file; anything malformed is one error line that names the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the MLC episode {path}: {err}") from None
    starts = _block_starts(path, lines)
    support = _pairs(path, lines, starts[0] + 1, starts[1])
    query = _pairs(path, lines, starts[1] + 1, starts[2])
    if not support or not query:
        raise UserError(f"{path}: the *SUPPORT* and *QUERY* blocks each need at least one `IN: ... OUT: ...` line")
    return MlcEpisode(str(path), tuple(support), tuple(query), "\n".join(lines[starts[2] + 1:]).strip())


def _block_starts(path: str, lines: list[str]) -> list[int]:
    """The line index of each block header; each must be there once, in MLC's order."""
    starts = []
    for header in BLOCKS:
        found = [i for i, line in enumerate(lines) if line.strip() == header]
        if len(found) != 1:
            raise UserError(f"{path}: not an MLC episode: it needs one {header} line "
                            f"(found {len(found)}; the blocks are {', '.join(BLOCKS)})")
        starts.append(found[0])
    if starts != sorted(starts):
        raise UserError(f"{path}: the blocks must come in the order {', '.join(BLOCKS)}")
    return starts


def _pairs(path: str, lines: list[str], start: int, stop: int) -> list[tuple[str, str]]:
    pairs = []
    for number in range(start, stop):
        text = lines[number].strip()
        if not text:
            continue
        found = LINE.fullmatch(text)
        if not found or not found["input"].split() or not found["output"].split():
            raise UserError(f"{path} line {number + 1}: not of the form `IN: <words> OUT: <symbols>`: {text!r}")
        pairs.append((" ".join(found["input"].split()), " ".join(found["output"].split())))
    return pairs


@dataclass(frozen=True)
class HumanResponses:
    """One human-response file: its queries are commands of the episode, each with a person's answer."""
    path: str
    responses: tuple[tuple[str, str], ...]


def read_human(path: str, episode: MlcEpisode) -> HumanResponses:
    """The file must show the episode's study examples, and ask only commands in the episode's words."""
    human = read_episode(path)
    if sorted(human.support) != sorted(episode.support):
        raise UserError(f"{path}: its study examples (*SUPPORT*) differ from those of the episode {episode.path}")
    words = set(episode.input_symbols())
    for command, _ in human.query:
        if not set(command.split()) <= words:
            raise UserError(f"{path}: the command {command!r} has words that the episode {episode.path} has not "
                            f"({', '.join(sorted(set(command.split()) - words))})")
    return HumanResponses(str(path), human.query)


# ---- remapping ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Remapping:
    """One random renaming of an episode onto the model's symbols, and the order of its support set."""
    order: tuple[int, ...]
    inputs: dict[str, str]   # canonical word -> model word
    outputs: dict[str, str]  # canonical output symbol -> model output symbol

    def map_input(self, text: str) -> str:
        return " ".join(self.inputs[t] for t in text.split())

    def map_output(self, text: str) -> str:
        return " ".join(self.outputs[t] for t in text.split())

    def unmap_output(self, text: str) -> str:
        back = {v: k for k, v in self.outputs.items()}
        return " ".join(back.get(t, UNDEFINED) for t in text.split())

    def support(self, episode: MlcEpisode) -> list[tuple[str, str]]:
        return [(self.map_input(episode.support[i][0]), self.map_output(episode.support[i][1])) for i in self.order]


def model_pools(input_vocab, output_vocab) -> tuple[list[str], list[str]]:
    """The words and output symbols a model can read and write: its vocabularies less the special tokens."""
    return ([t for t in input_vocab if t not in SPECIAL_TOKENS], [t for t in output_vocab if t not in SPECIAL_TOKENS])


def check_pools(episode: MlcEpisode, input_pool: list[str], output_pool: list[str]) -> None:
    for side, needed, pool in (("input", episode.input_symbols(), input_pool),
                               ("output", episode.output_symbols(), output_pool)):
        if len(needed) > len(pool):
            raise UserError(f"{episode.path} has {len(needed)} distinct {side} symbols, more than the {len(pool)} of "
                            f"the model's {side} vocabulary: a remapping needs one model symbol for each")


def draw_remapping(rng: np.random.Generator, episode: MlcEpisode, input_pool: list[str],
                   output_pool: list[str]) -> Remapping:
    """Shuffle the support set, then give the episode's words (sorted) the first of the shuffled model words, and
    its output symbols the first of the shuffled model symbols, as MLC's evaluation does."""
    order = tuple(int(i) for i in rng.permutation(len(episode.support)))
    words = [input_pool[i] for i in rng.permutation(len(input_pool))]
    symbols = [output_pool[i] for i in rng.permutation(len(output_pool))]
    return Remapping(order, dict(zip(episode.input_symbols(), words)), dict(zip(episode.output_symbols(), symbols)))


def draw_remappings(episode: MlcEpisode, input_pool: list[str], output_pool: list[str], n: int,
                    seed: int) -> list[Remapping]:
    check_pools(episode, input_pool, output_pool)
    rng = np.random.default_rng(seed)
    return [draw_remapping(rng, episode, input_pool, output_pool) for _ in range(n)]


# ---- scoring (pure: predictions in, figures out) ---------------------------------------------------------

def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd (n - 1); None where there are too few values, never NaN."""
    mean = statistics.fmean(values) if values else None
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def percent_right(pairs, prediction: dict[str, str]) -> float:
    return 100.0 * sum(prediction[i] == o for i, o in pairs) / len(pairs)


def score_gold(episode: MlcEpisode, predictions: list[dict[str, str]]) -> dict:
    """`predictions[r]`: canonical command -> the model's canonical output under remapping r. Accuracy on the
    queries and on the support items (retrieval), per remapping, then mean and sd over the remappings."""
    accuracy, sd = mean_sd([percent_right(episode.query, p) for p in predictions])
    retrieval, retrieval_sd = mean_sd([percent_right(episode.support, p) for p in predictions])
    return {"n": len(episode.query), "n_support": len(episode.support), "n_remappings": len(predictions),
            "accuracy": accuracy, "accuracy_sd": sd, "retrieval": retrieval, "retrieval_sd": retrieval_sd,
            "per_query": [per_query(command, target, predictions) for command, target in episode.query]}


def per_query(command: str, target: str, predictions: list[dict[str, str]]) -> dict:
    accuracy, sd = mean_sd([100.0 * (p[command] == target) for p in predictions])
    outputs = Counter(p[command] for p in predictions)
    return {"input": command, "target": target, "accuracy": accuracy, "accuracy_sd": sd,
            "outputs": dict(outputs.most_common(5))}


def score_human(episode: MlcEpisode, humans: list[HumanResponses], predictions: list[dict[str, str]]) -> dict:
    """How often people gave the gold output, and how often they gave the model's output (per remapping, then
    mean and sd over the remappings): per query, averaged over the queries (as the paper averages people's
    accuracy), and pooled over all responses."""
    responses = [pair for h in humans for pair in h.responses]
    gold = dict(episode.support + episode.query)
    answers = _answers(responses)
    rows = [human_row(c, given, gold.get(c), predictions) for c, given in answers]
    by_query = mean_sd([statistics.fmean(share(given, p[c]) for c, given in answers) for p in predictions])
    pooled = mean_sd([percent_right(responses, p) for p in predictions])
    with_gold = [row["gold_accuracy"] for row in rows if row["gold_accuracy"] is not None]
    scored = [(c, r) for c, r in responses if c in gold]
    return {"files": [{"path": h.path, "sha256": file_sha256(Path(h.path)), "n_responses": len(h.responses)}
                      for h in humans],
            "n_responses": len(responses), "agreement": by_query[0], "agreement_sd": by_query[1],
            "agreement_pooled": pooled[0], "agreement_pooled_sd": pooled[1],
            "gold_accuracy": mean_sd(with_gold)[0],
            "gold_accuracy_pooled": percent_right(scored, gold) if scored else None, "per_query": rows}


def _answers(responses: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Each command once, in order of first appearance, with all the answers given to it."""
    return [(c, [r for x, r in responses if x == c]) for c in dict.fromkeys(c for c, _ in responses)]


def share(answers: list[str], output: str | None) -> float:
    """Percent of `answers` equal to `output`."""
    return 100.0 * sum(a == output for a in answers) / len(answers)


def human_row(command: str, answers: list[str], target: str | None, predictions: list[dict[str, str]]) -> dict:
    agreement, sd = mean_sd([share(answers, p[command]) for p in predictions])
    return {"input": command, "target": target, "n_responses": len(answers),
            "gold_accuracy": share(answers, target) if target is not None else None,
            "agreement": agreement, "agreement_sd": sd, "modal_response": Counter(answers).most_common(1)[0][0]}


# ---- decoding --------------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """Every remapping's outputs, canonical and as the model wrote them."""
    canonical: list[dict[str, str]] = field(default_factory=list)
    raw: list[dict[str, str]] = field(default_factory=list)


def decode_all(loaded, episode: MlcEpisode, remappings: list[Remapping], extra: list[str]) -> Decoded:
    """Per remapping, the support inputs and the queries as one batch against the remapped support set (as
    MLC's evaluation batches them), then any further command (of human files) likewise."""
    commands = list(dict.fromkeys([i for i, _ in episode.support] + [i for i, _ in episode.query]))
    further = [c for c in dict.fromkeys(extra) if c not in commands]
    decoded = Decoded()
    for remapping in remappings:
        raw: dict[str, str] = {}
        for group in (commands, further):
            raw |= decode_commands(loaded, remapping, episode, group)
        decoded.raw.append(raw)
        decoded.canonical.append({c: remapping.unmap_output(out) for c, out in raw.items()})
    return decoded


def decode_commands(loaded, remapping: Remapping, episode: MlcEpisode, commands: list[str]) -> dict[str, str]:
    from evalsuite.decode import decode_shared_support  # torch: only once there is a model to run
    if not commands:
        return {}
    tokenizer = loaded.tokenizer
    support_ids = tokenizer.encode_pairs(remapping.support(episode))
    query_ids = [tokenizer.encode_input(remapping.map_input(c)) for c in commands]
    outputs = decode_shared_support(loaded.model, support_ids, query_ids, loaded.max_length, loaded.device)
    return {c: tokenizer.decode_output(ids) for c, ids in zip(commands, outputs)}


# ---- the command -----------------------------------------------------------------------------------------

def check_config(cfg: MlcEvalConfig) -> None:
    if type(cfg.remappings) is not int or cfg.remappings < 1 or type(cfg.seed) is not int or cfg.seed < 0:
        raise UserError(f"--mlc_remappings must be a positive integer and --seed a non-negative one, got "
                        f"{cfg.remappings!r} and {cfg.seed!r}")
    if cfg.max_length is not None and cfg.max_length < 1:
        raise UserError("--max_length_eval must be >= 1")


def load(cfg: MlcEvalConfig):
    """The checkpoint's model, tokenizer, device and decoding limit, as `eval` loads them."""
    from evalsuite.evaluate import EvalConfig, load_model  # torch: here, not when the CLI starts
    from trainer.checkpoint import load_checkpoint
    ckpt = load_checkpoint(Path(cfg.checkpoint))
    return load_model(ckpt, EvalConfig(cfg.checkpoint, max_length=cfg.max_length, device=cfg.device))


def evaluate_mlc(cfg: MlcEvalConfig) -> dict:
    """Score the checkpoint on the episode through the remappings; write DIR/results.json and the
    predictions; return the results."""
    check_config(cfg)
    episode = read_episode(cfg.episode)
    humans = [read_human(path, episode) for path in cfg.human]
    loaded = load(cfg)
    remappings = draw_remappings(episode, *model_pools(loaded.tokenizer.input_vocab, loaded.tokenizer.output_vocab),
                                 cfg.remappings, cfg.seed)
    report.check_destination(cfg.out_dir)  # now, not after the decoding
    start = time.perf_counter()
    decoded = decode_all(loaded, episode, remappings, [c for h in humans for c, _ in h.responses])
    results = report.header(cfg.checkpoint, loaded.checkpoint, loaded.max_length, str(loaded.device))
    results["provenance"][SPLIT] = {"path": str(Path(cfg.episode).resolve()), "sha256": file_sha256(Path(cfg.episode))}
    results["splits"][SPLIT] = split_results(cfg, episode, humans, decoded, time.perf_counter() - start)
    report.replace_report(cfg.out_dir, lambda d: write_files(d, results, episode, remappings, decoded))
    return results


def split_results(cfg: MlcEvalConfig, episode: MlcEpisode, humans: list[HumanResponses], decoded: Decoded,
                  seconds: float) -> dict:
    scores = score_gold(episode, decoded.canonical)
    scores["remappings"] = {"n": cfg.remappings, "seed": cfg.seed, "rng": f"numpy default_rng({cfg.seed})"}
    scores["human"] = score_human(episode, humans, decoded.canonical) if humans else None
    return {**scores, "paper": PAPER, "decode_seconds": round(seconds, 3),
            "predictions": report.predictions_name(SPLIT)}


def write_files(directory: Path, results: dict, episode: MlcEpisode, remappings: list[Remapping],
                decoded: Decoded) -> None:
    lines = []
    support = {i for i, _ in episode.support}
    gold = dict(episode.support + episode.query)
    for r, (remapping, canonical, raw) in enumerate(zip(remappings, decoded.canonical, decoded.raw)):
        for command, output in canonical.items():
            lines.append(json.dumps({"remapping": r, "input": command, "target": gold.get(command),
                                     "prediction": output, "correct": output == gold.get(command),
                                     "retrieval": command in support, "model_input": remapping.map_input(command),
                                     "model_output": raw[command]}))
    (directory / report.predictions_name(SPLIT)).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    report.write_results(directory, results)


def summary_table(results: dict) -> str:
    """Per query: the gold output, the model's accuracy over the remappings and, with human files, the share of
    people who gave the gold output and who gave the model's; then the totals."""
    s = results["splits"][SPLIT]
    humans = {row["input"]: row for row in (s["human"] or {}).get("per_query", [])}
    rows = [("query", "gold", "model exact", "humans: gold", "humans = model")]
    for q in s["per_query"]:
        h = humans.get(q["input"])
        rows.append((q["input"], q["target"], _pm(q["accuracy"], q["accuracy_sd"]),
                     _pct(h["gold_accuracy"]) if h else "-", _pm(h["agreement"], h["agreement_sd"]) if h else "-"))
    human = s["human"] or {}
    rows.append(("all queries", "", _pm(s["accuracy"], s["accuracy_sd"]), _pct(human.get("gold_accuracy")),
                 _pm(human.get("agreement"), human.get("agreement_sd")) if human else "-"))
    rows.append(("support items (retrieval)", "", _pm(s["retrieval"], s["retrieval_sd"]), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    ckpt = results["checkpoint"]
    return "\n".join([f"{ckpt['path']} ({ckpt['episode_type']}, {ckpt['episodes_done']} episodes): "
                      f"{s['remappings']['n']} remappings, seed {s['remappings']['seed']}", *lines,
                      f"paper: humans {PAPER['humans']['accuracy']}%, MLC {PAPER['mlc']['accuracy']}% (docs/mlc.md)"])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _pm(mean: float | None, sd: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.1f}%" + ("" if sd is None else f" ± {sd:.1f}")
