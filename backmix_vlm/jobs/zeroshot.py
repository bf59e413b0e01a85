"""``zeroshot`` job: its config (a frozen CLIP, prompts, the known test set, OOD sets), loader and preflight."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import DataSource, EvalConfig, RunConfig, default_data_root, fill_data_roots, from_dict, torch_checks
from ..errors import ConfigError
from ..runtime import WEIGHT_PRECISIONS
from ..validation import check_choice
from .data import check_distinct_sets

JOB = "zeroshot"
DEFAULT_SCORES = ["mcm", "glmcm", "msp", "maxlogit", "energy"]


@dataclass
class ClipModelConfig:
    """Which CLIP, with which weights and prompts (see :func:`backmix_vlm.models.clip.load_clip`)."""

    name: str = "ViT-B-16"                 # open_clip model name (open_clip.list_models()), or backmix-tiny-clip
    pretrained: str | None = "openai"      # open_clip tag; null = random init
    checkpoint: str | None = None          # local weights file (then `pretrained` only names the tag it holds)
    templates: str | list[str] = "simple"  # simple | cifar_ensemble | imagenet, or strings with '{}'
    classnames: list[str] | None = None    # prompt class names (default: the known set's CLIP-friendly names)
    precision: str = "fp32"                # weight precision: fp32 | fp16 | bf16 (run.precision = autocast)
    cache_dir: str | None = None           # open_clip / HF download cache (default: the HF cache)
    preprocess: str = "openai"             # transformers checkpoints: openai (the weights' own pipeline) | hf | hf_pil (CLIPImageProcessor)

    def validate(self) -> None:
        check_choice(self.precision, WEIGHT_PRECISIONS, "model.precision")

    def check_prompts(self) -> None:
        """The preprocessing mode and the templates (their names live with the CLIP code, which
        imports torch: checked by :meth:`ZeroShotConfig.validate`, outside the CLI's early check)."""
        from ..models.clip import resolve_templates
        from ..models.hf_clip import PREPROCESS_MODES

        check_choice(self.preprocess, PREPROCESS_MODES, "model.preprocess")
        try:
            resolve_templates(self.templates)
        except Exception as e:  # ModelError -> the config key that caused it
            raise ConfigError(f"model.templates: {e}") from None


@dataclass
class ZeroShotEvalConfig(EvalConfig):
    """:class:`EvalConfig` with the CLIP scores as the default list."""

    scores: list[str] = field(default_factory=lambda: list(DEFAULT_SCORES))


@dataclass
class ZeroShotConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data_root: str = field(default_factory=default_data_root)  # every data source without a root reads from here
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: DataSource = field(default_factory=DataSource)  # the known (ID) test set
    eval: ZeroShotEvalConfig = field(default_factory=ZeroShotEvalConfig)

    def __post_init__(self) -> None:
        fill_data_roots(self, self.data_root)

    def validate(self) -> None:
        check_distinct_sets(self.data, self.eval.ood)
        if not torch_checks():
            return
        self.model.check_prompts()
        build_scores(self.eval, None)  # names from the score registry, parameters, what a zero-shot run offers


def build_zeroshot_config(data: dict[str, Any]) -> ZeroShotConfig:
    return from_dict(ZeroShotConfig, data)


def preflight(cfg: ZeroShotConfig) -> None:
    """Check the CLIP name / tag / weights file, the scores and every data source before a run
    folder is created or a model is loaded."""
    from ..data import check_dataset
    from ..models.clip import check_clip_source

    check_clip_source(cfg.model.name, cfg.model.pretrained, cfg.model.checkpoint, "model", cfg.model.preprocess)
    check_dataset(cfg.data, "data")
    for i, src in enumerate(cfg.eval.ood):
        check_dataset(src, f"eval.ood[{i}] ({src.display_name})")


#: what a zero-shot run offers the scores' setup: the CLIP itself and its text encoder (no training
#: data, no linear head)
OFFERS = ("forward", "text")


def build_scores(cfg: EvalConfig, std: tuple[float, ...] | None) -> list[Any]:
    """Score objects from ``eval.scores`` / ``eval.score_params`` (ODIN gets the pixel-space epsilon via
    ``std``, as the reference code); a score needing training data or a head is refused."""
    from ..ood.open_set import build_scores as build_eval_scores

    return build_eval_scores(cfg, std, offers=OFFERS, job="a zero-shot run (use it with backmix-vlm fewshot / train)")
