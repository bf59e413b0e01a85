"""The training loop every runner uses: Accelerate, BackMix with its mask bank, exact resume.

One training step::

    clean batch (images, labels, indices)            # loader workers only decode + light aug
      -> mixer(images, labels, indices) on device    # BackMix / Cutout / Mixup / CutMix / none
      -> alongside: [originals; mixed] in ONE forward of 2B  |  mixed_only: the mixed batch
      -> loss = MixResult.loss(logits) -> backward -> optimizer + LR schedule step
      -> mask bank EMA update at the clean images' dataset indices

What differs per model family (a CNN trained from scratch, a prompt adapter over a frozen
CLIP) sits behind the small :class:`~backmix_vlm.engine.tasks.TrainTask` protocol (its
docstring gives the order of the calls); the loop itself never branches on it.

Design choices (documented because they change numbers):

* **LR schedule per step** (:mod:`.optim`: the optimizer, its parameter groups and the schedule).
* **Batch size is global.**  ``optim.batch_size`` is split evenly over the processes.
* **Data order = f(seed, epoch, rank).**  A ``DistributedSampler`` (also with one process)
  shuffles with ``seed + epoch``, and the loader's worker seeds come from a generator seeded
  by :func:`~backmix_vlm.engine.checkpoint.epoch_seed`; with every RNG saved at the end of
  each epoch, ``--resume`` replays the remaining epochs bit for bit.
* **Several processes** (``torchrun`` / ``accelerate launch``; docs/distributed.md): each process
  trains on its shard of every epoch and the bank update is gathered, so banks and weights stay
  identical.  When the processes cannot share the set evenly, the sampler repeats a few samples;
  those repeats train (every process needs the same number of steps) but do not update the bank,
  so each image moves its bank row once per epoch (:func:`sampler_padding`).
* **Evaluation never perturbs training.**  It runs on the main process with all RNG states
  saved before and restored after, so ``eval.every`` does not change the trained weights.
* **Mask bank in the canonical frame.**  With ``views`` (a
  :class:`~backmix_vlm.augment.geometry.DeviceViews`), the loader returns each image in its
  canonical frame and the trainer draws each sample's crop / flip on the device: BackMix maps
  the background image's bank row into that image's current view before masking, and maps
  taken on a view go back to the canonical frame before the EMA update (only the cells the view
  covered move).  Without ``views`` the loader's augmentation is used as is (v0.1 behaviour:
  the bank then mixes the frames of different random views).
* **Bank maps come from the training forward.**  With ``alongside`` the maps are the
  originals' (rows ``[:B]``); with ``mixed_only`` they are taken from the mixed images w.r.t.
  the target label, as Algorithm 1 of the paper reads ("obtain C-hat with respect to x-tilde").
  How a task gets them is its :class:`~backmix_vlm.engine.tasks.StepPlan`, made by
  ``task.plan_step`` before the batch is mixed (the CAM of the output; a recording of the
  forward; a kept block input + tail pass; or a separate pass — CoOp / LoCoOp's costly ones
  only every ``backmix.bank_update_every`` steps) and read by ``task.bank_maps`` after the step.
* **Optional airbench pieces.**  ``optim.lookahead`` resets the weights to a scheduled slow copy
  every 5 steps (:mod:`.lookahead`; the model *is* the slow copy after the last step, before the
  final evaluation); ``optim.freeze_after`` stops parameters (by name glob) after N epochs with an
  LR group at 0; both are in the checkpoint / scheduler state, so resume stays exact.
* **Only finite maps enter the bank.**  A map with a NaN / inf (e.g. fp16 overflow) is skipped;
  the epoch's count is logged as ``bank_skipped`` (column present only when non-zero).  With a
  GradScaler (fp16) the task gets the loss scale of the step, so maps read from the training
  backward use unscaled gradients.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..augment.base import Mixer, MixerSetup
from ..config import BACKMIX_MODES, BackMixConfig, OptimConfig, RunConfig
from ..errors import ConfigError, DivergedError, ModelError
from ..models.output import ModelOutput
from ..runtime import check_autocast_precision, resolve_device, resolve_run_precision, single_process_launch_warning
from ..validation import check_choice
from .lookahead import Lookahead
from .optim import build_optimizer, build_scheduler, frozen_after, lr_factor, norm_parameters
from .tasks import StepPlan, TrainTask
from .checkpoint import (
    BEST,
    LAST,
    capture_rng_state,
    epoch_seed,
    load_checkpoint,
    load_model_state_dict,
    model_state_dict,
    restore_rng_state,
    save_checkpoint,
)

CHECKPOINT_FORMAT = 1
TRAIN_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "time", "bank_skipped")

Evaluator = Callable[[nn.Module, int], dict[str, float]]


# ----------------------------------------------------------------------------- task protocol
# TrainTask (the calls of one step, in order) and StepPlan live in .tasks; importable from here.


def build_accelerator(run: RunConfig) -> Any:
    """An ``accelerate.Accelerator`` for ``run.device`` / ``run.precision``.

    Works unchanged under ``accelerate launch`` / ``torchrun`` (the env tells Accelerate the
    process group; its collectives give up after ``run.process_timeout_s``; each process uses the
    GPU of its local rank, so ``cuda:N`` is refused there).  ``bf16`` autocasts
    on CPU as well as on GPU.  In a single process the Accelerate state is a singleton; it is
    reset when a later run asks for another precision.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from ..compat import accelerate_state_started, reset_accelerate_state

    device = str(run.device)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if device.startswith("cuda:") and processes > 1:  # Accelerate gives each process its local rank's GPU
        raise ConfigError(f"run.device: {device!r} names one GPU, but this run has {processes} processes (each "
                          "uses the GPU of its local rank); use run.device=cuda or auto")
    if run.precision == "auto":  # resolved once per run by runs.plan_from_args; direct callers here
        resolve_run_precision(run)
    check_autocast_precision(run.precision, "run.precision")
    cpu = resolve_device(device, "run.device").type == "cpu"
    if run.precision == "fp16" and cpu:
        raise ConfigError("run.precision: fp16 autocast needs a CUDA GPU; use bf16 on CPU")
    reset_accelerate_state(run.precision, cpu)
    if device.startswith("cuda:") and not accelerate_state_started():
        os.environ["ACCELERATE_TORCH_DEVICE"] = device
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=float(run.process_timeout_s)))
    accelerator = Accelerator(mixed_precision=run.precision, cpu=cpu, kwargs_handlers=[timeout])
    warning = single_process_launch_warning(accelerator.num_processes)
    if warning:
        print(warning, file=sys.stderr)
    return accelerator


