"""The original code's checkpoints (facebookresearch/meta_seq2seq: the `net_<type>.tar` that its train.py
writes), read as they are and turned into ours.

The original pickled live objects beside its weights: its two `Lang` vocabularies (a class of train.py, which
ran as __main__, so the pickle names `__main__.Lang`), its argparse.Namespace of flags and its validation
episodes. The file is read by torch.load(weights_only=True) with two plain stand-in classes allowlisted under
those names: a pickle that asks for anything else (a function to call, another class) is refused before any
of it runs.

The weights map onto MetaSeq2Seq by module name (ENCODER_NAMES, DECODER_NAMES) and, for the rows indexed by
a token, by vocabulary (VocabMap); tests/test_original_equivalence.py proves this mapping against the original
code. The model keeps the original's behaviour (mask_query_padding and pad_in_softmax off), its vocabularies
(ours put <pad>, <sos> and <eos> in front) and its validation episodes, as records that eval scores as the
original's test.py does (VALIDATION_RECORDS).
"""
from __future__ import annotations

import pickle
import re
import tarfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline import provenance
from pipeline import store as episode_store
from pipeline.errors import UserError
from pipeline.records import sample_key
from pipeline.samplers import SCAN_SPECS, get_sampler
from pipeline.shardio import file_sha256
from pipeline.vocab import EOS_ID, SOS_ID, SPECIAL_TOKENS, build_vocab
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import PAPER_LR, TrainConfig
from trainer.data import Tokenizer
from trainer.distributed import DistContext
from trainer.model import MetaSeq2Seq, ModelConfig
from trainer.state import Session, build_state, checkpoint_payload, model_config

# The payload key of the validation episodes that an original checkpoint carries inside it, as our records.
VALIDATION_RECORDS = "validation_records"
REQUIRED_KEYS = ("encoder_state_dict", "decoder_state_dict", "input_lang", "output_lang", "episodes_validation",
                 "episode_type", "emb_size", "dropout", "nlayers", "disable_memory", "max_length_eval")
ORIGINAL_SOS, ORIGINAL_EOS = "SOS", "EOS"


class OriginalLang:
    """Stands in for train.py's Lang while its pickle is read: it receives Lang's attributes (symbols,
    index2symbol, symbol2index, n_symbols) and has no behaviour, so reading one runs nothing."""


class OriginalArgs:
    """Stands in for the argparse.Namespace of the original's flags (its attributes only)."""


# (stand-in, the name a pickle gives): `train.Lang` where train.py was imported rather than run.
STAND_INS = [(OriginalLang, "__main__.Lang"), (OriginalLang, "train.Lang"), (OriginalArgs, "argparse.Namespace")]


# ---- reading the file, without running it ------------------------------------------------------------------

def read_original(path: Path) -> dict:
    """The dict that the original's train.py saved; anything else is one UserError line, and nothing of the
    file is run: torch's weights-only unpickler builds tensors, containers and the stand-ins only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path) and tarfile.is_tarfile(path):
        raise UserError(f"{path} is a tar archive of another program, not a checkpoint of the original code "
                        "(its train.py pickles a dict into net_<type>.tar)")
    try:  # quiet: torch warns in several lines about pickle protocols it may not read
        with torch.serialization.safe_globals(STAND_INS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(_refusal(path, err)) from None
    except Exception as err:  # torch raises many types for a truncated or damaged file
        raise UserError(f"{path} is truncated or damaged, or not a torch file ({type(err).__name__})") from None
    check_original(raw, path)
    return raw


def _refusal(path: Path, err: Exception) -> str:
    """A pickle that names a function or class beyond the allowlist is refused; any other stop is damage."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    asked = re.search(r"GLOBAL (\S+)", str(err))
    if asked:
        return (f"{path} asks for {asked.group(1)}, which no checkpoint of the original code holds: refused, and "
                "nothing in it was run")
    where = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    detail = lines[where + 1] if where is not None and where + 1 < len(lines) else lines[0] if lines else ""
    return f"{path} is not a checkpoint of the original code, or is damaged ({detail[:80]})"


