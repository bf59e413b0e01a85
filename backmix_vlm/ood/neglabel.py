"""NegLabel (Jiang et al., ICLR 2024): zero-shot CLIP OOD detection with mined negative labels.

1. **Candidates**: WordNet 3.0 nouns and adjectives (~70 k words, shipped with the package:
   :mod:`backmix_vlm.data.wordnet`; the authors' lexicographer files by default), or a user's
   word lists (one word per line), which replace them.  Nouns take the ID prompts' templates,
   adjectives the authors' "This is a {} photo".
2. **Selection** (:func:`select_negative_labels`): for each candidate, the ``percentile``
   (η = 0.95) quantile of its cosine similarities to the ID class embeddings; the
   ``ratio`` (15 %) of candidates with the *lowest* such value — the farthest from every
   ID label — become negative labels (nouns and adjectives selected separately).
3. **Score** (:func:`neglabel_score`): ``sum_ID e^{cos/τ} / (sum_ID e^{cos/τ} + sum_neg
   e^{cos/τ})`` with τ = 0.01, computed per group of negatives (``ngroup`` = 100 random
   groups after dropping the remainder) and averaged — the authors' grouping strategy.

Differences from the authors' code (XueJiang16/NegLabel, read not copied): the group
permutation comes from a CPU ``torch.Generator`` seeded with ``seed`` (theirs from the CUDA
RNG, so the grouping differs, and with it the score up to group noise); argsort is stable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

ADJ_TEMPLATE = "This is a {} photo"


def load_words(path: str | Path) -> list[str]:
    """Words from a text file: one per line, blank lines and ``#`` comments skipped, duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"neglabel word list not found: {p}. Give a text file with one English word per line (the paper "
            f"uses WordNet nouns/adjectives; e.g. from the PyPI package english-words: python -c \"from "
            f"english_words import get_english_words_set as g; print('\\n'.join(sorted(g(['web2'], "
            f"lower=True))))\" > words.txt)"
        )
    seen: dict[str, None] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        w = line.strip()
        if w and not w.startswith("#"):
            seen.setdefault(w, None)
    if not seen:
        raise ConfigError(f"neglabel word list {p} holds no words")
    return list(seen)


def candidate_pool(words: str | Path | None, adjectives: str | Path | None, lexnames: Sequence[str] | None,
                   default: Sequence[str], where: str) -> tuple[list[str], list[str]]:
    """``(nouns, adjectives)``: the user's word files when given (they replace the whole pool),
    else the shipped WordNet words of ``lexnames`` (default: ``default``, the authors' files)."""
    if words or adjectives:
        if lexnames:
            raise ConfigError(f"{where}: give word files (words / adjectives) or WordNet lexnames, not both")
        return (load_words(words) if words else []), (load_words(adjectives) if adjectives else [])
    from ..data.wordnet import wordnet_pool

    return wordnet_pool(list(lexnames or default), where=f"{where}.lexnames")


def select_negative_labels(pos: Tensor, cand: Tensor, *, ratio: float = 0.15, percentile: float = 0.95,
                           kinds: Sequence[int] | Tensor | None = None, chunk: int = 1000,
                           exclude_above: float | None = None) -> Tensor:
    """Indices of the negative labels among ``cand`` (M, D), given ID embeddings ``pos`` (K, D).

    Both are unit-norm.  Per candidate: ``torch.quantile`` (linear) of its similarities to the
    K ID labels at ``percentile``; keep the ``int(n * ratio)`` lowest per kind (``kinds``: a
    word-type id per candidate, e.g. 0 = noun, 1 = adjective; one kind by default), kinds in
    increasing id order, each sorted by increasing similarity.  ``exclude_above`` (CSP: 0.95):
    a candidate whose largest ID similarity exceeds it gets similarity 1 (a near-synonym of an
    ID label is never picked unless the ratio reaches it).
    """
    if not 0 < ratio <= 1:
        raise ConfigError(f"neglabel ratio must be in (0, 1], got {ratio!r}")
    if not 0 <= percentile <= 1:
        raise ConfigError(f"neglabel percentile must be in [0, 1] (a quantile, the paper's eta = 0.95), got {percentile!r}")
    pos, cand = pos.float(), cand.float()
    def chunk_sims(block: Tensor) -> Tensor:
        s = block @ pos.T
        q = torch.quantile(s, percentile, dim=-1)
        if exclude_above is not None:
            q[s.amax(dim=-1) > exclude_above] = 1.0
        return q

    sims = torch.cat([chunk_sims(cand[i:i + chunk]) for i in range(0, cand.shape[0], chunk)])
    kinds_t = torch.zeros(cand.shape[0], dtype=torch.long) if kinds is None else torch.as_tensor(kinds).long().cpu()
    picked = []
    for kind in torch.unique(kinds_t).tolist():
        idx = torch.nonzero(kinds_t == kind).squeeze(1)
        order = torch.argsort(sims[idx].cpu(), stable=True)
        picked.append(idx[order[: int(len(idx) * ratio)]])
    out = torch.cat(picked)
    if out.numel() == 0:
        raise ConfigError(f"neglabel: ratio {ratio} of {cand.shape[0]} candidate words selects none; "
                          f"give a larger word list or ratio")
    return out


