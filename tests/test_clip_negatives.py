"""CSP and AdaNeg against their authors' code (restated below, small and cited) on a random tiny
CLIP and synthetic embeddings; the shipped WordNet lists; the zero-shot job without a word list."""
from __future__ import annotations

import gzip
import json
import random
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backmix_vlm import cli
from backmix_vlm.data.wordnet import CSP_LEXNAMES, NEGLABEL_LEXNAMES, wordnet_lexnames, wordnet_pool, wordnet_words
from backmix_vlm.errors import ConfigError
from backmix_vlm.models.clip import TINY_CLIP, build_text_features, load_clip
from backmix_vlm.ood.adaneg import adaneg_scores, stream_indices
from backmix_vlm.ood.csp import CSP_ADJ_TEMPLATES, CSP_SUPERCLASS_TEMPLATES, conjugate, csp_text_features
from backmix_vlm.ood.evaluate import score_outputs
from backmix_vlm.ood.scores import get_score

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zeroshot" / "tiny_demo.yaml"
SMALL = ["noun.Tops", "noun.motive", "adj.ppl"]  # 50 + 41 + 60 words: seconds on the tiny CLIP


# ----------------------------------------------------------------------------- shipped word lists
def test_shipped_wordnet_lists():
    names = wordnet_lexnames()
    assert len(names) == 29 and {"noun.animal", "noun.food", "adj.all", "adj.pert", "adj.ppl"} <= set(names)
    nouns, adjs = wordnet_pool()  # NegLabel's default: the authors' 27 files (no noun.animal / noun.food)
    assert 55_000 < len(nouns) < 62_000 and 11_000 < len(adjs) < 14_000  # the paper's ~70 k words
    assert "sewing machine" in nouns and "dog" not in wordnet_words(["noun.artifact"])
    assert "dog" in wordnet_words(["noun.animal"]) and not set(nouns) & set(adjs)
    assert all(w == w.lower() and "_" not in w and not w.endswith(("(a)", "(p)", "(ip)")) for w in nouns + adjs)
    csp_nouns, csp_adjs = wordnet_pool(CSP_LEXNAMES)
    assert len(csp_nouns) < len(nouns) and "noun.person" in NEGLABEL_LEXNAMES and "noun.person" not in CSP_LEXNAMES
    lic = resources.files("backmix_vlm.data").joinpath("wordlists", "WORDNET_LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in lic
    raw = resources.files("backmix_vlm.data").joinpath("wordlists", "wordnet30.tsv.gz").read_bytes()
    assert len(raw) < 2_000_000 and gzip.decompress(raw).count(b"\n") == sum(len(wordnet_words([n])) for n in names)
    with pytest.raises(ConfigError, match="unknown WordNet lexicographer file.*noun.animals"):
        wordnet_pool(["noun.animals"])


# ----------------------------------------------------------------------------- CSP
def _csp_authors_pool(adjs, seed):
    """NeurIPS2024-CSP multi_modal.py: random.seed(seed); one random.choice(csp_templates) per adjective."""
    random.seed(seed)
    return [random.choice(list(CSP_SUPERCLASS_TEMPLATES)).format(a) for a in adjs]


def _csp_authors_select(pos, neg, noun_length, topk=0.15, pct=0.95, chunk=1000):
    """NeurIPS2024-CSP multi_modal.py (pos_neg_sim == 'neg_centroid'), restated: quantile, max > 0.95 -> 1."""
    neg_sim = []
    for i in range(0, neg.shape[0], chunk):
        tmp = neg[i:i + chunk] @ pos.T
        sim = torch.quantile(tmp, q=pct, dim=-1)
        sim[torch.max(tmp, dim=1)[0] > 0.95] = 1.0
        neg_sim.append(sim)
    neg_sim = torch.cat(neg_sim)
    ind_noun, ind_adj = torch.argsort(neg_sim[:noun_length]), torch.argsort(neg_sim[noun_length:])
    return torch.cat([neg[:noun_length][ind_noun[:int(len(ind_noun) * topk)]],
                      neg[noun_length:][ind_adj[:int(len(ind_adj) * topk)]]])


@pytest.mark.slow
def test_csp_matches_the_authors_selection_on_a_random_tiny_clip():
    torch.manual_seed(0)
    bundle = load_clip(TINY_CLIP, pretrained=None)
    classes = ["cat", "dog", "ship", "truck"]
    nouns, adjs = wordnet_pool(SMALL)
    noun_tpl = ["a photo of the nice {}.", "the {}"]

    memo = {}

    def encode(words, tpl):  # each (words, templates) encoded once: ours and the reference share the embeddings
        key = (tuple(words), tuple(tpl))
        if key not in memo:
            memo[key] = build_text_features(bundle, words, tpl)
        return memo[key]
    pos = encode(classes, noun_tpl)
    ours, words = csp_text_features(encode, pos, nouns, adjs, noun_templates=noun_tpl, ratio=0.2, seed=3)
    phrases = _csp_authors_pool(adjs, 3)
    assert conjugate(adjs, 3) == phrases and all(p.split(" ")[-1] in {t.split(" ")[-1] for t in CSP_SUPERCLASS_TEMPLATES}
                                                 for p in phrases)
    cand = F.normalize(torch.cat([encode(nouns, noun_tpl), encode(phrases, list(CSP_ADJ_TEMPLATES))]), dim=-1)
    ref = _csp_authors_select(pos, cand, len(nouns), topk=0.2)
    assert ours.shape == ref.shape == (int(len(nouns) * 0.2) + int(len(adjs) * 0.2), pos.shape[1])
    assert torch.allclose(ours, ref, atol=1e-6)
    assert set(words[int(len(nouns) * 0.2):]) <= set(phrases)


def test_exclude_above_hand_computed():
    from backmix_vlm.ood.neglabel import select_negative_labels

    pos = torch.eye(3)
    cand = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0.1, 1], [-1, -1, -1.0], [0.6, 0.6, 0.5]]), dim=-1)
    # medians of the ID similarities: 0 (x), 0.0995 (y), -0.577 (z), 0.6 (w); the largest of x (1) and of y
    # (0.995) exceed 0.95 -> both ranked with similarity 1, after w, ties in index order
    assert select_negative_labels(pos, cand, ratio=1.0, percentile=0.5).tolist() == [2, 0, 1, 3]
    assert select_negative_labels(pos, cand, ratio=1.0, percentile=0.5, exclude_above=0.95).tolist() == [2, 3, 0, 1]
    assert select_negative_labels(pos, cand, ratio=1.0, percentile=0.5, exclude_above=0.999).tolist() == [2, 1, 3, 0]


