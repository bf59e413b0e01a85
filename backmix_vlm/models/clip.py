"""open_clip loading, a tiny CLIP for tests, global + local (patch) features, zero-shot heads.

* :func:`load_clip` returns the model with its tokenizer and transforms (open_clip style) in a
  :class:`ClipBundle`.  Weights come from an open_clip pretrained tag (downloaded through the
  Hugging Face hub cache) or from a local ``checkpoint`` file.  OpenAI-tagged weights were
  trained with QuickGELU, so for any tag whose open_clip config says ``quick_gelu`` (e.g.
  ``ViT-B-16`` + ``openai``) the architecture is built with ``force_quick_gelu=True`` —
  otherwise the weights load but every activation is subtly wrong.
* Offline, a tag whose weights are not cached fails in seconds with one message that says how
  to provide them, instead of minutes of hub retries.
* ``backmix-tiny-clip`` (``model_configs/backmix-tiny-clip.json``) is registered with open_clip
  at import: a randomly initialised 32 px CLIP that runs in milliseconds on a CPU.
* :func:`encode_image_global_local` gives the global embedding *and* LoCoOp-style per-patch
  embeddings from one forward; LoCoOp, GL-MCM and :class:`ClipZeroShotClassifier` use it, and
  :class:`~backmix_vlm.saliency.local.LocalSimilarity` turns it into gradient-free foreground maps
  for the mask bank.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from ..compat import add_open_clip_config_dir
from ..errors import ModelError
from ..registry import Registry
from ..runtime import OFFLINE_ENV, WEIGHT_PRECISIONS, hub_reachable, resolve_device  # noqa: F401 (OFFLINE_ENV)
from .clip_bundle import ACCEPTED_CHECKPOINTS as _ACCEPTED
from .clip_bundle import ClipBundle, read_state_dict, set_block_layout
from .hf_clip import convert_state_dict as convert_hf_state_dict
from .hf_clip import find_hf_clip, is_hf_name, is_hf_state_dict, load_hf_clip
from .output import ModelOutput

TINY_CLIP = "backmix-tiny-clip"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# precision names (WEIGHT_PRECISIONS: the weight dtype of a frozen CLIP), OFFLINE_ENV and hub_reachable
# are defined in backmix_vlm.runtime; OFFLINE_ENV stays importable from here.

add_open_clip_config_dir(MODEL_CONFIG_DIR)  # makes "backmix-tiny-clip" an open_clip name


# ----------------------------------------------------------------------------- prompt templates
TEMPLATES: Registry[tuple[str, ...]] = Registry("prompt template set")
TEMPLATES.add("simple", ("a photo of a {}.",))
# CLIP's CIFAR-10 ensemble (openai/CLIP data/prompts.md).
TEMPLATES.add("cifar_ensemble", (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
))
# CLIP's 80 ImageNet templates, as shipped by open_clip.
TEMPLATES.add("imagenet", tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES))


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template-set name (see ``TEMPLATES``) or explicit ``"...{}..."`` strings → tuple."""
    if isinstance(templates, str):
        if "{}" in templates:
            return (templates,)
        try:
            return TEMPLATES.get(templates)
        except KeyError as e:
            raise ModelError(f"{e}; or give template strings containing '{{}}'") from None
    out = tuple(templates)
    bad = [t for t in out if not isinstance(t, str) or "{}" not in t]
    if not out or bad:
        raise ModelError(
            f"prompt templates must be a set name ({', '.join(TEMPLATES.names())}) or a non-empty "
            f"list of strings with a '{{}}' placeholder for the class name; got {bad or out!r}"
        )
    return out


