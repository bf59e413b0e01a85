"""One scoring pass (``ood.pipeline``): every set through the model once, every score's ``setup``
once, every (set, score)'s ``postprocess`` once; the metric table and ``scores.safetensors`` are
the same numbers.  Counted on the train-run / ``eval`` evaluator, the ``ood`` job's Evaluator and
the ``zeroshot`` job."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from backmix_vlm.config import EvalConfig
from backmix_vlm.models.output import ModelOutput
from backmix_vlm.ood import Evaluator, OpenSetEvaluator, ood_metrics
from backmix_vlm.ood.scores import SCORES
from backmix_vlm.ood.shards import Processes

SIZES = {"known": 20, "near": 12, "far": 9}
TRAIN, BATCH = 30, 8
NAMES = ["msp", "energy", "odin", "mahalanobis", "knn", "vim", "react", "ash_s", "gen", "featnorm"]
PARAMS = {"knn": {"k": 3}, "vim": {"dim": 4}, "odin": {"temperature": 10.0, "epsilon": 0.01}}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)
        self.batches = 0

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.batches += 1
        f = self.body(x)
        return ModelOutput(logits=self.fc(f), features=f)


class Images(Dataset):
    def __init__(self, n: int, seed: int, shift: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 4, 4, generator=g) + shift
        self.labels = torch.randint(0, 3, (n,), generator=g).tolist()
        self.classes = ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i], i


@pytest.fixture
def calls(monkeypatch):
    """(method, score name, id of the outputs it read) for every setup / postprocess / image_scores call."""
    seen: list[tuple[str, str, int]] = []

    def spy(method: str, fn):
        def wrapped(self, arg):
            seen.append((method, self.name, id(arg)))
            return fn(self, arg)
        return wrapped

    for name in SCORES.names():
        cls = SCORES.get(name)
        for method in ("setup", "postprocess", "image_scores"):
            monkeypatch.setattr(cls, method, spy(method, getattr(cls, method)))
    return seen


def _check_once(calls, names, n_sets):
    post = Counter((s, i) for m, s, i in calls if m == "postprocess")
    assert set(post.values()) == {1}, post                      # each (set, score) once
    assert Counter(s for s, _ in post) == {s: n_sets for s in names}
    assert Counter(s for m, s, _ in calls if m == "setup") == {s: 1 for s in names}


def test_trained_model_evaluator_scores_each_set_once(calls):
    model = Net().eval()
    sets = {name: Images(n, seed, shift=2.0 * (name != "known")) for seed, (name, n) in enumerate(SIZES.items())}
    cfg = EvalConfig(scores=NAMES, score_params=PARAMS, batch_size=BATCH, num_workers=0)
    ev = OpenSetEvaluator(sets["known"], {"near": sets["near"], "far": sets["far"]}, cfg, device="cpu",
                          fit_set=lambda: Images(TRAIN, 7))
    summary = ev(model, epoch=3)
    _check_once(calls, NAMES, 3)
    batches = {name: math.ceil(n / BATCH) for name, n in SIZES.items()}
    # ODIN: one call per batch of each evaluated set
    assert sum(1 for m, s, _ in calls if m == "image_scores") == sum(batches.values())
    # the model ran over each set once, plus ODIN's two forwards (gradient + perturbed) per batch
    assert model.batches == sum(batches.values()) + math.ceil(TRAIN / BATCH) + 2 * sum(batches.values())
    # the table is computed from the very numbers saved per sample
    ps, res = ev.per_sample, ev.result
    assert summary["test_acc"] == res["acc"] and res["epoch"] == 3
    assert res["table"] == cfg.table() == {"fpr95": "id_positive", "aupr": "step", "metrics": cfg.table_metrics}
    for ood in ("near", "far"):
        for s in NAMES:
            assert res["results"][ood][s] == ood_metrics(
                torch.from_numpy(ps[f"known::{s}"]), torch.from_numpy(ps[f"unknown::{ood}::{s}"]),
                known_preds=torch.from_numpy(ps["known::preds"]), known_labels=torch.from_numpy(ps["known::labels"]),
                unknown_preds=model(sets[ood].x).logits.argmax(-1)), (ood, s)


def test_ood_job_evaluator_scores_each_set_once(calls):
    sets = {name: Images(n, seed, shift=2.0 * (name != "known")) for seed, (name, n) in enumerate(SIZES.items())}
    table = EvalConfig(positive="unknown", table_aupr="both").table()
    ev = Evaluator(Net(), sets["known"], {"near": sets["near"], "far": sets["far"]}, train_data=Images(TRAIN, 7),
                   device="cpu", batch_size=BATCH, table=table)
    res = ev.run(NAMES, PARAMS)
    _check_once(calls, NAMES, 3)
    assert res["table"] == table and table["fpr95"] == "ood_positive"
    assert res["counts"] == {**SIZES, "train": TRAIN} and res["head"]["name"] == "fc"
    assert set(ev.per_sample) == {"known::labels", "known::preds", *(f"known::{s}" for s in NAMES),
                                  *(f"unknown::{o}::{s}" for o in ("near", "far") for s in NAMES)}


def test_zeroshot_job_scores_each_set_once(calls, tmp_path):
    from backmix_vlm.jobs.zeroshot import build_zeroshot_config
    from backmix_vlm.runners.zeroshot import run_zeroshot
    from backmix_vlm.ood.open_set import SCORES_FILE, load_scores

    names = ["mcm", "glmcm", "msp", "odin"]
    cfg = build_zeroshot_config({
        "run": {"output_dir": str(tmp_path), "name": "z", "device": "cpu"},
        "model": {"name": "backmix-tiny-clip", "pretrained": None},
        "data": {"name": "demo", "split": "test"},
        "eval": {"scores": names, "batch_size": 32, "num_workers": 0, "cache_features": False,
                 "ood": [{"name": "demo", "split": "ood-cifar100", "label": "c100"}], "table_fpr95": "both"}})
    res = run_zeroshot(cfg, tmp_path / "z")
    assert res["table"]["fpr95"] == "both"
    assert "| Score | AUROC | AUPR-In (step) | AUPR-Out (step) | FPR95 (ID+) ↓ | FPR95 (OOD+) ↓ |" in \
        (tmp_path / "z" / "results.md").read_text()
    _check_once(calls, names, 2)
    arrays, meta = load_scores(tmp_path / "z" / SCORES_FILE)  # the zero-shot job saves per-sample scores too
    assert meta["scores"] == names and meta["unknown_sets"] == ["c100"]
    assert res["results"]["c100"]["mcm"]["auroc"] == ood_metrics(
        torch.from_numpy(arrays["known::mcm"]), torch.from_numpy(arrays["unknown::c100::mcm"]))["auroc"]


@pytest.mark.parametrize("n,batch,world", [(20, 8, 2), (9, 4, 3), (3, 8, 2), (100, 7, 4), (1, 1, 2)])
def test_process_spans_are_whole_batches_in_order(n, batch, world):
    spans = [Processes(rank, world).span(n, batch) for rank in range(world)]
    assert [i for s in spans for i in s] == list(range(n))      # disjoint, complete, in dataset order
    for s in spans:
        assert len(s) == 0 or s.start % batch == 0               # each block starts at a batch boundary
        assert all(len(s) % batch == 0 for s in spans[:-1] if len(s))  # only the last block ends short


def test_setup_refuses_a_missing_input_and_config_names_what_a_job_lacks():
    from backmix_vlm.errors import ConfigError
    from backmix_vlm.ood.scores import ScoreSetup, build_scores, get_score

    with pytest.raises(ConfigError, match=r"knn.*\(train\)"):
        get_score("knn").setup(ScoreSetup())
    with pytest.raises(ConfigError, match="eval.scores: 'vim'"):
        build_scores(["msp", "vim"], offers=("forward", "text"), job="a zero-shot run")
    with pytest.raises(ConfigError, match="eval.scores: unknown score 'mps'"):
        build_scores(["mps"])
    with pytest.raises(ConfigError, match="eval.score_params.knn"):
        build_scores(["knn"], {"knn": {"kk": 3}})
