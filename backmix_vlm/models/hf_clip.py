"""Hugging Face ``transformers`` CLIP checkpoints → open_clip models.

Users often hold CLIP in the transformers layout: a ``save_pretrained`` folder
(``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, maybe sharded), such a weights
file alone, or a snapshot of ``openai/clip-vit-base-patch16`` in their Hugging Face cache.  This
module turns any of them into the toolkit's open_clip model, so every CLIP code path (zero-shot,
CoOp, LoCoOp, VPT, LoRA, saliency) runs unchanged:

* **Architecture from the HF config**, not assumed: width, layers, heads, MLP ratio, patch and
  image size, text context length, vocabulary, LayerNorm eps, projection dim, and the activation
  (``hidden_act: quick_gelu`` → open_clip's QuickGELU, ``gelu`` → exact GELU).
* **Weights by key mapping** (:func:`convert_state_dict`): HF's separate ``q/k/v_proj`` become
  open_clip's packed ``in_proj_weight``; ``visual_projection`` / ``text_projection`` (Linear,
  ``out x in``) become open_clip's ``proj`` / ``text_projection`` matrices (``in x out``).  The
  converted model's image / text features and logits equal transformers' own forward to 1e-5
  (fp32, ``tests/test_hf_clip.py``, ``scripts/check_hf_clip_parity.py``).
* **Text pooling**: transformers pools at the first ``eos_token_id`` (``argmax`` for legacy
  configs with ``eos_token_id == 2``); open_clip's ``eos`` / ``argmax`` pooling is set to match.
* **Tokenizer**: CLIP's BPE (vocabulary 49408) is the one open_clip ships, so open_clip's
  tokenizer is used; ids equal ``CLIPTokenizer``'s on the toolkit's prompt templates (tested).
* **Preprocessing**: ``preprocessor_config.json`` gives the sizes and normalisation; the default
  pipeline is the one the OpenAI weights were trained and evaluated with (torchvision/PIL
  bicubic resize of the shorter side + centre crop, exactly open_clip's), ``preprocess="hf"``
  uses transformers' ``CLIPImageProcessor`` instead (see ``docs/methods.md`` for the pixel
  differences between the two).

Names: ``hf:<org>/<repo>`` (a Hugging Face repo id, resolved from the local cache first; with no
network and no cached snapshot it fails in seconds with one message) or ``hf:/path/to/folder``;
``checkpoint=`` accepts a ``save_pretrained`` folder or a weights file with its ``config.json``
beside it.  A transformers-layout weights file *without* a config is converted by key mapping
and loaded into the architecture named by ``model.name`` (see ``clip.load_clip_checkpoint``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ModelError
from ..runtime import low_precision_dtype

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Preferred first; index files list shards.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = [CONFIG_FILE, PREPROCESSOR_FILE, "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors"]
HUB_PATTERNS_BIN = [CONFIG_FILE, PREPROCESSOR_FILE, "pytorch_model.bin", "pytorch_model.bin.index.json",
                    "pytorch_model-*.bin"]
CLIP_VOCAB_SIZE = 49408   # CLIP's BPE (open_clip's bpe_simple_vocab_16e6), <|endoftext|> = 49407
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
PREPROCESS_MODES = ("openai", "hf", "hf_pil")


# ----------------------------------------------------------------------------- sources
@dataclass
class HFClipSource:
    """A transformers CLIP checkpoint found on disk: its config, weight files and preprocessing."""

    origin: str                                   # what the user named (messages, ClipBundle.name)
    config: dict[str, Any]                        # config.json
    weights: list[Path]                           # one file, or the shards of an index
    preprocessor: dict[str, Any] | None = None    # preprocessor_config.json, when present
    folder: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # already read


def is_hf_name(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def find_hf_clip(name: str | None, checkpoint: str | os.PathLike | None, cache_dir: str | None = None
                 ) -> HFClipSource | None:
    """The transformers CLIP checkpoint named by ``name`` (``hf:...``) or ``checkpoint``, else None.

    ``checkpoint`` counts as transformers CLIP when it is a folder with a CLIP ``config.json``, or a
    weights file in transformers key layout with a CLIP ``config.json`` beside it (an open_clip
    file that happens to sit next to an HF config, as in LAION's repos, stays open_clip).
    """
    if is_hf_name(name):
        if checkpoint is not None:
            raise ModelError(f"model name {name!r} already names the weights; remove model.checkpoint={checkpoint}")
        ref = name[len(HF_PREFIX):].strip()
        if not ref:
            raise ModelError("model name 'hf:' needs a repo id or folder, e.g. hf:openai/clip-vit-base-patch16")
        path = Path(ref).expanduser()
        if path.is_dir():
            return _from_folder(path, origin=name)
        if ref.startswith(("/", ".", "~")) or path.exists():
            raise ModelError(f"model name {name!r}: {path} is not a folder with a transformers CLIP config.json")
        return _from_folder(resolve_hub_snapshot(ref, cache_dir), origin=name)
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return _from_folder(path, origin=str(checkpoint))
    if not path.is_file():
        return None  # load_clip reports the missing file
    config_path = path.parent / CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else None
    if not _is_clip_config(config):
        return None
    from .clip_bundle import read_state_dict

    sd = _read_weights([path]) if path.name.endswith(".index.json") else read_state_dict(path)
    if not is_hf_state_dict(sd):
        return None
    pre = path.parent / PREPROCESSOR_FILE
    return HFClipSource(origin=str(checkpoint), config=config, weights=[path], folder=path.parent,
                        preprocessor=_read_json(pre) if pre.is_file() else None, state_dict=sd)


def _from_folder(folder: Path, origin: str) -> HFClipSource:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(f"{origin}: {folder} has no {CONFIG_FILE}; expected a transformers CLIP save_pretrained "
                         f"folder ({CONFIG_FILE} + one of {', '.join(WEIGHT_FILES)})")
    config = _read_json(config_path)
    if not _is_clip_config(config):
        raise ModelError(f"{origin}: {config_path} is not a CLIP config (model_type "
                         f"{config.get('model_type')!r}, expected 'clip' with text_config and vision_config)")
    weights: list[Path] = []
    for fname in WEIGHT_FILES:
        if (folder / fname).is_file():
            weights = [folder / fname]
            break
    if not weights:
        raise ModelError(f"{origin}: no weights in {folder}; expected one of {', '.join(WEIGHT_FILES)}")
    if weights[0].name.endswith(".index.json"):
        weights = _shards(weights[0])
    pre = folder / PREPROCESSOR_FILE
    return HFClipSource(origin=origin, config=config, weights=weights, folder=folder,
                        preprocessor=_read_json(pre) if pre.is_file() else None)


def _shards(index: Path) -> list[Path]:
    data = _read_json(index)
    names = sorted(set((data.get("weight_map") or {}).values()))
    if not names:
        raise ModelError(f"{index}: no 'weight_map' entries")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ModelError(f"{index}: shard files missing: {', '.join(missing[:4])}")
    return [index.parent / n for n in names]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _is_clip_config(config: Mapping[str, Any] | None) -> bool:
    return (isinstance(config, Mapping) and config.get("model_type") == "clip"
            and isinstance(config.get("text_config"), Mapping) and isinstance(config.get("vision_config"), Mapping))


def resolve_hub_snapshot(repo_id: str, cache_dir: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id``: from the HF cache when there, else downloaded.

    Without network (``huggingface.co`` unreachable, ``HF_HUB_OFFLINE=1`` or
    ``BACKMIX_VLM_OFFLINE=1``) and no cached snapshot this fails in seconds with one message.
    """
    from huggingface_hub import constants, snapshot_download

    from ..runtime import hub_reachable

    def local() -> Path | None:
        for patterns in (HUB_PATTERNS, HUB_PATTERNS_BIN):
            try:
                folder = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True,
                                                allow_patterns=patterns))
            except Exception:  # noqa: BLE001 - any "not cached" flavour of huggingface_hub errors
                continue
            if any((folder / f).is_file() for f in WEIGHT_FILES):
                return folder
        return None

    folder = local()
    if folder is not None:
        return folder
    cache = cache_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise ModelError(
            f"cannot load hf:{repo_id}: huggingface.co is unreachable and no snapshot with weights is in the "
            f"Hugging Face cache ({cache}). To provide it: run once with network, copy a cache that has it "
            f"(HF_HOME / HF_HUB_CACHE), or point model.checkpoint at a save_pretrained folder")
    try:
        for patterns in (HUB_PATTERNS, HUB_PATTERNS_BIN):
            folder = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))
            if any((folder / f).is_file() for f in WEIGHT_FILES):
                return folder
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot download hf:{repo_id}: {str(e).splitlines()[0][:300]}") from None
    raise ModelError(f"hf:{repo_id}: the repo has no transformers weights ({', '.join(WEIGHT_FILES)})")


