"""Typed experiment configs: YAML files → dataclasses, with strict validation.

* Every section is a dataclass; a YAML key that is not a field fails with
  :class:`~backmix_vlm.errors.ConfigError` naming the key, where it was, and the valid keys.
* Command-line overrides are ``section.key=value`` (value parsed as YAML, so
  ``train.epochs=3``, ``eval.scores=[msp,energy]``, ``model.checkpoint=null`` work).
* :func:`to_dict` gives the fully resolved config that every run writes beside its results.

Shared sections live here; each job's top-level config (e.g. ``ZeroShotConfig``) lives
with its runner in :mod:`backmix_vlm.runners`.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError
from .metric_keys import check_table_settings, table_settings
from .validation import check_choice, check_fraction, check_non_negative, check_positive, check_range, join

DATA_ROOT_ENV = "BACKMIX_DATA"   # default for every job's data_root (else ./data)

C = TypeVar("C")

# choices of the shared sections (the trainer checks the same names; BackMix reads PAIRINGS / MASK_SOURCES).
# Names of registered things (mixers, views, adapters, scores) are not listed here: each job checks
# them against their registries (``jobs.train.preflight``, ``FewShotConfig.validate``).
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant", "step", "triangle")
BACKMIX_MODES = ("alongside", "mixed_only")
PAIRINGS = ("random", "different_class")
MASK_SOURCES = ("bank", "random", "oracle")


# ----------------------------------------------------------------------------- sections
def default_data_root() -> str:
    """``$BACKMIX_DATA`` when set, else ``data`` (relative to the working directory)."""
    return os.path.expanduser(os.environ.get(DATA_ROOT_ENV) or "data")


@dataclass
class RunConfig:
    """Where and how a run is recorded."""

    output_dir: str = "runs"          # parent folder of run directories
    name: str | None = None           # run directory name; default: <job>-<timestamp>
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "no"             # auto | no | bf16 | fp16  (autocast; auto: bf16 where the device computes it natively, fp16 on older GPUs, else fp32; runtime.resolve_run_precision)
    channels_last: bool = False       # CNNs: NHWC memory format (faster convolutions with bf16 on CPU and GPU)
    compile: bool = False             # torch.compile the model for training, the frozen image tower for zero-shot evaluation (first batches pay the compile time)
    process_timeout_s: float = 1800.0  # multi-process runs: seconds a process waits for the others at a collective (e.g. while the main process evaluates) before the run fails with a clear error (torch's default 30 min)
    eval_workers: int | str = "auto"  # zero-shot on CPU: split each batch over N threads of one intra-op thread each (auto: one per torch thread; 0/1: off); docs/benchmarks_speed.md

    def validate(self, where: str = "run") -> None:
        from .runtime import check_autocast_precision, check_device_name, check_eval_workers

        check_device_name(self.device, join(where, "device"))
        check_autocast_precision(self.precision, join(where, "precision"))
        check_eval_workers(self.eval_workers, join(where, "eval_workers"))
        check_range(self.process_timeout_s, join(where, "process_timeout_s"), low=1)
        if self.name is not None and (not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\")):
            raise ConfigError(f"{join(where, 'name')}: {self.name!r} is not a usable folder name")


@dataclass
class DataSource:
    """One dataset split, by registered name (see ``backmix_vlm.data.DATASETS``)."""

    name: str = "cifar10"             # cifar10 | cifar100 | svhn | tinyimagenet | mnist | fashionmnist | imagefolder | demo
    root: str | None = None           # folder that holds the data (layout detected inside it); null: the job's data_root
    split: str = "test"               # train | test | val (whatever the dataset offers)
    layout: str = "auto"              # auto | torchvision | folder | hf
    download: bool = False            # torchvision download when online
    classes: list[int] | None = None  # keep only these label ids (relabelled 0..K-1 in this order)
    label: str | None = None          # display name in tables (default: name)
    jpeg_quality: int | None = None   # JPEG round trip at this quality (match JPEG-stored ID data)
    resize: str = "resize"            # resize | crop | center_crop: how to reach the model's size
    max_samples: int | None = None    # N evenly spaced samples (after class filtering; class-balanced on sorted data)
    on_corrupt: str = "error"         # error | skip (skipped files are counted in a warning)

    @property
    def display_name(self) -> str:
        return self.label or self.name

    def validate(self, where: str = "data") -> None:
        check_choice(self.layout, ("auto", "torchvision", "folder", "hf"), join(where, "layout"))
        check_choice(self.resize, ("resize", "crop", "center_crop"), join(where, "resize"))
        check_choice(self.on_corrupt, ("error", "skip"), join(where, "on_corrupt"))
        check_range(self.jpeg_quality, join(where, "jpeg_quality"), low=1, high=100, allow_none=True)
        check_range(self.max_samples, join(where, "max_samples"), low=1, allow_none=True)
        if not self.name:
            raise ConfigError(f"{join(where, 'name')}: give a dataset name")


@dataclass
class ViewsConfig:
    """Random training geometry (crop / flip), drawn per sample on the batch's device.

    The loader then returns each image in its canonical frame (decoded + resized, as for
    evaluation) and BackMix's mask bank stays in that frame (see ``docs/methods.md``).  ``name`` is
    checked against ``augment.geometry.view_names()`` by the job that holds this section.
    """

    name: str = "auto"                # auto | none | loader (v0.1: in the workers) | a view sampler: crop_flip, resized_crop_flip, flip, ...
    options: dict[str, Any] = field(default_factory=dict)  # sampler options: padding, pad_mode, flip_p, scale, ratio


@dataclass
class EvalConfig:
    """Open-set / OOD evaluation."""

    ood: list[DataSource] = field(default_factory=list)  # unknown sets
    extra_known: list[DataSource] = field(default_factory=list)  # known classes under a shift: accuracy only (acc/<label>)
    scores: list[str] = field(default_factory=lambda: ["msp", "maxlogit", "energy"])
    score_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {energy: {temperature: 1}}
    batch_size: int = 128
    num_workers: int = 2
    cache_features: bool = True       # reuse frozen-encoder features across scores and OOD sets
    positive: str = "known"           # known | unknown (OpenOOD convention): the positive class of `fpr95` / `tnr95`
    every: int = 0                    # evaluate every N epochs during training (0 = only at the end)
    # What results.md / summary.md show (results.json has every metric in every convention):
    table_fpr95: str = "auto"         # auto (eval.positive's) | id_positive | ood_positive | both
    table_aupr: str = "step"          # step (average precision) | trapezoid (OpenOOD) | both
    table_metrics: list[str] = field(default_factory=lambda: ["auroc", "aupr_in", "aupr_out", "fpr95", "dtacc",
                                                              "oscr", "macro_f1"])

    def validate(self, where: str = "eval") -> None:
        check_range(self.batch_size, join(where, "batch_size"), low=1)
        check_non_negative(self.num_workers, join(where, "num_workers"))
        check_choice(self.positive, ("known", "unknown"), join(where, "positive"))
        check_table_settings(self.table_fpr95, self.table_aupr, self.table_metrics, where)
        check_non_negative(self.every, join(where, "every"))
        if not self.scores:
            raise ConfigError(f"{join(where, 'scores')}: list at least one score")

    def table(self) -> dict[str, Any]:
        """The ``"table"`` entry of the results: the tables' columns and conventions (``auto`` resolved)."""
        return table_settings(self.positive, self.table_fpr95, self.table_aupr, self.table_metrics)


