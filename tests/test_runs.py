"""Runs never lose work: one run per folder, locks, resume with the saved config, no stub
folders, records untouched by failing commands, shareable file modes."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backmix_vlm.cli import main as cli
from backmix_vlm.errors import RunDirError
from backmix_vlm.atomic import atomic_write_text
from backmix_vlm.jobs.runs import LOCK_FILE, RunLock, default_run_name, flatten, lock_is_stale, run_status
from conftest import train_config


def _records(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "run_info.json")}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def finished(tmp_path, tiny_train_config, capsys):
    """A finished 1-epoch train run at tmp/runs/tiny."""
    assert cli(["train", str(tiny_train_config)]) == 0
    capsys.readouterr()
    return tmp_path / "runs" / "tiny"


# ----------------------------------------------------------------------------- one run per folder
def test_finished_run_is_recorded_and_unlocked(finished):
    info = json.loads((finished / "run_info.json").read_text())
    assert info["status"] == "finished" and info["finished"] and info["host"] == socket.gethostname()
    assert run_status(finished) == "finished"
    assert not (finished / LOCK_FILE).exists()


def test_new_run_into_a_finished_run_refuses_and_touches_nothing(finished, tiny_train_config, capsys):
    before = _records(finished)
    assert cli(["train", str(tiny_train_config)]) == 2
    err = capsys.readouterr().err
    assert str(finished) in err and "--resume" in err and "run.name=" in err and "--overwrite" in err
    assert "finished train run" in err and "Traceback" not in err
    assert _records(finished) == before


def test_overwrite_replaces_the_old_run(finished, tiny_train_config, capsys):
    (finished / "marker.txt").write_text("old")
    started = json.loads((finished / "run_info.json").read_text())["started"]
    assert cli(["train", str(tiny_train_config), "--overwrite"]) == 0
    assert not (finished / "marker.txt").exists()
    info = json.loads((finished / "run_info.json").read_text())
    assert info["status"] == "finished" and "--overwrite" in info["command"]
    assert (finished / "last.pt").is_file() and info["started"] >= started


def _tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["nan", "crash", "interrupt"])
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(finished, tiny_train_config, capsys,
                                                                         monkeypatch, how):
    from backmix_vlm.engine.trainer import Trainer

    (finished / "marker.txt").write_text("old")
    before = _tree(finished)
    seen = {}

    def fail(self, *a, **k):  # while the new run trains, the old one is whole (set aside) and the new folder fresh
        seen["aside"] = [_tree(p) for p in finished.parent.glob(".tiny.replaced-*")]
        seen["new"] = sorted(p.name for p in finished.iterdir())
        raise KeyboardInterrupt if how == "interrupt" else RuntimeError("boom")

    extra = ["optim.lr=1e6"] if how == "nan" else []
    if how != "nan":
        monkeypatch.setattr(Trainer, "fit", fail)
    rc = cli(["train", str(tiny_train_config), "--overwrite", *extra]) if how != "crash" else None
    if how == "crash":
        with pytest.raises(RuntimeError):
            cli(["train", str(tiny_train_config), "--overwrite"])
    assert rc in (None, 2, 130)
    assert _tree(finished) == before  # nothing lost, nothing changed
    assert sorted(p.name for p in finished.parent.iterdir()) == ["tiny"]  # no aside, no stub left
    if how != "nan":
        assert seen["aside"] == [before] and seen["new"] == [LOCK_FILE, "config.yaml", "run_info.json"]


def test_an_interrupted_overwrite_is_reported(finished, tiny_train_config, capsys):
    aside = finished.parent / ".tiny.replaced-20260101-000000-1"
    aside.mkdir()
    assert cli(["train", str(tiny_train_config), "run.name=tiny", "--overwrite"]) == 0
    assert f"{aside} holds a run that an interrupted --overwrite" in capsys.readouterr().err
    assert aside.is_dir()


def test_folder_that_is_not_a_run_is_never_written(tmp_path, image_folder, capsys):
    cfg = train_config(tmp_path, image_folder)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert cli(["train", str(cfg), *extra]) == 2
        assert "is not a run directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "runs" / "tiny") == ["notes.txt"]


def test_default_run_names_never_collide(tmp_path):
    first = default_run_name(tmp_path, "train")
    (tmp_path / first).mkdir()
    second = default_run_name(tmp_path, "train")
    assert second != first and second.startswith(first)


# ----------------------------------------------------------------------------- failing commands
@pytest.mark.parametrize("override, message", [
    ("model.name=resnet99", "model: unknown cnn model 'resnet99'"),
    ("data.train.root=/no/such/folder", "data.train: dataset 'imagefolder' split 'train' not found"),
    ("backmix.mask_ratio=1.5", "override 'backmix.mask_ratio=1.5': backmix.mask_ratio: 1.5 is not accepted; "
                               "expected a number in [0, 1]"),
    ("optim.lr=0", "override 'optim.lr=0': optim.lr: 0.0 is not accepted; expected a number > 0"),
    ("eval.scores=[msp,nope]", "nope"),
])
def test_failing_command_leaves_no_folder_and_no_change(finished, tiny_train_config, capsys, override, message):
    before = _records(finished)
    # into a fresh name: nothing is created; over the finished run with --overwrite: nothing deleted
    for extra in (["run.name=other"], ["--overwrite"]):
        assert cli(["train", str(tiny_train_config), override, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err
    assert not (finished.parent / "other").exists()
    assert _records(finished) == before and (finished / "last.pt").is_file()


def test_every_variant_is_checked_before_the_first_one_trains(tmp_path, image_folder, capsys):
    cfg = train_config(tmp_path, image_folder, variants={"plain": ["backmix.enabled=false"],
                                                          "bad": ["data.test.root=/no/such/folder"]})
    assert cli(["train", str(cfg)]) == 2
    assert "variants.bad: data.test: dataset 'imagefolder' split 'test' not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    cfg = train_config(tmp_path, image_folder, variants={"a": [], "b": ["backmix.momentum=0"]})
    assert cli(["train", str(cfg)]) == 2
    assert "variants.b: backmix.momentum: 0.0 is not accepted" in capsys.readouterr().err


def test_error_in_the_file_names_the_file_not_an_override(tmp_path, image_folder, capsys):
    cfg = train_config(tmp_path, image_folder, optim={"epochs": 1, "batch_size": 8, "lr": -1})
    assert cli(["train", str(cfg), "optim.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: optim.lr: -1.0 is not accepted" in err and "override" not in err


def test_failure_before_the_first_checkpoint_removes_the_fresh_folder(tmp_path, image_folder, capsys, monkeypatch):
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.errors import DataError

    def broken(self, *a, **k):
        raise DataError("disk on fire")

    monkeypatch.setattr(Trainer, "fit", broken)
    cfg = train_config(tmp_path, image_folder, run={"output_dir": str(tmp_path / "new" / "runs"), "name": "x",
                                                    "device": "cpu"})
    assert cli(["train", str(cfg)]) == 2
    assert "disk on fire" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the run folder and the parents it created are gone


def test_failure_after_a_checkpoint_keeps_the_run_marked_failed(tmp_path, image_folder, capsys, monkeypatch):
    import backmix_vlm.report.tables as tables
    from backmix_vlm.errors import DataError

    def broken(*a, **k):
        raise DataError("results disk full")

    monkeypatch.setattr(tables, "write_results", broken)
    cfg = train_config(tmp_path, image_folder)
    assert cli(["train", str(cfg)]) == 2
    run = tmp_path / "runs" / "tiny"
    info = json.loads((run / "run_info.json").read_text())
    assert (run / "last.pt").is_file() and info["status"] == "failed" and "results disk full" in info["error"]
    assert run_status(run) == "failed" and not (run / LOCK_FILE).exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert cli(["train", str(cfg)]) == 2  # still a run: a new one refuses
    assert "a failed train run" in capsys.readouterr().err
    assert cli(["train", str(cfg), "--resume"]) == 0  # and --resume finishes it
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["resumed"][-1]["status"] == "finished"


# ----------------------------------------------------------------------------- locks
def test_a_live_lock_refuses_a_second_writer(finished, tiny_train_config, capsys):
    before = _records(finished)
    lock = {"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier", "command": ["other"]}
    (finished / LOCK_FILE).write_text(json.dumps(lock))
    assert cli(["train", str(tiny_train_config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getppid()}" in err and "another process" in err
    assert cli(["train", str(tiny_train_config), "--overwrite"]) == 2
    assert "another process" in capsys.readouterr().err
    assert _records(finished) == before and json.loads((finished / LOCK_FILE).read_text()) == lock


def test_a_stale_lock_is_reported_and_taken_over(finished, tiny_train_config, capsys):
    lock = {"pid": _dead_pid(), "host": socket.gethostname(), "since": "earlier", "command": ["crashed"]}
    assert lock_is_stale(lock)
    (finished / LOCK_FILE).write_text(json.dumps(lock))
    leftover = finished / ".last.pt.abc123.tmp"  # what a kill -9 during a checkpoint write leaves
    leftover.write_bytes(b"half")
    assert cli(["train", str(tiny_train_config), "--resume"]) == 0
    assert capsys.readouterr().err.count(f"taking over a stale lock: PID {lock['pid']}") == 1  # said once
    assert not (finished / LOCK_FILE).exists() and not leftover.exists()


@pytest.mark.parametrize("num", ["0", "-3", "x"])
def test_visualize_num_must_be_positive(finished, capsys, num):
    with pytest.raises(SystemExit) as info:
        cli(["visualize", str(finished), "--num", num])
    assert info.value.code == 2 and "--num" in capsys.readouterr().err
    assert not (finished / "plots").exists()


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(RunDirError, match=rf"host elsewhere.*delete {run / LOCK_FILE}"):
        RunLock(run).acquire()
    (run / LOCK_FILE).unlink()
    lock = RunLock(run).acquire(["me"])
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_running_status_without_its_process_reads_interrupted(finished):
    info = json.loads((finished / "run_info.json").read_text())
    (finished / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
    assert run_status(finished) == "interrupted"
    (finished / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert run_status(finished) == "running"


# ----------------------------------------------------------------------------- resume
def test_resume_anywhere_on_the_command_line_and_by_folder(finished, tiny_train_config, capsys):
    log = (finished / "log.jsonl").read_text()
    assert cli(["train", "--resume", str(tiny_train_config)]) == 0
    assert cli(["train", str(tiny_train_config), "eval.num_workers=0", "--resume", "eval.batch_size=7"]) == 0
    assert cli(["train", str(finished), "--resume"]) == 0  # the run directory instead of the YAML
    assert (finished / "log.jsonl").read_text() == log  # finished: nothing trained again
    assert len(json.loads((finished / "run_info.json").read_text())["resumed"]) == 3
    assert cli(["train", str(finished)]) == 2
    assert "add --resume to continue" in capsys.readouterr().err


def test_resume_uses_the_saved_config_not_the_edited_file(finished, tiny_train_config, capsys):
    saved = (finished / "config.yaml").read_text()
    data = yaml.safe_load(tiny_train_config.read_text())
    data["optim"]["lr"] = 0.5
    tiny_train_config.write_text(yaml.safe_dump(data))
    assert cli(["train", str(tiny_train_config), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "differs from the run's saved config (optim.lr: saved 0.05, file 0.5)" in err
    assert (finished / "config.yaml").read_text() == saved


def test_result_affecting_override_refuses_unless_allowed(finished, tiny_train_config, capsys):
    before = _records(finished)
    first = json.loads((finished / "results.json").read_text())
    assert cli(["train", str(tiny_train_config), "--resume", "optim.epochs=2", "backmix.mask_ratio=0.5"]) == 2
    err = capsys.readouterr().err
    assert "backmix.mask_ratio: saved 0.25, now 0.5" in err and "optim.epochs: saved 1, now 2" in err
    assert "--allow-changes" in err and _records(finished) == before
    assert cli(["train", str(tiny_train_config), "--resume", "optim.epochs=2", "--allow-changes"]) == 0
    assert yaml.safe_load((finished / "config.yaml").read_text())["optim"]["epochs"] == 2
    info = json.loads((finished / "run_info.json").read_text())
    assert info["resumed"][-1]["changes"] == {"optim.epochs": {"was": 1, "now": 2}}
    log = [json.loads(line) for line in (finished / "log.jsonl").read_text().splitlines()]
    results = json.loads((finished / "results.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2] and results["epochs"] == 2
    # train_time_s covers both epochs, the first run's and the resumed one's
    assert results["train_time_s"] == round(log[0]["time"] + log[1]["time"], 1)
    assert first["train_time_s"] == round(log[0]["time"], 1)


def test_resume_with_allow_changes_trains_with_the_changed_optimizer_settings(finished, tiny_train_config, capsys):
    """The checkpoint restores the old lr / momentum / weight decay; the changed config must win and the
    run must record exactly what was put into the restored state."""
    import torch

    from backmix_vlm.engine.checkpoint import load_checkpoint
    from backmix_vlm.engine.optim import lr_factor
    from backmix_vlm.config import OptimConfig

    old = load_checkpoint(finished / "last.pt")
    group = old["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (pytest.approx(0.0), 5e-4, 0.9)
    steps = old["global_step"]
    assert cli(["train", str(finished), "--resume", "optim.epochs=3", "optim.lr=1e-3", "optim.weight_decay=0.1",
                "optim.momentum=0.5", "optim.schedule=constant", "--allow-changes"]) == 0
    out = capsys.readouterr().out
    assert "optimizer.base_lr 0.05 -> 0.001" in out
    new = load_checkpoint(finished / "last.pt")
    group = new["optimizer"]["param_groups"][0]
    assert (group["initial_lr"], group["weight_decay"], group["momentum"]) == (1e-3, 0.1, 0.5)
    assert group["lr"] == 1e-3 and new["scheduler"]["base_lrs"] == [1e-3]  # constant schedule: lr = base lr
    assert new["optim"]["lr"] == 1e-3 and new["epoch"] == 3
    log = [json.loads(line) for line in (finished / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log[1:]] == [1e-3, 1e-3]
    applied = json.loads((finished / "run_info.json").read_text())["resumed"][-1]["applied"]
    assert applied["optimizer.base_lr"] == {"was": 0.05, "now": 1e-3}
    assert applied["optimizer.weight_decay"] == {"was": 5e-4, "now": 0.1}
    assert applied["optimizer.momentum"] == {"was": 0.9, "now": 0.5}
    # at the restored step the old cosine schedule had reached 0; the new constant one gives 1e-3
    was = 0.05 * lr_factor(steps, steps_per_epoch=steps, cfg=OptimConfig(epochs=1, lr=0.05))
    assert applied[f"optimizer.lr_at_step_{steps}"] == {"was": pytest.approx(was), "now": 1e-3}
    assert applied["optim.epochs"] == {"was": 1, "now": 3} and applied["optim.schedule"] == {"was": "cosine",
                                                                                          "now": "constant"}
    assert torch.is_tensor(new["optimizer"]["state"][0]["momentum_buffer"])  # the buffers themselves are kept


def test_a_failing_resume_leaves_the_records_alone(finished, tiny_train_config, capsys, monkeypatch):
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.errors import DataError

    before = _records(finished)

    def broken(self, *a, **k):
        raise DataError("loader crashed")

    monkeypatch.setattr(Trainer, "fit", broken)
    assert cli(["train", str(tiny_train_config), "--resume"]) == 2
    assert "loader crashed" in capsys.readouterr().err
    assert _records(finished) == before and not (finished / LOCK_FILE).exists()
    assert run_status(finished) == "finished"


def test_resume_errors(tmp_path, finished, tiny_train_config, capsys):
    assert cli(["train", str(tiny_train_config), "--resume", "run.name=missing"]) == 2
    assert f"there is no run to resume at {finished.parent / 'missing'}" in capsys.readouterr().err
    assert not (finished.parent / "missing").exists()
    info = json.loads((finished / "run_info.json").read_text())
    (finished / "run_info.json").write_text(json.dumps({**info, "job": "fewshot"}))
    assert cli(["train", str(tiny_train_config), "--resume"]) == 2
    assert "holds a fewshot run, not a train run" in capsys.readouterr().err
    assert cli(["train", str(tiny_train_config), "--resume", "--overwrite"]) == 2
    assert cli(["train", str(tiny_train_config), "--allow-changes", "run.name=x"]) == 2
    assert "--allow-changes only applies to --resume" in capsys.readouterr().err


def test_resume_with_a_moved_data_root_is_not_a_change(tmp_path, image_folder, capsys):
    moved = tmp_path / "moved"
    cfg = train_config(tmp_path, image_folder, data_root=str(image_folder))
    data = yaml.safe_load(cfg.read_text())
    for key in ("train", "test"):
        data["data"][key].pop("root")
    data["eval"]["ood"][0].pop("root")
    cfg.write_text(yaml.safe_dump(data))
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train"]["root"] == str(image_folder)
    image_folder.rename(moved)
    assert cli(["train", str(cfg), "--resume", f"data_root={moved}"]) == 0


# ----------------------------------------------------------------------------- files people share
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode


def test_run_files_are_shareable(tmp_path, image_folder):
    old = os.umask(0o022)
    try:
        assert cli(["train", str(train_config(tmp_path, image_folder))]) == 0
    finally:
        os.umask(old)
    run = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "run_info.json", "last.pt", "results.json", "log.csv", "scores.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


# ----------------------------------------------------------------------------- eval
def test_eval_says_where_it_wrote_and_names_model_and_epochs(finished, capsys):
    assert cli(["eval", str(finished)]) == 0
    out = capsys.readouterr()
    (ev,) = finished.glob("eval-*")
    assert f"results: {ev / 'results.md'}" in out.out
    assert "small_cnn + backmix, 1 epochs" in (ev / "results.md").read_text()
    assert "unfinished" not in out.err
    assert cli(["eval", str(finished)]) == 0  # a second evaluation gets its own folder
    assert len(list(finished.glob("eval-*"))) == 2


def test_eval_warns_on_a_checkpoint_of_an_unfinished_run(finished, capsys):
    config = yaml.safe_load((finished / "config.yaml").read_text())
    config["optim"]["epochs"] = 3  # as if the run had been stopped after epoch 1 of 3
    (finished / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli(["eval", str(finished)]) == 0
    assert "is from an unfinished run (it holds epoch 1 of 3)" in capsys.readouterr().err


def test_eval_of_a_non_checkpoint_file_says_what_was_expected(finished, capsys):
    (finished / "last.pt").write_text("hello world\n")  # torch.load says `KeyError: 101` here
    assert cli(["eval", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "not a torch checkpoint" in err and "expected a training checkpoint" in err and "KeyError" not in err
    assert not list(finished.glob("eval-*"))  # no half-written eval folder


def test_flatten_names_every_leaf():
    assert flatten({"a": {"b": 1, "c": []}, "l": [{"x": 2}], "s": [1, 2]}) == {
        "a.b": 1, "a.c": [], "l[0].x": 2, "l#len": 1, "s": [1, 2]}


def test_a_folder_claimed_after_the_plan_is_left_alone(tmp_path):
    """Two fresh runs race for one name: the loser of the lock removes nothing of the winner's."""
    from backmix_vlm.jobs.runs import new_run_dir, open_run
    from backmix_vlm.runners.train import TrainConfig

    plan = new_run_dir("train", tmp_path / "runs", "same")  # checked while the folder is free
    winner = tmp_path / "runs" / "same"
    winner.mkdir(parents=True)
    (winner / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "now"}))
    (winner / "run_info.json").write_text(json.dumps({"job": "train", "status": "running"}))
    with pytest.raises(RunDirError, match="another process"):
        with open_run(plan, TrainConfig()):
            pytest.fail("must not start")
    assert sorted(os.listdir(winner)) == [LOCK_FILE, "run_info.json"]
