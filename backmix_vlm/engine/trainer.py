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

* **LR schedule per step.**  ``cosine`` anneals from ``lr`` to 0 over every step after the
  warm-up; ``step`` multiplies by 0.1 at 50% and 75% of training; ``constant`` keeps ``lr``.
  Warm-up epochs run at the constant ``warmup_lr`` (CoOp's ConstantWarmupScheduler).
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
import inspect
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..augment.factory import MIXER_NAMES, active_mixer
from ..config import BACKMIX_MODES, OPTIMIZERS, SCHEDULES, BackMixConfig, OptimConfig, RunConfig
from ..errors import ConfigError, DivergedError, ModelError
from ..models.output import ModelOutput
from ..runs import atomic_write_text
from ..runtime import check_autocast_precision, resolve_device, resolve_run_precision, single_process_launch_warning
from ..validation import check_choice
from .lookahead import Lookahead
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

#: airbench's piecewise-linear schedule: factor 0.2 at step 0, 1.0 at 23 % of training, 0.07 at the end
TRIANGLE = (0.2, 0.23, 0.07)
CHECKPOINT_FORMAT = 1
TRAIN_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "time", "bank_skipped")

Evaluator = Callable[[nn.Module, int], dict[str, float]]


# ----------------------------------------------------------------------------- task protocol
# TrainTask (the calls of one step, in order) and StepPlan live in .tasks; importable from here.


# ----------------------------------------------------------------------------- pure helpers
def norm_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter of a normalisation layer (BatchNorm / GroupNorm / LayerNorm)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}


