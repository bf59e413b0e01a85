"""Errors that give the right advice: offline weights per job, non-checkpoint files, corrupt
images in loader workers, on_corrupt: skip, and up-front validation of every value."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from backmix_vlm.cli import main as cli
from backmix_vlm.config import DataSource, default_data_root, load_config
from backmix_vlm.data import build_dataset, check_dataset
from backmix_vlm.engine.checkpoint import load_checkpoint, save_checkpoint
from backmix_vlm.errors import ConfigError, DataError, ModelError, user_message
from backmix_vlm.models.clip import OFFLINE_ENV, load_clip, read_state_dict
from backmix_vlm.validation import check_range
from conftest import make_image_folder, train_config

REPO = Path(__file__).resolve().parents[1]
FEWSHOT_TINY = REPO / "configs" / "fewshot" / "tiny_demo.yaml"


# ----------------------------------------------------------------------------- offline advice per job
def test_offline_clip_advice_names_the_fewshot_keys(monkeypatch, tmp_path):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(ModelError) as info:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path), config_section="backbone")
    msg = str(info.value)
    assert "backbone.checkpoint=/path/to/file" in msg and "keep backbone.pretrained=openai" in msg
    assert "model.checkpoint" not in msg


def test_offline_fewshot_job_fails_fast_with_its_keys_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    args = ["fewshot", str(FEWSHOT_TINY), f"run.output_dir={tmp_path / 'runs'}", "backbone.name=ViT-B-16",
            "backbone.pretrained=openai", f"backbone.cache_dir={tmp_path / 'cache'}"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "backbone.checkpoint=/path/to/file" in err and "model.checkpoint" not in err
    assert not (tmp_path / "runs" / "fewshot-tiny-demo").exists()


def test_fewshot_timm_backbone_reads_a_local_file_given_as_pretrained(tmp_path, monkeypatch):
    """backbone.pretrained=/path/file.safetensors is read locally (never a hub lookup)."""
    import timm
    from safetensors.torch import save_file

    from backmix_vlm.models import vit as vit_mod
    from backmix_vlm.runners.fewshot import build_backbone, load_fewshot_config

    torch.manual_seed(0)
    opts = {"patch_size": 8, "depth": 2}
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **opts)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    monkeypatch.setattr(vit_mod, "_cached_weights", lambda name: pytest.fail("asked the hub/cache"))
    cfg = load_fewshot_config(FEWSHOT_TINY, ["method.name=vpt", "method.options={num_tokens: 2}", "backbone.family=timm",
                                             "backbone.name=vit_tiny_patch16_224", f"backbone.pretrained={path}",
                                             "backbone.image_size=32", "backbone.options={patch_size: 8, depth: 2}"])
    vit = build_backbone(cfg, "cpu").base
    assert torch.equal(vit.state_dict()["cls_token"], ref.state_dict()["cls_token"])


# ----------------------------------------------------------------------------- non-checkpoint files
@pytest.mark.parametrize("content", [b"hello world\n", b"", b"epoch: 3\n", bytes(range(256)) * 4])
def test_non_checkpoint_files_say_what_was_expected(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "expected a training checkpoint" in msg
    assert "KeyError" not in msg and "101" not in msg and "IndexError" not in msg


def test_checkpoint_without_model_weights_is_named(tmp_path):
    save_checkpoint(tmp_path / "x.pt", {"epoch": 1})
    with pytest.raises(ModelError, match="has no 'model' entry"):
        load_checkpoint(tmp_path / "x.pt", require=("model",))


def test_clip_and_timm_weights_that_are_not_weights_files(tmp_path):
    from backmix_vlm.models.vit import load_timm_vit

    bad = tmp_path / "weights.pt"
    bad.write_text("hello world\n")
    with pytest.raises(ModelError, match="not a torch or safetensors weights file") as info:
        read_state_dict(bad)
    assert "KeyError" not in str(info.value)
    with pytest.raises(ModelError, match="not a torch or safetensors weights file.*timm's key layout"):
        load_timm_vit("vit_tiny_patch16_224", pretrained=str(bad), img_size=32)


# ----------------------------------------------------------------------------- corrupt images
def _corrupt_folder(tmp_path: Path, n_bad: int = 1) -> tuple[Path, list[Path]]:
    root = make_image_folder(tmp_path / "data")
    bad = [root / "train" / "red" / f"{i:03d}.png" for i in range(n_bad)]
    for path in bad:
        path.write_bytes(b"this is not a png")
    return root, bad


def test_corrupt_image_in_a_loader_worker_reads_like_the_main_process(tmp_path):
    root, (bad,) = _corrupt_folder(tmp_path)
    ds = build_dataset(DataSource(name="imagefolder", root=str(root), split="train"))
    i = next(k for k in range(len(ds)) if str(bad) in ds.records.where(k))
    with pytest.raises(DataError) as main_error:
        ds[i]
    loader = DataLoader(torch.utils.data.Subset(ds, [i]), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as worker_error:
        next(iter(loader))
    assert "Original Traceback" in str(worker_error.value)  # what torch re-raises
    assert user_message(worker_error.value) == str(main_error.value)  # what the CLI prints
    assert user_message(main_error.value) == str(main_error.value)


def test_cli_prints_one_line_for_a_corrupt_image_in_a_worker(tmp_path, capsys):
    root, (bad,) = _corrupt_folder(tmp_path)
    cfg = train_config(tmp_path, root, data={**yaml.safe_load(train_config(tmp_path, root).read_text())["data"],
                                              "num_workers": 1})
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read image {bad}" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny").exists()  # failed before its first checkpoint: no stub


def test_on_corrupt_skip_reports_the_count_and_the_files(tmp_path):
    root, bad = _corrupt_folder(tmp_path, n_bad=2)
    with pytest.warns(UserWarning) as record:
        ds = build_dataset(DataSource(name="imagefolder", root=str(root), split="train", on_corrupt="skip"))
    (message,) = [str(w.message) for w in record if "unreadable" in str(w.message)]
    assert "skipped 2 unreadable image(s) of 24" in message
    assert all(str(p) in message for p in bad)
    assert len(ds) == 22 and sorted(ds.skipped_files) == sorted(str(p) for p in bad)


# ----------------------------------------------------------------------------- validation up front
@pytest.mark.parametrize("override, message", [
    ("backmix.mask_ratio=-0.1", "backmix.mask_ratio: -0.1 is not accepted; expected a number in [0, 1]"),
    ("backmix.cut_area=0", "backmix.cut_area: 0.0 is not accepted; expected a number in (0, 1]"),
    ("backmix.mode=mixed", "backmix.mode: 'mixed' is not accepted; choose one of alongside, mixed_only"),
    ("backmix.bank_update_every=0", "backmix.bank_update_every: 0 is not accepted"),
    ("optim.lr=-1", "optim.lr: -1.0 is not accepted; expected a number > 0"),
    ("optim.epochs=0", "optim.epochs: 0 is not accepted"),
    ("optim.momentum=1", "optim.momentum: 1.0 is not accepted; expected a number in [0, 1)"),
    ("optim.warmup_epochs=200", "optim.warmup_epochs: 200 is not accepted with epochs=200"),
    ("optim.grad_clip=0", "optim.grad_clip: 0.0 is not accepted; expected a number > 0 or null"),
    ("eval.batch_size=0", "eval.batch_size: 0 is not accepted"),
    ("eval.positive=ood", "eval.positive: 'ood' is not accepted"),
    ("run.device=gpu", "run.device: 'gpu' is not accepted; use auto, cpu, cuda or cuda:N"),
    ("run.precision=fp8", "run.precision: 'fp8' is not accepted"),
    ("run.name=a/b", "run.name: 'a/b' is not a usable folder name"),
    ("eval.ood=[{name: cifar100, on_corrupt: ignore}]", "eval.ood[0].on_corrupt: 'ignore' is not accepted"),
    ("data.train.jpeg_quality=0", "data.train.jpeg_quality: 0 is not accepted; expected a number in [1, 100]"),
    ("data.test.max_samples=0", "data.test.max_samples: 0 is not accepted"),
])
def test_out_of_range_values_fail_at_load_naming_the_override(override, message):
    from backmix_vlm.runners.train import load_train_config

    with pytest.raises(ConfigError) as info:
        load_train_config(None, ["optim.epochs=200", override])
    assert str(info.value).startswith(f"override '{override}': ") and message in str(info.value)


def test_the_blame_goes_to_the_file_when_the_file_is_wrong(tmp_path):
    from backmix_vlm.runners.train import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"backmix": {"mask_ratio": 2}}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: backmix.mask_ratio: 2.0 is not accepted")):
        load_train_config(path, ["optim.epochs=3"])
    with pytest.raises(ConfigError, match=re.escape("override 'optim.lrr=1': unknown config key 'optim.lrr'")):
        load_train_config(None, ["optim.epochs=3", "optim.lrr=1"])


def test_fewshot_and_zeroshot_check_names_and_data_up_front(tmp_path, capsys):
    zs = REPO / "configs" / "zeroshot" / "tiny_demo.yaml"
    cases = [
        (["zeroshot", str(zs), "model.name=ViT-B-61"], "unknown open_clip model 'ViT-B-61'"),
        (["zeroshot", str(zs), "eval.ood=[{name: cifar100, root: /no/such}]"], "eval.ood[0] (cifar100): dataset"),
        (["zeroshot", str(zs), "eval.scores=[mahalanobis]"], "must be fit on training features"),
        (["fewshot", str(FEWSHOT_TINY), "backbone.name=ViT-B-61"], "unknown open_clip model 'ViT-B-61'"),
        (["fewshot", str(FEWSHOT_TINY), "backbone.family=timm", "method.name=vpt", "method.options={}",
          "backbone.name=vit_nope"],
         "unknown timm model 'vit_nope'"),
        (["fewshot", str(FEWSHOT_TINY), "data.train={name: cifar10, root: /no/such}"], "data.train: dataset 'cifar10'"),
        (["fewshot", str(FEWSHOT_TINY), "eval.scores=[msp,nope]"], "nope"),
        (["fewshot", str(FEWSHOT_TINY), "data.seeds=[1,1]"], "data.seeds: [1, 1] repeats a seed"),
    ]
    for args, message in cases:
        assert cli([*args, f"run.output_dir={tmp_path / 'runs'}"]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    assert not (tmp_path / "runs").exists()


def test_check_range_rejects_nan_and_bools():
    for bad in (float("nan"), True, "1"):
        with pytest.raises(ConfigError):
            check_range(bad, "x", low=0)
    check_range(None, "x", low=0, allow_none=True)


# ----------------------------------------------------------------------------- data root
def test_data_root_defaults_to_the_environment_and_fills_every_source(monkeypatch, tmp_path):
    from backmix_vlm.runners.fewshot import load_fewshot_config
    from backmix_vlm.runners.zeroshot import ZeroShotConfig

    monkeypatch.setenv("BACKMIX_DATA", str(tmp_path / "env"))
    assert default_data_root() == str(tmp_path / "env")
    cfg = load_config(ZeroShotConfig, None, ["eval.ood=[cifar100, {name: svhn, root: /mine}]"])
    assert cfg.data_root == str(tmp_path / "env")
    assert [cfg.data.root, cfg.eval.ood[0].root, cfg.eval.ood[1].root] == [str(tmp_path / "env")] * 2 + ["/mine"]
    cfg = load_fewshot_config(REPO / "configs" / "fewshot" / "table_v" / "16shot_coop.yaml", ["data_root=/datasets"])
    assert {cfg.data.train.root, cfg.data.test.root, *(s.root for s in cfg.eval.ood)} == {"/datasets"}
    monkeypatch.delenv("BACKMIX_DATA")
    assert default_data_root() == "data"


def test_build_dataset_without_root_reads_the_data_root(monkeypatch, tmp_path):
    root = make_image_folder(tmp_path / "d")
    monkeypatch.setenv("BACKMIX_DATA", str(root))
    assert len(build_dataset(DataSource(name="imagefolder", split="test"))) == 12
    assert len(check_dataset(DataSource(name="imagefolder", split="test"))) == 12


def test_shipped_configs_hold_no_machine_paths_and_all_load():
    from backmix_vlm.config import load_yaml
    from backmix_vlm.runners.fewshot import load_fewshot_config
    from backmix_vlm.runners.train import load_train_config
    from backmix_vlm.runners.zeroshot import ZeroShotConfig

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        body = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments may mention examples
        assert "/tmp" not in text and "/work" not in text and "shared/" not in body, path
        assert not re.search(r"\broot:\s*[/~.]", body), path
        assert "checkpoint: null" in body or "checkpoint:" not in body, path
        if path.name.startswith("_"):
            continue
        parts = path.relative_to(REPO / "configs").parts
        job = parts[1] if parts[0] == "imagenet" else parts[0]
        if job == "bgshift":  # one benchmark, two jobs: the CNN (train) and VPT (fewshot, has a backbone)
            job = "fewshot" if "backbone" in load_yaml(path) else "train"
        if job == "zeroshot":
            cfg = load_config(ZeroShotConfig, path, ["data_root=/x"])
        elif job == "ood":
            from backmix_vlm.runners.ood import OodConfig

            cfg = load_config(OodConfig, path, ["data_root=/x"])
        elif job == "fewshot":
            cfg = load_fewshot_config(path, ["data_root=/x"])
        else:
            cfg = load_train_config(path, ["data_root=/x"])[0]
        roots = {s.root for s in _sources(cfg) if s.name != "demo"}
        assert roots <= {"/x"}, (path, roots)
        assert "data_root" not in load_yaml(path) or path.name == "tiny_real_shared.yaml"


def _sources(cfg):
    from dataclasses import fields, is_dataclass

    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, DataSource):
                out.append(item)
            elif is_dataclass(item):
                out += _sources(item)
    return out


def test_docs_name_no_path_of_our_machines():
    text = (REPO / "docs" / "data.md").read_text()
    assert "/work/" not in text and "/tmp/" not in text and "shared/" not in text
    readme = (REPO / "README.md").read_text()
    assert "python -m venv" in readme and "download.pytorch.org/whl/cpu" in readme
    assert 'pytest -m "not slow"' in readme and "configs/zeroshot/tiny_demo.yaml" in readme
    assert "scripts/prepare_data.py" in readme and json  # noqa: B018