# ----------------------------------------------------------------------------- AdaNeg
def _adaneg_authors(image_batches, text, class_num, *, memory_size=10, thres=0.5, gap=0.5, lambda_val=0.1, beta=5,
                    group_num=5, samada=False, logit_scale=100.0):
    """YBZh/OpenOOD-VLM ttaprompt_postprocessor.py, TTAPromptPostprocessor_noadagap.postprocess (random_permute,
    in_score 'combine'), restated on the CPU over a list of batches; memory reset at the start."""
    feat_memory = torch.cat([text.unsqueeze(1), torch.zeros_like(text.unsqueeze(1)).repeat(1, memory_size, 1)], dim=1)
    indice_memory = torch.ones(text.size(0))
    entropy_memory = torch.zeros(feat_memory.size(0), feat_memory.size(1), dtype=text.dtype)

    def grouped(output):
        pos_logit, neg_logit = output[:, :class_num], output[:, class_num:]
        drop = neg_logit.size(1) % group_num
        if drop > 0:
            neg_logit = neg_logit[:, :-drop]
        torch.manual_seed(0)
        idx = torch.randperm(neg_logit.shape[1])
        neg_logit = neg_logit.T[idx].T.reshape(pos_logit.shape[0], group_num, -1)
        scores = [torch.cat([pos_logit, neg_logit[:, i, :]], dim=-1).softmax(dim=-1)[:, :class_num].sum(dim=-1)
                  for i in range(group_num)]
        return torch.stack(scores, dim=-1).mean(dim=-1)

    def store(active, logits, offset):
        _, pred_all = torch.max(logits, dim=1)
        prob = torch.softmax(logits, dim=1)
        for i in range(active.size(0)):
            if active[i].item():
                cate = pred_all[i].item() + offset
                ent = -(prob[i] * torch.log(prob[i] + 1e-8)).sum()
                if indice_memory[cate] == memory_size:
                    if (ent < entropy_memory[cate]).sum() == 0:
                        pass
                    else:
                        _, indice = torch.sort(entropy_memory[cate])
                        feat_memory[cate][indice[-1]] = image_features[i]
                        entropy_memory[cate][indice[-1]] = ent
                else:
                    feat_memory[cate][indice_memory[cate].long()] = image_features[i]
                    entropy_memory[cate][indice_memory[cate].long()] = ent
                    indice_memory[cate] += 1

    out = []
    for image_features in image_batches:
        output_vanilla = logit_scale * image_features @ text.t()
        conf_in_vanilla = grouped(output_vanilla)
        store(conf_in_vanilla > (thres + gap * (1 - thres)), output_vanilla[:, :class_num], 0)
        store(conf_in_vanilla < (thres - gap * thres), output_vanilla[:, class_num:], class_num)
        sim = torch.exp(-beta * (-(feat_memory @ image_features.t()) + 1))
        if samada:
            temp = sim.unsqueeze(0).transpose(0, -1) * feat_memory.unsqueeze(0)
            sa = temp.sum(2)
            sa = sa / sa.norm(dim=-1, keepdim=True)
        else:
            sa = feat_memory.mean(1)
            sa = sa / sa.norm(dim=-1, keepdim=True)
        output = logit_scale * (image_features.unsqueeze(1) * sa).sum(-1)
        out.append(grouped(output) + conf_in_vanilla * lambda_val)
    return torch.cat(out)


