"""``backmix-vlm`` command line: one subcommand per job.

Each job lives in ``backmix_vlm.runners.<job>`` and exposes ``main(args) -> int``.  Jobs
are imported lazily so ``--help`` is instant.  User errors (:class:`BackmixError`) print one
clear message and exit 2 — no traceback soup.  Flags may stand anywhere after the job name
(``backmix-vlm train cfg.yaml optim.epochs=3 --resume``).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import BackmixError, environment_message, user_message

_CONFIG_HELP = "experiment YAML file (see configs/)"
_OVERRIDE_HELP = "overrides as section.key=value, e.g. optim.epochs=3 eval.scores=[msp,energy]"

JOBS: dict[str, tuple[str, str]] = {
    "zeroshot": (
        "Zero-shot OOD evaluation of a pretrained CLIP.",
        "Encode the in-distribution test set and every configured OOD set with a frozen open_clip "
        "model, score them (MCM, GL-MCM, MSP, MaxLogit, Energy, ...) and write results.md / "
        "results.json (ID accuracy, then every metric per OOD set and score) into the run directory.",
    ),
    "ood": (
        "OOD evaluation of any pretrained classifier (timm, torchvision, a train run, your nn.Module).",
        "Encode the ID test set, the OOD sets and (for scores with training statistics or a linear "
        "probe) the ID training set once each, then score them with KNN, ViM, ReAct, ASH, GEN, "
        "Mahalanobis, Energy, MSP, ... and write results.md / results.json, scores.safetensors and "
        "score histograms into the run directory.",
    ),
    "train": (
        "Train a CNN from scratch (optionally with BackMix) and evaluate open-set metrics.",
        "Train the configured model with Accelerate (CPU, GPU or `accelerate launch`), checkpoint "
        "atomically every epoch, evaluate closed-set accuracy and open-set metrics, and log to "
        "the console and log.csv / results.json in the run directory. --resume continues exactly.",
    ),
    "fewshot": (
        "Few-shot / full-data prompt tuning (CoOp, LoCoOp, VPT) with or without BackMix.",
        "For each seed: sample k shots per class (split saved as JSON), train the adapter over a "
        "frozen CLIP / ViT with BackMix alongside the original samples, and evaluate the known test "
        "set against the OOD sets; aggregate mean ± std over seeds into results.md / results.json.",
    ),
    "eval": (
        "Evaluate a trained checkpoint on known vs unknown sets.",
        "Load a run directory's checkpoint and config and recompute the open-set / OOD tables, "
        "optionally with other scores or OOD sets given as overrides.",
    ),
    "visualize": (
        "Pictures of a run: BackMix grids (TI, BI, mask, mixed) and score histograms.",
        "Write backmix_grid.png (target image, background image, its estimated foreground mask, "
        "the mixed image) and score_hist_<set>.png (known vs unknown scores) into <run-dir>/plots.",
    ),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; expected a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from . import __version__

    jobs: dict[str, argparse.ArgumentParser] = {}
    parser = argparse.ArgumentParser(
        prog="backmix-vlm",
        description="BackMix and open-set / OOD evaluation for CNNs, ViTs and CLIP.",
    )
    parser.add_argument("--version", action="version", version=f"backmix_vlm {__version__}")
    sub = parser.add_subparsers(dest="job", metavar="{" + ",".join(JOBS) + "}")
    for name, (short, long) in JOBS.items():
        p = jobs[name] = sub.add_parser(name, help=short, description=f"{short} {long}")
        p.add_argument("--debug", action="store_true",
                       help="show the full traceback of an error instead of its one-line message")
        if name == "visualize":
            p.add_argument("run_dir", help="a run directory written by train / fewshot")
            p.add_argument("--num", type=_positive_int, default=8, help="rows in the BackMix grid (>= 1)")
            p.add_argument("--out", default=None, help="output folder (default: <run-dir>/plots)")
        elif name == "eval":
            p.add_argument("run_dir", help="a run directory with config.yaml and a checkpoint")
            p.add_argument("overrides", nargs="*", help=_OVERRIDE_HELP)
        else:
            p.add_argument("config", help=_CONFIG_HELP + ("; with --resume also a run directory"
                                                          if name in ("train", "fewshot") else ""))
            p.add_argument("overrides", nargs="*", help=_OVERRIDE_HELP)
            if name in ("train", "fewshot"):
                p.add_argument("--resume", action="store_true",
                               help="continue the run in run.output_dir/run.name (or the run directory given) from "
                                    "its last checkpoint, with its saved config; overrides are optional")
                p.add_argument("--allow-changes", action="store_true",
                               help="with --resume: accept overrides that change settings affecting the results "
                                    "(recorded in run_info.json)")
            p.add_argument("--overwrite", action="store_true",
                           help="replace an existing run of the same run.name (its files are deleted once the new "
                                "run has its first checkpoint; until then the old run is kept whole)")
    return parser, jobs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, jobs = _build_parsers()
    if argv and argv[0] in jobs:  # flags anywhere among the positionals (overrides)
        args = jobs[argv[0]].parse_intermixed_args(argv[1:])
        args.job = argv[0]
    else:
        args = parser.parse_args(argv)
    if not args.job:
        parser.print_help()
        return 0
    args.argv = ["backmix-vlm", *argv]
    from .perf import keep_freed_memory

    keep_freed_memory()  # CPU: no page faults on every forward's activations (backmix_vlm/perf.py)
    _keep_interrupts()
    _JOB_RUNNING[0] = True
    try:
        return _run_job(args)
    finally:  # no interrupt re-delivered once the job has returned (an embedding program, a test runner)
        _JOB_RUNNING[0] = False
        _cancel_redeliveries()


def _run_job(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "config", None) or args.job == "eval":
            _check_config_early(args)
        if getattr(args, "config", None):
            _preflight_data(args.config, list(getattr(args, "overrides", []) or []))
        module = importlib.import_module(f"backmix_vlm.runners.{args.job}")
        return int(module.main(args) or 0)
    except BackmixError as e:
        if args.debug:
            raise
        _report(args.job, f"error: {user_message(e)}", e)
        return 2
    except OSError as e:  # the environment: a full disk, a read-only or forbidden folder
        message = environment_message(e)
        if message is None or args.debug:
            raise
        _report(args.job, f"error: {message}", e)
        return 2
    except KeyboardInterrupt as e:
        _cancel_redeliveries()  # this Ctrl-C is handled: no second one from a finalizer
        if args.debug:
            raise
        try:
            _report(args.job, "interrupted", e)
        except KeyboardInterrupt:  # a second Ctrl-C (or one re-delivered by _keep_interrupts) while reporting
            pass
        return 130


_REDELIVERIES: list = []  # timers of interrupts _keep_interrupts delivers again (cancelled once one is handled)
_JOB_RUNNING = [False]    # re-deliver only while a job runs in main()


def _cancel_redeliveries() -> None:
    for timer in _REDELIVERIES:
        timer.cancel()
    _REDELIVERIES.clear()


def _interrupt_running_job() -> None:
    import _thread

    if _JOB_RUNNING[0]:
        _thread.interrupt_main()


def _keep_interrupts() -> None:
    """Ctrl-C that lands in a finalizer (torch's DataLoader iterator joins its workers in ``__del__``)
    raises KeyboardInterrupt there, which Python prints as "Exception ignored" and drops: the run went
    on and exited 0.  Such an interrupt is delivered again to the main thread, where it stops the job
    like any other Ctrl-C (exit 130, the run kept resumable)."""
    previous = sys.unraisablehook
    if getattr(previous, "keeps_interrupts", False):
        return

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            import threading

            while True:  # raised in the main thread shortly after this hook returns (a raise in it is dropped too)
                try:
                    timer = threading.Timer(0.2, _interrupt_running_job)
                    timer.daemon = True
                    _REDELIVERIES.append(timer)
                    timer.start()
                    return
                except KeyboardInterrupt:  # another Ctrl-C while scheduling: schedule again
                    continue
        previous(unraisable)

    hook.keeps_interrupts = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _report(job: str, text: str, error: BaseException) -> None:
    """The one line the user reads (+ how to continue a run that is kept), on stderr."""
    hint = getattr(error, "resume_hint", None)
    print(f"backmix-vlm {job}: {text}" + (f"\n  {hint}" if hint else ""), file=sys.stderr)


#: jobs whose config module imports without torch: job -> (module, config builder).  ``fewshot`` is
#: not among them: its optimiser recipes and ``method.options`` classes live with the adapters (torch).
LIGHT_CONFIGS = {"train": ("backmix_vlm.jobs.train", "build_train_config"),
                 "ood": ("backmix_vlm.jobs.ood", "build_ood_config"),
                 "zeroshot": ("backmix_vlm.jobs.zeroshot", "build_zeroshot_config")}


def _check_config_early(args: argparse.Namespace) -> None:
    """Build the job's config (keys, types, ranges, every variant) before torch is imported, so a typo
    is answered in about a second; the job builds it again (cheap) when it plans the run."""
    if args.job == "eval":
        return _check_eval_overrides(Path(args.run_dir), list(args.overrides or []))
    spec = LIGHT_CONFIGS.get(args.job)
    if spec is None or getattr(args, "resume", False) or Path(args.config).is_dir():
        return  # --resume: the saved config is the base (runs.resume_config checks it)
    from .config import build_with_overrides, load_yaml, without_torch_checks

    build = getattr(importlib.import_module(spec[0]), spec[1])
    with without_torch_checks():
        build_with_overrides(build, load_yaml(args.config), list(getattr(args, "overrides", []) or []), args.config)


def _check_eval_overrides(run_dir: Path, overrides: list[str]) -> None:
    """``eval <train run> overrides``: the saved config + the overrides, as the job will build them."""
    import json

    info = run_dir / "run_info.json"
    if not (run_dir / "config.yaml").is_file():
        return  # the job says what is missing
    if info.is_file() and json.loads(info.read_text()).get("job", "train") != "train":
        return  # a fewshot run: its config builder needs torch (see LIGHT_CONFIGS)
    from .jobs.train import load_overridden

    load_overridden(run_dir, overrides)


def _preflight_data(config: str, overrides: list[str]) -> None:
    """Datasets no job can download (ImageNet-1k protocol) must exist before models load (seconds, not minutes)."""
    from .config import DataSource, apply_overrides, from_dict, load_yaml
    from .errors import ConfigError
    from .data.datasets import DATASETS, preflight

    try:
        tree = apply_overrides(load_yaml(config), overrides)
    except ConfigError:
        return  # the job reports config errors itself

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and node["name"] in DATASETS and ("root" in node or "split" in node):
                try:
                    src = from_dict(DataSource, node)
                except ConfigError:
                    return
                preflight(src)
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)


if __name__ == "__main__":
    sys.exit(main())
