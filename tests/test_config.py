"""Config loading: strict keys, typed conversion, overrides, run records."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml

from backmix_vlm.config import (
    BackMixConfig,
    DataSource,
    EvalConfig,
    OptimConfig,
    RunConfig,
    apply_overrides,
    load_config,
    to_dict,
)
from backmix_vlm.errors import ConfigError
from backmix_vlm.jobs.runs import make_run_dir, record_run


@dataclass
class _Job:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataSource = field(default_factory=DataSource)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backmix: BackMixConfig = field(default_factory=BackMixConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _write(tmp_path, data) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_load_nested_and_typed(tmp_path):
    path = _write(tmp_path, {
        "optim": {"lr": "1e-3", "epochs": 3},
        "eval": {"ood": ["cifar100", {"name": "mnist", "root": "/d", "jpeg_quality": 75}],
                 "scores": ["msp"]},
    })
    cfg = load_config(_Job, path)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.epochs == 3
    assert [s.name for s in cfg.eval.ood] == ["cifar100", "mnist"]
    assert cfg.eval.ood[1].jpeg_quality == 75 and cfg.eval.ood[1].root == "/d"
    assert cfg.backmix.cut_area == 0.25 and cfg.backmix.momentum == 0.1


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    path = _write(tmp_path, {"optim": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(_Job, path)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg and "cfg.yaml" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optimiser'.*did you mean 'optim'"):
        load_config(_Job, _write(tmp_path, {"optimiser": {}}))


def test_wrong_types_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="optim.epochs: expected an integer"):
        load_config(_Job, _write(tmp_path, {"optim": {"epochs": "ten"}}))
    with pytest.raises(ConfigError, match="backmix.enabled: expected true/false"):
        load_config(_Job, None, ["backmix.enabled=maybe"])
    with pytest.raises(ConfigError, match="run.seed: null is not allowed"):
        load_config(_Job, None, ["run.seed=null"])


def test_overrides_parse_yaml_values():
    cfg = load_config(_Job, None, ["optim.epochs=7", "eval.scores=[msp,energy]", "run.name=x",
                                   "data.classes=[0,1,2]", "data.max_samples=null"])
    assert cfg.optim.epochs == 7 and cfg.eval.scores == ["msp", "energy"]
    assert cfg.run.name == "x" and cfg.data.classes == [0, 1, 2] and cfg.data.max_samples is None
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["optim.epochs"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.nope'"):
        load_config(_Job, None, ["optim.nope=1"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_config(_Job, "/no/such.yaml")


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.5, "epochs": 2}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"_base_": "base.yaml", "optim": {"epochs": 9}}))
    cfg = load_config(_Job, child)
    assert cfg.optim.lr == 0.5 and cfg.optim.epochs == 9


def test_record_run_writes_resolved_config(tmp_path):
    cfg = load_config(_Job, None, ["optim.epochs=4"])
    run_dir = make_run_dir(tmp_path, "r1", "train")
    info = record_run(run_dir, cfg, "train", ["backmix-vlm", "train", "x.yaml"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == to_dict(cfg) and saved["optim"]["epochs"] == 4
    on_disk = json.loads((run_dir / "run_info.json").read_text())
    assert on_disk["backmix_vlm_version"] == info["backmix_vlm_version"]
    assert on_disk["command"] == ["backmix-vlm", "train", "x.yaml"]
    # the saved config loads back into the same object
    assert to_dict(load_config(_Job, run_dir / "config.yaml")) == to_dict(cfg)


def test_yaml_bare_no_stays_a_string(tmp_path):
    cfg = load_config(_Job, _write(tmp_path, {"run": {"precision": False}}), ["run.device=cpu"])
    assert cfg.run.precision == "no"
    assert load_config(_Job, None, ["run.precision=no"]).run.precision == "no"