# ----------------------------------------------------------------------------- loading
def load_clip(
    name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
    load_weights: bool = True,
    layout: str = "auto",
    config_section: str = "model",
    preprocess: str = "openai",
) -> ClipBundle:
    """Build an open_clip model with its tokenizer and transforms, frozen and in eval mode.

    ``pretrained`` is an open_clip tag (``open_clip.list_pretrained()``) or None for random
    init.  With ``checkpoint`` the weights come from that local file instead (open_clip or
    OpenAI state dict, ``.pt``/``.pth``/``.bin``/``.safetensors``, or an OpenAI JIT archive);
    ``pretrained`` then only says which tag the file holds, so its QuickGELU and normalisation
    settings are used — nothing is downloaded.  Hugging Face transformers CLIP checkpoints (a
    ``save_pretrained`` folder or weights file as ``checkpoint``, or ``name="hf:<repo or folder>"``)
    are converted by :mod:`backmix_vlm.models.hf_clip`, architecture from their ``config.json``.
    ``load_weights=False`` builds the tag's
    architecture and preprocessing with random weights (offline tests, shape checks).
    ``layout`` (``auto`` | ``batch_first`` | ``seq_first``) sets how the transformer blocks are
    fed; ``auto`` is ``seq_first`` on CPU — same math, but open_clip's batch-first attention
    projects a non-contiguous view that is ~7x slower in CPU bf16 (docs/benchmarks_speed.md).
    ``config_section`` is the job's config section holding these keys (``model`` for zeroshot,
    ``backbone`` for fewshot): error messages name ``<section>.checkpoint`` etc.
    ``preprocess`` is the evaluation pipeline of a transformers checkpoint: ``openai`` (default,
    the pipeline the weights were trained with), ``hf`` / ``hf_pil`` (transformers'
    ``CLIPImageProcessor``; see docs/methods.md); other checkpoints accept only ``openai``.
    """
    if precision not in WEIGHT_PRECISIONS:
        raise ModelError(f"precision {precision!r} is not accepted; choose one of {', '.join(WEIGHT_PRECISIONS)}")
    if pretrained is not None and checkpoint is None and os.path.isfile(pretrained):
        pretrained, checkpoint = None, pretrained  # open_clip also accepts a file as `pretrained`
    hf = find_hf_clip(name, checkpoint, cache_dir)  # transformers CLIP (hf:<repo>, save_pretrained folder / file)
    if hf is not None:
        return load_hf_clip(hf, device=resolve_device(device, "device"), precision=precision,
                            load_weights=load_weights, layout=layout, preprocess=preprocess)
    name, tag_cfg = check_clip_source(name, pretrained, checkpoint, config_section, preprocess)
    device = resolve_device(device, "device")

    kwargs: dict[str, Any] = dict(
        precision=precision, device=device, cache_dir=cache_dir, pretrained_text=False,
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
        image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"),
    )
    download = bool(tag_cfg) and checkpoint is None and load_weights
    offline: list[bool] = []
    # random init was asked for / download errors become one ModelError below
    quiet = _quiet_open_clip("initialized randomly", "Failed to download weights")
    try:
        guard = (_offline_guard(name, pretrained, tag_cfg, cache_dir, offline, config_section) if download
                 else contextlib.nullcontext())
        with quiet, guard:
            model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
                name, pretrained=pretrained if download else None, **kwargs)
    except RuntimeError as e:
        if not download:
            raise
        why = ("huggingface.co is unreachable and the weights are not in the Hugging Face cache"
               if offline else f"download failed: {str(e).splitlines()[0][:300]}")
        raise ModelError(_no_weights_message(name, pretrained, why, config_section)) from None
    if checkpoint is not None and load_weights:
        load_clip_checkpoint(model, checkpoint)

    model.eval().requires_grad_(False)
    set_block_layout(model, layout, device)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = tuple(pp["size"]) if isinstance(pp["size"], (tuple, list)) else (pp["size"], pp["size"])
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name, cache_dir=cache_dir),
        preprocess_train=preprocess_train,
        preprocess_eval=preprocess_eval,
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        image_size=size[0] if size[0] == size[1] else size,
        name=name,
        pretrained=str(checkpoint) if checkpoint is not None else pretrained if load_weights else None,
    )


def check_clip_source(name: str, pretrained: str | None = None, checkpoint: str | None = None,
                      config_section: str = "model", preprocess: str = "openai") -> tuple[str, dict[str, Any]]:
    """Check a CLIP's name, tag, weights file and ``preprocess`` choice without building it
    (seconds before any run).

    Returns the canonical model name and the tag's open_clip config (``{}`` without a tag).
    """
    from .hf_clip import PREPROCESS_MODES

    if preprocess not in PREPROCESS_MODES:
        raise ModelError(f"{config_section}.preprocess: {preprocess!r} is not accepted; choose one of "
                         f"{', '.join(PREPROCESS_MODES)}")
    if is_hf_name(name) or find_hf_clip(None, checkpoint) is not None:
        find_hf_clip(name, checkpoint)  # transformers CLIP: fails fast when the folder / cached snapshot is missing
        return name, {}
    if preprocess != "openai":
        raise ModelError(f"{config_section}.preprocess: {preprocess!r} needs a transformers (Hugging Face) CLIP "
                         "checkpoint; open_clip / OpenAI weights come with their own pipeline (use 'openai')")
    name = _check_model_name(name)
    tag_cfg = _check_tag(name, pretrained, config_section) if pretrained else {}
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"{config_section}.checkpoint: file not found: {checkpoint}")
    return name, tag_cfg