# ----------------------------------------------------------------------------- config
def open_clip_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip ``CLIP(**cfg)`` keyword arguments (plus ``quick_gelu``) from a transformers CLIPConfig dict."""
    from transformers import CLIPConfig

    hf = CLIPConfig.from_dict(dict(config))  # fills transformers' defaults for keys the file leaves out
    t, v = hf.text_config, hf.vision_config
    acts = {t.hidden_act, v.hidden_act}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise ModelError(f"HF CLIP config: hidden_act text={t.hidden_act!r}, vision={v.hidden_act!r}; supported: "
                         "'quick_gelu' or 'gelu', the same in both towers")
    for tower, c in (("text", t), ("vision", v)):
        if c.hidden_size % c.num_attention_heads:
            raise ModelError(f"HF CLIP config: {tower} hidden_size {c.hidden_size} is not divisible by "
                             f"num_attention_heads {c.num_attention_heads}")

    def norm(eps: float) -> dict[str, Any]:
        return {} if abs(eps - 1e-5) < 1e-12 else {"norm_kwargs": {"eps": float(eps)}}

    eos = t.eos_token_id
    pool = "argmax" if eos in (None, 2, t.vocab_size - 1) else "eos"  # transformers: legacy eos 2 -> argmax
    vision_cfg = dict(layers=v.num_hidden_layers, width=v.hidden_size, head_width=v.hidden_size // v.num_attention_heads,
                      mlp_ratio=v.intermediate_size / v.hidden_size, patch_size=v.patch_size, image_size=v.image_size,
                      **norm(v.layer_norm_eps))
    text_cfg = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                    heads=t.num_attention_heads, layers=t.num_hidden_layers, mlp_ratio=t.intermediate_size / t.hidden_size,
                    pool_type=pool, **({"eos_id": int(eos)} if pool == "eos" else {}), **norm(t.layer_norm_eps))
    return {"embed_dim": hf.projection_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg,
            "quick_gelu": t.hidden_act == "quick_gelu"}


# ----------------------------------------------------------------------------- weights
_TOWERS = (("text_model.encoder.layers.", "transformer.resblocks."),
           ("vision_model.encoder.layers.", "visual.transformer.resblocks."))
_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}
_IGNORED_SUFFIXES = ("position_ids",)  # buffers older transformers saved


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a transformers ``CLIPModel`` state dict (``vision_model.*`` / ``text_model.*`` keys)."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPModel`` keys → open_clip ``CLIP`` keys (q/k/v packed, projections transposed).

    Every key must be understood: an unknown one is a ModelError naming it (a vision-only
    ``CLIPVisionModel`` or a model with extra heads is not a CLIPModel checkpoint).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        else:
            for hf_prefix, oc_prefix in _TOWERS:
                if key.startswith(hf_prefix):
                    index, _, rest = key[len(hf_prefix):].partition(".")
                    block = f"{oc_prefix}{index}."
                    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                        _, proj, kind = rest.split(".")
                        qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[proj[0]] = value
                        break
                    for hf_name, oc_name in _BLOCK.items():
                        if rest.startswith(hf_name + "."):
                            out[block + oc_name + rest[len(hf_name):]] = value
                            break
                    else:
                        unknown.append(key)
                    break
            else:
                unknown.append(key)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"HF CLIP state dict: {key} needs q_proj, k_proj and v_proj; found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise ModelError(f"HF CLIP state dict: {len(unknown)} keys are not part of a transformers CLIPModel "
                         f"(e.g. {', '.join(unknown[:3])})")
    if "logit_scale" in out and out["logit_scale"].ndim == 1 and out["logit_scale"].numel() == 1:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from .clip_bundle import read_state_dict

    if len(files) == 1 and files[0].name.endswith(".index.json"):
        files = _shards(files[0])
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd


# ----------------------------------------------------------------------------- model + bundle
def build_model(source: HFClipSource, *, device: torch.device | str = "cpu", precision: str = "fp32",
                load_weights: bool = True) -> nn.Module:
    """The open_clip ``CLIP`` for ``source``'s config, with its converted weights (frozen, eval)."""
    from open_clip.model import CLIP, convert_weights_to_lp, get_cast_dtype

    cfg = open_clip_config(source.config)
    cast_dtype = get_cast_dtype(precision)
    model = CLIP(**cfg, cast_dtype=cast_dtype)
    if load_weights:
        sd = source.state_dict if source.state_dict is not None else _read_weights(source.weights)
        if not is_hf_state_dict(sd):
            raise ModelError(f"{source.origin}: {source.weights[0]} is not in transformers CLIPModel key layout "
                             f"(e.g. {next(iter(sd), '')!r}); an open_clip file goes in model.checkpoint with "
                             f"model.name set to its architecture")
        sd = convert_state_dict(sd)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise ModelError(f"{source.origin}: the weights lack {len(missing)} tensors of the CLIP its config "
                             f"describes (e.g. {', '.join(missing[:3])})")
        bad = [f"{k}: {tuple(sd[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
               if tuple(sd[k].shape) != tuple(v.shape)]
        if bad:
            raise ModelError(f"{source.origin}: weights do not match config.json ({'; '.join(bad[:2])})")
        model.load_state_dict(sd, strict=True)
    model.to(device=device)
    dtype = low_precision_dtype(precision)
    if dtype is not None:
        convert_weights_to_lp(model, dtype=dtype)
    return model.eval().requires_grad_(False)


