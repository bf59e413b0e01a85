"""LoRA through peft over frozen CLIP (open_clip) and timm ViTs — CLIP-LoRA's recipe by default.

CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024, MaxZanella/CLIP-LoRA) adds a rank-``r`` update
``ΔW = s · B A`` to the query, key and value projections of every block of both CLIP towers and
trains only ``A`` and ``B``: rank 2, α = 1, dropout 0.25 on the LoRA branch's input, ``A``
kaiming-uniform and ``B = 0`` (so the untrained adapter *is* the backbone), AdamW (lr 2e-4, weight
decay 1e-2), cosine schedule over ``500 × shots`` iterations of batch 32, class prompts
``"a photo of a {class}."`` re-encoded through the adapted text tower at every step.  Its scaling is
``s = α / sqrt(r)`` (``loralib/layers.py``: rsLoRA's rule; the LoRA paper and peft's default use
``α / r``): ``rslora: true`` here, ``false`` switches to ``α / r``.

How the layers are made:

* **peft does the LoRA**: :func:`peft.inject_adapter_in_model` wraps the targeted ``nn.Linear``
  layers in place (``lora.Linear``: ``base_layer`` + ``lora_A`` / ``lora_B`` / ``lora_dropout``).
* **q / k / v need their own Linear layers** (:mod:`backmix_vlm.models.split_attention`).
  open_clip 3.x runs attention in ``nn.MultiheadAttention``, whose packed ``in_proj_weight`` has no Linear for q, k or v (and whose
  ``out_proj.forward`` is never called).  peft's own ``nn.MultiheadAttention`` support adapts the
  packed projection *jointly* and always adds ``out_proj`` — not CLIP-LoRA's separate q/k/v
  updates — so, like CLIP-LoRA's ``PlainMultiheadAttentionLoRA``, each targeted attention becomes a
  :class:`SplitAttention` with ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` Linears whose
  weights are *views* of the original tensors (no copy) and whose output equals the original module
  (same math, SDPA).  timm's fused ``qkv`` Linear becomes a :class:`SplitQKV` (``q`` / ``k`` / ``v``
  Linears whose outputs are concatenated), so ``targets: [q, k, v]`` means the same on both.
* **The base is not modified**: the adapter works on a structural copy of the backbone that shares
  its frozen tensors, so one loaded backbone serves any number of adapters (seeds).

Targets: ``q`` ``k`` ``v`` (attention projections), ``o`` (attention output), ``mlp_in``,
``mlp_out``; ``towers``: ``vision`` / ``text`` (timm: vision only); ``blocks``: indices into each
tower (negative from the end; null = every block).

Heads: ``auto`` = ``zeroshot_text`` on CLIP (the toolkit's prompt templates through the — possibly
adapted — text tower, averaged as CLIP's prompt ensemble; logits ``logit_scale · cos``) and
``linear`` on timm (a trained ``nn.Linear`` on the pooled feature, like VPT's).

Trainable set = the LoRA ``A`` / ``B`` matrices (+ the linear head when there is one).
:meth:`LoRA.merge` folds ``ΔW`` into the weights and returns a plain open_clip / timm model whose
state dict has the backbone's original keys (``SplitAttention`` → ``nn.MultiheadAttention``).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError, ModelError
from ..models.output import ModelOutput
from ..validation import check_choice
from ..models.split_attention import SplitAttention, SplitQKV, effective_linear, is_lora_layer
from .base import ADAPTERS, Adapter, resolve_config
from .vision import ClipVision, vision_view

TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
TOWERS = ("vision", "text")
HEADS = ("auto", "zeroshot_text", "linear")
ADAPTER_NAME = "default"          # peft's adapter slot
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 2                                                   # r (CLIP-LoRA: 2)
    alpha: float = 1.0                                              # α (CLIP-LoRA: 1)
    dropout: float = 0.25                                           # dropout on the LoRA branch input (CLIP-LoRA: 0.25)
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"])    # q | k | v | o | mlp_in | mlp_out
    towers: list[str] | None = None                                 # vision | text; null = every tower (timm: vision)
    blocks: list[int] | None = None                                 # block indices per tower; null = all
    rslora: bool = True                                             # scale α/sqrt(r) (CLIP-LoRA); false: α/r (peft default)
    head: str = "auto"                                              # auto | zeroshot_text (CLIP) | linear
    templates: str = "simple"                                       # zeroshot_text: template set or "...{}..."
    local_features: bool = True                                     # eval: per-patch cosines (GL-MCM), CLIP only

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"adapter.rank: {self.rank} is not accepted; must be >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"adapter.alpha: {self.alpha} is not accepted; must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: {self.dropout} is not accepted; must be in [0, 1)")
        for name, values, allowed in (("targets", self.targets, TARGETS), ("towers", self.towers or TOWERS, TOWERS)):
            if not values:
                raise ConfigError(f"adapter.{name}: give at least one of {', '.join(allowed)}")
            for v in values:
                check_choice(v, allowed, f"adapter.{name}")
        check_choice(self.head, HEADS, "adapter.head")
        if self.towers is not None and not self.towers:
            raise ConfigError("adapter.towers: an empty list adapts nothing; use null for every tower")
        if self.blocks is not None and not self.blocks:
            raise ConfigError("adapter.blocks: an empty list adapts nothing; use null for every block")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_default_schedule(shots: int | None, num_classes: int | None, batch_size: int = 32,
                          iterations_per_shot: int = 500, full_data_epochs: int = 10) -> dict[str, Any]:
    """CLIP-LoRA's optimiser recipe as :class:`~backmix_vlm.config.OptimConfig` fields.

    AdamW (lr 2e-4, weight decay 1e-2), batch 32, cosine decay with no warm-up, ``500 × shots``
    iterations — turned into epochs of the trainer (``num_classes × shots`` images per epoch, a
    trailing partial batch dropped).  CLIP-LoRA defines no full-data budget; ``full_data_epochs``
    (10: ~15.6k iterations on CIFAR-10, about twice its 16-shot ImageNet budget) is our choice.
    """
    base = dict(name="adamw", lr=2e-4, weight_decay=1e-2, schedule="cosine", warmup_epochs=0, batch_size=batch_size)
    if shots is None:
        return {**base, "epochs": full_data_epochs}
    if shots < 1:
        raise ConfigError(f"shots: {shots} is not accepted; use a positive number or null for full data")
    if not num_classes:
        raise ConfigError("the CLIP-LoRA schedule (500 x shots iterations) needs the number of classes; "
                          "set optim.epochs explicitly")
    images = num_classes * shots
    steps = images // batch_size if images >= batch_size else 1
    return {**base, "epochs": math.ceil(iterations_per_shot * shots / steps)}


# ----------------------------------------------------------------------------- peft compatibility
# Tested with peft 0.15.2 and 0.21.2 (pyproject: >=0.15,<0.22).  What this adapter needs from peft's
# internals (the LoRA layer's base layer, its delta weight and its merged state) is here and in
# models/split_attention.py (is_lora_layer, effective_linear).
def _peft_lora_config(cfg: LoRAConfig, target_modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_modules,
                      use_rslora=cfg.rslora, bias="none", init_lora_weights=True)


def _merged_linear(layer: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``W + ΔW`` (a new module, nothing shared)."""
    weight, bias = effective_linear(layer)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.requires_grad_(False)


