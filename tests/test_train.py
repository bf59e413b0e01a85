"""The ``train`` / ``eval`` jobs end to end on a tiny generated image-folder dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from backmix_vlm.augment import build_mixer
from backmix_vlm.cli import main as cli
from backmix_vlm.engine.checkpoint import load_checkpoint
from backmix_vlm.errors import ConfigError
from backmix_vlm.ood.open_set import load_scores
from backmix_vlm.runners.train import load_train_config, resolve_sources, variant_configs

COLORS = {"red": 0, "green": 1, "blue": 2}


def make_image_folder(root: Path, per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """<root>/{train,test}/<class>/*.png (a coloured square per class) and <root>/ood/noise/*.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name, ch in COLORS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                x[4:12, 4:12, ch] = 255
                Image.fromarray(x).save(root / split / name / f"{i:03d}.png")
    (root / "ood" / "noise").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "ood" / "noise" / f"{i}.png")
    return root


def write_config(tmp: Path, **extra) -> Path:
    data_root = make_image_folder(tmp / "data")
    cfg = {
        "run": {"output_dir": str(tmp / "runs"), "name": "tiny", "device": "cpu"},
        "data": {"train": {"name": "imagefolder", "root": str(data_root), "split": "train"},
                 "test": {"name": "imagefolder", "root": str(data_root), "split": "test"},
                 "image_size": 16, "num_workers": 0, "mean": [0.5] * 3, "std": [0.25] * 3},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.05},
        "eval": {"ood": [{"name": "imagefolder", "root": str(data_root), "split": "ood", "label": "noise"}],
                 "scores": ["msp", "energy"], "num_workers": 0, "every": 1},
        **extra,
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_job_writes_every_artifact_and_resumes(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "run_info.json", "log.csv", "log.jsonl", "results.json", "results.md", "last.pt",
                 "scores.safetensors", "plots/backmix_grid.png", "plots/score_hist_noise.png"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run_info.json").read_text())
    assert info["job"] == "train" and info["command"][:2] == ["backmix-vlm", "train"]
    assert yaml.safe_load((run / "config.yaml").read_text())["augment"]["name"] == "backmix"

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"lr", "train_loss", "train_acc", "time", "test_acc", "auroc/noise/msp"} <= set(log[1])
    assert (run / "log.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss,train_acc,time")

    results = json.loads((run / "results.json").read_text())
    assert set(results["results"]["noise"]) == {"msp", "energy"}
    assert results["counts"] == {"known": 12, "noise": 6} and results["epochs"] == 2
    # the logged final metrics are the results' metrics
    assert log[-1]["auroc/noise/energy"] == pytest.approx(results["results"]["noise"]["energy"]["auroc"])
    assert log[-1]["test_acc"] == pytest.approx(results["acc"])

    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["bank"]["bank"].shape == (24, 4, 4)  # 24 images, 16 px / stride 4
    arrays, meta = load_scores(run / "scores.safetensors")
    assert meta["unknown_sets"] == ["noise"] and arrays["known::msp"].shape == (12,)
    assert arrays["unknown::noise::energy"].shape == (6,)

    # --resume on a finished run trains nothing and reproduces the results
    before = (run / "log.jsonl").read_text()
    assert cli(["train", str(cfg), "--resume"]) == 0
    assert (run / "log.jsonl").read_text() == before
    again = json.loads((run / "results.json").read_text())
    assert again["results"] == results["results"]

    # eval job: other scores on the same checkpoint, into a new folder; same msp numbers
    assert cli(["eval", str(run), "eval.scores=[msp,mahalanobis]"]) == 0
    (out,) = run.glob("eval-*")
    ev = json.loads((out / "results.json").read_text())
    assert set(ev["results"]["noise"]) == {"msp", "mahalanobis"}
    assert ev["results"]["noise"]["msp"] == results["results"]["noise"]["msp"]
    assert ev["acc"] == results["acc"]


def test_train_job_user_errors_exit_2(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli(["train", str(cfg), "augment.name=backmixx"]) == 2
    assert "augment.name: 'backmixx' is not accepted" in capsys.readouterr().err
    assert cli(["train", str(cfg), "optim.batch_size=0"]) == 2
    assert "override 'optim.batch_size=0': optim.batch_size: 0 is not accepted" in capsys.readouterr().err
    assert cli(["train", str(cfg), "run.name=fresh", "--resume"]) == 2
    assert "--resume: there is no run to resume at" in capsys.readouterr().err
    assert cli(["train", str(cfg), "eval.ood=[]"]) == 2
    assert "no unknown set" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no command above left a folder behind


def test_protocol_and_variants_resolve(tmp_path):
    cfg, data = load_train_config(None, ["data.train.name=demo", "data.test.name=demo", "data.protocol=cifar10",
                                         "variants={plain: [backmix.enabled=false], backmix: []}"])
    train, test, unknowns = resolve_sources(cfg)
    known, unknown = [0, 6, 4, 9, 1, 7], [2, 3, 5, 8]  # CIFAR-10 split 0 (ARPL), known order = label order
    assert train.classes == known and test.classes == known and train.split == "train"
    assert unknowns[0].classes == unknown and unknowns[0].split == "test" and unknowns[0].name == "demo"
    subs = variant_configs(cfg, data)
    assert [s.mixer for s in subs.values()] == ["none", "backmix"] and not subs["plain"].variants
    with pytest.raises(ConfigError, match="may not override run.name"):
        variant_configs(*load_train_config(None, ["variants={a: [run.name=x]}"]))
    with pytest.raises(ConfigError, match="data.protocol"):
        resolve_sources(load_train_config(None, ["data.protocol=cifar10", "data.train.classes=[0,1]"])[0])


def test_bf16_run_autocasts_on_cpu(tmp_path):
    """run.precision=bf16 really runs the convolutions in bfloat16 on CPU (via Accelerate)."""
    from backmix_vlm.config import OptimConfig, RunConfig
    from backmix_vlm.engine.tasks import ClassifierTask
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.models.cnn import create_cnn
    from test_resume import tiny_dataset

    model = create_cnn("small_cnn", 3, width=4)
    dtypes = []
    model.backbone[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = Trainer(ClassifierTask(model, 16), tiny_dataset(16), optim=OptimConfig(epochs=1, batch_size=8),
                      run=RunConfig(device="cpu", precision="bf16"), run_dir=tmp_path, num_classes=3,
                      mixer=build_mixer("backmix"))
    trainer.fit()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert trainer.bank.bank.dtype == torch.float32


@pytest.mark.parametrize("name", ["cnn/cifar10_osr_wrn40_4.yaml", "cnn/cifar10_osr_resnet18.yaml", "demo.yaml"])
def test_shipped_configs_load_with_the_paper_hyperparameters(name):
    from backmix_vlm.models.cnn import create_cnn

    cfg, _ = load_train_config(Path(__file__).resolve().parents[1] / "configs" / name)
    b, o = cfg.backmix, cfg.optim
    assert (b.cut_area, b.mask_ratio, b.momentum, b.mode) == (0.25, 0.25, 0.1, "alongside")
    assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.schedule) == ("sgd", 0.9, True, 5e-4, "cosine")
    assert cfg.data.protocol == "cifar10" and cfg.mixer == "backmix"
    if name.startswith("cnn/"):
        assert (o.lr, o.batch_size) == (0.1, 128)
    model = create_cnn(cfg.model.name, 6, **cfg.model.options)
    assert model.cam_size(cfg.data.image_size) in ((4, 4), (8, 8))