def _check_model_name(name: str) -> str:
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    clean = name.replace("/", "-")  # "ViT-B/16" (OpenAI spelling) -> "ViT-B-16"
    known = open_clip.list_models()
    if clean not in known:
        close = difflib.get_close_matches(clean, known, n=6, cutoff=0.5)
        hint = f"similar: {', '.join(close)}" if close else f"e.g. {', '.join(known[:6])}"
        raise ModelError(
            f"unknown open_clip model '{name}'; {hint} (all: open_clip.list_models(), "
            f"or 'hf-hub:org/repo' / 'local-dir:/path')"
        )
    return clean


def _check_tag(name: str, tag: str, config_section: str = "model") -> dict[str, Any]:
    if name.startswith(("hf-hub:", "local-dir:")):
        return {}  # the schema names its own weights
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelError(
            f"unknown pretrained tag '{tag}' for open_clip model '{name}'; available: "
            f"{', '.join(tags) if tags else 'none (use pretrained: null for random init)'}; "
            f"or set {config_section}.checkpoint to a local weights file"
        )
    return cfg


@contextlib.contextmanager
def _quiet_open_clip(*phrases: str) -> Iterator[None]:
    """Drop open_clip log lines we replace with our own message (or that state the intent)."""
    def keep(record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in phrases)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


