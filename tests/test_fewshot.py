"""``backmix-vlm fewshot`` end to end on the shipped demo images with tiny random models.

Numbers are meaningless (random weights); these tests check the real code paths: few-shot
splits, BackMix with attention-map banks (separate pass for CoOp, training backward for VPT,
patch-text similarity), evaluation, seed aggregation, config validation and resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backmix_vlm.augment.mask_bank import INIT_VALUE
from backmix_vlm.cli import main as cli_main
from backmix_vlm.engine.checkpoint import load_checkpoint
from backmix_vlm.errors import ConfigError
from backmix_vlm.runners.fewshot import load_fewshot_config, run_fewshot

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "tiny_demo.yaml"
FAST = ["data.shots=2", "optim.epochs=2", "optim.batch_size=10", "optim.warmup_epochs=0",
        "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 30}]",
        "data.test.max_samples=30", "eval.batch_size=30"]
TIMM_VPT = ["method.name=vpt", "method.options={num_tokens: 2}", "backbone.family=timm",
            "backbone.name=vit_tiny_patch16_224", "backbone.pretrained=null", "backbone.image_size=32",
            "backbone.options={patch_size: 8, depth: 2}", "eval.scores=[msp,energy,mahalanobis]"]


def _cfg(tmp_path, *extra):
    return load_fewshot_config(CONFIG, [f"run.output_dir={tmp_path}", "data.seeds=[1]", *FAST, *extra])


def _bank(run_dir: Path, seed: int = 1) -> torch.Tensor:
    return load_checkpoint(run_dir / f"seed{seed}" / "last.pt")["bank"]["bank"]


def test_coop_backmix_attention_bank_and_outputs(tmp_path):
    cfg = _cfg(tmp_path)
    agg = run_fewshot(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for f in ("results.md", "results.json", "table_v_row.md", "seed1/results.json", "seed1/last.pt",
              "seed1/log.csv", "seed1/scores.safetensors"):
        assert (run / f).is_file(), f
    assert set(agg["results"]["c100"]) == {"mcm", "glmcm", "msp", "energy"}
    res = json.loads((run / "seed1" / "results.json").read_text())
    assert res["num_train"] == 20 and res["trainable_parameters"] == 4 * 64  # "a photo of a" = 4 ctx tokens
    bank = _bank(run)
    assert bank.shape == (20, 4, 4)  # 2 shots x 10 classes, 32 px / patch 8
    # every image was a clean batch member at least once: every row moved off the uniform init
    assert bool((bank != INIT_VALUE).flatten(1).any(1).all())
    assert float(bank.min()) >= 0.0 and float(bank.max()) <= 1.0
    split = json.loads((tmp_path / "splits" / "demo_train_2shot_seed1.json").read_text())
    assert split["shots"] == 2 and len(split["indices"]) == 20


def test_vpt_timm_bank_from_training_backward(tmp_path):
    cfg = _cfg(tmp_path, *TIMM_VPT)
    run_fewshot(cfg, tmp_path / "vpt")
    bank = _bank(tmp_path / "vpt")
    assert bank.shape == (20, 4, 4)
    assert bool((bank != INIT_VALUE).flatten(1).any(1).all())
    res = json.loads((tmp_path / "vpt" / "seed1" / "results.json").read_text())
    # prompts (2 x 192) + linear head (192 x 10 + 10)
    assert res["trainable_parameters"] == 2 * 192 + 192 * 10 + 10
    assert "mahalanobis" in res["results"]["c100"]


def test_locoop_local_similarity_source(tmp_path):
    agg = run_fewshot(_cfg(tmp_path, "method.name=locoop", "saliency.source=local", "data.seeds=[1,2]"),
                      tmp_path / "lo")
    assert agg["num_seeds"] == 2 and agg["acc"]["n"] == 2
    assert bool((_bank(tmp_path / "lo", 2) != INIT_VALUE).any())


def test_plain_has_no_bank_and_same_split(tmp_path):
    run_fewshot(_cfg(tmp_path, "backmix.enabled=false"), tmp_path / "plain")
    assert load_checkpoint(tmp_path / "plain" / "seed1" / "last.pt")["bank"] is None


def test_cli_resume_skips_finished_seed(tmp_path, capsys):
    args = ["fewshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r", "data.seeds=[1]", *FAST]
    assert cli_main(args) == 0
    first = (tmp_path / "r" / "seed1" / "results.json").read_text()
    assert cli_main([*args[:1], "--resume", *args[1:]]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "r" / "seed1" / "results.json").read_text() == first
    assert (tmp_path / "r" / "config.yaml").is_file() and (tmp_path / "r" / "run_info.json").is_file()


def test_optim_defaults_follow_coop_schedule(tmp_path):
    one = load_fewshot_config(CONFIG, ["data.shots=1", "optim={}"])
    assert (one.optim.epochs, one.optim.lr, one.optim.batch_size, one.optim.warmup_epochs) == (50, 0.002, 32, 1)
    sixteen = load_fewshot_config(CONFIG, ["data.shots=16", "optim={}"])
    assert sixteen.optim.epochs == 200 and sixteen.optim.warmup_lr == 1e-5
    mine = load_fewshot_config(CONFIG, ["data.shots=16", "optim={epochs: 3}"])
    assert mine.optim.epochs == 3 and mine.optim.lr == 0.002
    full = load_fewshot_config(CONFIG, ["data.shots=full"])
    assert full.data.shots_per_class is None and full.setting_label == "Full-data"


@pytest.mark.parametrize("override, message", [
    ("data.shots=five", "data.shots: 'five' is not accepted"),
    ("data.shots=0", "data.shots: 0 is not accepted"),
    ("method.options={n_ctxx: 4}", "unknown config key 'method.options.n_ctxx'"),
    ("method.name=clipadapter", "method.name: 'clipadapter' is not accepted"),
    ("saliency.source=gradcam", "saliency.source: 'gradcam' is not accepted"),
    ("backbone.family=onnx", "backbone.family: 'onnx' is not accepted"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_fewshot_config(CONFIG, [override])


def test_timm_backbone_needs_vpt(tmp_path):
    with pytest.raises(ConfigError, match="needs a CLIP text tower"):
        run_fewshot(_cfg(tmp_path, "backbone.family=timm", "backbone.name=vit_tiny_patch16_224"), tmp_path / "x")


def test_eval_job_reproduces_fewshot_results(tmp_path, capsys):
    args = ["fewshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r", "data.seeds=[1]", *FAST]
    assert cli_main(args) == 0
    trained = json.loads((tmp_path / "r" / "seed1" / "results.json").read_text())
    assert cli_main(["eval", str(tmp_path / "r")]) == 0
    (evaluated,) = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("eval-*/seed1/results.json")]
    assert evaluated["acc"] == pytest.approx(trained["acc"], abs=1e-6)
    for score in ("mcm", "glmcm", "msp", "energy"):
        assert evaluated["results"]["c100"][score]["auroc"] == pytest.approx(
            trained["results"]["c100"][score]["auroc"], abs=1e-6)


def test_visualize_fewshot_run_draws_the_attention_bank(tmp_path, capsys):
    from PIL import Image

    args = ["fewshot", str(CONFIG), f"run.output_dir={tmp_path}", "run.name=v", "data.seeds=[1]", *FAST]
    assert cli_main(args) == 0
    assert cli_main(["visualize", str(tmp_path / "v"), "--num", "4"]) == 0
    grid = tmp_path / "v" / "seed1" / "plots" / "backmix_grid.png"
    width, height = Image.open(grid).size
    assert width > 0 and height >= width  # 4 rows (pairs) x 4 columns (TI, BI, mask, mixed)
    assert (tmp_path / "v" / "seed1" / "plots" / "score_hist_c100.png").is_file()


def test_extra_known_set_reports_its_accuracy(tmp_path):
    # the known test split again as an "extra known" set: the same images under the same transform
    # must give exactly the known accuracy (how bgshift's swapped-background split is reported)
    cfg = _cfg(tmp_path, "backmix.enabled=false",
               "eval.extra_known=[{name: demo, split: test, label: again, max_samples: 30}]")
    res = run_fewshot(cfg, tmp_path / "xk")
    seed = json.loads((tmp_path / "xk" / "seed1" / "results.json").read_text())
    assert seed["extra_known"]["again"]["acc"] == pytest.approx(seed["acc"], abs=1e-12)
    assert "acc/again" in (tmp_path / "xk" / "seed1" / "log.csv").read_text()
    assert res["num_seeds"] == 1


def test_label_mixing_augment_for_adapters(tmp_path):
    # augment.name picks the batch mixer for the fewshot job too (Cutout / CutMix baselines beside
    # BackMix): no bank, the method label says which mixer ran, and backmix.enabled=false still
    # means plain only for augment.name=backmix
    cfg = _cfg(tmp_path, *TIMM_VPT, "augment.name=cutmix", "augment.options={alpha: 1.0}")
    assert cfg.method_label == "VPT + CutMix"
    run_fewshot(cfg, tmp_path / "cm")
    assert load_checkpoint(tmp_path / "cm" / "seed1" / "last.pt")["bank"] is None
    res = json.loads((tmp_path / "cm" / "seed1" / "results.json").read_text())
    assert res["method"] == "VPT + CutMix"
    assert _cfg(tmp_path, "augment.name=cutout", "backmix.enabled=false").method_label == "CoOp + Cutout"
    assert _cfg(tmp_path, "backmix.enabled=false").method_label == "CoOp"
    with pytest.raises(ConfigError, match="augment.name"):
        _cfg(tmp_path, "augment.name=mosaic")
