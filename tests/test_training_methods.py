"""Training methods (engine/methods.py): each loss and score against the authors' formula or a hand
computation on shared small tensors, composition with mixers through MixResult, the OE outlier rule,
and each method trained end to end (with BackMix) through the train job."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backmix_vlm.augment.base import MixResult, alongside
from backmix_vlm.config import DataSource
from backmix_vlm.engine.methods import (ARPL, ARPLHead, LogitNorm, OutlierExposure, RotPred, arpl_logits,
                                        build_method, logitnorm_cross_entropy, rotations, uniform_cross_entropy)
from backmix_vlm.engine.tasks import ClassifierTask
from backmix_vlm.errors import ConfigError, RegistryError
from backmix_vlm.jobs.train import OUTLIER_FLAG, outlier_seen_sets
from backmix_vlm.models.cnn import create_cnn
from backmix_vlm.models.output import ModelOutput
from backmix_vlm.ood.scores import get_score, rotpred_score

torch.manual_seed(0)
LOGITS = torch.randn(6, 4) * 3          # shared small inputs
LABELS = torch.tensor([0, 1, 2, 3, 1, 0])


class _Task:
    """The task interface the methods use: ``loss`` (CE via MixResult), ``label_smoothing``, ``model``."""

    label_smoothing = 0.0

    def __init__(self, model=None):
        self.model = model

    def loss(self, output, mix):
        return mix.loss(output.logits)


# ----------------------------------------------------------------------------- LogitNorm
def test_logitnorm_hand_case_and_authors_formula():
    # logits (3, 4): norm 5 -> (0.6, 0.8) / 0.04 = (15, 20); CE at label 0 = log(1 + e^5)
    got = logitnorm_cross_entropy(torch.tensor([[3.0, 4.0]]), torch.tensor([0]), 0.04)
    assert got.item() == pytest.approx(math.log1p(math.exp(5.0)), rel=1e-5)
    # the authors' LogitNormLoss (common/loss_function.py), written out
    norms = torch.norm(LOGITS, p=2, dim=-1, keepdim=True) + 1e-7
    ref = F.cross_entropy(torch.div(LOGITS, norms) / 0.04, LABELS)
    method = LogitNorm()
    assert method.temperature == 0.04 and method.score == "msp"
    out = method.loss(_Task(), ModelOutput(logits=LOGITS), MixResult(LOGITS, LABELS))
    torch.testing.assert_close(out, ref)


def test_logitnorm_composes_with_a_mixer_per_sample_lambda():
    """A mixed batch keeps its λ-weighted labels under the method's criterion (composition done once)."""
    images = torch.zeros(3, 3, 2, 2)
    mixed = MixResult(images, LABELS[:3], LABELS[3:], lam=0.3)
    mix = alongside(images, LABELS[:3], mixed)          # 6 rows: originals (λ=1), mixed (λ=0.3)
    lam = torch.tensor([1, 1, 1, 0.3, 0.3, 0.3])
    a = logitnorm_cross_entropy(LOGITS, mix.labels_a, 0.1, reduction="none")
    b = logitnorm_cross_entropy(LOGITS, mix.labels_b, 0.1, reduction="none")
    got = LogitNorm(0.1).loss(_Task(), ModelOutput(logits=LOGITS), mix)
    torch.testing.assert_close(got, (lam * a + (1 - lam) * b).mean())


