"""NegLabel: hand-computed scores, the authors' selection + grouping (restated) on a random tiny CLIP,
and the zero-shot job with a generated word list."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backmix_vlm import cli
from backmix_vlm.errors import ConfigError
from backmix_vlm.models.clip import TINY_CLIP, build_text_features, load_clip
from backmix_vlm.ood.neglabel import load_words, neglabel_score, negative_text_features, select_negative_labels
from backmix_vlm.ood.scores import get_score

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zeroshot" / "tiny_demo.yaml"
SYLLABLES = ["ka", "lo", "mi", "ter", "bun", "sa", "rip", "vo", "den", "gul", "pha", "zon"]


def _words(n: int) -> list[str]:
    return ["".join(p) for p in itertools.islice(itertools.product(SYLLABLES, repeat=2), n)]


def test_score_hand_computed():
    pos, neg = torch.tensor([[0.3, 0.1]], dtype=torch.float64), torch.tensor([[0.2]], dtype=torch.float64)
    expected = (math.exp(3) + math.exp(1)) / (math.exp(3) + math.exp(1) + math.exp(2))
    assert neglabel_score(pos, neg, temperature=0.1, ngroup=1).item() == pytest.approx(expected, rel=1e-9)
    # two groups of two after dropping the 5th negative; permutation [3, 0, 2, 1] -> groups {3, 0}, {2, 1}
    neg5 = torch.tensor([[0.0, 0.1, 0.2, 0.3, 9.0]], dtype=torch.float64)
    ep = math.exp(3) + math.exp(1)

    def share(*cos):
        return ep / (ep + sum(math.exp(c / 0.1) for c in cos))
    got = neglabel_score(pos, neg5, temperature=0.1, ngroup=2, permutation=torch.tensor([3, 0, 2, 1]))
    assert got.item() == pytest.approx((share(0.3, 0.0) + share(0.2, 0.1)) / 2, rel=1e-9)


def _authors_select(pos, cand, kinds, ratio, pct):
    """XueJiang16/NegLabel multi_modal.py, restated: quantile over ID sims, argsort, per kind slice."""
    sim = torch.quantile(cand @ pos.T, q=pct, dim=-1)
    out = []
    for k in (0, 1):
        idx = torch.nonzero(torch.tensor(kinds) == k).squeeze(1)
        order = torch.argsort(sim[idx])
        out.append(cand[idx][order[0:int(len(order) * ratio)]])
    return torch.cat(out)


def _authors_score(pos, neg, ngroup, t=1.0):
    """XueJiang16/NegLabel clip_ood.py grouping (random_permute, seed 0), with 100 * cos logits; CPU RNG."""
    drop = neg.shape[1] % ngroup
    if drop > 0:
        neg = neg[:, :-drop]
    torch.manual_seed(0)
    idx = torch.randperm(neg.shape[1])
    negs = neg.T[idx].T.reshape(pos.shape[0], ngroup, -1)
    scores = []
    for i in range(ngroup):
        full = (torch.cat([pos, negs[:, i, :]], dim=-1) / t).softmax(dim=-1)
        scores.append(full[:, :pos.shape[1]].sum(dim=-1, keepdim=True))
    return torch.cat(scores, dim=-1).mean(dim=-1)


def test_agrees_with_the_authors_algorithm_on_a_random_tiny_clip():
    torch.manual_seed(0)
    bundle = load_clip(TINY_CLIP, pretrained=None)
    classes, templates = ["cat", "dog", "ship", "truck"], ["a photo of a {}."]
    pos = build_text_features(bundle, classes, templates)
    nouns, adjs = _words(120), [w + "ish" for w in _words(40)]

    def encode(words, tpl):
        return build_text_features(bundle, words, tpl)
    neg, words = negative_text_features(encode, pos, nouns, templates, adjectives=adjs, ratio=0.25, percentile=0.95)
    cand = torch.cat([encode(nouns, templates), encode(adjs, ["This is a {} photo"])])
    ref = _authors_select(pos, F.normalize(cand, dim=-1), [0] * 120 + [1] * 40, 0.25, 0.95)
    assert neg.shape == (30 + 10, pos.shape[1]) and len(words) == 40
    assert torch.allclose(neg, ref, atol=1e-6)
    # scores on random "image" embeddings, with the authors' 100 * cos logits and t = 1
    img = F.normalize(torch.randn(16, pos.shape[1], generator=torch.Generator().manual_seed(1)), dim=-1)
    ours = neglabel_score(img @ pos.T, img @ neg.T, temperature=0.01, ngroup=4, seed=0)
    theirs = _authors_score(100 * img @ pos.T, 100 * img @ neg.T, 4)
    assert torch.allclose(ours.float(), theirs, atol=1e-5)
    s = get_score("neglabel", ngroup=4)
    s.set_negatives(neg, words)
    out = {"cosine": img @ pos.T, "features": img * 3.0}  # the score normalises the image embedding
    assert torch.allclose(s.postprocess(out), theirs, atol=1e-5)


def test_selection_keeps_the_farthest_words_and_errors(tmp_path):
    pos = torch.eye(3)
    cand = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0.1, 1], [-1, -1, -1.0], [0.6, 0.6, 0.5]]), dim=-1)
    assert select_negative_labels(pos, cand, ratio=0.5, percentile=1.0).tolist() == [2, 3]  # max sims -0.58, 0.61 < 0.995, 1
    with pytest.raises(ConfigError, match="percentile must be in"):
        select_negative_labels(pos, cand, percentile=95)
    with pytest.raises(ConfigError, match="word list not found"):
        load_words(tmp_path / "missing.txt")
    f = tmp_path / "w.txt"
    f.write_text("# comment\napple\n\npear\napple\n")
    assert load_words(f) == ["apple", "pear"]
    with pytest.raises(ConfigError, match="no negative labels"):
        get_score("neglabel").postprocess({"cosine": torch.zeros(1, 2), "features": torch.ones(1, 3)})


def test_zeroshot_job_with_neglabel(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(_words(144)))
    rc = cli.main(["zeroshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r", "data.max_samples=40",
                   "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 40}]",
                   "eval.scores=[mcm, neglabel]",
                   f"eval.score_params={{neglabel: {{words: {words}, ngroup: 5}}}}"])
    assert rc == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(results["results"]["c100"]) == {"mcm", "neglabel"}
    assert "| neglabel |" in (tmp_path / "r" / "summary.md").read_text()  # FPR95 / AUROC + average table
    rc = cli.main(["zeroshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r2", "data.max_samples=8",
                   "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 8}]",
                   "eval.scores=[neglabel]", "eval.score_params={neglabel: {words: /no/such/words.txt}}"])
    assert rc == 2  # a missing word list: one clear message (no list at all = the shipped WordNet words)