def check_original(raw, path: Path) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a checkpoint of the original code (it holds a {type(raw).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise UserError(f"{path} is not a checkpoint of the original code (it lacks {', '.join(missing)})")
    for side in ("input_lang", "output_lang"):
        if not _is_lang(raw[side]):
            raise UserError(f"{path} is not a checkpoint of the original code (its {side} is not the original's Lang)")
    get_sampler(raw["episode_type"])  # an episode type we do not know is one line, naming the known ones


def _is_lang(lang) -> bool:
    """The original's Lang: symbols 0..n-1, then SOS at n and EOS at n + 1."""
    symbols, index = getattr(lang, "symbols", None), getattr(lang, "index2symbol", None)
    return (isinstance(lang, OriginalLang) and isinstance(symbols, list) and all(isinstance(s, str) for s in symbols)
            and isinstance(index, dict) and index.get(len(symbols)) == ORIGINAL_SOS
            and index.get(len(symbols) + 1) == ORIGINAL_EOS)


# ---- the weights -------------------------------------------------------------------------------------------

# The original's module names (its encoder and its decoder are two modules) -> ours:
#
#   encoder.suppport_embedding.embedding / .lstm (*)     input_encoder.embedding / .lstm
#   encoder.output_embedding.embedding / .lstm           output_encoder.embedding / .lstm
#   encoder.hidden                                       memory_combine
#   encoder.embedding / .lstm (its disable_memory one)   input_encoder.embedding / .lstm
#   decoder.embedding, decoder.rnn                       dec_embedding, dec_lstm
#   decoder.concat (AttnDecoderRNN only), decoder.out    attn_combine, out
#
# (*) query_embedding is the same module (its tie_encoders=True), as our one input encoder; a state dict lists
# it twice. LSTM parameters keep their names (weight_ih_l0, ..._reverse). Rows indexed by a token id (the
# embeddings, out.weight, out.bias) are put in our order by VocabMap; everything else is copied as is.
ENCODER_NAMES = {"suppport_embedding.": "input_encoder.", "output_embedding.": "output_encoder.",
                 "hidden.": "memory_combine.", "embedding.": "input_encoder.embedding.",
                 "lstm.": "input_encoder.lstm."}
DECODER_NAMES = {"embedding.": "dec_embedding.", "rnn.": "dec_lstm.", "concat.": "attn_combine.", "out.": "out."}
TIED = "query_embedding."


def original_named(encoder_items, decoder_items) -> dict[str, torch.Tensor]:
    """The original's tensors under our names, from (name, tensor) pairs of its encoder and of its decoder
    (their named_parameters(), their grads, or a saved state dict). LSTM weights keep their own names."""
    out, tied = {}, {}
    for name, value in encoder_items:
        if name.startswith(TIED):
            tied[name[len(TIED):]] = value
            continue
        out[_renamed(name, ENCODER_NAMES)] = value
    for name, value in decoder_items:
        out[_renamed(name, DECODER_NAMES)] = value
    for name, value in tied.items():  # a state dict repeats the tied encoder: it must be that very one
        if not torch.equal(value, out.get("input_encoder." + name, torch.empty(0))):
            raise ValueError(f"the query encoder's {name} is not the support encoder's (untied encoders)")
    return out


def _renamed(name: str, table: dict[str, str]) -> str:
    prefix = next((p for p in table if name.startswith(p)), None)
    if prefix is None:
        raise ValueError(f"unknown parameter {name}")
    return table[prefix] + name[len(prefix):]


def ours_of_original(symbols, vocab) -> torch.Tensor:
    """For each id of the original's Lang over `symbols` (symbols[i] is i, then SOS is n and EOS n + 1), our id
    in `vocab`, which must hold the same symbols after our three special tokens, in any order."""
    index = {token: i for i, token in enumerate(vocab)}
    if sorted(symbols) != sorted(vocab[len(SPECIAL_TOKENS):]) or len(index) != len(vocab):
        raise ValueError("the vocabularies hold different symbols")
    return torch.tensor([index[s] for s in symbols] + [SOS_ID, EOS_ID])


@dataclass(frozen=True)
class VocabMap:
    """Our id of each original id, on the input and on the output side."""
    input: torch.Tensor
    output: torch.Tensor

    @classmethod
    def between(cls, input_symbols, output_symbols, tokenizer: Tokenizer) -> "VocabMap":
        return cls(ours_of_original(input_symbols, tokenizer.input_vocab),
                   ours_of_original(output_symbols, tokenizer.output_vocab))

    def rows(self, our_name: str):
        """The rows of our tensor `our_name` that the original's holds: by token id, or all (`...`)."""
        if our_name == "input_encoder.embedding.weight":
            return self.input
        if our_name in ("output_encoder.embedding.weight", "dec_embedding.weight", "out.weight", "out.bias"):
            return self.output
        return ...


def copy_original_weights(named: dict[str, torch.Tensor], model: MetaSeq2Seq, vocab: VocabMap) -> None:
    """Copy the original's tensors (original_named) into `model`; our <pad> rows, which the original has
    not, keep their values. Every tensor of ours must get one, of the right shape."""
    ours = dict(model.named_parameters())
    if set(named) != set(ours):
        raise ValueError(f"the parameters differ: {sorted(set(named) ^ set(ours))[:4]}")
    for name, value in named.items():
        rows = vocab.rows(name)
        if ours[name][rows].shape != value.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, ours {tuple(ours[name][rows].shape)}")
        with torch.no_grad():
            ours[name][rows] = value.detach()


# ---- its settings, its model, its validation episodes --------------------------------------------------------

def train_config(raw: dict, **where) -> TrainConfig:
    """The original's settings as our TrainConfig (its training recipe is our default one); `where` sets the
    store, dir_model and fn_out_model."""
    args = vars(raw["args"]) if isinstance(raw.get("args"), OriginalArgs) else {}
    attention = raw.get("use_attention", not args.get("disable_attention", False))
    return TrainConfig(
        episode_type=raw["episode_type"], emb_size=int(raw["emb_size"]), nlayers=int(raw["nlayers"]),
        dropout=float(raw["dropout"]), max_length_eval=int(raw["max_length_eval"]),
        disable_memory=bool(raw["disable_memory"]), disable_attention=not attention,
        disable_recon_loss=bool(raw.get("disable_recon_loss", args.get("disable_recon_loss", False))),
        num_episodes=int(raw.get("num_episodes", args.get("num_episodes", TrainConfig.num_episodes))),
        lr=float(args.get("lr", PAPER_LR)), batch_size=1,
        lr_decay_schedule=int(args.get("lr_decay_schedule", TrainConfig.lr_decay_schedule)),
        mask_query_padding=False, pad_in_softmax=False, keep_adam_at_decay=False, **where)


def original_tokenizer(raw: dict) -> Tokenizer:
    """The original's vocabularies in its own order, after our three special tokens."""
    try:
        return Tokenizer(tuple(build_vocab(raw["input_lang"].symbols)), tuple(build_vocab(raw["output_lang"].symbols)))
    except ValueError as err:
        raise UserError(f"the original's vocabularies cannot be ours: {err}") from None


def original_state(raw: dict, cfg: ModelConfig, tokenizer: Tokenizer, path: Path) -> dict[str, torch.Tensor]:
    """Our state dict of the original's weights, in `tokenizer`'s vocabulary order; <pad> rows are 0."""
    model = MetaSeq2Seq(cfg)
    try:
        vocab = VocabMap.between(raw["input_lang"].symbols, raw["output_lang"].symbols, tokenizer)
        named = original_named(raw["encoder_state_dict"].items(), raw["decoder_state_dict"].items())
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        copy_original_weights(named, model, vocab)
    except (AttributeError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"{path} does not hold a model that fits its own settings ({err})") from None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def validation_records(raw: dict, path: Path) -> list[dict]:
    """Its saved validation episodes as our records. Its support loss appended each support item to the
    queries; our eval adds them again itself, so they are taken off here."""
    appended, samples = not raw.get("disable_recon_loss", False), raw["episodes_validation"]
    try:
        return [_record(raw["episode_type"], i, sample, appended) for i, sample in enumerate(samples)]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: its validation episodes are not the original's "
                        f"({type(err).__name__}: {err})") from None


def _record(episode_type: str, index: int, sample: dict, appended: bool) -> dict:
    support = _pairs(sample["xs"], sample["ys"])
    query = _pairs(sample["xq"], sample["yq"])
    if appended and len(query) > len(support) and query[-len(support):] == support:
        query = query[:-len(support)]
    words, actions = _pairing(episode_type, sample["identifier"])
    return {"episode_type": episode_type, "split": "val", "index": index,
            "identifier": get_sampler(episode_type)._identifier(words, actions),
            "mapping": [{"src": w, "tgt": a} for w, a in zip(words, actions)],
            "support": support, "query": query, "__key__": sample_key("val", index)}


def _pairs(inputs: list, outputs: list) -> list[dict]:
    if len(inputs) != len(outputs):
        raise ValueError("inputs and outputs differ in number")
    return [{"input": " ".join(x), "output": " ".join(y)} for x, y in zip(inputs, outputs)]


def _pairing(episode_type: str, identifier: str) -> tuple[list[str], list[str]]:
    """The word -> meaning pairing of a validation episode. SCAN validation uses the true meanings; an ME
    episode's identifier lists its pairing, one `word -> MEANING` a line."""
    if episode_type in SCAN_SPECS:
        return list(SCAN_SPECS[episode_type].slot_words), list(SCAN_SPECS[episode_type].slot_actions)
    pairs = [line.split(" -> ") for line in identifier.split("\n")]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"identifier {identifier!r} is not a pairing")
    return [w for w, _ in pairs], [a for _, a in pairs]