# ----------------------------------------------------------------------------- Outlier Exposure
def test_oe_uniform_term_and_weight():
    # uniform logits: CE(U, softmax) = log K
    assert uniform_cross_entropy(torch.zeros(2, 5)).item() == pytest.approx(math.log(5))
    out_logits = torch.randn(4, 4)
    explicit = -(out_logits.log_softmax(1).mean(1)).mean()            # -(1/K) sum_k log p_k
    torch.testing.assert_close(uniform_cross_entropy(out_logits), explicit)
    method = OutlierExposure()
    assert (method.weight, method.outlier_batch_ratio, method.score) == (0.5, 2.0, "msp")
    got = method.loss(_Task(), ModelOutput(logits=LOGITS), MixResult(LOGITS, LABELS), ModelOutput(logits=out_logits))
    # the authors' oe_scratch.py line, written out
    ref = F.cross_entropy(LOGITS, LABELS) + 0.5 * -(out_logits.mean(1) - torch.logsumexp(out_logits, dim=1)).mean()
    torch.testing.assert_close(got, ref)
    with pytest.raises(ConfigError, match="method.outliers"):
        method.extra_inputs(torch.zeros(2, 3, 4, 4), None)


def test_outlier_rule_flags_sets_of_the_outlier_source():
    outliers = DataSource(name="tinyimagenet", split="val")
    unknowns = [DataSource(name="tinyimagenet", split="test", label="TIN"), DataSource(name="cifar100", label="C100"),
                DataSource(name="tiny_imagenet", split="train", label="TIN-train")]
    assert outlier_seen_sets(outliers, unknowns) == ["TIN", "TIN-train"]
    assert outlier_seen_sets(None, unknowns) == []
    folder = DataSource(name="imagefolder", root="/a", split="ood")      # folders: the same root is the same source
    assert outlier_seen_sets(folder, [DataSource(name="imagefolder", root="/b", split="ood", label="B"),
                                      DataSource(name="imagefolder", root="/a", split="x", label="A")]) == ["A"]
    assert OUTLIER_FLAG == "outlier distribution seen in training"


