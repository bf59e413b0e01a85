"""``backmix-vlm zeroshot`` end to end with the tiny CLIP on the shipped demo images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from backmix_vlm import cli
from backmix_vlm.config import DataSource, load_config
from backmix_vlm.data import build_dataset
from backmix_vlm.errors import ConfigError
from backmix_vlm.models.clip import TINY_CLIP, ClipZeroShotClassifier, load_clip
from backmix_vlm.runners.zeroshot import DEFAULT_SCORES, ZeroShotConfig, build_scores

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zeroshot" / "tiny_demo.yaml"
N = 60  # samples per set: enough for non-trivial metrics, fast on 2 shared cores
SMALL = [f"data.max_samples={N}", f"eval.ood=[{{name: demo, split: ood-cifar100, label: c100, max_samples: {N}}}]"]


def _run(tmp_path: Path, *overrides: str, name: str = "r") -> tuple[int, Path]:
    rc = cli.main(["zeroshot", str(CONFIG), f"run.output_dir={tmp_path}", f"run.name={name}", *SMALL, *overrides])
    return rc, tmp_path / name


# ODIN rides along in the shared run (it needs the model; epsilon 0 makes it checkable)
ODIN = ["eval.scores=[mcm, glmcm, msp, maxlogit, energy, odin]",
        "eval.score_params={odin: {temperature: 10, epsilon: 0}}"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zs")
    rc, run_dir = _run(tmp, *ODIN)
    assert rc == 0
    return tmp, run_dir


def _reference(seed: int = 0):
    """Independent recomputation: same seed → same tiny CLIP → outputs by hand."""
    torch.manual_seed(seed)
    bundle = load_clip(TINY_CLIP, pretrained=None)
    known = build_dataset(DataSource(name="demo", split="test", max_samples=N), bundle.preprocess_eval)
    unknown = build_dataset(DataSource(name="demo", split="ood-cifar100", max_samples=N), bundle.preprocess_eval)
    clf = ClipZeroShotClassifier(bundle, known.classes, "simple")
    with torch.no_grad():
        k = clf(torch.stack([known[i][0] for i in range(len(known))]))
        u = clf(torch.stack([unknown[i][0] for i in range(len(unknown))]))
    return known, k, u


def test_run_writes_records_and_all_default_scores(demo_run):
    _, run_dir = demo_run
    for f in ("results.md", "results.json", "config.yaml", "run_info.json"):
        assert (run_dir / f).is_file(), f
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["results"]) == ["c100"]
    assert list(results["results"]["c100"]) == [*DEFAULT_SCORES, "odin"]
    assert results["counts"] == {"known": N, "c100": N}
    assert results["model"]["name"] == TINY_CLIP and results["model"]["pretrained"] is None
    md = (run_dir / "results.md").read_text()
    assert "ID accuracy" in md and "## c100" in md and "| glmcm |" in md
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["job"] == "zeroshot" and info["command"][:2] == ["backmix-vlm", "zeroshot"]
    # the recorded config reloads into the same typed config
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == TINY_CLIP and saved["data"]["max_samples"] == N
    cfg = load_config(ZeroShotConfig, run_dir / "config.yaml")
    assert cfg.eval.ood[0].label == "c100"


def test_results_match_an_independent_computation(demo_run):
    _, run_dir = demo_run
    results = json.loads((run_dir / "results.json").read_text())
    known, k, u = _reference()
    labels = torch.tensor(known.labels)
    assert results["acc"] == pytest.approx(float((k.logits.argmax(1) == labels).double().mean()))
    mcm_k, mcm_u = k.cosine.softmax(1).amax(1), u.cosine.softmax(1).amax(1)
    y = [1] * len(mcm_k) + [0] * len(mcm_u)
    auroc = roc_auc_score(y, torch.cat([mcm_k, mcm_u]).numpy())
    assert results["results"]["c100"]["mcm"]["auroc"] == pytest.approx(auroc, abs=1e-6)
    glmcm_k = mcm_k + k.local_cosine.softmax(-1).amax(-1).amax(-1)
    glmcm_u = mcm_u + u.local_cosine.softmax(-1).amax(-1).amax(-1)
    auroc = roc_auc_score(y, torch.cat([glmcm_k, glmcm_u]).numpy())
    assert results["results"]["c100"]["glmcm"]["auroc"] == pytest.approx(auroc, abs=1e-6)


def test_feature_cache_is_reused_with_identical_results(demo_run):
    tmp, run_dir = demo_run
    cache = sorted((tmp / ".cache" / "features").glob("*.safetensors"))
    assert len(cache) == 2  # known + one OOD set
    mtimes = [p.stat().st_mtime_ns for p in cache]
    rc, again = _run(tmp, *ODIN, name="again")
    assert rc == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp / ".cache" / "features").glob("*.safetensors"))] == mtimes
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((again / "results.json").read_text())
    assert a["results"] == b["results"] and a["acc"] == b["acc"]


def test_odin_runs_through_the_model(demo_run):
    # epsilon 0: ODIN = max softmax(logits / T), recomputed here from reference logits
    _, run_dir = demo_run
    results = json.loads((run_dir / "results.json").read_text())
    _, k, u = _reference()
    sk, su = (k.logits / 10).softmax(1).amax(1), (u.logits / 10).softmax(1).amax(1)
    auroc = roc_auc_score([1] * len(sk) + [0] * len(su), torch.cat([sk, su]).numpy())
    assert results["results"]["c100"]["odin"]["auroc"] == pytest.approx(auroc, abs=1e-6)


def test_no_cache_when_disabled(tmp_path):
    rc, _ = _run(tmp_path, "eval.scores=[msp]", "eval.cache_features=false")
    assert rc == 0 and not (tmp_path / ".cache").exists()


def test_odin_gets_clip_std_for_pixel_space_step():
    cfg = load_config(ZeroShotConfig, CONFIG, ["eval.scores=[odin, mcm]"])
    odin, mcm = build_scores(cfg.eval, (0.1, 0.2, 0.3))
    assert odin.std == (0.1, 0.2, 0.3) and mcm.name == "mcm"


@pytest.mark.parametrize("overrides, match", [
    (["eval.scores=[mahalanobis]"], "training features"),
    (["eval.ood=[]"], "at least one unknown"),
    (["model.templates=nonsense"], "model.templates"),
    (["model.precision=fp64"], "model.precision"),
    (["eval.score_params={energy: {temperature: 2}}", "eval.scores=[msp]"], "not in eval.scores"),
    (["eval.ood=[{name: demo, split: ood-cifar100, label: demo}]"], "distinct `label`"),
    (["run.eval_workers=-2"], "run.eval_workers"),
])
def test_config_errors_are_clear(tmp_path, overrides, match):
    from backmix_vlm.runners.zeroshot import run_zeroshot

    with pytest.raises(ConfigError, match=match):
        cfg = load_config(ZeroShotConfig, CONFIG, [f"run.output_dir={tmp_path}", *overrides])
        run_zeroshot(cfg, tmp_path)


def test_cli_unknown_model_is_one_line_error(tmp_path, capsys):
    rc, _ = _run(tmp_path, "model.name=ViT-B-61")
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown open_clip model 'ViT-B-61'" in err and "Traceback" not in err


def test_shipped_configs_load():
    cfg = load_config(ZeroShotConfig, CONFIG.parent / "clip_vitb16_cifar10.yaml")
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.templates) == ("ViT-B-16", "openai", "cifar_ensemble")
    assert cfg.eval.scores == DEFAULT_SCORES
    labels = [s.display_name for s in cfg.eval.ood]
    assert labels == ["CIFAR-100", "SVHN", "TIN-resize", "TIN-crop", "MNIST", "Fashion-MNIST"]
    assert [s.resize for s in cfg.eval.ood if s.name == "tinyimagenet"] == ["resize", "crop"]


@pytest.mark.slow
def test_compiled_image_tower_gives_the_same_results(tmp_path):
    # run.compile: the frozen image tower's forward under torch.compile (MCM and GL-MCM read the
    # pooled and the per-patch features, the latter through a hook on the last block), bf16 both
    common = ["run.precision=bf16", "eval.scores=[mcm, glmcm, msp]", "eval.cache_features=false"]
    rc_e, eager = _run(tmp_path, *common, name="eager")
    rc_c, compiled = _run(tmp_path, *common, "run.compile=true", name="compiled")
    assert rc_e == rc_c == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (eager, compiled))
    assert a["acc"] == pytest.approx(b["acc"], abs=1 / N + 1e-9)  # at most one flipped argmax
    for score in ("mcm", "glmcm", "msp"):
        assert a["results"]["c100"][score]["auroc"] == pytest.approx(b["results"]["c100"][score]["auroc"], abs=0.02)


@pytest.mark.slow
def test_compile_frozen_tower_keeps_names_and_outputs():
    from backmix_vlm.models.frozen import compile_frozen_tower, hold_frozen_in

    torch.manual_seed(0)
    bundle = load_clip(TINY_CLIP, pretrained=None)
    hold_frozen_in(bundle.model, torch.bfloat16)
    keys = list(bundle.model.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = bundle.model.encode_image(images).float()
        compile_frozen_tower(bundle.model)
        compile_frozen_tower(bundle.model)  # a second call does not wrap twice
        compiled = bundle.model.encode_image(images).float()
    assert list(bundle.model.state_dict()) == keys  # checkpoints and feature-cache fingerprints unchanged
    assert float(torch.nn.functional.cosine_similarity(eager, compiled).min()) > 0.999


def test_sharded_batches_equal_the_whole_batch_and_run_in_parallel_threads():
    # run.eval_workers: each shard of the batch runs the whole classifier (global + the hooked
    # local path) in a worker thread with one intra-op thread; outputs are joined along the batch
    import threading

    from backmix_vlm.models.frozen import ShardedForward, hold_frozen_in, shard_batches

    torch.manual_seed(0)
    bundle = load_clip(TINY_CLIP, pretrained=None)
    hold_frozen_in(bundle.model, torch.bfloat16)
    clf = ClipZeroShotClassifier(bundle, ["cat", "dog", "car"], "simple")
    images = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = clf(images)
    seen: set[str] = set()
    barrier: list[threading.Barrier] = []  # set for the parallel call: all 3 shards must be in flight at once

    def hook(*_):
        seen.add(threading.current_thread().name)
        if barrier:
            barrier[0].wait()

    handle = bundle.model.visual.transformer.resblocks[0].register_forward_pre_hook(hook)
    threads = torch.get_num_threads()
    try:
        assert shard_batches(clf, 3) is clf and isinstance(clf.forward, ShardedForward)
        shard_batches(clf, 3)  # a second call does not wrap twice
        assert clf.forward.forward.__self__ is clf
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for call in range(2):  # the first call runs its shards one after the other, the second in parallel
                if call == 1:
                    barrier.append(threading.Barrier(3, timeout=30))
                sharded = clf(images)
                for field in ("logits", "features", "cosine", "local_cosine", "local_logits"):
                    a, b = getattr(whole, field), getattr(sharded, field)
                    assert a.shape == b.shape and a.dtype == b.dtype, field
                    torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)  # bf16: other blockings for other batch sizes
                assert sharded.cam is None
        barrier.clear()
        assert len(seen) == 3 and all(n.startswith("backmix-shard") for n in seen)
        assert torch.get_num_threads() == threads  # restored
        seen.clear()
        clf(images[:4])  # graph recorded (grad mode): the wrapped forward, in this thread
        assert seen == {threading.current_thread().name}
    finally:
        handle.remove()
    with pytest.raises(ConfigError, match="eval_workers"):
        shard_batches(clf, -1)
