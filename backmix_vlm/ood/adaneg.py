"""AdaNeg (Zhang et al., NeurIPS 2024): test-time adaptive negative proxies for zero-shot CLIP OOD.

NegLabel's negative labels are text; the test images themselves tell more about what the
unknowns look like.  AdaNeg keeps a **memory**: one row per label (the C ID classes and the M
negative labels), each with its text embedding in slot 0 and up to ``memory_size - 1`` test
image features.  Per batch of the test stream (authors' ``TTAPromptPostprocessor_noadagap``,
YBZh/OpenOOD-VLM ``openood/postprocessors/ttaprompt_postprocessor.py``):

1. **vanilla score** ``s0``: NegLabel's grouped ID share on the text embeddings
   (``ngroup`` = 5 groups, permutation ``torch.randperm`` after ``torch.manual_seed(seed)``);
2. **memory write**: an image with ``s0 > thres + gap (1 - thres)`` (0.75) goes to the slot
   list of its predicted ID class, one with ``s0 < thres - gap thres`` (0.25) to its
   most similar negative label; a full list replaces its highest-entropy entry when the
   new image has a lower entropy (entropy of the softmax over the ID resp. negative logits);
3. **adaptive proxies**: per label, the normalised mean of its memory slots (empty slots are
   zero; the authors' final ImageNet setting) or, with ``sample_adaptive``, per image the
   slots weighted by ``exp(-beta (1 - cos))`` (the authors' ``samada``);
4. **score**: ``s = share(image . proxies) + lambda s0`` (``in_score: combine``).

The batch's own images are written before it is scored, exactly as in their code.  Defaults
are their ImageNet script's (``scripts/ood/adaneg/imagenet.sh``): memory 10, thres 0.5, gap
0.5, lambda 0.1, 5 groups, batch 256, τ = 0.01 (CLIP's logit scale 100); their ``beta=5.5``
is truncated by ``int()`` in their code, so the value in effect is 5 (ours).

**The stream**: scores depend on which images came before, so on the ID:OOD mix and the
order.  The authors shuffle the whole ID set together with each OOD set (ImageNet 50,000 :
10,000) with an unseeded shuffle and reset the memory per OOD set.  Here each OOD set gets its
own stream and a fresh memory; by default a **1:1** stream (``ratio`` = 1: the larger side
subsampled) in an order shuffled with ``stream_seed``; ``ratio: null`` uses every sample of
both sets (the authors' mix).  The stream's counts, ratio and order are in ``results.json``
(``streams``).  Negative labels: NegLabel's selection (:mod:`backmix_vlm.ood.neglabel`) on the
shipped WordNet pool; the authors load 10,000 pre-selected NegLabel labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .neglabel import neglabel_score
from .scores import NegLabel, _register

ORDERS = ("shuffled", "known_first", "unknown_first")


def stream_indices(n_known: int, n_unknown: int, *, ratio: float | None = 1.0, order: str = "shuffled",
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(known_idx, unknown_idx, is_unknown)``: which samples of each set form the stream, in stream order.

    ``ratio`` = known : unknown (1.0 = as many of each; the larger set is subsampled at random
    with ``seed``); None = all samples of both.  ``order``: ``shuffled`` (a ``seed``-ed
    permutation), ``known_first`` or ``unknown_first``.  Stream position ``t`` holds
    ``known_idx[j]`` or ``unknown_idx[j]``, ``j`` counting that set's samples so far.
    """
    if order not in ORDERS:
        raise ConfigError(f"adaneg order {order!r}; choose one of {', '.join(ORDERS)}")
    g = torch.Generator().manual_seed(int(seed))
    if ratio is None:
        nk, nu = n_known, n_unknown
    else:
        if not ratio > 0:
            raise ConfigError(f"adaneg ratio (known : unknown) must be > 0 or null (all samples), got {ratio!r}")
        nu = min(n_unknown, int(n_known / ratio))
        nk = min(n_known, max(1, round(ratio * nu)))
        nu = max(1, nu)
    known_idx = torch.randperm(n_known, generator=g)[:nk].sort().values if nk < n_known else torch.arange(n_known)
    unknown_idx = torch.randperm(n_unknown, generator=g)[:nu].sort().values if nu < n_unknown else torch.arange(n_unknown)
    flags = torch.cat([torch.zeros(nk, dtype=torch.bool), torch.ones(nu, dtype=torch.bool)])
    if order == "shuffled":
        flags = flags[torch.randperm(nk + nu, generator=g)]
    elif order == "unknown_first":
        flags = flags.flip(0)
    return known_idx, unknown_idx, flags