def neglabel_score(pos_cos: Tensor, neg_cos: Tensor, *, temperature: float = 0.01, ngroup: int = 100,
                   seed: int = 0, permutation: Tensor | None = None) -> Tensor:
    """NegLabel score from cosines to the ID labels (N, K) and to the negative labels (N, M).

    ``ngroup`` > 1: drop ``M % ngroup`` negatives (the last ones), permute the rest
    (``permutation`` or a CPU generator seeded ``seed``), split into ``ngroup`` contiguous
    groups, score each as ``sum softmax([pos, group] / τ)[:K]`` and average.
    """
    if temperature <= 0:
        raise ConfigError(f"neglabel temperature must be > 0, got {temperature!r}")
    pos, neg = pos_cos.double() / temperature, neg_cos.double() / temperature
    k, m = pos.shape[1], neg.shape[1]
    if ngroup <= 1:
        return torch.cat([pos, neg], dim=1).softmax(dim=1)[:, :k].sum(dim=1)
    if m < ngroup:
        raise ConfigError(f"neglabel: {m} negative labels cannot form {ngroup} groups; lower ngroup")
    keep = m - m % ngroup
    neg = neg[:, :keep]
    if permutation is None:
        permutation = torch.randperm(keep, generator=torch.Generator().manual_seed(seed))
    groups = neg[:, permutation.to(neg.device)].reshape(neg.shape[0], ngroup, -1)
    pos_lse = torch.logsumexp(pos, dim=1, keepdim=True)                 # (N, 1)
    neg_lse = torch.logsumexp(groups, dim=2)                             # (N, G)
    return (pos_lse - torch.logaddexp(pos_lse, neg_lse)).exp().mean(dim=1)  # sum of ID softmax, per group


def negative_text_features(encode: Callable[[list[str], Sequence[str]], Tensor], pos: Tensor, nouns: Sequence[str],
                           templates: Sequence[str], *, adjectives: Sequence[str] = (), ratio: float = 0.15,
                           percentile: float = 0.95, exclude: Sequence[str] = (),
                           adj_templates: Sequence[str] = (ADJ_TEMPLATE,),
                           exclude_above: float | None = None) -> tuple[Tensor, list[str]]:
    """Encode candidate words with ``encode(words, templates) -> (M, D)`` and keep the negatives.

    Words equal to an ID class name (``exclude``, case-insensitive) are dropped first.
    Nouns take ``templates``, adjectives ``adj_templates`` (averaged when several).
    Returns ``(unit-norm embeddings (M', D), the selected words)``, nouns first.
    """
    banned = {w.lower() for w in exclude}
    nouns = [w for w in nouns if w.lower() not in banned]
    noun_set = set(nouns)
    adjectives = [w for w in adjectives if w.lower() not in banned and w not in noun_set]
    if not nouns and not adjectives:
        raise ConfigError("negative labels: the candidate word lists are empty (after dropping the ID class names)")
    feats = [encode(list(nouns), list(templates))] if nouns else []
    if adjectives:
        feats.append(encode(list(adjectives), list(adj_templates)))
    cand = F.normalize(torch.cat(feats).float(), dim=-1)
    kinds = [0] * len(nouns) + [1] * len(adjectives)
    idx = select_negative_labels(F.normalize(pos.float(), dim=-1).to(cand.device), cand, ratio=ratio,
                                 percentile=percentile, kinds=kinds, exclude_above=exclude_above)
    words = list(nouns) + list(adjectives)
    return cand[idx.to(cand.device)], [words[i] for i in idx.tolist()]