def _clustered_stream(seed=0, n=96, d=16, c=4, m=23):
    """ID images near their class text, OOD images near negative labels: the memory fills both ways."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c + m, d, generator=g, dtype=torch.float64), dim=-1)
    which = torch.randint(0, c + m, (n,), generator=g)
    imgs = F.normalize(text[which] + 0.35 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return imgs, text, c


@pytest.mark.parametrize("samada", [False, True])
def test_adaneg_matches_the_authors_postprocessor(samada, monkeypatch):
    from backmix_vlm.ood import adaneg

    imgs, text, c = _clustered_stream()
    writes, write = [], adaneg.AdaNegMemory.write

    def counted(self, label, image, entropy):
        writes.append((label, int(self.count[label])))
        return write(self, label, image, entropy)
    monkeypatch.setattr(adaneg.AdaNegMemory, "write", counted)
    ours = adaneg_scores(imgs, text[:c], text[c:], memory_size=3, batch_size=16, sample_adaptive=samada)
    # the stream exercises every path: ID writes, negative-label writes, replacements in full memories
    assert sum(lab < c for lab, _ in writes) > 20 and sum(lab >= c for lab, _ in writes) > 20
    assert sum(n == 3 for _, n in writes) > 20
    theirs = _adaneg_authors(list(imgs.split(16)), text, c, memory_size=3, samada=samada)
    assert torch.allclose(ours, theirs, atol=1e-10)
    vanilla = adaneg_scores(imgs, text[:c], text[c:], memory_size=3, batch_size=16, in_score="adaonly",
                            lambda_=0.0, thres=1.0, gap=1.0)  # nothing written: the text-only NegLabel share
    from backmix_vlm.ood.neglabel import neglabel_score
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(vanilla, neglabel_score(imgs @ text[:c].T, imgs @ text[c:].T, ngroup=5, permutation=perm))


def test_adaneg_stream_mix_and_order():
    k, u, flags = stream_indices(10, 4, ratio=1.0, seed=0)
    assert len(k) == 4 and len(u) == 4 and int(flags.sum()) == 4 and len(set(k.tolist())) == 4
    k2, u2, flags2 = stream_indices(10, 4, ratio=1.0, seed=0)
    assert torch.equal(k, k2) and torch.equal(flags, flags2)  # a fixed seed: the same stream
    k, u, flags = stream_indices(10, 4, ratio=None, order="known_first")
    assert len(k) == 10 and len(u) == 4 and flags.tolist() == [False] * 10 + [True] * 4
    k, u, flags = stream_indices(10, 40, ratio=2.0)
    assert (len(k), len(u)) == (10, 5)
    with pytest.raises(ConfigError, match="order"):
        stream_indices(3, 3, order="random")
    # through score_outputs: one stream per unknown set, the ratio in the results
    imgs, text, c = _clustered_stream(n=60)
    s = get_score("adaneg", ngroup=5, batch_size=8, memory_size=3, ratio_neg=1.0, percentile=0.5,
                  words=None)
    s.set_negatives(text[c:].float())
    s._pos = text[:c].float()
    known = {"features": imgs[:40].float(), "labels": torch.zeros(40, dtype=torch.long), "logits": imgs[:40] @ text[:c].T}
    unk = {"features": imgs[40:].float(), "logits": imgs[40:] @ text[:c].T}
    scored = score_outputs(known, {"u": unk}, [s, get_score("msp")])
    res = scored.results()
    assert res["streams"]["u"]["adaneg"]["ratio"] == "20:20" and "seed 0" in res["streams"]["u"]["adaneg"]["order"]
    arrays = scored.per_sample()
    assert "known::adaneg" not in arrays and arrays["stream::u::adaneg::known"].shape == (20,)
    assert scored.set_score_names == ["msp"]
    from backmix_vlm.report.tables import results_to_markdown
    assert "scored on a test stream of 20 known + 20 unknown samples (known:unknown 20:20), shuffled (seed 0)" \
        in results_to_markdown(res)
    with pytest.raises(ConfigError, match="test stream"):
        s.postprocess(known)


# ----------------------------------------------------------------------------- the zero-shot job
@pytest.mark.slow
def test_zeroshot_job_without_word_lists(tmp_path):
    params = "{" + ", ".join(f"{n}: {{lexnames: [{', '.join(SMALL)}], ngroup: 5}}" for n in ("neglabel", "csp", "adaneg")) + "}"
    rc = cli.main(["zeroshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r", "data.max_samples=24",
                   "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 16}]",
                   "eval.scores=[mcm, neglabel, csp, adaneg]", f"eval.score_params={params}"])
    assert rc == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(results["results"]["c100"]) == {"mcm", "neglabel", "csp", "adaneg"}
    assert results["streams"]["c100"]["adaneg"]["ratio"] == "16:16"
    rc = cli.main(["zeroshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r2", "data.max_samples=8",
                   "eval.scores=[csp]", "eval.score_params={csp: {lexnames: [noun.Tops], words: /x.txt}}"])
    assert rc == 2  # a word file and lexnames: one clear message


def test_configs_carry_the_authors_settings():
    from backmix_vlm.config import load_config
    from backmix_vlm.jobs.zeroshot import build_scores
    from backmix_vlm.ood.csp import CSP_NOUN_TEMPLATES
    from backmix_vlm.runners.zeroshot import ZeroShotConfig

    root = CONFIG.parents[1]
    csp_cfg = load_config(ZeroShotConfig, root / "imagenet" / "zeroshot" / "clip_vitb16_csp.yaml")
    assert list(csp_cfg.model.templates) == list(CSP_NOUN_TEMPLATES)
    csp = build_scores(csp_cfg.eval, None)[0]
    assert (csp.name, csp.ratio, csp.percentile, csp.exclude_above, csp.ngroup, csp.temperature) == \
        ("csp", 0.15, 0.95, 0.95, 100, 0.01)
    ada_cfg = load_config(ZeroShotConfig, root / "imagenet" / "zeroshot" / "clip_vitb16_adaneg.yaml")
    ada = build_scores(ada_cfg.eval, None)[0]
    assert (ada.memory_size, ada.thres, ada.gap, ada.lambda_, ada.ngroup, ada.batch_size, ada.sample_adaptive,
            ada.stream_ratio, ada.order) == (10, 0.5, 0.5, 0.1, 5, 256, False, 1.0, "shuffled")
    demo = load_config(ZeroShotConfig, root / "zeroshot" / "tiny_negatives.yaml")
    assert demo.eval.scores == ["mcm", "neglabel", "csp", "adaneg"]