@dataclass
class OptimConfig:
    name: str = "sgd"                 # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # cosine | constant | step | triangle (airbench: 0.2 -> 1 at 23 % -> 0.07)
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5           # constant LR during warm-up (CoOp style)
    epochs: int = 200
    batch_size: int = 128
    grad_clip: float | None = None
    label_smoothing: float = 0.0      # cross-entropy label smoothing (train job; airbench: 0.2)
    norm_lr_scale: float = 1.0        # LR multiplier of normalisation-layer parameters, weight decay kept (airbench: 64)
    lookahead: bool = False           # airbench's scheduled Lookahead (weights + BN statistics, every 5 steps)
    freeze_after: dict[str, int | None] = field(default_factory=dict)  # parameter-name glob -> epochs it trains (airbench: whitening bias 3); null: all

    def validate(self, where: str = "optim") -> None:
        check_choice(self.name, OPTIMIZERS, join(where, "name"))
        check_choice(self.schedule, SCHEDULES, join(where, "schedule"))
        check_range(self.label_smoothing, join(where, "label_smoothing"), low=0, high=1, high_open=True)
        check_positive(self.norm_lr_scale, join(where, "norm_lr_scale"))
        check_positive(self.lr, join(where, "lr"))
        check_positive(self.warmup_lr, join(where, "warmup_lr"))
        check_range(self.momentum, join(where, "momentum"), low=0, high=1, high_open=True)
        check_non_negative(self.weight_decay, join(where, "weight_decay"))
        check_range(self.epochs, join(where, "epochs"), low=1)
        check_range(self.batch_size, join(where, "batch_size"), low=1)
        check_positive(self.grad_clip, join(where, "grad_clip"), allow_none=True)
        for pattern, epochs in self.freeze_after.items():
            if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0):
                raise ConfigError(f"{join(where, 'freeze_after')}: {pattern!r}: {epochs!r} is not accepted; "
                                  "expected a whole number of epochs >= 0, or null (trains throughout)")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"{join(where, 'warmup_epochs')}: {self.warmup_epochs!r} is not accepted with "
                              f"epochs={self.epochs}; expected 0 <= warmup_epochs < epochs")