@dataclass
class Preprocess:
    """What the checkpoint's preprocessor_config.json says (defaults: OpenAI CLIP's)."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    center_crop: bool = True


def preprocess_settings(source: HFClipSource) -> Preprocess:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    image_size = int((source.config.get("vision_config") or {}).get("image_size", 224))
    p = source.preprocessor or {}

    def side(value: Any, default: int) -> int:
        if isinstance(value, Mapping):
            value = value.get("shortest_edge", value.get("height", default))
        return int(value) if value is not None else default

    crop = side(p.get("crop_size"), image_size) if p.get("do_center_crop", True) else image_size
    resample = p.get("resample", 3)
    interp = _PIL_RESAMPLE.get(resample) if isinstance(resample, int) else str(resample).lower()
    if interp not in ("nearest", "bilinear", "bicubic"):
        raise ModelError(f"{source.origin}: {PREPROCESSOR_FILE} resample={resample!r} is not supported "
                         "(0 nearest, 2 bilinear, 3 bicubic)")
    if crop != image_size:
        raise ModelError(f"{source.origin}: {PREPROCESSOR_FILE} crops to {crop} px but the model takes {image_size} px")
    return Preprocess(resize=side(p.get("size"), image_size), crop=crop,
                      mean=tuple(p.get("image_mean", OPENAI_DATASET_MEAN)), std=tuple(p.get("image_std", OPENAI_DATASET_STD)),
                      interpolation=interp, center_crop=bool(p.get("do_center_crop", True)))


def openai_eval_transform(pp: Preprocess) -> Callable[[Any], torch.Tensor]:
    """OpenAI CLIP's evaluation pipeline (``clip._transform``, = open_clip's): PIL resize of the
    shorter side, centre crop, RGB, ToTensor, Normalize."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[pp.interpolation]
    steps: list[Any] = [T.Resize(pp.resize, interpolation=mode)]
    if pp.center_crop:
        steps.append(T.CenterCrop(pp.crop))
    return T.Compose([*steps, _to_rgb, T.ToTensor(), T.Normalize(pp.mean, pp.std)])


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB") if hasattr(image, "convert") else image


