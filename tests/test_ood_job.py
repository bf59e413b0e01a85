"""``backmix-vlm ood`` and ``backmix_vlm.ood.Evaluator`` on generated images (no /work/shared).

Models: a tiny timm model (with a head, headless + linear probe, weights from a local file),
a torchvision ResNet-18, a plain ``nn.Module`` given as ``module:attr`` (logits only: features
from a hook on the final layer, or from a named layer), and a ``train`` run directory.  Each
score the job writes is recomputed by hand from the model's own forward.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from torch import nn

from backmix_vlm import cli
from backmix_vlm.config import DataSource, EvalConfig
from backmix_vlm.data import build_dataset, build_transform
from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.jobs.ood import load_run_classifier
from backmix_vlm.models.classifier import FeatureClassifier, load_classifier
from backmix_vlm.models.heads import LinearHead, check_head, find_linear_head
from backmix_vlm.ood import Evaluator
from backmix_vlm.ood.open_set import SCORES_FILE, OpenSetEvaluator, load_scores

COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def _write_images(root: Path, split: str, n: int, seed: int, ood: bool = False) -> None:
    """Per class a dominant colour + noise (ID); grey stripes (OOD, one folder)."""
    rng = np.random.default_rng(seed)
    classes = ["stripes"] if ood else ["red", "green", "blue"]
    for c, name in enumerate(classes):
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if ood:
                img = np.zeros((32, 32, 3), np.uint8) + (np.arange(32)[:, None, None] % 8 < 4) * 200
            else:
                img = np.clip(np.array(COLORS[c]) + rng.normal(0, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood_data")
    _write_images(root / "id", "train", 12, 0)
    _write_images(root / "id", "test", 8, 1)
    _write_images(root / "far", "test", 16, 2, ood=True)
    return root


def _config(tmp: Path, data_root: Path, model: dict, **extra) -> Path:
    cfg = {
        "run": {"output_dir": str(tmp), "name": "r", "device": "cpu"},
        "model": model,
        "data": {"name": "imagefolder", "root": str(data_root / "id"), "split": "test", "label": "ID"},
        "train": {"name": "imagefolder", "root": str(data_root / "id"), "split": "train"},
        "eval": {"batch_size": 16, "num_workers": 0,
                 "ood": [{"name": "imagefolder", "root": str(data_root / "far"), "split": "test", "label": "far"}],
                 "scores": ["msp", "energy", "gen", "mahalanobis", "knn", "vim", "react", "ash_p", "ash_b", "ash_s"],
                 "score_params": {"knn": {"k": 3}, "vim": {"dim": 4}}},
        **extra,
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _images(data_root: Path, split: str, size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    ds = build_dataset(DataSource(name="imagefolder", root=str(data_root / "id"), split=split),
                       build_transform(size, False, mean, std))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.labels)


# ----------------------------------------------------------------------------- timm
def test_ood_job_timm_model_every_score_matches_its_own_forward(tmp_path, data_root):
    model_cfg = {"source": "timm", "name": "test_resnet", "options": {"num_classes": 3}, "image_size": 32}
    rc = cli.main(["ood", str(_config(tmp_path, data_root, model_cfg))])
    assert rc == 0
    run = tmp_path / "r"
    for f in ("results.md", "results.json", "summary.md", "config.yaml", "run_info.json", SCORES_FILE,
              "plots/score_hist_far.png"):
        assert (run / f).is_file(), f
    results = json.loads((run / "results.json").read_text())
    assert results["head"] == {"name": "fc", "classes": 3, "in_features": results["head"]["in_features"]}
    assert results["counts"] == {"known": 24, "far": 16, "train": 36} and results["probe"] is False
    assert set(results["results"]["far"]) == {"msp", "energy", "gen", "mahalanobis", "knn", "vim", "react",
                                              "ash_p", "ash_b", "ash_s"}
    arrays, _ = load_scores(run / SCORES_FILE)

    # the same model by hand: timm's forward_features -> forward_head(pre_logits) -> fc
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=3).eval()
    cfg = net.pretrained_cfg
    x, _ = _images(data_root, "test", 32, cfg["mean"], cfg["std"])
    with torch.no_grad():
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
        logits = net(x)
    assert torch.allclose(net.fc(feats), logits, atol=1e-5)
    assert np.allclose(arrays["known::energy"], torch.logsumexp(logits, -1).numpy(), atol=1e-4)
    xt, _ = _images(data_root, "train", 32, cfg["mean"], cfg["std"])
    with torch.no_grad():
        train_feats = net.forward_head(net.forward_features(xt), pre_logits=True)
    c = np.percentile(train_feats.numpy().reshape(-1), 90)
    react = torch.logsumexp(net.fc(feats.clamp(max=float(c))), -1).detach()
    assert np.allclose(arrays["known::react"], react.numpy(), atol=1e-4)
    md = (run / "results.md").read_text()
    assert "## far (unknown, n = 16)" in md and "| vim |" in md
    # a second run with other scores reads the cached outputs: no new forward pass, no new cache file
    cache = sorted((tmp_path / ".cache" / "features").iterdir())
    assert len(cache) == 3  # known, far, train
    mtimes = [p.stat().st_mtime_ns for p in cache]
    assert cli.main(["ood", str(tmp_path / "cfg.yaml"), "run.name=r2", "eval.scores=[energy, knn]",
                     "eval.score_params={knn: {k: 3}}"]) == 0
    assert sorted((tmp_path / ".cache" / "features").iterdir()) == cache
    assert [p.stat().st_mtime_ns for p in cache] == mtimes
    again, _ = load_scores(tmp_path / "r2" / SCORES_FILE)
    assert np.array_equal(again["known::energy"], arrays["known::energy"])


def test_timm_local_weights_file_headless_gets_a_linear_probe(tmp_path, data_root, monkeypatch):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = timm.create_model("test_vit", num_classes=0, img_size=32)
    weights = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))

    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub must not be contacted when a local file is given")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    loaded = load_classifier("timm", "test_vit", checkpoint=str(weights), image_size=32, options={"num_classes": 0})
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.model.net.state_dict()[k], v), k
    assert loaded.model.head_name is None and loaded.num_classes is None

    model_cfg = {"source": "timm", "name": "test_vit", "checkpoint": str(weights), "image_size": 32,
                 "options": {"num_classes": 0}}
    rc = cli.main(["ood", str(_config(tmp_path, data_root, model_cfg)), "eval.scores=[msp, energy, vim, ash_s, odin]",
                   "eval.score_params={vim: {dim: 4}}"])
    assert rc == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["probe"] is True and results["head"]["name"] == "linear_probe"
    assert results["probe_train_acc"] == 1.0  # three colours: linearly separable
    assert results["acc"] is not None and "odin" in results["results"]["far"]  # ODIN perturbs through the probe


# ----------------------------------------------------------------------------- plain nn.Module
TOY = textwrap.dedent('''
    import torch
    from torch import nn

    class Toy(nn.Module):
        """Returns logits only; the penultimate features are the classifier's input."""

        def __init__(self, num_classes=3, width=8):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
            self.classifier = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.classifier(self.body(x))

    def build(num_classes=3, width=8):
        torch.manual_seed(5)
        return Toy(num_classes, width)

    instance = build()