@dataclass
class BackMixConfig:
    enabled: bool = True
    cut_area: float = 0.25            # s: pasted square's AREA fraction (paper: 0.25 → side 0.5)
    mask_ratio: float = 0.25          # k: top-k fraction of bank cells treated as foreground
    momentum: float = 0.1             # β: weight of the new map in the EMA bank update
    same_location: bool = True        # paper: paste at the cut location; False: official code's independent source box
    pairing: str = "random"           # random | different_class
    mode: str = "alongside"           # alongside (original + mixed) | mixed_only
    bank_update_every: int = 1        # steps between bank updates when maps need an extra pass
    mask_source: str = "bank"         # bank (the method) | random (ablation) | oracle (true masks of a bgshift dataset)

    def validate(self, where: str = "backmix") -> None:
        check_fraction(self.cut_area, join(where, "cut_area"), low_open=True)
        check_fraction(self.mask_ratio, join(where, "mask_ratio"))
        check_fraction(self.momentum, join(where, "momentum"), low_open=True)
        check_choice(self.pairing, PAIRINGS, join(where, "pairing"))
        check_choice(self.mode, BACKMIX_MODES, join(where, "mode"))
        check_range(self.bank_update_every, join(where, "bank_update_every"), low=1)
        check_choice(self.mask_source, MASK_SOURCES, join(where, "mask_source"))


def active_mixer(name: str, backmix_enabled: bool = True) -> str:
    """The mixer that actually runs: ``name``, except ``none`` for ``backmix`` with ``backmix.enabled: false``
    (so a sweep can switch BackMix off with one flag)."""
    return "none" if name == "backmix" and not backmix_enabled else name


@dataclass
class AugmentConfig:
    """The ``augment`` section of the train and fewshot jobs: the batch mixer (``augment.build_mixer``).
    ``backmix`` reads the ``backmix`` section; ``backmix.enabled: false`` turns it off (plain training) so a
    sweep can flip one flag.  Defined here, not in ``augment``, so a typo in a key is reported without
    torch; ``name`` and ``options`` are checked against ``augment.MIXERS`` by the job that holds it."""

    name: str = "backmix"              # a registered mixer: backmix | cutout | mixup | cutmix | none | ...
    options: dict[str, Any] = field(default_factory=dict)  # e.g. mixup/cutmix {alpha: 1.0}, cutout {side: 0.5}

    def active(self, backmix_enabled: bool) -> str:
        return active_mixer(self.name, backmix_enabled)