class AdaNegMemory:
    """The per-label memory of test image features (slot 0: the label's text embedding)."""

    def __init__(self, text: Tensor, num_id: int, memory_size: int = 10) -> None:
        n, d = text.shape
        self.num_id, self.size = int(num_id), int(memory_size)
        self.feat = torch.zeros(n, 1 + self.size, d, dtype=text.dtype)
        self.feat[:, 0] = text
        self.count = torch.ones(n, dtype=torch.long)
        self.entropy = torch.zeros(n, 1 + self.size, dtype=text.dtype)

    def write(self, label: int, image: Tensor, entropy: Tensor) -> None:
        c = self.count[label]
        if c == self.size:  # full: replace the highest-entropy entry if this one is more certain than any
            if (entropy < self.entropy[label]).sum() == 0:
                return
            slot = torch.sort(self.entropy[label]).indices[-1]
            self.feat[label, slot], self.entropy[label, slot] = image, entropy
        else:
            self.feat[label, c], self.entropy[label, c] = image, entropy
            self.count[label] += 1


def _entropy(logits: Tensor) -> Tensor:
    p = logits.softmax(dim=-1)
    return -(p * torch.log(p + 1e-8)).sum(dim=-1)


def adaneg_scores(images: Tensor, pos: Tensor, neg: Tensor, *, memory_size: int = 10, thres: float = 0.5,
                  gap: float = 0.5, lambda_: float = 0.1, beta: float = 5.0, ngroup: int = 5,
                  temperature: float = 0.01, batch_size: int = 256, sample_adaptive: bool = False,
                  seed: int = 0, in_score: str = "combine") -> Tensor:
    """AdaNeg scores of a test stream: ``images`` (N, D) in stream order; ID / negative text (C, D), (M, D).

    Everything unit-norm, float64 on the CPU.  Returns (N,) float64, higher = more likely known.
    """
    images = F.normalize(images.double().cpu(), dim=-1)
    pos, neg = F.normalize(pos.double().cpu(), dim=-1), F.normalize(neg.double().cpu(), dim=-1)
    c, m = pos.shape[0], neg.shape[0]
    if m < ngroup:
        raise ConfigError(f"adaneg: {m} negative labels cannot form {ngroup} groups; lower ngroup")
    text = torch.cat([pos, neg])
    mem = AdaNegMemory(text, c, memory_size)
    keep = m - m % ngroup
    perm = torch.randperm(keep, generator=torch.Generator().manual_seed(int(seed)))
    scale = 1.0 / temperature
    hi, lo = thres + gap * (1 - thres), thres - gap * thres
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        cos = x @ text.T                                                   # (B, C + M)
        s0 = neglabel_score(cos[:, :c], cos[:, c:], temperature=temperature, ngroup=ngroup, permutation=perm)
        id_logits, neg_logits = scale * cos[:, :c], scale * cos[:, c:]
        id_pred, neg_pred = id_logits.argmax(dim=1), neg_logits.argmax(dim=1)
        id_ent, neg_ent = _entropy(id_logits), _entropy(neg_logits)
        for j in torch.nonzero(s0 > hi).flatten().tolist():
            mem.write(int(id_pred[j]), x[j], id_ent[j])
        for j in torch.nonzero(s0 < lo).flatten().tolist():
            mem.write(c + int(neg_pred[j]), x[j], neg_ent[j])
        if sample_adaptive:
            w = torch.exp(-beta * (1 - torch.einsum("nld,bd->bnl", mem.feat, x)))      # (B, C + M, 1 + L)
            proxies = F.normalize(torch.einsum("bnl,nld->bnd", w, mem.feat), dim=-1)   # (B, C + M, D)
            cos_a = torch.einsum("bd,bnd->bn", x, proxies)
        else:
            cos_a = x @ F.normalize(mem.feat.mean(dim=1), dim=-1).T
        s = neglabel_score(cos_a[:, :c], cos_a[:, c:], temperature=temperature, ngroup=ngroup, permutation=perm)
        if in_score == "combine":
            out.append(s + lambda_ * s0)
        elif in_score == "adaonly":
            out.append(s)
        elif in_score == "multiply":
            out.append(s * s0)
        else:
            raise ConfigError(f"adaneg in_score {in_score!r}; choose combine, adaonly or multiply")
    return torch.cat(out)


@dataclass
class StreamScores:
    """One (unknown set, stream score): the stream's samples of each set and their scores."""

    known_index: Tensor
    known: Tensor
    unknown_index: Tensor
    unknown: Tensor
    info: dict[str, Any] = field(default_factory=dict)