# ---- what eval and predict take: our payload layout -------------------------------------------------------

def original_source(raw: dict, path: Path) -> dict:
    """Where a model came from, for provenance: the original's file, its episode count and its flags."""
    args = vars(raw["args"]) if isinstance(raw.get("args"), OriginalArgs) else None
    return {"path": str(path.resolve()), "sha256": file_sha256(path), "episode": raw.get("episode"),
            "num_episodes": raw.get("num_episodes"), "args": args}


def original_payload(path: Path) -> dict:
    """An original checkpoint in our payload layout (what eval and predict read), with its validation
    episodes; it records no store of ours."""
    path = Path(path)
    raw = read_original(path)
    tokenizer, cfg = original_tokenizer(raw), train_config(raw)
    model_cfg = model_config(cfg, {"input_vocab": tokenizer.input_vocab, "output_vocab": tokenizer.output_vocab})
    return {"episode_type": cfg.episode_type, "model_config": model_cfg.to_dict(), "train_config": asdict(cfg),
            "model": original_state(raw, model_cfg, tokenizer, path), "input_vocab": list(tokenizer.input_vocab),
            "output_vocab": list(tokenizer.output_vocab), "episodes_done": raw.get("episode"), "store": None,
            "manifest_sha256": None, "val_shards_sha256": None,
            "provenance": {"original_checkpoint": original_source(raw, path)},
            VALIDATION_RECORDS: validation_records(raw, path)}