def build_optimizer(params: Sequence[nn.Parameter], cfg: OptimConfig,
                    norm_ids: set[int] | None = None,
                    train_epochs: dict[int, int] | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum, the paper's recipe) or AdamW over ``params``.

    ``cfg.norm_lr_scale != 1``: the parameters in ``norm_ids`` get ``lr * scale`` and a weight
    decay divided by the scale, so their decay per step is unchanged (airbench's 64x BN biases).
    ``train_epochs`` (parameter ``id`` -> epochs, from ``optim.freeze_after``) puts those parameters
    in groups of their own whose ``train_epochs`` key makes :func:`build_scheduler` stop them.
    """
    check_choice(cfg.name, OPTIMIZERS, "optim.name")
    params = list(params)
    if not params:
        raise ConfigError("optim: the model has no trainable parameters (requires_grad is False everywhere)")
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr: {cfg.lr!r} is not accepted; expected a positive number")
    if cfg.norm_lr_scale <= 0:
        raise ConfigError(f"optim.norm_lr_scale: {cfg.norm_lr_scale!r} is not accepted; expected a positive number")
    scale = cfg.norm_lr_scale
    norm_ids = norm_ids if scale != 1.0 and norm_ids else set()
    train_epochs = train_epochs or {}
    keyed: dict[tuple[bool, int | None], list[nn.Parameter]] = {}
    for p in params:  # groups in first-seen order: (normalisation layer?, epochs it trains)
        keyed.setdefault((id(p) in norm_ids, train_epochs.get(id(p))), []).append(p)
    groups: list[dict[str, Any]] = []
    for (is_norm, epochs), members in keyed.items():
        group: dict[str, Any] = {"params": members}
        if is_norm:
            group.update(lr=cfg.lr * scale, weight_decay=cfg.weight_decay / scale)
        if epochs is not None:
            group["train_epochs"] = epochs
        groups.append(group)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based), per-step schedule."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr / cfg.lr
    total = max(1, cfg.epochs * steps_per_epoch - warmup)
    t = min(step - warmup, total) / total
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return 0.1 ** sum(t >= m for m in (0.5, 0.75))
    if cfg.schedule == "triangle":
        start, peak, end = TRIANGLE
        return start + (1 - start) * t / peak if t < peak else 1 + (end - 1) * (t - peak) / (1 - peak)
    return 1.0


def frozen_after(model: nn.Module, patterns: dict[str, int | None]) -> dict[int, int]:
    """``optim.freeze_after`` resolved: trainable parameter ``id`` -> epochs it trains.

    A pattern is an ``fnmatch`` glob over ``model.named_parameters()`` names (e.g. ``"*whiten.bias"``);
    one that matches no trainable parameter is an error naming the key.  ``None`` (YAML ``null``)
    switches a pattern off, so a config can undo the freeze its ``_base_`` sets.
    """
    import fnmatch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[int, int] = {}
    for pattern, epochs in patterns.items():
        if epochs is None:
            continue
        hits = [p for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(n for n, _ in named[:6])
            raise ConfigError(f"optim.freeze_after: {pattern!r} matches no trainable parameter; names look like: "
                              f"{sample}{', ...' if len(named) > 6 else ''}")
        out.update({id(p): int(epochs) for p in hits})
    return out


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    check_choice(cfg.schedule, SCHEDULES, "optim.schedule")
    if cfg.epochs < 1 or not 0 <= cfg.warmup_epochs < max(cfg.epochs, 1) + (cfg.warmup_epochs == 0):
        raise ConfigError(f"optim: epochs={cfg.epochs}, warmup_epochs={cfg.warmup_epochs}; "
                          "expected epochs >= 1 and 0 <= warmup_epochs < epochs")

    def factor(stop: float) -> Callable[[int], float]:  # a group frozen after ``stop`` steps gets LR 0
        return lambda s: lr_factor(s, steps_per_epoch=steps_per_epoch, cfg=cfg) if s < stop else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor(g.get("train_epochs", math.inf) * steps_per_epoch) for g in optimizer.param_groups])


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
    ``meta`` (plain data: config, class names) is stored in every checkpoint.  The mixer is
    ``augment`` built from the ``backmix`` section plus ``augment_options`` (e.g. mixup
    ``alpha``); ``augment="backmix"`` with ``backmix.enabled=False`` trains plain.
    """

    _mixer_takes_geometry = False  # set by _build_mixer

    def __init__(
        self,
        task: TrainTask,
        train_set: Dataset,
        *,
        optim: OptimConfig,
        run: RunConfig,
        run_dir: str | Path,
        num_classes: int,
        augment: str = "none",
        backmix: BackMixConfig | None = None,
        augment_options: dict[str, Any] | None = None,
        num_workers: int = 0,
        evaluate: Evaluator | None = None,
        eval_every: int = 0,
        best_metric: str | None = None,
        meta: dict[str, Any] | None = None,
        accelerator: Any = None,
        views: Any = None,
    ) -> None:
        check_choice(augment, MIXER_NAMES, "augment")
        self.backmix = backmix or BackMixConfig()
        check_choice(self.backmix.mode, BACKMIX_MODES, "backmix.mode")
        if self.backmix.bank_update_every < 1:
            raise ConfigError(f"backmix.bank_update_every: {self.backmix.bank_update_every!r}; expected >= 1")
        self.task, self.train_set = task, train_set
        self.optim_cfg, self.run_cfg = optim, run
        self.run_dir = Path(run_dir)
        self.num_classes, self.augment = num_classes, augment
        self.augment_options = dict(augment_options or {})
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

        self.bank, self.mixer = self._build_mixer()
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
    def _build_mixer(self) -> tuple[nn.Module | None, Callable[..., Any] | None]:
        if active_mixer(self.augment, self.backmix.enabled) == "none":
            return None, None
        from ..augment import build_mixer
        from ..augment.mask_bank import MaskBank

        bank = None
        if self.augment == "backmix":
            size = self.task.saliency_size
            if size is None:
                raise ConfigError("augment: backmix needs foreground maps, but this model gives none "
                                  "(no CAM head / saliency); choose augment none, cutout, mixup or cutmix")
            bank = MaskBank.from_config(self.backmix, len(self.train_set), tuple(size), device=self.device)
        options = {**asdict(self.backmix), **self.augment_options}  # BackMix keys, then mixer options
        if self.augment == "backmix" and self.backmix.mask_source == "oracle":
            if self.true_masks is None:
                raise ConfigError("backmix.mask_source: 'oracle' needs a training set with foreground masks "
                                  "(e.g. the bgshift datasets); this one has none")
            options["true_masks"] = self.true_masks.to(self.device)
        mixer = build_mixer(self.augment, options, bank, self.num_classes, self.mix_generator)
        self._mixer_takes_geometry = "geometry" in inspect.signature(mixer.__call__).parameters
        return bank, mixer

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
            kw = {"geometry": geometry} if self._mixer_takes_geometry else {}
            mix = self.mixer(images, labels, indices, **kw)
            if cfg.mode == "alongside":
                mix = alongside(images, labels, mix)
        self.optimizer.zero_grad(set_to_none=True)
        with acc.autocast():  # 2. the training forward (keeps what the plan asks for)
            out = _as_output(task.forward(self.model, mix.images, plan))
        out = output_to_fp32(out)
        loss = task.loss(out, mix)  # 3. loss, backward, optimizer step
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
                raise ModelError(f"{path}: the checkpoint has no mask bank but augment is backmix")
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