class HFImageProcessorTransform:
    """transformers' CLIP image processor as a PIL → ``FloatTensor[3, H, W]`` transform (picklable
    for loader workers).  ``backend``: ``torchvision`` (transformers 5's default
    ``CLIPImageProcessor``; v4's ``CLIPImageProcessorFast``) or ``pil`` (v5's
    ``CLIPImageProcessorPil``; v4's ``CLIPImageProcessor``)."""

    BACKENDS = ("torchvision", "pil")

    def __init__(self, source: HFClipSource | Mapping[str, Any] | None = None, backend: str = "torchvision") -> None:
        if backend not in self.BACKENDS:
            raise ModelError(f"image processor backend {backend!r} is not accepted; choose one of {', '.join(self.BACKENDS)}")
        settings = dict(source.preprocessor or {}) if isinstance(source, HFClipSource) else dict(source or {})
        if isinstance(source, HFClipSource) and not settings:
            image_size = int(source.config.get("vision_config", {}).get("image_size", 224))
            settings = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
        for key in ("image_processor_type", "processor_class", "feature_extractor_type"):
            settings.pop(key, None)
        self.settings, self.backend = settings, backend
        self._processor = None

    def _get(self) -> Any:
        if self._processor is None:
            self._processor = hf_image_processor_class(self.backend)(**self.settings)
        return self._processor

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "backend": self.backend, "_processor": None}

    def __call__(self, image: Any) -> torch.Tensor:
        out = self._get()(images=_to_rgb(image), return_tensors="pt")["pixel_values"]
        return out[0].float()