def sampler_padding(rank: int, world: int, num_samples: int, start: int, count: int) -> Tensor:
    """Which of positions ``start .. start + count - 1`` of ``rank``'s ``DistributedSampler`` order are padding.

    The sampler (``drop_last=False``) shuffles the ``num_samples`` indices, appends copies of the
    first ones until the total divides by ``world``, and gives rank ``r`` the positions
    ``r, r + world, r + 2 world, ...``: local position ``j`` is global position ``r + j * world``,
    padding from ``num_samples`` on (so only each rank's last position can be padding).
    """
    positions = rank + (start + torch.arange(count)) * world
    return positions >= num_samples


def output_to_fp32(output: ModelOutput) -> ModelOutput:
    """Autocast leaves bf16/fp16 tensors in the output; losses and maps are computed in fp32."""
    return replace(output, **{f.name: getattr(output, f.name).float() for f in fields(output)
                              if isinstance(getattr(output, f.name), Tensor)
                              and getattr(output, f.name).is_floating_point()})


def _as_output(out: Any) -> ModelOutput:
    return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``task.model`` on ``train_set`` with optional BackMix; checkpoint and log per epoch.

    ``train_set`` yields ``(image, label, index)`` with ``index`` its position in the dataset
    (the mask bank row).  ``evaluate(model, epoch) -> {metric: value}`` is called on the main
    process every ``eval_every`` epochs and after the last one; its values go to the log.
    ``best_metric`` (a log column, higher = better) also keeps ``best.pt``.
    ``meta`` (plain data: config, class names) is stored in every checkpoint.  ``mixer`` is a
    built :class:`~backmix_vlm.augment.base.Mixer` (``augment.build_mixer``; None or one with
    ``mixes = False``: plain training); the trainer makes the mask bank when ``mixer.needs_bank``
    and hands it, with its random stream, to ``mixer.setup``.  ``backmix`` configures the engine
    (``mode``, ``bank_update_every``) and the bank (``momentum``; ``mask_ratio`` for mask quality).
    """

    def __init__(
        self,
        task: TrainTask,
        train_set: Dataset,
        *,
        optim: OptimConfig,
        run: RunConfig,
        run_dir: str | Path,
        num_classes: int,
        mixer: Mixer | None = None,
        backmix: BackMixConfig | None = None,
        num_workers: int = 0,
        evaluate: Evaluator | None = None,
        eval_every: int = 0,
        best_metric: str | None = None,
        meta: dict[str, Any] | None = None,
        accelerator: Any = None,
        views: Any = None,
        method: Any = None,
        outliers: Dataset | None = None,
    ) -> None:
        self.backmix = backmix or BackMixConfig()
        check_choice(self.backmix.mode, BACKMIX_MODES, "backmix.mode")
        if self.backmix.bank_update_every < 1:
            raise ConfigError(f"backmix.bank_update_every: {self.backmix.bank_update_every!r}; expected >= 1")
        self.task, self.train_set = task, train_set
        self.optim_cfg, self.run_cfg = optim, run
        self.run_dir = Path(run_dir)
        self.num_classes = num_classes
        self.num_workers, self.evaluate, self.eval_every = num_workers, evaluate, eval_every
        self.best_metric, self.meta = best_metric, dict(meta or {})
        self.accelerator = accelerator or build_accelerator(run)
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process

        if optim.batch_size < 1 or optim.batch_size % self.world:
            raise ConfigError(f"optim.batch_size: {optim.batch_size} must be a positive multiple of the "
                              f"number of processes ({self.world})")
        self.batch_size = optim.batch_size // self.world
        self.sampler = DistributedSampler(train_set, num_replicas=self.world, rank=self.rank,
                                          shuffle=True, seed=run.seed, drop_last=False)
        per_rank = len(self.sampler)
        if per_rank == 0:
            raise ConfigError("the training set is empty")
        # drop a trailing partial batch (BatchNorm and in-batch pairing need > 1 sample)
        self.drop_last = per_rank >= self.batch_size
        self.steps_per_epoch = per_rank // self.batch_size if self.drop_last else 1
        self.loader_generator = torch.Generator()
        self.mix_generator = torch.Generator().manual_seed(epoch_seed(run.seed, 0, self.rank, stream=2))
        self.views = views
        self.view_generator = torch.Generator().manual_seed(epoch_seed(run.seed, 0, self.rank, stream=3))
        self.true_masks = getattr(train_set, "foreground_masks", None)  # datasets with known foregrounds
        self._init_method(method, outliers)

        self.mixer = mixer if mixer is not None and mixer.mixes else None
        self.bank = self._setup_mixer()
        optimizer = build_optimizer(task.trainable_parameters(), optim, norm_parameters(task.model),
                                    frozen_after(task.model, optim.freeze_after))
        self.channels_last = bool(getattr(run, "channels_last", False))
        if self.channels_last:
            task.model.to(memory_format=torch.channels_last)
        self.model, self.optimizer = acc.prepare(task.model, optimizer)
        if getattr(run, "compile", False):  # the loop calls self.model; checkpoints unwrap it
            self.model = torch.compile(self.model)
        self.scheduler = build_scheduler(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                         else self.optimizer, optim, self.steps_per_epoch)
        self.lookahead = Lookahead(task.model, optim.epochs * self.steps_per_epoch) if optim.lookahead else None
        self.epoch = 0            # epochs completed
        self.global_step = 0
        self.best: float | None = None
        self._best_pending = False
        self.epochs_this_call = 0
        self.history: list[dict[str, Any]] = []
        self.resume_applied: dict[str, dict[str, Any]] = {}  # load(): configured optim settings put into the restored state

    # ------------------------------------------------------------------ construction
    def _init_method(self, method: Any, outliers: Dataset | None) -> None:
        """The training method (:mod:`.methods`; plain CE by default) and, for one that needs it, the outlier
        loader: its own sampler shard per process, batch ``outlier_batch_ratio`` x the per-process batch,
        drawn afresh each epoch from (seed, epoch, rank) like the training loader (exact resume)."""
        from .methods import TrainingMethod

        self.method = method if method is not None else TrainingMethod()
        self.outliers, self._outlier_iter, self._outlier_pass = outliers, None, 0
        if self.method.needs_outliers and outliers is None:
            raise ConfigError(f"method {self.method.name}: needs an auxiliary outlier set (method.outliers)")
        if outliers is None:
            return
        self.outlier_batch = max(1, round(self.batch_size * getattr(self.method, "outlier_batch_ratio", 1.0)))
        self.outlier_sampler = DistributedSampler(outliers, num_replicas=self.world, rank=self.rank, shuffle=True,
                                                  seed=self.run_cfg.seed, drop_last=True)
        if len(self.outlier_sampler) < self.outlier_batch:
            raise ConfigError(f"method.outliers: {len(outliers)} images cannot fill one outlier batch of "
                              f"{self.outlier_batch} per process")
        self.outlier_generator = torch.Generator()
        self.outlier_loader = DataLoader(outliers, batch_size=self.outlier_batch, sampler=self.outlier_sampler,
                                         num_workers=self.num_workers, drop_last=True, generator=self.outlier_generator,
                                         persistent_workers=self.num_workers > 0)  # restarted often: keep its workers
        self.outlier_view_generator = torch.Generator().manual_seed(epoch_seed(self.run_cfg.seed, 0, self.rank, stream=5))

    def _next_outliers(self) -> Tensor:
        """The next outlier batch on the device (the loader restarts, reshuffled, when it runs out)."""
        batch = next(self._outlier_iter, None) if self._outlier_iter is not None else None
        if batch is None:
            self._outlier_pass += 1
            self.outlier_sampler.set_epoch(self.epoch * 1000 + self._outlier_pass)
            self.outlier_generator.manual_seed(epoch_seed(self.run_cfg.seed, self.epoch, self.rank, stream=4))
            self._outlier_iter = iter(self.outlier_loader)
            batch = next(self._outlier_iter)
        images, _, indices = batch
        images = images.to(self.device, non_blocking=True)
        if self.views is not None:
            images, _ = self.views(images, self.outlier_view_generator, indices=torch.as_tensor(indices).to(self.device),
                                   epoch=self.epoch, seed=self.run_cfg.seed)
        return images

    def _setup_mixer(self) -> nn.Module | None:
        """The mask bank when the mixer asks for one (else None), and the mixer's setup."""
        if self.mixer is None:
            return None
        from ..augment.factory import MIXERS
        from ..augment.mask_bank import MaskBank

        bank = None
        if self.mixer.needs_bank:
            size = self.task.saliency_size
            if size is None:
                without = ", ".join(n for n in MIXERS.names() if not MIXERS.get(n).needs_bank)
                raise ConfigError(f"augment.name: {type(self.mixer).__name__} needs foreground maps (a mask bank), "
                                  f"but this model gives none (no CAM head / saliency); choose a mixer without "
                                  f"one: {without}")
            bank = MaskBank.from_config(self.backmix, len(self.train_set), tuple(size), device=self.device)
        self.mixer.setup(MixerSetup(generator=self.mix_generator, bank=bank, true_masks=self.true_masks,
                                    device=self.device))
        return bank

    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.loader_generator.manual_seed(epoch_seed(self.run_cfg.seed, epoch, self.rank, stream=1))
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=self.num_workers, drop_last=self.drop_last,
                          generator=self.loader_generator, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ one step / epoch
    def train_step(self, images: Tensor, labels: Tensor, indices: Tensor,
                   padding: Tensor | None = None) -> dict[str, float]:
        """Mix, forward, backward, optimizer + schedule step, bank update. Returns batch stats.

        ``padding`` (B booleans): samples the distributed sampler repeated to even out the ranks;
        they train like any other sample but do not update the mask bank (see :meth:`train_epoch`).
        """
        from ..augment.base import MixResult, alongside

        acc, task, cfg = self.accelerator, self.task, self.backmix
        b = images.shape[0]
        geometry = None
        if self.views is not None:  # each sample's random view of its canonical image
            images, geometry = self.views(images, self.view_generator, indices=indices, epoch=self.epoch,
                                          seed=self.run_cfg.seed)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        plan: StepPlan | None = None
        if self.bank is not None and task.saliency_size is not None:  # 1. plan the step's bank maps
            plan = task.plan_step(acc.unwrap_model(self.model), images, labels,
                                  update_bank=self.global_step % cfg.bank_update_every == 0,
                                  clean_first=self.mixer is None or cfg.mode == "alongside")
        if self.mixer is None:
            mix = MixResult(images, labels)
        else:
            mix = self.mixer(images, labels, indices, geometry=geometry)
            if cfg.mode == "alongside":
                mix = alongside(images, labels, mix)
        self.optimizer.zero_grad(set_to_none=True)
        # the method's extra rows (RotPred's rotations, OE's outliers) join the same forward, after the batch
        extra = self.method.extra_inputs(mix.images, self._next_outliers() if self.outliers is not None else None)
        inputs = mix.images if extra is None else torch.cat([mix.images, extra.to(mix.images.dtype)])
        with acc.autocast():  # 2. the training forward (keeps what the plan asks for)
            out = _as_output(task.forward(self.model, inputs, plan))
        out = output_to_fp32(out)
        extra_out = None
        if extra is not None:
            out, extra_out = _slice_output(out, slice(0, len(mix))), _slice_output(out, slice(len(mix), None))
        loss = self.method.loss(task, out, mix, extra_out)  # 3. loss, backward, optimizer step
        grad_scale = _loss_scale(acc) if plan is not None else 1.0  # read before step(): update() changes it
        acc.backward(loss)
        if self.optim_cfg.grad_clip:
            acc.clip_grad_norm_(task.trainable_parameters(), self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

        # rows that correspond one-to-one with the clean batch (originals, or the mixed TIs)
        rows = slice(0, b)
        row_labels = labels if (self.mixer is None or cfg.mode == "alongside") else mix.labels_a[:b]
        if plan is not None:  # 4. the bank maps of the clean rows, after the step
            with torch.no_grad():
                maps = task.bank_maps(plan, _slice_output(out, rows), mix.images[rows], row_labels,
                                      grad_scale=grad_scale)
            if maps is not None:
                # the bank refuses maps with non-finite values (e.g. an fp16 overflow) and counts them
                keep = None if padding is None else ~padding
                self.bank.update(indices, maps, geometry=geometry, keep=keep)  # a collective in multi-process runs
        self.global_step += 1
        if self.lookahead is not None:
            self.lookahead.step(self.task.model, self.global_step)
        with torch.no_grad():
            correct = (out.logits[rows].argmax(-1) == row_labels).sum()
        return {"loss": loss.detach(), "correct": correct, "n": b}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns mean loss / accuracy over all processes."""
        self.model.train()
        self._outlier_iter, self._outlier_pass = None, 0  # the epoch's outlier stream = f(seed, epoch, rank)
        start = time.perf_counter()
        # the schedule's base LR (not a 64x norm group's or one frozen by optim.freeze_after)
        lr = self.optim_cfg.lr * lr_factor(self.global_step, steps_per_epoch=self.steps_per_epoch, cfg=self.optim_cfg)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        seen = torch.zeros((), device=self.device, dtype=torch.float64)
        skipped_before = self.bank.skipped if self.bank is not None else 0
        bar = tqdm(self._loader(epoch), desc=f"epoch {epoch + 1}/{self.optim_cfg.epochs}", leave=False,
                   disable=not (self.is_main and sys.stderr.isatty()), dynamic_ncols=True)
        # the sampler pads when the ranks cannot share the set evenly: those repeats train (every rank
        # needs the same number of steps; DDP averages the ranks' batch means) but skip the bank
        padded = self.world * len(self.sampler) > len(self.train_set)
        for step, (images, labels, indices) in enumerate(bar):
            images = images.to(self.device, non_blocking=True)
            labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
            indices = torch.as_tensor(indices).to(self.device, non_blocking=True)
            padding = (sampler_padding(self.rank, self.world, len(self.train_set), step * self.batch_size,
                                       len(indices)).to(self.device) if padded else None)
            stats = self.train_step(images, labels, indices, padding)
            loss_sum += stats["loss"].double() * stats["n"]
            correct += stats["correct"].double()
            seen += stats["n"]
            if not bar.disable:
                bar.set_postfix(loss=f"{stats['loss'].item():.3f}")
        if self.world > 1:  # DDP leaves each rank its own BN running stats: average them (timm)
            from timm.utils import distribute_bn

            distribute_bn(self.model, self.world, reduce=True)
        # non-finite maps the bank refused this epoch, on this process
        skipped = torch.tensor(float(self.bank.skipped - skipped_before if self.bank is not None else 0),
                               device=self.device, dtype=torch.float64)
        totals = self.accelerator.reduce(torch.stack([loss_sum, correct, seen, skipped]), reduction="sum")
        loss_sum, correct, seen, skipped_all = (float(t) for t in totals)
        what = (f"training loss became {loss_sum}" if not math.isfinite(loss_sum) else
                "the model's weights became non-finite" if not self._weights_finite() else None)
        if what is not None:  # before the epoch is checkpointed: the last checkpoint stays a usable one
            raise DivergedError(f"{what} in epoch {epoch + 1}; lower optim.lr, set optim.grad_clip or use "
                                "run.precision=no")
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1),
               "train_acc": correct / max(seen, 1), "time": time.perf_counter() - start}
        if skipped_all:
            row["bank_skipped"] = int(skipped_all)
            self.accelerator.print(f"warning: epoch {epoch + 1}: {int(skipped_all)} non-finite saliency map(s) were "
                                   "not written into the mask bank (bank_skipped in log.csv)")
        if self.bank is not None and self.true_masks is not None:  # how well the bank finds the true foreground
            from ..saliency.mask_quality import mask_quality

            # measured at the configured k (the paper's 0.25 when k = 0 masks nothing)
            quality = mask_quality(self.bank.bank, self.true_masks, self.backmix.mask_ratio or 0.25)
            row.update({f"mask_{k}": v for k, v in quality.items()})
        return row

    def _weights_finite(self) -> bool:
        """Every trainable parameter and normalisation statistic finite: a step can overflow them while the
        step's loss was still finite.  (Other buffers may hold -inf by design, e.g. CLIP's causal mask.)"""
        stats = [b for m in self.task.model.modules() if getattr(m, "track_running_stats", False)
                 for b in (m.running_mean, m.running_var) if b is not None]
        tensors = [*self.task.trainable_parameters(), *stats]
        with torch.no_grad():
            flags = [torch.isfinite(t).all() for t in tensors]
            return bool(torch.stack(flags).all()) if flags else True

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train to ``optim.epochs`` (from ``last.pt`` with ``resume``); returns the epoch log.

        ``stop_after`` ends this call after that many epochs (a time-sliced or preempted job):
        the next ``fit(resume=True)`` continues exactly where it stopped.
        """
        if resume:
            self.load(self.run_dir / LAST)
            if self.resume_applied:
                self.accelerator.print("resume: changed settings applied to the restored state: " + "; ".join(
                    f"{k} {v['was']!r} -> {v['now']!r}" for k, v in self.resume_applied.items()))
        epochs = self.optim_cfg.epochs
        self.epochs_this_call = 0
        while self.epoch < epochs and (stop_after is None or self.epochs_this_call < stop_after):
            row = self.train_epoch(self.epoch)
            self.epoch += 1
            self.epochs_this_call += 1
            self.history.append(row)
            if self.evaluate is not None and (self.epoch == epochs or (self.eval_every and self.epoch % self.eval_every == 0)):
                self.save(self.run_dir / LAST)  # the epoch is kept even if its evaluation fails (resume re-evaluates)
                row.update(self.run_evaluation())
            self._maybe_best(row)
            self.save(self.run_dir / LAST)
            self.write_logs()
            self.accelerator.print(format_row(row, epochs))
        return self.history

    def run_evaluation(self) -> dict[str, float]:
        """Call ``evaluate`` on the main process without touching any training RNG."""
        summary: dict[str, float] = {}
        if self.is_main:
            rng = capture_rng_state(self._generators())
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            try:
                summary = dict(self.evaluate(model, self.epoch) or {})
            finally:
                model.train(was_training)
                restore_rng_state(rng, self._generators())
        self.accelerator.wait_for_everyone()
        return summary

    def _maybe_best(self, row: dict[str, Any]) -> None:
        """Mark ``best.pt`` for writing when ``best_metric`` (higher = better) improved."""
        if self.best_metric is None or not self.is_main:
            return
        evaluated = [k for k in row if k not in TRAIN_COLUMNS and not k.startswith("mask_")]
        if not evaluated:
            return
        if self.best_metric not in row:
            raise ConfigError(f"best_metric: {self.best_metric!r} is not a logged metric; "
                              f"available: {', '.join(evaluated)}")
        value = float(row[self.best_metric])
        if self.best is None or value > self.best:
            self.best = value
            self._best_pending = True

    # ------------------------------------------------------------------ checkpoints
    def _generators(self) -> dict[str, torch.Generator]:
        gens = {"mixer": self.mix_generator, "loader": self.loader_generator}
        if self.views is not None:
            gens["views"] = self.view_generator
        if self.outliers is not None:
            gens["outlier_views"] = self.outlier_view_generator
        return gens

    def state_dict(self) -> dict[str, Any]:
        """The full training state; RNG states are gathered from every process."""
        rng = capture_rng_state(self._generators())
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": model_state_dict(self.model, trainable_only=self.task.trainable_only),
            "trainable_only": self.task.trainable_only,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "rng": rngs,
            "data": {"seed": self.run_cfg.seed, "world_size": self.world, "batch_size": self.optim_cfg.batch_size,
                     "num_samples": len(self.train_set), "steps_per_epoch": self.steps_per_epoch,
                     "num_workers": self.num_workers},
            "optim": asdict(self.optim_cfg),  # what the schedule was built from (a resume reports changes)
            "history": self.history,
            "best": self.best,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        state = self.state_dict()  # collective in DDP: every rank builds it
        if self.is_main:
            save_checkpoint(path, state)
            if self._best_pending:
                save_checkpoint(Path(path).with_name(BEST), state)
                self._best_pending = False
        self.accelerator.wait_for_everyone()

    def load(self, path: str | Path) -> None:
        """Restore everything :meth:`state_dict` saved (exact continuation)."""
        state = load_checkpoint(path)
        data = state.get("data", {})
        expected = {"world_size": self.world, "batch_size": self.optim_cfg.batch_size,
                    "num_samples": len(self.train_set), "seed": self.run_cfg.seed}
        diff = {k: (data.get(k), v) for k, v in expected.items() if data.get(k) != v}
        if diff:
            raise ModelError(f"{path}: cannot resume exactly, the run changed: "
                             + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items()))
        if data.get("num_workers", self.num_workers) != self.num_workers:
            warnings.warn(f"{path}: data.num_workers was {data['num_workers']}, now {self.num_workers}; the "
                          "augmentation random streams differ, so the resumed run will not match exactly",
                          stacklevel=2)
        load_model_state_dict(self.model, state["model"], trainable_only=state.get("trainable_only", False),
                              source=path)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # another number / size of parameter groups
            raise ModelError(f"{path}: the optimizer state does not fit the configured optimizer ({e}); "
                             "optim.name / norm_lr_scale / freeze_after cannot change on --resume") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.resume_applied = self._apply_configured_optim(configured, state.get("optim"), path)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if self.bank is not None:
            if state.get("bank") is None:
                raise ModelError(f"{path}: the checkpoint has no mask bank but the mixer "
                                 f"({type(self.mixer).__name__}) uses one")
            self.bank.load_state_dict(state["bank"])
        if self.lookahead is not None:
            if state.get("lookahead") is None:
                raise ModelError(f"{path}: the checkpoint has no lookahead state but optim.lookahead is true")
            saved_total = int(state["lookahead"]["total_steps"])
            self.lookahead.load_state_dict({**state["lookahead"], "total_steps": self.lookahead.total_steps})
            if saved_total != self.lookahead.total_steps:  # optim.epochs changed: the slow copy's schedule follows
                self.resume_applied["lookahead.total_steps"] = {"was": saved_total, "now": self.lookahead.total_steps}
        restore_rng_state(state["rng"][self.rank], self._generators())
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history, self.best = list(state.get("history", [])), state.get("best")

    def _apply_configured_optim(self, configured: list[dict[str, Any]], saved_optim: dict[str, Any] | None,
                                path: str | Path) -> dict[str, dict[str, Any]]:
        """Put the configured optimizer / schedule settings into the restored state; return what changed.

        The checkpoint brings back the optimizer's buffers (momentum, Adam moments) *and* its
        hyper-parameters; a resume with changed ``optim`` settings (``--allow-changes``) must train with
        the new ones, so every hyper-parameter of the freshly built optimizer (``lr`` as base LR,
        momentum, weight decay, nesterov, ...) replaces the restored one, the scheduler's base LRs follow,
        and the LR of the next step is the new schedule's at the restored step.  Returns
        ``{name: {"was", "now"}}`` for every value that differs from the restored state.
        """
        groups = self.optimizer.param_groups
        if len(groups) != len(configured) or any(set(g) - {"params"} != set(c) for g, c in zip(groups, configured)):
            raise ModelError(f"{path}: the optimizer state does not fit the configured optimizer; optim.name / "
                             "norm_lr_scale / freeze_after cannot change on --resume")
        applied: dict[str, dict[str, Any]] = {}

        def note(i: int, key: str, was: Any, now: Any) -> None:
            if was != now:
                applied[f"optimizer.{key}" if len(groups) == 1 else f"optimizer.group{i}.{key}"] = {"was": was, "now": now}

        step = self.scheduler.last_epoch
        for i, (group, fresh, fn) in enumerate(zip(groups, configured, self.scheduler.lr_lambdas)):
            for key, value in fresh.items():
                if key not in ("lr", "initial_lr"):
                    note(i, key, group[key], value)
                    group[key] = value
            note(i, "base_lr", group["initial_lr"], fresh["initial_lr"])
            group["initial_lr"] = fresh["initial_lr"]
            lr = fresh["initial_lr"] * fn(step)  # the (possibly new) schedule at the restored step
            note(i, f"lr_at_step_{step}", group["lr"], lr)
            group["lr"] = lr
        self.scheduler.base_lrs = [g["initial_lr"] for g in groups]
        self.scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports
        now = asdict(self.optim_cfg)
        for key in ("schedule", "epochs", "warmup_epochs", "warmup_lr", "grad_clip", "label_smoothing"):
            if saved_optim is not None and key in saved_optim and saved_optim[key] != now[key]:
                applied[f"optim.{key}"] = {"was": saved_optim[key], "now": now[key]}
        return applied

    # ------------------------------------------------------------------ logs
    def write_logs(self) -> None:
        """``log.csv`` and ``log.jsonl`` from the full history (so a resume never duplicates rows)."""
        if not self.is_main:
            return
        write_log_files(self.run_dir, self.history)


def _loss_scale(accelerator: Any) -> float:
    """The GradScaler's current loss scale (fp16), else 1.0."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())


def _slice_output(out: ModelOutput, rows: slice) -> ModelOutput:
    return replace(out, **{f.name: getattr(out, f.name)[rows] for f in fields(out)
                           if isinstance(getattr(out, f.name), Tensor)})


def write_log_files(run_dir: str | Path, history: list[dict[str, Any]]) -> None:
    """Write ``log.csv`` (union of columns, blanks where an epoch has no eval) and ``log.jsonl``."""
    run_dir = Path(run_dir)
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "log.csv", buf.getvalue())
    atomic_write_text(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def format_row(row: dict[str, Any], epochs: int) -> str:
    """One console line per epoch (the full row is in log.csv): loss, accuracy, eval AUROCs."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4g}", f"loss {row['train_loss']:.4f}",
             f"acc {100 * row['train_acc']:.2f}%", f"{row['time']:.1f}s"]
    parts += [f"{k} {100 * v:.2f}" for k, v in row.items()
              if (k == "test_acc" or k.startswith("auroc/")) and isinstance(v, float)]
    return "  ".join(parts)