# ----------------------------------------------------------------------------- RotPred
def test_rotpred_loss_is_class_ce_plus_rotation_ce_in_block_order():
    model = create_cnn("small_cnn", 4, width=4)
    method = RotPred()
    method.attach(model, 4)
    images = torch.randn(2, 3, 8, 8)
    rot = rotations(images)
    assert rot.shape[0] == 6 and torch.equal(rot[2:4], images.flip(2).flip(3))   # block 2 = 180 degrees
    feats = torch.randn(8, model.num_features)
    out, extra = ModelOutput(logits=LOGITS[:2], features=feats[:2]), ModelOutput(logits=LOGITS[2:], features=feats[2:])
    got = method.loss(_Task(model), out, MixResult(images, LABELS[:2]), extra)
    rot_logits = model.rotation_head(feats)
    ref = F.cross_entropy(LOGITS[:2], LABELS[:2]) + F.cross_entropy(rot_logits, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    torch.testing.assert_close(got, ref)


def test_rotpred_score_matches_openood_postprocessor():
    torch.manual_seed(1)
    model = create_cnn("small_cnn", 4, width=4).eval()
    RotPred().attach(model, 4)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        got = rotpred_score(model, model.rotation_head, x)
        # OpenOOD v1.5 RotPredPostprocessor, written out
        batch = torch.cat([x, torch.rot90(x, 1, [2, 3]), torch.rot90(x, 2, [2, 3]), torch.rot90(x, 3, [2, 3])])
        out = model(batch)
        logits, logits_rot = out.logits[:3], model.rotation_head(out.features)
        y_rot = torch.cat([torch.full((3,), k) for k in range(4)])
        uniform = torch.ones_like(logits) / logits.shape[1]
        cls_loss = F.kl_div(F.log_softmax(logits, dim=1), uniform, reduction="none").sum(dim=1)
        one_hot = torch.zeros_like(logits_rot).scatter_(1, y_rot.unsqueeze(1), 1)
        rot_loss = F.kl_div(F.log_softmax(logits_rot, dim=1), one_hot, reduction="none").sum(dim=1)
        ref = cls_loss - sum(torch.chunk(rot_loss, 4, dim=0)) / 4.0
    torch.testing.assert_close(got, ref)
    score = get_score("rotpred")
    assert score.uses == ("forward",)
    with pytest.raises(ConfigError, match="rotation_head"):
        score._forward = create_cnn("small_cnn", 4, width=4).eval()
        score.image_scores(x)


# ----------------------------------------------------------------------------- ARPL
def _authors_dist(features, centers, metric):
    """ARPL's loss/Dist.py forward (one center per class), written out."""
    if metric == "l2":
        f_2 = torch.sum(torch.pow(features, 2), dim=1, keepdim=True)
        c_2 = torch.sum(torch.pow(centers, 2), dim=1, keepdim=True)
        dist = f_2 - 2 * torch.matmul(features, centers.t()) + c_2.t()
        return dist / float(features.shape[1])
    return features.matmul(centers.t())


def test_arpl_logits_loss_and_cam_match_the_authors():
    torch.manual_seed(2)
    feats, points = torch.randn(6, 5), torch.randn(4, 5)
    ref_logits = _authors_dist(feats, points, "l2") - _authors_dist(feats, points, "dot")
    torch.testing.assert_close(arpl_logits(feats, points), ref_logits)

    model = create_cnn("small_cnn", 4, width=4)
    method = ARPL()
    method.attach(model, 4)
    head = model.head
    assert isinstance(head, ARPLHead) and head.points.shape == (4, model.num_features) and head.radius.item() == 0
    assert (method.weight_pl, method.temperature, method.score) == (0.1, 1.0, "maxlogit")
    f = torch.randn(6, model.num_features)
    logits = arpl_logits(f, head.points)
    got = method.loss(_Task(model), ModelOutput(logits=logits, features=f), MixResult(torch.zeros(6), LABELS))
    # ARPLoss.forward: CE(logits / temp) + weight_pl * MarginRankingLoss(radius, d, 1)
    d = (f - head.points[LABELS]).pow(2).mean(1)
    ref = F.cross_entropy(logits, LABELS) + 0.1 * nn.MarginRankingLoss(margin=1.0)(head.radius, d, torch.ones_like(d))
    torch.testing.assert_close(got, ref)
    # the CAM is the same function at every location; with a constant map it equals the logits
    fmap = f[:, :, None, None].expand(-1, -1, 3, 3)
    lg, cam = head(fmap)
    torch.testing.assert_close(lg, logits)
    torch.testing.assert_close(cam[..., 1, 2], logits)


def test_method_registry_and_options_are_checked():
    assert isinstance(build_method("logitnorm", {"temperature": 0.1}), LogitNorm)
    with pytest.raises(ConfigError, match="method.options: temp not accepted"):
        build_method("logitnorm", {"temp": 0.1})
    with pytest.raises(ConfigError, match="method.options.temperature"):
        build_method("logitnorm", {"temperature": 0})
    with pytest.raises(RegistryError, match="available: arpl, logitnorm, oe, plain, rotpred"):
        build_method("logit_norm")


# ----------------------------------------------------------------------------- through the train job
@pytest.mark.parametrize("name,options", [pytest.param("logitnorm", {}, marks=pytest.mark.slow),
                                          pytest.param("oe", {}, marks=pytest.mark.slow), ("rotpred", {}),
                                          pytest.param("arpl", {}, marks=pytest.mark.slow)])
def test_each_method_trains_with_backmix_through_the_train_job(tmp_path, image_folder, name, options):
    from conftest import train_config

    from backmix_vlm.cli import main
    from backmix_vlm.engine.checkpoint import load_checkpoint

    method = {"name": name, "options": options}
    if name == "oe":  # the OOD noise folder as outliers: the unknown set of the same source is flagged
        method["outliers"] = {"name": "imagefolder", "root": str(image_folder), "split": "ood"}
        method["options"] = {"outlier_batch_ratio": 0.5}
    cfg = train_config(tmp_path, image_folder, method=method, backmix={"enabled": True})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    res = json.loads((run / "results.json").read_text())
    intended = {"logitnorm": "msp", "oe": "msp", "rotpred": "rotpred", "arpl": "maxlogit"}[name]
    assert res["method"] == name and res["intended_score"] == intended and res["augment"] == "backmix"
    assert intended in json.dumps(res)
    state = load_checkpoint(run / "last.pt")["model"]
    if name == "rotpred":
        assert "rotation_head.weight" in state
    if name == "arpl":
        assert "head.points" in state and "head.radius" in state and "head.conv.weight" not in state
    if name == "oe":
        assert res["seen_in_training"] == {"noise": OUTLIER_FLAG}
    else:
        assert "seen_in_training" not in res
    # the eval job rebuilds the method's heads from the saved config
    assert main(["eval", str(run)]) == 0


def test_config_errors_name_the_method_key(tmp_path, image_folder):
    from conftest import train_config

    from backmix_vlm.cli import main

    cfg = train_config(tmp_path, image_folder, method={"name": "oe"})
    with pytest.raises(ConfigError, match="method.outliers: method oe needs an auxiliary outlier dataset"):
        main(["train", str(cfg), "--debug"])


# ----------------------------------------------------------------------------- exact resume, several processes
def _oe_trainer(run_dir):
    from test_resume import K, SIZE, rng_hungry_eval, tiny_dataset

    from backmix_vlm.augment import build_mixer
    from backmix_vlm.augment.geometry import build_views
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.trainer import Trainer

    torch.manual_seed(0)
    model = create_cnn("small_cnn", K, width=4)
    views = build_views("crop_flip", {"padding": 2}, (0.5,) * 3, (0.25,) * 3)
    return Trainer(ClassifierTask(model, SIZE), tiny_dataset(train_tf=False), optim=OptimConfig(epochs=2, batch_size=8,
                   lr=0.05), run=RunConfig(device="cpu", seed=3), run_dir=run_dir, num_classes=K,
                   mixer=build_mixer("backmix"), backmix=BackMixConfig(mode="alongside"), evaluate=rng_hungry_eval, eval_every=1, views=views,
                   method=OutlierExposure(outlier_batch_ratio=0.5), outliers=tiny_dataset(train_tf=False))


def test_oe_resume_is_bitwise_exact(tmp_path):
    """The outlier stream is a function of (seed, epoch, rank) and its view generator is checkpointed."""
    from test_resume import assert_same_state, strip_time

    full = _oe_trainer(tmp_path / "full")
    full.fit()
    _oe_trainer(tmp_path / "split").fit(stop_after=1)
    resumed = _oe_trainer(tmp_path / "split")
    resumed.fit(resume=True)
    assert_same_state(full, resumed)
    assert strip_time(full.history) == strip_time(resumed.history)


@pytest.mark.slow  # one torchrun launch of 2 processes, 4 variants: ~1-2 min on 2 busy cores
def test_every_method_with_backmix_on_two_processes(tmp_path, image_folder):
    """Each method as a variant of one train run on 2 processes: weights (heads included) and banks agree on
    both processes, and the results carry each method's intended score."""
    from conftest import train_config
    from test_ddp_jobs import assert_same_on_every_process, launch

    outliers = "{name: imagefolder, root: %s, split: ood}" % image_folder
    variants = {"logitnorm": ["method.name=logitnorm"], "rotpred": ["method.name=rotpred"],
                "arpl": ["method.name=arpl"],
                "oe": ["method.name=oe", f"method.outliers={outliers}", "method.options={outlier_batch_ratio: 0.75}"]}
    cfg = train_config(tmp_path, image_folder, optim={"epochs": 1, "batch_size": 8, "lr": 0.05}, variants=variants)
    launch(tmp_path, 2, ["train", str(cfg), f"run.output_dir={tmp_path / 'runs'}", "run.name=two"], probe="p")
    for name in variants:
        state = assert_same_on_every_process(tmp_path / "p", name)
        assert state["bank"] is not None
        res = json.loads((tmp_path / "runs" / "two" / name / "results.json").read_text())
        assert res["processes"] == 2 and res["method"] == name
    assert "rotation_head.weight" in assert_same_on_every_process(tmp_path / "p", "rotpred")["model"]
