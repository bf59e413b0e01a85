"""WordNet 3.0 nouns and adjectives shipped with the package: the candidate pools of NegLabel / CSP.

``data/wordlists/wordnet30.tsv.gz`` (0.45 MB, built once by ``scripts/prepare_wordnet.py``
from the Princeton WordNet 3.0 database; licence in ``data/wordlists/WORDNET_LICENSE``)
holds the first lemma of every noun and adjective synset, grouped by lexicographer file
(``noun.artifact``, ``adj.all``, ...).  Nothing is downloaded; the file is read once per
process.

The pools default to the lexicographer files the methods' authors ship: NegLabel's database
(XueJiang16/NegLabel ``txtfiles/``) has every noun and adjective file except ``noun.animal``
and ``noun.food``; CSP (MengyuanChen21/NeurIPS2024-CSP) further drops ``noun.person``,
``noun.quantity``, ``noun.group`` and ``adj.pert``.  Their lists are a parse of the same
database with one word per synset; ours match them to within 1 % per file
(docs/methods.md: word lists).
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Sequence

from ..errors import ConfigError

WORDNET_FILE = "wordnet30.tsv.gz"
#: the lexicographer files of XueJiang16/NegLabel's txtfiles/ (all noun / adjective files but animal and food)
NEGLABEL_LEXNAMES = (
    "noun.Tops", "noun.act", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "adj.all", "adj.pert", "adj.ppl")
#: CSP's clip-ViT-B16 config: NegLabel's files less txt_exclude
CSP_EXCLUDE = ("noun.person", "noun.quantity", "noun.group", "adj.pert")
CSP_LEXNAMES = tuple(n for n in NEGLABEL_LEXNAMES if n not in CSP_EXCLUDE)


@lru_cache(maxsize=1)
def _table() -> dict[str, tuple[str, ...]]:
    """lexname -> its words, in database order (read once per process)."""
    path = resources.files("backmix_vlm.data").joinpath("wordlists", WORDNET_FILE)
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        table: dict[str, list[str]] = {}
        for line in f:
            lexname, word = line.rstrip("\n").split("\t")
            table.setdefault(lexname, []).append(word)
    return {k: tuple(v) for k, v in table.items()}


def wordnet_lexnames() -> list[str]:
    """The lexicographer files the shipped list holds (``noun.*`` and ``adj.*``)."""
    return list(_table())


def wordnet_words(lexnames: Sequence[str], *, where: str = "lexnames") -> list[str]:
    """The words of ``lexnames`` (in the given order), each once."""
    table = _table()
    unknown = [n for n in lexnames if n not in table]
    if unknown:
        raise ConfigError(f"{where}: unknown WordNet lexicographer file(s) {', '.join(unknown)}; "
                          f"available: {', '.join(table)}")
    return list(dict.fromkeys(w for n in lexnames for w in table[n]))


def wordnet_pool(lexnames: Sequence[str] = NEGLABEL_LEXNAMES, *, where: str = "lexnames") -> tuple[list[str], list[str]]:
    """``(nouns, adjectives)`` of ``lexnames``; a word in both keeps its noun entry (nouns come first)."""
    nouns = wordnet_words([n for n in lexnames if n.startswith("noun.")], where=where)
    others = [n for n in lexnames if not n.startswith("noun.")]
    bad = [n for n in others if not n.startswith("adj.")]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} is neither a noun.* nor an adj.* lexicographer file")
    noun_set = set(nouns)
    return nouns, [w for w in wordnet_words(others, where=where) if w not in noun_set]