@_register("adaneg")
class AdaNeg(NegLabel):
    """AdaNeg (Zhang et al. 2024): NegLabel + a memory of test features as adaptive negative /
    ID proxies (:mod:`backmix_vlm.ood.adaneg`).  A **stream** score: the zero-shot job scores each
    unknown set on its own ID + OOD stream (``ratio`` known : unknown, default 1:1; ``order``
    shuffled with ``stream_seed``), and reports the stream in ``results.json``.

    Negative labels: NegLabel's (``words`` / ``adjectives`` / ``lexnames``, ``ratio_neg`` kept
    at ``percentile``).  Memory / score parameters: the authors' ImageNet defaults.
    """

    stream = True
    requires = ("features",)

    def __init__(self, words: str | None = None, adjectives: str | None = None, lexnames: list[str] | None = None,
                 ratio_neg: float = 0.15, percentile: float = 0.95, memory_size: int = 10, thres: float = 0.5,
                 gap: float = 0.5, lambda_: float = 0.1, beta: float = 5.0, ngroup: int = 5,
                 temperature: float = 0.01, batch_size: int = 256, sample_adaptive: bool = False,
                 in_score: str = "combine", ratio: float | None = 1.0, order: str = "shuffled",
                 stream_seed: int = 0, seed: int = 0) -> None:
        super().__init__(words=words, adjectives=adjectives, lexnames=lexnames, ratio=ratio_neg,
                         percentile=percentile, temperature=temperature, ngroup=ngroup, seed=seed)
        for key, v in (("memory_size", memory_size), ("batch_size", batch_size)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ConfigError(f"adaneg {key} must be a positive integer, got {v!r}")
        if not 0 <= thres <= 1 or not 0 <= gap <= 1:
            raise ConfigError(f"adaneg thres and gap must be in [0, 1], got thres={thres!r}, gap={gap!r}")
        if in_score not in ("combine", "adaonly", "multiply"):
            raise ConfigError(f"adaneg in_score {in_score!r}; choose combine, adaonly or multiply")
        if order not in ORDERS:
            raise ConfigError(f"adaneg order {order!r}; choose one of {', '.join(ORDERS)}")
        if ratio is not None and not ratio > 0:
            raise ConfigError(f"adaneg ratio (known : unknown) must be > 0 or null (all samples), got {ratio!r}")
        self.memory_size, self.thres, self.gap = int(memory_size), float(thres), float(gap)
        self.lambda_, self.beta, self.batch_size = float(lambda_), float(beta), int(batch_size)
        self.sample_adaptive, self.in_score = bool(sample_adaptive), in_score
        self.stream_ratio = None if ratio is None else float(ratio)
        self.order, self.stream_seed = order, int(stream_seed)
        self._pos: Tensor | None = None

    def _setup(self, inputs: Any) -> None:
        super()._setup(inputs)
        self._pos = F.normalize(inputs.text.class_features.detach().float().cpu(), dim=-1)

    def postprocess(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raise ConfigError("score 'adaneg' scores a test stream (the known set mixed with one unknown set), not one "
                          "set: run it in the zero-shot job (or call score_stream(known, unknown))")

    def score_stream(self, known: Mapping[str, Tensor], unknown: Mapping[str, Tensor]) -> StreamScores:
        """Scores of the stream of ``known`` and ``unknown`` outputs (their ``features``)."""
        self.check(known, self.requires)
        self.check(unknown, self.requires)
        if self._neg is None or self._pos is None:
            raise ConfigError("score 'adaneg' has no labels: set it up with the zero-shot job's text encoder first")
        kf, uf = known["features"], unknown["features"]
        k_idx, u_idx, is_unknown = stream_indices(kf.shape[0], uf.shape[0], ratio=self.stream_ratio,
                                                  order=self.order, seed=self.stream_seed)
        stream = torch.empty(len(is_unknown), kf.shape[1], dtype=torch.float64)
        stream[~is_unknown] = kf[k_idx].double().cpu()
        stream[is_unknown] = uf[u_idx].double().cpu()
        s = adaneg_scores(stream, self._pos, self._neg, memory_size=self.memory_size, thres=self.thres,
                          gap=self.gap, lambda_=self.lambda_, beta=self.beta, ngroup=self.ngroup,
                          temperature=self.temperature, batch_size=self.batch_size,
                          sample_adaptive=self.sample_adaptive, seed=self.seed, in_score=self.in_score)
        nk, nu = len(k_idx), len(u_idx)
        order = f"shuffled (seed {self.stream_seed})" if self.order == "shuffled" else self.order
        info = {"known": nk, "unknown": nu, "ratio": f"{nk}:{nu}", "order": order,
                "batch_size": self.batch_size, "memory": "reset per unknown set"}
        return StreamScores(k_idx, s[~is_unknown].float(), u_idx, s[is_unknown].float(), info)