def load_any_checkpoint(path: Path) -> dict:
    """Ours (trainer.checkpoint), or the original's `.tar` read as it is, in our payload layout."""
    path = Path(path)
    return original_payload(path) if path.suffix == ".tar" else load_checkpoint(path)


# ---- `cli.py convert`: our checkpoint, to evaluate, predict with, resume and extend ----------------------

@dataclass
class ConvertConfig:
    from_original: str          # the original's net_<type>.tar
    out: str | None = None      # default: beside it, net_<type>.pt
    store: str | None = None    # our store to resume on: its vocabulary order, recorded for train --resume

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.from_original).with_suffix(".pt")


def convert(cfg: ConvertConfig) -> Path:
    """Write our checkpoint of the original's: its weights, settings, vocabularies and validation episodes,
    a fresh Adam (the original saved none, and restarted Adam at each lr decay anyway) at the lr of its
    episode, and, with a store, that store and the data position of its episode count."""
    source, out = Path(cfg.from_original), cfg.out_path
    if out.exists():
        raise UserError(f"{out} already exists: remove it or give another --out")
    raw = read_original(source)
    manifest, manifest_hash = store_manifest(cfg.store, raw)
    train_cfg = train_config(raw, store=cfg.store, dir_model=str(out.parent), fn_out_model=out.name)
    payload = converted_payload(raw, train_cfg, manifest, manifest_hash, source)
    save_checkpoint(out, payload)
    return out


def store_manifest(store: str | None, raw: dict) -> tuple[dict, str | None]:
    """The store's manifest and hash; without a store, a manifest of the original's own vocabularies."""
    if store is None:
        tokenizer = original_tokenizer(raw)
        return {"input_vocab": list(tokenizer.input_vocab), "output_vocab": list(tokenizer.output_vocab),
                "shards": []}, None
    if not (Path(store) / "manifest.json").is_file():
        raise UserError(f"no episode store at {store}")
    manifest = episode_store.load_manifest(store)
    if manifest.get("episode_type") != raw["episode_type"]:
        raise UserError(f"the store {store} holds {manifest.get('episode_type')} episodes, the checkpoint was "
                        f"trained on {raw['episode_type']}")
    for side in ("input", "output"):
        if sorted(raw[f"{side}_lang"].symbols) != sorted(manifest[f"{side}_vocab"][len(SPECIAL_TOKENS):]):
            raise UserError(f"the store {store} has another {side} vocabulary than the checkpoint")
    return manifest, episode_store.manifest_sha256(store)


def converted_payload(raw: dict, cfg: TrainConfig, manifest: dict, manifest_hash: str | None, source: Path) -> dict:
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    episodes = int(raw.get("episode") or 0)
    state = build_state(cfg, manifest, torch.device("cpu"), episodes_done=episodes)
    state.model.load_state_dict(original_state(raw, state.model.cfg, tokenizer, source))
    state.steps = state.batches = episodes  # one episode per step; a store is read on from that episode
    session = Session(cfg, DistContext(), torch.device("cpu"), manifest, manifest_hash,
                      {**provenance.collect("cpu"), "original_checkpoint": original_source(raw, source)})
    payload = checkpoint_payload(state, session) | {"threads": None}  # no run of ours has chosen a count yet
    if manifest_hash is None:  # no store of ours: eval uses its own validation episodes; resume says what lacks
        payload |= {"store": None, "val_shards_sha256": None}
    return payload | {VALIDATION_RECORDS: validation_records(raw, source)}
