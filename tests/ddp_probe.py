"""``backmix-vlm`` under ``torchrun``, instrumented for the multi-process tests (tests/test_ddp_jobs.py).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node N tests/ddp_probe.py <job> ...``
with ``PROBE_DIR`` set.  Each process records, without changing what the job computes:

* ``PROBE_DIR/writes<rank>.json``: every file it created, opened for writing, renamed into place or
  removed under ``PROBE_WATCH`` (Python audit events: ``open``, ``os.rename``, ``os.remove``, ``os.mkdir``);
* ``PROBE_DIR/state<rank>_<run folder>.pt`` after each ``Trainer.fit``: the mask bank, the trainable
  weights, the epoch log and, per epoch, how many times each bank row was updated.

``PROBE_KILL=<rank>:<epoch>`` makes that process ``SIGKILL`` itself right after the checkpoint of that
epoch (of the first training) is on disk: a ``kill -9`` at a known point.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))
PROBE = Path(os.environ["PROBE_DIR"])
WATCH = os.path.realpath(os.environ.get("PROBE_WATCH", PROBE))
WRITES: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        paths = [path] if writing else []
    elif event == "os.rename":
        paths = [args[1]]
    elif event in ("os.remove", "os.mkdir", "shutil.rmtree"):
        paths = [args[0]]
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            p = os.fsdecode(p)
            real = os.path.realpath(p)
            if real == WATCH or real.startswith(WATCH + os.sep):
                WRITES.append([event, os.path.relpath(real, WATCH)])


def _instrument() -> None:
    import torch

    from backmix_vlm.augment.mask_bank import MaskBank
    from backmix_vlm.engine.checkpoint import model_state_dict
    from backmix_vlm.engine.trainer import Trainer

    ema_rows, train_epoch, fit, save = MaskBank._ema_rows, Trainer.train_epoch, Trainer.fit, Trainer.save

    def counting_ema_rows(self, indices, maps, weights):  # one EMA step per distinct row and call
        counts = getattr(self, "probe_counts", None)
        if counts is not None and indices.numel():
            counts[torch.unique(indices.cpu())] += 1
        return ema_rows(self, indices, maps, weights)

    def counting_epoch(self, epoch):
        if self.bank is not None:
            self.bank.probe_counts = torch.zeros(self.bank.num_samples, dtype=torch.long)
        row = train_epoch(self, epoch)
        if self.bank is not None:
            self.probe_updates = [*getattr(self, "probe_updates", []), self.bank.probe_counts.tolist()]
        return row

    def dumping_fit(self, *args, **kwargs):
        history = fit(self, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        torch.save({"bank": None if self.bank is None else self.bank.bank.cpu().clone(),
                    "model": {k: v.cpu() for k, v in model_state_dict(model, trainable_only=self.task.trainable_only).items()},
                    "history": history, "updates": getattr(self, "probe_updates", []),
                    "world": self.world, "rank": self.rank},
                   PROBE / f"state{self.rank}_{self.run_dir.name}.pt")
        return history

    kill = os.environ.get("PROBE_KILL")

    def killing_save(self, path):
        save(self, path)
        if kill and [int(v) for v in kill.split(":")] == [self.rank, self.epoch]:
            _flush()
            os.kill(os.getpid(), signal.SIGKILL)

    MaskBank._ema_rows, Trainer.train_epoch, Trainer.fit, Trainer.save = (counting_ema_rows, counting_epoch,
                                                                          dumping_fit, killing_save)


def _flush() -> None:
    (PROBE / f"writes{RANK}.json").write_text(json.dumps(WRITES))


if __name__ == "__main__":
    PROBE.mkdir(parents=True, exist_ok=True)
    sys.addaudithook(_audit)
    _instrument()
    from backmix_vlm.cli import main

    try:
        code = main(sys.argv[1:])
    finally:
        _flush()
    sys.exit(code)