# ----------------------------------------------------------------------------- offline handling
@contextlib.contextmanager
def _offline_guard(name: str, tag: str | None, tag_cfg: dict[str, Any], cache_dir: str | None,
                   offline: list[bool], config_section: str = "model") -> Iterator[None]:
    """Without network: hub in cache-only mode (cached weights still load), else fail fast.

    Appends True to ``offline`` when the hub is (or was set) offline, for the error message.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        offline.append(True)
    if offline or hub_reachable():
        yield
        return
    offline.append(True)
    if not tag_cfg.get("hf_hub"):  # URL-only weights: open_clip's own cache, no retries to skip
        url = tag_cfg.get("url", "")
        cached = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if not cached.is_file():
            raise ModelError(_no_weights_message(name, tag, f"huggingface.co is unreachable and {cached} does not exist",
                                                 config_section))
        yield
        return
    old_const, old_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _no_weights_message(name: str, tag: str | None, why: str, config_section: str = "model") -> str:
    return (
        f"cannot load pretrained weights for open_clip '{name}' / '{tag}': {why} "
        f"(cache: HF_HOME / HF_HUB_CACHE, default ~/.cache/huggingface/hub). To provide them: run once with "
        f"network to fill the cache, or copy a cache that has them and set HF_HUB_OFFLINE=1, or "
        f"download the weights file elsewhere and set {config_section}.checkpoint=/path/to/file "
        f"(keep {config_section}.pretrained={tag} so its QuickGELU / normalisation settings are used)"
    )


# ----------------------------------------------------------------------------- checkpoints
def load_clip_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a CLIP state dict file into ``model``; any key or shape mismatch is a ModelError."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    sd = read_state_dict(path)
    if is_hf_state_dict(sd):  # transformers CLIPModel keys, no config.json beside: into the named architecture
        sd = convert_hf_state_dict(sd)
    sd = open_clip.factory.convert_state_dict(model, sd)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        example = ", ".join([f"missing '{k}'" for k in missing[:2]] + [f"unexpected '{k}'" for k in unexpected[:2]])
        raise ModelError(
            f"checkpoint {path}: not a CLIP state dict for this architecture: {len(missing)} missing "
            f"and {len(unexpected)} unexpected keys (e.g. {example}); {_ACCEPTED}"
        )
    try:
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:300])
        raise ModelError(f"checkpoint {path}: tensor shapes do not fit this architecture ({detail}); "
                         f"{_ACCEPTED}") from None


# ----------------------------------------------------------------------------- features
def encode_image_global_local(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global image embedding ``(B, D)`` and LoCoOp local (patch) embeddings ``(B, P, D)``.

    The global part *is* ``model.encode_image(images)`` (bit-identical).  A forward pre-hook
    grabs the input ``x`` of the last residual block during that same forward; the patch
    tokens of ``x`` then take LoCoOp's value path (``clip_w_local/model.py``), which skips the
    attention mixing so each token keeps its own content:

        v = x + out_proj(W_v ln_1(x) + b_v);   v = v + mlp(ln_2(v));   local = ln_post(v) @ proj

    (open_clip's LayerScale ``ls_1``/``ls_2`` are applied too; they are identities in CLIP.)
    Patch tokens are the last ``P = (H/ps) * (W/ps)`` tokens, so prompt tokens inserted after
    the class token (VPT) are skipped.  ``model`` is an open_clip CLIP or its VisionTransformer.
    """
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ModelError(f"local features need an open_clip VisionTransformer image tower; got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.final_ln_after_pool:
        raise ModelError("local features are not defined for open_clip towers with attentional pooling "
                         "or final_ln_after_pool; use a standard CLIP ViT")
    block = visual.transformer.resblocks[-1]
    if not isinstance(block, ResidualAttentionBlock):
        raise ModelError(f"local features need nn.MultiheadAttention blocks; got {type(block).__name__}")

    from .frozen import class_token_only

    captured: list[torch.Tensor] = []
    me = threading.get_ident()  # only this call's forward: the tower may run in other threads at once (frozen.ShardedForward)
    handle = block.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0]) if threading.get_ident() == me else None)
    try:  # a tower held by hold_frozen_in runs its last block for the class token only
        with class_token_only(visual):
            global_feats = model.encode_image(images) if hasattr(model, "encode_image") else model(images)
    finally:
        handle.remove()
    x = captured[-1]
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1)  # LND -> NLD
    ph, pw = visual.patch_size
    num_patches = (images.shape[-2] // ph) * (images.shape[-1] // pw)
    return global_feats, _local_value_path(visual, block, x[:, -num_patches:])


def _local_value_path(visual: VisionTransformer, block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    width = x.shape[-1]
    attn = block.attn
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], bias)
    v = x + block.ls_1(attn.out_proj(v))
    v = v + block.ls_2(block.mlp(block.ln_2(v)))
    v = visual.ln_post(v)
    return v @ visual.proj if visual.proj is not None else v


# ----------------------------------------------------------------------------- local similarity maps
# ----------------------------------------------------------------------------- zero-shot head
@torch.no_grad()
def build_text_features(bundle: ClipBundle, classnames: Sequence[str], templates: str | Sequence[str] = "simple") -> torch.Tensor:
    """``(K, D)`` unit-norm class embeddings, averaged over templates (CLIP's prompt ensemble)."""
    weights = open_clip.build_zero_shot_classifier(
        bundle.model, bundle.tokenizer, list(classnames), list(resolve_templates(templates)),
        num_classes_per_batch=10, device=next(bundle.model.parameters()).device,
    )
    return weights.T.contiguous()


class ClipZeroShotClassifier(nn.Module):
    """Frozen CLIP + cached class text embeddings → global and per-patch class scores."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], templates: str | Sequence[str] = "simple") -> None:
        super().__init__()
        if not classnames:
            raise ModelError("zero-shot classifier needs at least one class name")
        self.model = bundle.model
        self.classnames = list(classnames)
        self.templates = resolve_templates(templates)
        self.register_buffer("text_features", build_text_features(bundle, self.classnames, self.templates), persistent=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def forward(self, images: torch.Tensor) -> ModelOutput:
        global_feats, local_feats = encode_image_global_local(self.model, images)
        with torch.autocast(global_feats.device.type, enabled=False):  # head in fp32 (models/frozen.py)
            text = self.text_features.float()
            cosine = F.normalize(global_feats.float(), dim=-1) @ text.T
            local_cosine = F.normalize(local_feats.float(), dim=-1) @ text.T
            scale = self.logit_scale.float()
        return ModelOutput(
            logits=scale * cosine,
            features=global_feats,
            cosine=cosine,
            local_cosine=local_cosine,
            local_logits=scale * local_cosine,
        )