# ----------------------------------------------------------------------------- machinery
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, failing with a clear message."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)})")
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, str) and tp is DataSource:
            return DataSource(name=value)  # shorthand: "cifar100"
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {_field_names(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    origin = get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (Union, types.UnionType):  # e.g. int | str
        for arg in get_args(tp):
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 1e-5 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `yes` (e.g. precision: no) as a bool
            return "yes" if value else "no"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{path}'{hint}; valid keys"
                f"{' in ' + where if where else ''}: {', '.join(fields)}"
            )
        kwargs[key] = _convert(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    run_validate(obj, where)
    return obj


def run_validate(obj: Any, where: str = "") -> None:
    """Call ``obj.validate(where)`` (or ``obj.validate()`` for validators without a key path)."""
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    try:
        takes_where = bool(inspect.signature(validate).parameters)
    except (TypeError, ValueError):
        takes_where = False
    if takes_where and where:
        validate(where)
    else:
        validate()


_TORCH_CHECKS = contextvars.ContextVar("backmix_torch_checks", default=True)


@contextlib.contextmanager
def without_torch_checks() -> Any:
    """Validators skip their checks that need torch-side registries (score names, CLIP templates):
    the CLI checks keys, types and ranges this way before torch loads, and the job builds the
    config again with every check."""
    token = _TORCH_CHECKS.set(False)
    try:
        yield
    finally:
        _TORCH_CHECKS.reset(token)


def torch_checks() -> bool:
    """False inside :func:`without_torch_checks`."""
    return _TORCH_CHECKS.get()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The fully resolved config as plain data (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested mapping (value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a mapping; ``_base_: other.yaml`` (relative to the file) is merged underneath."""
    path = Path(path)
    if not path.is_file():
        via = f" (the _base_ of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{via}")
    if path.resolve() in [p.resolve() for p in _chain]:
        raise ConfigError(f"{_chain[-1]}: _base_ loop: {' -> '.join(map(str, (*_chain, path)))}; remove one of "
                          "these _base_ keys")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("_base_", None)  # optional inheritance: _base_: other.yaml
    if base:
        parent = load_yaml(path.parent / base, (*_chain, path))
        data = _deep_merge(parent, data)
    return data


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load ``path`` (YAML) into ``cls`` with ``section.key=value`` overrides applied.

    An error caused by an override names that override; otherwise it names the file.
    """
    data = load_yaml(path) if path is not None else {}
    return build_with_overrides(lambda raw: from_dict(cls, raw), data, list(overrides or []),
                                str(path) if path is not None else "")


def build_with_overrides(build: Callable[[dict[str, Any]], C], base: dict[str, Any], overrides: list[str],
                         where: str = "") -> C:
    """``build(base + overrides)``; a ConfigError names the override that caused it, else ``where``.

    When the full build fails, the culprit is found by building ``base`` alone and then with one
    more override at a time: the first step that fails with the same message is blamed.
    """
    overrides = list(overrides)
    try:
        return build(apply_overrides(copy.deepcopy(base), overrides))
    except ConfigError as e:
        message = str(e)
    culprit = _blame(build, base, overrides, message)
    if culprit is not None:
        raise ConfigError(f"override '{culprit}': {message}") from None
    raise ConfigError(f"{where}: {message}" if where else message) from None


def _blame(build: Callable[[dict[str, Any]], Any], base: dict[str, Any], overrides: list[str],
           message: str) -> str | None:
    if not overrides:
        return None

    def fails(k: int) -> bool:
        try:
            build(apply_overrides(copy.deepcopy(base), overrides[:k]))
        except ConfigError as e:
            return str(e) == message
        return False

    if fails(0):
        return None  # the file alone already has this error
    for k in range(1, len(overrides) + 1):
        if fails(k):
            return overrides[k - 1]
    return overrides[-1]


def data_root_override(overrides: list[str]) -> str | None:
    """The value of the last ``data_root=...`` override, or None."""
    for item in reversed(overrides):
        key, _, value = item.partition("=")
        if key.strip() == "data_root":
            return str(yaml.safe_load(value)) if value else ""
    return None


def move_data_root(saved: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A saved (resolved) config whose sources read from its ``data_root``, moved to the ``data_root=``
    override: every ``root`` equal to the saved ``data_root`` becomes the new one (a resolved config
    holds each source's root, so overriding ``data_root`` alone would change nothing)."""
    new, old = data_root_override(overrides), saved.get("data_root")
    if new is None or old is None:
        return saved

    def move(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (new if k == "root" and v == old else move(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [move(v) for v in node]
        return node

    return move(saved)


def fill_data_roots(obj: Any, root: str) -> None:
    """Set ``root`` on every :class:`DataSource` inside ``obj`` whose ``root`` is null (in place)."""
    if isinstance(obj, DataSource):
        if obj.root is None:
            obj.root = root
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            fill_data_roots(item, root)
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            fill_data_roots(getattr(obj, f.name), root)