# ----------------------------------------------------------------------------- target layout
def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _select(n: int, blocks: Sequence[int] | None, tower: str) -> list[int]:
    if blocks is None:
        return list(range(n))
    out = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not -n <= b < n:
            raise ConfigError(f"adapter.blocks: {b!r} is not a block of the {n}-block {tower} tower "
                              f"(use indices in [{-n}, {n - 1}])")
        out.append(b % n)
    return sorted(set(out))


def _tower_blocks(model: nn.Module, is_clip: bool, towers: Sequence[str]) -> dict[str, tuple[str, nn.Module]]:
    """``{tower: (path of its block list, block list)}`` for the requested towers."""
    paths = {id(m): name for name, m in model.named_modules()}
    out: dict[str, tuple[str, nn.Module]] = {}
    if is_clip:
        from .clip_text import text_tower

        if "vision" in towers:
            blocks = model.visual.transformer.resblocks
            out["vision"] = (paths[id(blocks)], blocks)
        if "text" in towers:
            blocks = text_tower(model).transformer.resblocks
            out["text"] = (paths[id(blocks)], blocks)
    else:
        if "text" in towers:
            raise ConfigError("adapter.towers: a timm ViT has no text tower; use towers: [vision]")
        out["vision"] = (paths[id(model.blocks)], model.blocks)
    return out