def hf_image_processor_class(backend: str) -> type:
    """transformers' CLIP image processor class for ``backend`` (names moved between v4 and v5)."""
    import transformers

    names = {"torchvision": ("CLIPImageProcessor", "CLIPImageProcessorFast"),
             "pil": ("CLIPImageProcessorPil", "CLIPImageProcessor")}[backend]
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    return getattr(transformers, names[0] if v5 else names[1])


def load_hf_clip(source: HFClipSource, *, device: torch.device | str = "cpu", precision: str = "fp32",
                 load_weights: bool = True, layout: str = "auto", preprocess: str = "openai") -> Any:
    """A :class:`~backmix_vlm.models.clip.ClipBundle` for a transformers CLIP checkpoint.

    ``preprocess``: ``openai`` (default; OpenAI/open_clip's torchvision pipeline with the sizes and
    statistics of ``preprocessor_config.json``), ``hf`` (transformers' default ``CLIPImageProcessor``,
    torchvision backend) or ``hf_pil`` (its PIL backend).
    """
    import open_clip

    from .clip_bundle import ClipBundle, set_block_layout

    if preprocess not in PREPROCESS_MODES:
        raise ModelError(f"preprocess {preprocess!r} is not accepted; choose one of {', '.join(PREPROCESS_MODES)}")
    text_cfg = open_clip_config(source.config)["text_cfg"]
    if text_cfg["vocab_size"] != CLIP_VOCAB_SIZE:
        raise ModelError(f"{source.origin}: text vocab_size {text_cfg['vocab_size']} is not CLIP's BPE ({CLIP_VOCAB_SIZE}); "
                         "only checkpoints with CLIP's tokenizer are supported")
    model = build_model(source, device=device, precision=precision, load_weights=load_weights)
    set_block_layout(model, layout, device)
    pp = preprocess_settings(source)
    eval_tf = (openai_eval_transform(pp) if preprocess == "openai" else
               HFImageProcessorTransform(source, backend="pil" if preprocess == "hf_pil" else "torchvision"))
    train_tf = open_clip.image_transform(pp.crop, is_train=True, mean=pp.mean, std=pp.std,
                                         interpolation=pp.interpolation)
    return ClipBundle(
        model=model,
        tokenizer=open_clip.SimpleTokenizer(context_length=text_cfg["context_length"]),
        preprocess_train=train_tf,
        preprocess_eval=eval_tf,
        mean=tuple(pp.mean),
        std=tuple(pp.std),
        image_size=pp.crop,
        name=source.origin,
        pretrained=(str(source.weights[0] if len(source.weights) == 1 else source.folder) if load_weights else None),
    )


# ----------------------------------------------------------------------------- tokenizer files
def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of CLIP's BPE (built from open_clip's bundled
    ``bpe_simple_vocab_16e6.txt.gz``, exactly as OpenAI's ``SimpleTokenizer`` builds it), so that
    transformers' ``CLIPTokenizer`` can be built offline."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n",
                                       encoding="utf-8")
    return folder
