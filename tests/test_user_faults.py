"""What a new user runs into: missing known classes, data_root for eval, environment faults
(disk full, read-only folders, non-finite values, config loops) as one line each, a corrupt test
image found before training, and the small things (progress without a TTY, leftovers)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from backmix_vlm.cli import main as cli
from conftest import train_config

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_folder(root: Path, per_class: int = 2) -> Path:
    """<root>/cifar10/{train,test}/<class>/*.png: CIFAR-10's class folders with a few tiny images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10:
            d = root / "cifar10" / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def protocol_config(tmp: Path, data_root: Path, **extra) -> Path:
    cfg = {"run": {"output_dir": str(tmp / "runs"), "name": "osr", "device": "cpu"}, "data_root": str(data_root),
           "data": {"train": {"name": "cifar10"}, "test": {"name": "cifar10", "split": "test"}, "protocol": "cifar10",
                    "image_size": 16, "num_workers": 0, "views": {"name": "none"}},
           "model": {"name": "small_cnn", "options": {"width": 4}},
           "optim": {"epochs": 1, "batch_size": 4}, "eval": {"scores": ["msp"], "num_workers": 0}, "plots": False,
           **extra}
    path = tmp / "osr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- known classes without images
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_known_class_missing_from_the_data_is_an_error_naming_it(tmp_path, capsys, split):
    root = cifar10_folder(tmp_path / "data")
    shutil.rmtree(root / "cifar10" / split / "truck")  # truck is known in split 0
    (root / "cifar10" / split / "horse").mkdir(exist_ok=True)
    for f in (root / "cifar10" / split / "horse").iterdir():
        f.unlink()  # an empty folder counts as missing too
    assert cli(["train", str(protocol_config(tmp_path, root))]) == 2
    err = capsys.readouterr().err
    assert f"data.{split}:" in err and "truck (label 3)" in err and "horse (label 5)" in err
    assert str(root / "cifar10") in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "osr").exists()


def test_an_unknown_class_missing_is_not_a_known_class_error(tmp_path, capsys):
    root = cifar10_folder(tmp_path / "data")
    shutil.rmtree(root / "cifar10" / "train" / "bird")  # unknown in split 0: never trained on
    assert cli(["train", str(protocol_config(tmp_path, root))]) == 0


# ----------------------------------------------------------------------------- eval data_root=
def test_eval_reads_from_the_data_root_given_on_the_command_line(tmp_path, image_folder, capsys):
    cfg = train_config(tmp_path, image_folder, data_root=str(image_folder))
    data = yaml.safe_load(cfg.read_text())
    for key in ("train", "test"):
        data["data"][key].pop("root")
    data["eval"]["ood"][0].pop("root")
    cfg.write_text(yaml.safe_dump(data))
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    moved = tmp_path / "moved"
    image_folder.rename(moved)
    capsys.readouterr()
    assert cli(["eval", str(run), f"data_root={moved}"]) == 0
    (out,) = run.glob("eval-*")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data_root"] == str(moved)
    assert {saved["data"]["train"]["root"], saved["data"]["test"]["root"], saved["eval"]["ood"][0]["root"]} == {
        str(moved)}
    assert cli(["eval", str(run)]) == 2  # the old root is gone: an error naming it, not a traceback
    err = capsys.readouterr().err
    assert str(image_folder) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- faults of the environment
def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("backmix-vlm")]
    assert len(lines) == 1, err
    return err


def _epochs(run: Path) -> int:
    from backmix_vlm.engine.checkpoint import load_checkpoint

    return int(load_checkpoint(run / "last.pt")["epoch"])


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(tmp_path, tiny_train_config, capsys,
                                                                         monkeypatch):
    import torch

    from backmix_vlm import atomic

    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):  # the second checkpoint meets a full disk, as torch reports it
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2176 vs 2064")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert cli(["train", str(tiny_train_config), "optim.epochs=3", "eval.every=0"]) == 2
    err = _one_line(capsys.readouterr().err)
    run = tmp_path / "runs" / "tiny"
    assert f"cannot write {run / 'last.pt'}: the disk is full (ENOSPC)" in err
    assert f"backmix-vlm train {run} --resume" in err
    assert _epochs(run) == 1 and not list(run.glob(".*.tmp"))
    assert json.loads((run / "run_info.json").read_text())["status"] == "failed"
    monkeypatch.setattr(torch, "save", real_save)
    assert cli(["train", str(run), "--resume"]) == 0 and _epochs(run) == 3


def test_read_only_folders_are_one_line_for_train_eval_and_visualize(tmp_path, tiny_train_config, capsys,
                                                                     monkeypatch):
    import errno
    import pathlib

    assert cli(["train", str(tiny_train_config)]) == 0
    run = tmp_path / "runs" / "tiny"
    capsys.readouterr()
    real_mkdir = pathlib.Path.mkdir

    def read_only_mkdir(self, *a, **k):  # the runs folder lives on a read-only file system
        if str(self).startswith(str(tmp_path / "runs")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    for args in (["train", str(tiny_train_config), "run.name=other"], ["eval", str(run)],
                 ["visualize", str(run)]):
        assert cli(args) == 2, args
        err = _one_line(capsys.readouterr().err)
        assert "the file system is read-only (EROFS)" in err and "write elsewhere" in err
    assert not (tmp_path / "runs" / "other").exists()
    with pytest.raises(OSError):
        cli(["eval", str(run), "--debug"])  # --debug: the traceback


def test_a_non_finite_loss_is_one_line_with_the_way_to_resume(tmp_path, tiny_train_config, capsys, monkeypatch):
    import torch

    from backmix_vlm.engine.trainer import Trainer

    real = Trainer.train_step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        return {**out, "loss": out["loss"] * float("nan")} if self.epoch == 1 else out

    monkeypatch.setattr(Trainer, "train_step", step)
    assert cli(["train", str(tiny_train_config), "optim.epochs=2"]) == 2
    err = _one_line(capsys.readouterr().err)
    run = tmp_path / "runs" / "tiny"
    assert "training loss became nan in epoch 2; lower optim.lr" in err
    assert f"backmix-vlm train {run} --resume optim.lr=<lower> --allow-changes" in err
    assert _epochs(run) == 1
    monkeypatch.setattr(Trainer, "train_step", real)
    assert cli(["train", str(run), "--resume", "optim.lr=0.01", "--allow-changes"]) == 0 and _epochs(run) == 2
    del torch


def test_config_loops_and_infinite_values_are_one_line(tmp_path, tiny_train_config, capsys):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    assert cli(["train", str(tmp_path / "a.yaml")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "_base_ loop" in err and "a.yaml -> " in err and "b.yaml" in err
    for value in (".inf", "-.inf", ".nan"):
        assert cli(["train", str(tiny_train_config), f"optim.lr={value}"]) == 2
        err = _one_line(capsys.readouterr().err)
        assert f"override 'optim.lr={value}'" in err and "finite" in err


def test_a_corrupt_test_image_fails_before_training(tmp_path, image_folder, capsys, monkeypatch):
    from backmix_vlm.engine.trainer import Trainer

    bad = image_folder / "test" / "red" / "000.png"
    bad.write_bytes(b"not a png")
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before checking the test set"))
    assert cli(["train", str(train_config(tmp_path, image_folder))]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(bad) in err and "on_corrupt: skip" in err


def test_the_last_epoch_is_saved_before_its_evaluation(tmp_path, tiny_train_config, capsys, monkeypatch):
    from backmix_vlm.errors import DataError
    from backmix_vlm.ood.open_set import OpenSetEvaluator

    def broken(self, *a, **k):
        raise DataError("cannot read image x.png")

    monkeypatch.setattr(OpenSetEvaluator, "__call__", broken)
    assert cli(["train", str(tiny_train_config), "optim.epochs=2"]) == 2
    run = tmp_path / "runs" / "tiny"
    assert _epochs(run) == 2 and "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ctrl-C inside a finalizer
def test_an_interrupt_raised_in_a_finalizer_reaches_the_main_thread(monkeypatch):
    """Python drops an exception raised in ``__del__`` ("Exception ignored in ..."); the CLI's hook
    delivers a KeyboardInterrupt dropped that way again, as a fresh Ctrl-C."""
    import sys
    import time

    from backmix_vlm import cli as cli_module
    from backmix_vlm.cli import _keep_interrupts

    monkeypatch.setattr(sys, "unraisablehook", lambda u: None)  # what Python would do: report and drop
    monkeypatch.setattr(cli_module, "_JOB_RUNNING", [True])     # as inside main(): a job is running
    _keep_interrupts()

    class Ctrl_C_Lands_In_Del:
        def __del__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Ctrl_C_Lands_In_Del()  # finalized at once; the interrupt is raised again in the main thread
        for _ in range(1000):  # interrupted within ~0.2 s (interrupt_main does not cut a blocking sleep short)
            time.sleep(0.01)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    _keep_interrupts()

    class Other:
        def __del__(self):
            raise ValueError("not an interrupt")

    Other()
    assert [u.exc_type for u in dropped] == [ValueError]  # other errors still go to the previous hook


def test_ctrl_c_in_a_data_loader_finalizer_stops_the_run_resumably(tmp_path, tiny_train_config, capsys, monkeypatch):
    """A Ctrl-C that landed while a loader iterator shut its workers down (its ``__del__``) was
    dropped by Python and the run went on to exit 0; now it stops with 130 and resumes."""
    import sys
    import time

    from torch.utils.data import dataloader

    run = tmp_path / "runs" / "tiny"
    fired = []

    def ctrl_c_while_finalizing(self):  # the user's Ctrl-C arrives inside the iterator's finalizer
        if not fired and (run / "last.pt").is_file():
            fired.append(True)
            raise KeyboardInterrupt

    next_batch = dataloader._SingleProcessDataLoaderIter.__next__

    def slow_next(self):  # after the Ctrl-C the batches take a while: the job is still running when it is re-delivered
        if fired:
            time.sleep(0.05)
        return next_batch(self)

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    monkeypatch.setattr(dataloader._SingleProcessDataLoaderIter, "__del__", ctrl_c_while_finalizing, raising=False)
    monkeypatch.setattr(dataloader._SingleProcessDataLoaderIter, "__next__", slow_next)
    assert cli(["train", str(tiny_train_config), "optim.epochs=4"]) == 130
    err = capsys.readouterr().err
    assert fired and "backmix-vlm train: interrupted" in err and "--resume" in err, err
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "interrupted" and _epochs(run) < 4
    assert cli(["train", str(run), "--resume"]) == 0
    assert _epochs(run) == 4 and json.loads((run / "run_info.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------- a full disk as a run starts
def test_a_full_disk_while_taking_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    import errno
    import io

    from backmix_vlm.jobs import runs

    class FullDisk(io.BytesIO):
        def close(self):  # the payload is flushed at close: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = runs.os.fdopen
    monkeypatch.setattr(runs.os, "fdopen", lambda fd, *a, **k: (runs.os.close(fd), FullDisk())[1])
    with pytest.raises(OSError):
        runs.RunLock(tmp_path).acquire(["me"])
    monkeypatch.setattr(runs.os, "fdopen", real_fdopen)
    assert not (tmp_path / runs.LOCK_FILE).exists()  # no 0-byte lock left behind


def test_a_full_disk_as_a_run_starts_leaves_no_stub_and_a_later_start_runs(tmp_path, tiny_train_config, capsys,
                                                                          monkeypatch):
    import errno

    from backmix_vlm.jobs import runs

    real_fsync = runs.os.fsync

    def full(fd):  # config.yaml, the first file a run writes, meets a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "fsync", full)
    assert cli(["train", str(tiny_train_config)]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no stub folder, no 0-byte lock
    monkeypatch.setattr(runs.os, "fsync", real_fsync)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / runs.LOCK_FILE).write_bytes(b"")  # what an older version left: a folder with a 0-byte lock
    assert cli(["train", str(tiny_train_config)]) == 0
    assert capsys.readouterr().err.count("taking over an unreadable lock") == 1
    assert json.loads((run / "run_info.json").read_text())["status"] == "finished" and not (run / runs.LOCK_FILE).exists()


# ----------------------------------------------------------------------------- a typo answers before torch loads
def _train_run_without_training(tmp: Path) -> Path:
    """A run folder as ``train`` leaves it (config.yaml + run_info.json), enough for ``eval`` to read its config."""
    from backmix_vlm.config import to_dict
    from backmix_vlm.jobs.train import load_train_config

    run = tmp / "run"
    run.mkdir()
    cfg, _ = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "run_info.json").write_text(json.dumps({"job": "train"}))
    return run


@pytest.mark.parametrize("job, target, override, message", [
    ("train", "configs/demo.yaml", "optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ("ood", "configs/ood/vits14_cifar10_probe.yaml", "eval.scroes=[msp]",
     "unknown config key 'eval.scroes' (did you mean 'scores'?)"),
    ("zeroshot", "configs/zeroshot/clip_vitb16_cifar10.yaml", "model.nmae=x",
     "unknown config key 'model.nmae' (did you mean 'name'?)"),
    ("ood", "configs/ood/vits14_cifar10_probe.yaml", "eval.batch_size=0", "eval.batch_size"),
    ("eval", None, "eval.scroes=[msp]", "unknown config key 'eval.scroes' (did you mean 'scores'?)"),
])
def test_a_config_typo_is_reported_without_importing_torch(tmp_path, job, target, override, message):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    target = str(_train_run_without_training(tmp_path)) if target is None else target
    code = (f"import sys; from backmix_vlm.cli import main; rc = main([{job!r}, {target!r}, {override!r}]); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert f"override '{override}': " in out.stderr and message in out.stderr, out.stderr


# ----------------------------------------------------------------------------- progress in a log file
def test_progress_without_a_terminal_prints_plain_lines(capsys):
    import io

    from backmix_vlm.runtime import progress

    log = io.StringIO()  # not a TTY
    assert list(progress(range(25), "CIFAR-100", lines=5, stream=log)) == list(range(25))
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == [f"  CIFAR-100: {i}/25 batches" for i in (5, 10, 15, 20)]
    assert lines[-1].startswith("  CIFAR-100: 25 batches in ")


def test_ood_job_reports_progress_per_set_into_a_log(tmp_path, image_folder, capsys):
    cfg = {"run": {"output_dir": str(tmp_path), "name": "r", "device": "cpu"},
           "model": {"source": "timm", "name": "test_resnet", "options": {"num_classes": 3}, "image_size": 16,
                     "mean": [0.5] * 3, "std": [0.25] * 3},
           "data": {"name": "imagefolder", "root": str(image_folder), "split": "test", "label": "ID"},
           "eval": {"batch_size": 4, "num_workers": 0, "scores": ["msp"],
                    "ood": [{"name": "imagefolder", "root": str(image_folder), "split": "ood", "label": "noise"}]},
           "plots": False}
    path = tmp_path / "ood.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["ood", str(path)]) == 0
    err = capsys.readouterr().err
    assert "  known: 3 batches in " in err and "  noise: 2 batches in " in err, err


# ----------------------------------------------------------------------------- figures at any number of panels
@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (3, (1, 3)), (4, (1, 4)), (9, (3, 4)), (12, (3, 4))])
def test_score_histograms_wrap_into_a_grid(tmp_path, n, shape):
    from backmix_vlm.report.plots import panel_grid, score_histograms

    assert panel_grid(n) == shape
    rng = np.random.default_rng(0)
    scores = {f"s{i}": rng.normal(size=50) for i in range(n)}
    path = score_histograms(tmp_path / "h.png", scores, {k: v - 1 for k, v in scores.items()}, set_name="x")
    width, height = Image.open(path).size
    assert width <= 4 * 3.6 * 110 + 1 and height <= (3.0 * shape[0] + 0.4) * 110 + 1  # 9 panels: ~1584 x 1034
    assert width / height < 5.0  # at most 4 panels a row (1584 x 330); one 9-panel strip was 3564 x 330 (10.8)


# ----------------------------------------------------------------------------- the README's own-loop snippet
def test_the_readme_own_loop_snippet_runs_as_written():
    """scripts/own_loop.py holds the README's lines verbatim, with a model, data and an optimizer."""
    import importlib.util
    import math

    repo = Path(__file__).resolve().parents[1]
    script = (repo / "scripts" / "own_loop.py").read_text()
    readme = (repo / "README.md").read_text()
    snippet = readme.split("### Using BackMix in your own loop")[1].split("```python")[1].split("```")[0]
    body = [line.strip() for line in snippet.splitlines() if line.strip() and not line.startswith("from ")]
    assert body and all(line in script for line in body)
    spec = importlib.util.spec_from_file_location("own_loop", repo / "scripts" / "own_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert math.isfinite(module.main(["--epochs", "1"]))