def _prepare_block(root: nn.Module, path: str, block: nn.Module, targets: Sequence[str]) -> list[str]:
    """Split the block's projections as the targets need; return the module paths peft should wrap."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    names: list[str] = []
    qkv = [t for t in targets if t in ("q", "k", "v")]
    if isinstance(attn, nn.MultiheadAttention):  # open_clip ResidualAttentionBlock
        if qkv or "o" in targets:
            _set_child(root, f"{path}.attn", SplitAttention(attn))
        names += [f"{path}.attn.{t}_proj" for t in qkv]
        if "o" in targets:
            names.append(f"{path}.attn.out_proj")
        mlp_names = ("c_fc", "c_proj")
    elif attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear):  # timm Attention
        if qkv:
            _set_child(root, f"{path}.attn.qkv", SplitQKV(attn.qkv))
        names += [f"{path}.attn.qkv.{t}" for t in qkv]
        if "o" in targets:
            names.append(f"{path}.attn.proj")
        mlp_names = ("fc1", "fc2")
    else:
        raise ModelError(f"LoRA: block {path} ({type(block).__name__}) has attention "
                         f"{type(attn).__name__}; supported: open_clip nn.MultiheadAttention blocks, timm "
                         "Attention with a qkv Linear")
    for target, child in (("mlp_in", mlp_names[0]), ("mlp_out", mlp_names[1])):
        if target in targets:
            layer = getattr(mlp, child, None)
            if not isinstance(layer, nn.Linear):
                raise ModelError(f"LoRA target {target}: {path}.mlp has no Linear '{child}'")
            names.append(f"{path}.mlp.{child}")
    return names


def _shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


# ----------------------------------------------------------------------------- adapter
class LoRA(Adapter):
    """peft LoRA over a frozen CLIP (both towers) or timm ViT; see the module docstring."""

    config_class = LoRAConfig

    def __init__(self, base: Any, classnames: Sequence[str], cfg: LoRAConfig | None = None, *,
                 tokenizer: Callable[..., Tensor] | None = None) -> None:
        model = base
        if not isinstance(base, nn.Module) and hasattr(base, "model"):  # ClipBundle
            model, tokenizer = base.model, tokenizer or getattr(base, "tokenizer", None)
        cfg = resolve_config(LoRAConfig, cfg)
        if not classnames:
            raise DataError("LoRA needs at least one class name, got none")
        is_clip = isinstance(vision_view(model, "LoRA"), ClipVision)  # raises for unsupported backbones
        head = cfg.head if cfg.head != "auto" else ("zeroshot_text" if is_clip else "linear")
        if head == "zeroshot_text" and not is_clip:
            raise ConfigError("adapter.head: 'zeroshot_text' needs a CLIP base (a text tower); use head: linear "
                              "(or auto) for timm ViTs")
        model = _shared_copy(model)
        super().__init__(model)  # freezes the copy; the caller's backbone is never modified
        self.cfg = cfg
        self.is_clip = is_clip
        self.head_type = head
        self.classnames = [str(c).replace("_", " ") for c in classnames]

        targets: list[str] = []
        self.adapted_blocks: dict[str, list[int]] = {}
        towers = cfg.towers if cfg.towers is not None else (list(TOWERS) if is_clip else ["vision"])
        for tower, (path, blocks) in _tower_blocks(model, is_clip, towers).items():
            chosen = _select(len(blocks), cfg.blocks, tower)
            self.adapted_blocks[tower] = chosen
            for i in chosen:
                targets += _prepare_block(model, f"{path}.{i}", blocks[i], cfg.targets)
        self.target_modules = targets
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_peft_lora_config(cfg, targets), model, adapter_name=ADAPTER_NAME)
        self._lora_layers = [m for m in model.modules() if is_lora_layer(m)]
        self.view = vision_view(model, "LoRA")  # of the adapted copy
        device = next(model.parameters()).device

        if head == "linear":
            self.head = nn.Linear(self.view.feature_dim, len(self.classnames)).to(device)
        else:
            self.head = None
        self.text_adapted = is_clip and "text" in towers
        self._text_cache: tuple[tuple[int, ...], Tensor] | None = None
        if head == "zeroshot_text":
            import open_clip

            from ..models.clip import resolve_templates

            if tokenizer is None:
                tokenizer = open_clip.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
            self.templates = resolve_templates(cfg.templates)
            prompts = [t.format(c) for t in self.templates for c in self.classnames]
            self.register_buffer("tokens", tokenizer(prompts).to(device), persistent=False)
        else:
            self.templates = ()
            self.register_buffer("tokens", None, persistent=False)
        self.train(False)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "LoRA":
        """Adapter rule (frozen base in eval) + the LoRA layers follow ``mode`` (their dropout)."""
        super().train(mode)
        for layer in getattr(self, "_lora_layers", ()):
            layer.train(mode)
        return self

    # ------------------------------------------------------------------ what the engine asks for
    @property
    def maps_from_backward(self) -> bool:
        """BackMix maps from the training backward (gradients reach the image tower), as for VPT."""
        return bool(self.adapted_blocks.get("vision"))

    @property
    def encodes_text(self) -> bool:
        """``encode_text()`` gives class text features (the zero-shot text head)."""
        return self.tokens is not None

    @property
    def blocks(self) -> nn.Module:
        """The image tower's blocks (hook these / their attention modules)."""
        return self.view.blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.view.num_prefix_tokens

    def grid_size(self, images: Tensor) -> tuple[int, int]:
        return self.view.grid_size(images)

    @property
    def logit_scale(self) -> Tensor:
        return self.base.logit_scale.exp()

    def lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if ".lora_" in n]

    # ------------------------------------------------------------------ text
    def encode_text(self) -> Tensor:
        """``(K, E)`` unit-norm class embeddings, mean over templates (CLIP's prompt ensemble).

        Through the adapted text tower: with gradients while training, cached otherwise (the cache
        is keyed on the LoRA tensors' version counters, so an optimizer step or a load refreshes it).
        """
        if self.tokens is None:
            raise ModelError("this LoRA adapter has a linear head, no text features")
        grad = torch.is_grad_enabled() and self.training and self.text_adapted
        key = tuple(p._version for _, p in self.lora_parameters()) + (self.training,)
        if not grad and self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        chunks = [self.base.encode_text(t) for t in self.tokens.split(1024)] if not grad else [
            self.base.encode_text(self.tokens)]
        emb = F.normalize(torch.cat(chunks).float(), dim=-1)
        emb = emb.view(len(self.templates), len(self.classnames), -1).mean(dim=0)
        text = F.normalize(emb, dim=-1)
        if not grad:
            text = text.detach()
            self._text_cache = (key, text)
        return text

    # ------------------------------------------------------------------ forward
    def forward_features(self, images: Tensor) -> Tensor:
        """Pooled image feature ``(B, D)`` (CLIP: the projected embedding)."""
        if self.is_clip:
            return self.base.encode_image(images)
        return self.base.forward_head(self.base.forward_features(images), pre_logits=True)

    def forward(self, images: Tensor) -> ModelOutput:
        local = None
        if self.is_clip and self.head is None and self.cfg.local_features and not self.training:
            from ..models.clip import encode_image_global_local

            feats, local = encode_image_global_local(self.base, images)
        else:
            feats = self.forward_features(images)
        if self.head is not None:
            return ModelOutput(logits=self.head(feats), features=feats)
        text = self._emit_text_features(self.encode_text()).to(feats.dtype)
        scale = self.logit_scale.to(feats.dtype)
        cosine = F.normalize(feats, dim=-1) @ text.T
        out = ModelOutput(logits=scale * cosine, features=feats, cosine=cosine)
        if local is not None:
            out.local_cosine = F.normalize(local, dim=-1) @ text.T
            out.local_logits = scale * out.local_cosine
        return out

    # ------------------------------------------------------------------ merge / save
    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain backbone with ``W + ΔW`` folded in (a new module; the adapter is unchanged).

        open_clip: a ``CLIP`` whose state dict has exactly the original keys (loads into
        ``open_clip.create_model(name)``); timm: the ViT, with the adapter's linear head as its
        ``head`` (loads into ``timm.create_model(name, num_classes=K)``).
        """
        merged = copy.deepcopy(self.base)
        for name, module in list(merged.named_modules()):
            if is_lora_layer(module):
                _set_child(merged, name, _merged_linear(module))
        for name, module in list(merged.named_modules()):
            if isinstance(module, SplitAttention):
                _set_child(merged, name, module.to_multihead_attention())
            elif isinstance(module, SplitQKV):
                _set_child(merged, name, module.to_linear())
        if self.head is not None and not self.is_clip:
            merged.head = copy.deepcopy(self.head)
            merged.num_classes = self.head.out_features
        return merged.requires_grad_(False).eval()

    def merged_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.merge().state_dict().items()}

    def save_adapter(self, folder: str | Path) -> Path:
        """``adapter_model.safetensors`` (the trainable tensors) + ``adapter_config.json`` (peft layout)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict_trainable().items()}, str(folder / WEIGHTS_FILE))
        info = {"method": "lora", "config": asdict(self.cfg), "classnames": self.classnames,
                "target_modules": self.target_modules, "peft": _peft_lora_config(self.cfg, self.target_modules).to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        return folder

    def load_adapter(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        info = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if info.get("config") != asdict(self.cfg):
            raise ModelError(f"{folder / CONFIG_FILE}: adapter config {info.get('config')} differs from this "
                             f"adapter's {asdict(self.cfg)}")
        self.load_state_dict_trainable(load_file(str(folder / WEIGHTS_FILE)))


ADAPTERS.add("lora", LoRA)