''')


@pytest.fixture()
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toy_ood_models.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_ood_models", None)
    import toy_ood_models

    return toy_ood_models


def test_plain_module_features_from_a_hook_equal_a_named_layer(toy_module):
    net = toy_module.build()
    x = torch.randn(5, 3, 16, 16)
    by_head = FeatureClassifier(net)(x)
    by_layer = FeatureClassifier(net, feature_layer="body.3")(x)
    with torch.no_grad():
        assert torch.allclose(by_head.features, net.body(x)) and torch.allclose(by_head.logits, net(x))
    assert torch.equal(by_head.features, by_layer.features)
    head = FeatureClassifier(net).linear_head()
    assert head.name == "classifier" and torch.allclose(head(by_head.features.detach()), by_head.logits.detach(), atol=1e-6)
    # features that are not the head's input are caught before any score uses them
    bad = {"features": torch.randn(5, 8), "logits": by_head.logits.detach()}
    with pytest.raises(ConfigError, match="not the input of that layer"):
        check_head(head, bad)
    # token tensors are refused with a hint
    from backmix_vlm.models.classifier import _pool

    with pytest.raises(ModelError, match=r"\(5, 4, 8\) tensor; features must be"):
        _pool(torch.randn(5, 4, 8), "layer 'blocks'")


def test_plain_module_job_and_python_api_agree(tmp_path, data_root, toy_module):
    model_cfg = {"source": "module", "name": "toy_ood_models:build", "options": {"width": 8}, "image_size": 32}
    rc = cli.main(["ood", str(_config(tmp_path, data_root, model_cfg)), "model.mean=[0.5,0.5,0.5]",
                   "model.std=[0.25,0.25,0.25]"])
    assert rc == 0
    job = json.loads((tmp_path / "r" / "results.json").read_text())
    assert job["head"]["name"] == "classifier"

    tf = build_transform(32, False, [0.5] * 3, [0.25] * 3)
    known = build_dataset(DataSource(name="imagefolder", root=str(data_root / "id"), split="test"), tf)
    train = build_dataset(DataSource(name="imagefolder", root=str(data_root / "id"), split="train"), tf)
    far = build_dataset(DataSource(name="imagefolder", root=str(data_root / "far"), split="test"), tf)
    ev = Evaluator(toy_module.build(width=8), known, {"far": far}, train_data=train, device="cpu", batch_size=8)
    api = ev.run(["msp", "energy", "gen", "mahalanobis", "knn", "vim", "react", "ash_p", "ash_b", "ash_s"],
                 {"knn": {"k": 3}, "vim": {"dim": 4}})
    for score, metrics in api["results"]["far"].items():
        assert metrics["auroc"] == pytest.approx(job["results"]["far"][score]["auroc"], abs=1e-9), score
    # a module instance works too, and the accuracy is the argmax of its own logits
    ev2 = Evaluator(toy_module.instance, known, {"far": far}, device="cpu")
    r2 = ev2.run(["msp"])
    x = torch.stack([known[i][0] for i in range(len(known))])
    with torch.no_grad():
        acc = (toy_module.instance(x).argmax(-1) == torch.tensor(known.labels)).double().mean().item()
    assert r2["acc"] == pytest.approx(acc)
    # under bf16 autocast the head check allows bf16 rounding of the logits
    r3 = Evaluator(toy_module.instance, known, {"far": far}, device="cpu", precision="bf16").run(
        ["ash_s", "react"], {"react": {"threshold": 1.0}})
    assert r3["head"]["name"] == "classifier"


def test_errors_are_clear(tmp_path, data_root, toy_module):
    with pytest.raises(ConfigError, match="'package.module:attr'"):
        load_classifier("module", "toy_ood_models.build")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_classifier("module", "toy_ood_models:nope")
    with pytest.raises(ConfigError, match="model.source: 'keras'"):
        load_classifier("keras", "x")
    with pytest.raises(ModelError, match="unknown timm model 'resnet_18'; similar: resnet18"):
        load_classifier("timm", "resnet_18")
    with pytest.raises(ConfigError, match="no layer named 'fc'.*named_modules"):
        load_classifier("module", "toy_ood_models:build", head_layer="fc")
    tf = build_transform(32, False, None, None)
    known = build_dataset(DataSource(name="imagefolder", root=str(data_root / "id"), split="test"), tf)
    far = build_dataset(DataSource(name="imagefolder", root=str(data_root / "far"), split="test"), tf)
    with pytest.raises(ConfigError, match="knn .*needs the ID training data"):
        Evaluator(toy_module.build(), known, {"far": far}, device="cpu").run(["msp", "knn"])
    headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match="no logits .*probe"):
        Evaluator(headless, known, {"far": far}, device="cpu", probe=False).run(["msp"])
    rc = cli.main(["ood", str(_config(tmp_path, data_root, {"source": "timm", "name": "test_resnet"})),
                   "eval.ood=[]"])
    assert rc == 2


# ----------------------------------------------------------------------------- torchvision + runs
def test_torchvision_model_head_is_fc(data_root):
    loaded = load_classifier("torchvision", "resnet18", options={"num_classes": 3}, image_size=32)
    assert loaded.model.head_name == "fc" and loaded.num_classes == 3 and loaded.mean == [0.485, 0.456, 0.406]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = loaded.model(x)
        assert torch.allclose(loaded.model.linear_head()(out.features), out.logits, atol=1e-5)
    with pytest.raises(ModelError, match="unknown torchvision model 'resnet_18'"):
        load_classifier("torchvision", "resnet_18")


def test_train_run_directory_and_openset_evaluator_head_scores(tmp_path, data_root):
    from backmix_vlm.engine.checkpoint import LAST, model_state_dict, save_checkpoint
    from backmix_vlm.models.cnn import create_cnn
    from backmix_vlm.runners.train import TrainConfig
    from backmix_vlm.jobs.runs import record_run

    cfg = TrainConfig()
    cfg.model.name, cfg.model.options = "small_cnn", {"width": 8}
    torch.manual_seed(0)
    net = create_cnn("small_cnn", 3, width=8).eval()
    run = tmp_path / "train_run"
    record_run(run, cfg, "train")
    save_checkpoint(run / LAST, {"model": model_state_dict(net), "epoch": 3, "meta": {"classes": ["r", "g", "b"]}})
    loaded = load_run_classifier(str(run))
    assert loaded.image_size == 32 and loaded.model.head_name == "head.conv" and loaded.classes == ["r", "g", "b"]
    head = find_linear_head(net)
    assert isinstance(head, LinearHead) and head.name == "head.conv"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert torch.allclose(head(out.features), out.logits, atol=1e-5)  # GAP then 1x1 conv = conv then GAP

    rc = cli.main(["ood", str(_config(tmp_path, data_root, {"source": "run", "name": str(run)}))])
    assert rc == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["head"]["name"] == "head.conv" and results["model"]["epoch"] == 3

    # the training-time evaluator hands the CAM head to ViM / ReAct / ASH as well
    tf = build_transform(32, False, list(cfg.data.mean), list(cfg.data.std))
    known = build_dataset(DataSource(name="imagefolder", root=str(data_root / "id"), split="test"), tf)
    train = build_dataset(DataSource(name="imagefolder", root=str(data_root / "id"), split="train"), tf)
    far = build_dataset(DataSource(name="imagefolder", root=str(data_root / "far"), split="test"), tf)
    ev = OpenSetEvaluator(known, {"far": far}, EvalConfig(scores=["vim", "react", "ash_s"], num_workers=0,
                                                          score_params={"vim": {"dim": 4}}),
                          device="cpu", fit_set=train)
    ev(net)
    for s in ("vim", "react", "ash_s"):
        assert ev.result["results"]["far"][s]["auroc"] == pytest.approx(results["results"]["far"][s]["auroc"]), s


def test_ood_summary_table_averages_and_marks_the_best():
    from backmix_vlm.report.tables import ood_summary_table

    res = {"results": {"A": {"msp": {"fpr95": 0.5, "auroc": 0.8}, "knn": {"fpr95": 0.3, "auroc": 0.7}},
                       "B": {"msp": {"fpr95": 0.7, "auroc": 0.6}, "knn": {"fpr95": 0.1, "auroc": 0.9}}}}
    md = ood_summary_table(res)
    assert ("| Score | A FPR95 (ID+) ↓ | A AUROC | B FPR95 (ID+) ↓ | B AUROC | Average FPR95 (ID+) ↓ "
            "| Average AUROC |") in md
    assert "| msp | 50.00 | **80.00** | 70.00 | 60.00 | 60.00 | 70.00 |" in md
    assert "| knn | **30.00** | 70.00 | **10.00** | **90.00** | **20.00** | **80.00** |" in md


# ----------------------------------------------------------------------------- run folders
def test_ood_run_folder_belongs_to_one_run(tmp_path, data_root, toy_module, capsys):
    """``ood`` plans and opens its folder like the other jobs: a finished run is never replaced
    without --overwrite, and a command that fails (bad model name, missing data) leaves nothing."""
    from backmix_vlm.jobs.runs import LOCK_FILE, read_run_info

    model_cfg = {"source": "module", "name": "toy_ood_models:build", "options": {"width": 8}, "image_size": 32}
    cfg = str(_config(tmp_path, data_root, model_cfg))
    fast = ["eval.scores=[msp, energy]", "eval.score_params={}", "plots=false"]
    assert cli.main(["ood", cfg, *fast]) == 0
    run = tmp_path / "r"
    info = read_run_info(run)
    assert info["job"] == "ood" and info["status"] == "finished" and not (run / LOCK_FILE).exists()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()

    assert cli.main(["ood", cfg, *fast, "eval.scores=[msp]"]) == 2  # same run.name: refused, nothing touched
    err = capsys.readouterr().err
    assert str(run) in err and "run.name" in err and "--overwrite" in err and "--resume" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    for bad in (["model.name=toy_ood_models:nope"], ["eval.ood=[{name: imagefolder, root: /no/such, label: x}]"]):
        assert cli.main(["ood", cfg, *fast, "run.name=fails", *bad]) == 2
        assert not (tmp_path / "fails").exists()  # no stub folder
        assert cli.main(["ood", cfg, *fast, *bad, "--overwrite"]) == 2  # preflight fails before the old run is touched
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    assert cli.main(["ood", cfg, *fast, "eval.scores=[msp]", "--overwrite"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert list(results["results"]["far"]) == ["msp"] and read_run_info(run)["status"] == "finished"


def test_random_weights_are_said_loudly_in_the_log_and_the_titles(tmp_path, data_root, capsys):
    """timm / torchvision without pretrained weights or a checkpoint evaluate a random initialisation:
    the command says so before and after, and the results' titles say it too."""
    model = {"source": "timm", "name": "test_resnet", "options": {"num_classes": 3}, "image_size": 32}
    cfg = str(_config(tmp_path, data_root, model))
    assert cli.main(["ood", cfg, "eval.scores=[msp]", "eval.score_params={}", "plots=false"]) == 0
    err = capsys.readouterr().err
    assert err.count("WARNING: test_resnet runs on RANDOM weights") == 2 and "model.checkpoint=" in err
    run = tmp_path / "r"
    assert "RANDOM WEIGHTS" in (run / "results.md").read_text().splitlines()[0]
    assert "RANDOM WEIGHTS" in (run / "summary.md").read_text().splitlines()[0]
    assert json.loads((run / "results.json").read_text())["weights"].startswith("random")
