"""Token ids shared by the store's manifest, the trainer and the eval suite.

A vocabulary is a list of tokens whose position is the id. Every vocabulary starts with the same three
special tokens, so PAD, SOS and EOS have the same id on the input and the output side.
"""
from __future__ import annotations

PAD, SOS, EOS = "<pad>", "<sos>", "<eos>"
SPECIAL_TOKENS = (PAD, SOS, EOS)
PAD_ID, SOS_ID, EOS_ID = 0, 1, 2


def build_vocab(symbols) -> list[str]:
    """Specials first, then `symbols` in the order given (their order is part of the store's contract)."""
    symbols = list(symbols)
    if len(set(symbols)) != len(symbols) or set(symbols) & set(SPECIAL_TOKENS):
        raise ValueError("vocabulary symbols must be distinct and must not be special tokens")
    return list(SPECIAL_TOKENS) + symbols
