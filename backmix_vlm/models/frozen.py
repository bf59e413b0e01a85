"""Frozen towers in the compute dtype: weights held in bf16 / fp16 once, fused attention.

Under ``torch.autocast`` every matmul casts its fp32 weight to the autocast dtype on *every*
call (autocast caches the cast only for leaf tensors that require grad, i.e. never for a
frozen tower), and the frozen towers of CoOp / LoCoOp / VPT / zero-shot evaluation dominate
the step.  :func:`hold_frozen_in` does the cast once, the way open_clip builds a model in half
precision (``convert_weights_to_lp`` + ``LayerNormFp32``):

* frozen parameters (matmul / conv weights and biases, embeddings, class / prompt tokens)
  are cast to ``dtype`` in place (the ``Parameter`` objects stay the same);
* normalisation layers keep fp32 parameters and compute in fp32 on low-precision inputs,
  returning the input dtype (open_clip's ``LayerNormFp32``; on CPU torch's mixed-dtype
  layer-norm kernel does exactly this without copying the input to fp32);
* ``logit_scale`` / ``logit_bias`` stay fp32 (a bf16 temperature would be off by up to 0.4 %);
* trainable parameters (``requires_grad=True``: CoOp context, VPT prompts, heads, LoRA
  weights) are not touched, so they and their optimizer state stay fp32;
* frozen ``nn.MultiheadAttention`` self-attention runs a lean ``scaled_dot_product_attention``
  forward (:class:`FusedMultiheadAttention`: one packed projection in the input's own layout,
  strided q / k / v views into the flash kernel, no ``contiguous`` copies of q, k, v);
* open_clip's ``QuickGELU`` allocates one tensor instead of three when no graph is recorded;
* open_clip blocks can compute the class token alone (:func:`class_token_only`: the last block
  of a tower whose caller reads only the pooled embedding, e.g. CoOp's image features);
* conv layers (the patch embedding) cast their input to their weight dtype, so an image
  tower also runs without autocast.

Everything else about the model is unchanged: module types stay subclasses of the original
ones (``isinstance`` checks and the attention-relevance extractor keep working), parameter
names and shapes are the same, and the adapter's saved state (its trainable tensors) is fp32
as before.  The cast model is meant to run under autocast of the same dtype (the trainer and
the evaluator do), so fp32 trainable parts mix with the low-precision frozen ones.
:func:`frozen_compute_dtype` maps ``run.precision`` to the dtype (None for fp32 runs).
"""
from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime import check_eval_workers, low_precision_dtype, resolve_precision

LOW_DTYPES = (torch.bfloat16, torch.float16)  # what frozen weights may be held in
KEEP_FP32 = ("logit_scale", "logit_bias")  # parameter names (CLIP / SigLIP temperature and bias)
NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                                *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def frozen_compute_dtype(precision: str | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype frozen weights are held in for ``run.precision`` on ``device``.

    ``bf16`` → bfloat16 (CPU and GPU); ``fp16`` → float16 on a GPU (CPU fp16 autocast is not
    supported, None); ``no`` / ``fp32`` / None → None (keep fp32).
    """
    if precision == "auto":  # a run resolves it once (runtime.resolve_run_precision); direct callers here
        precision = resolve_precision(precision, device)[0]
    dtype = low_precision_dtype(precision)
    if dtype is torch.float16 and torch.device(device).type == "cpu":
        return None
    return dtype


# ----------------------------------------------------------------------------- fp32 norms
class _NormInFp32:
    """Mixin: compute the norm in fp32 on bf16 / fp16 inputs, return the input dtype."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        if _plain_layer_norm(self) and x.device.type == "cpu":
            # CPU's mixed-dtype kernel: fp32 statistics and affine, bf16 / fp16 in and out, no copies
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # type: ignore[attr-defined]
        return super().forward(x.float(), *args, **kwargs).to(x.dtype)  # type: ignore[misc]


_PLAIN_LN_FORWARDS: set[Any] = {nn.LayerNorm.forward}


def _plain_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm whose forward is ``F.layer_norm(x, shape, weight, bias, eps)`` (torch / open_clip / timm)."""
    base = type(module).__mro__[2]  # (fp32 variant, _NormInFp32, original class, ...)
    return base.forward in _PLAIN_LN_FORWARDS and all(
        p is None or p.dtype == torch.float32 for p in (module.weight, module.bias))  # type: ignore[attr-defined]


def _known_plain_layer_norms() -> None:
    try:
        from open_clip.transformer import LayerNorm, LayerNormFp32

        _PLAIN_LN_FORWARDS.update({LayerNorm.forward, LayerNormFp32.forward})
    except ImportError:  # pragma: no cover - open_clip is optional for timm-only use
        pass
    try:
        from timm.layers import LayerNorm as TimmLayerNorm

        if getattr(TimmLayerNorm, "forward", None) is not None:
            # timm's LayerNorm only adds an optional "fast norm" path (GPU autocast), same math
            _PLAIN_LN_FORWARDS.add(TimmLayerNorm.forward)
    except ImportError:  # pragma: no cover
        pass


_known_plain_layer_norms()


# ----------------------------------------------------------------------------- conv input cast
class _CastInput:
    """Mixin: cast a floating input to the layer's weight dtype (patch embeddings: images arrive in fp32)."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        w = self.weight  # type: ignore[attr-defined]
        if x.is_floating_point() and x.dtype != w.dtype and not _autocast_on(x.device.type):
            x = x.to(w.dtype)
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


# ----------------------------------------------------------------------------- QuickGELU
class _QuickGELUFewerAllocations:
    """open_clip ``QuickGELU`` (``x * sigmoid(1.702 x)``) with one output tensor instead of three
    when no graph is recorded (same kernels, bit-identical result)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)  # type: ignore[misc]
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


# ----------------------------------------------------------------------------- fused attention
class FusedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention runs one lean ``scaled_dot_product_attention``.

    torch's own path (``F.multi_head_attention_forward``) also ends in SDPA, but first copies
    the packed q / k / v projection into a contiguous (3, L, N, E) tensor, re-views it per head
    and copies the output back (in bf16 on a CPU, ~10 % of a ViT-B/16 forward went to copies).  Here the projection runs in the input's own layout and q / k / v are strided views
    of it (the flash kernels read strides).  Anything else — ``need_weights``, cross-attention,
    key padding masks, ``add_bias_kv``, dropout in training — goes to the original forward.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if (need_weights or key is not query or value is not query or key_padding_mask is not None
                or query.dim() != 3 or not self._qkv_same_embed_dim or self.bias_k is not None
                or self.add_zero_attn or (self.training and self.dropout > 0)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return fused_self_attention(self, query, attn_mask, is_causal), None


def fused_self_attention(mod: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None = None,
                         is_causal: bool = False) -> Tensor:
    """Self-attention of ``mod`` on ``x`` ((N, L, E) if ``mod.batch_first`` else (L, N, E)) via SDPA."""
    heads = mod.num_heads
    qkv = F.linear(x, mod.in_proj_weight, mod.in_proj_bias)
    if mod.batch_first:
        n, length, emb = x.shape
        q, k, v = qkv.view(n, length, 3, heads, emb // heads).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        length, n, emb = x.shape
        q, k, v = qkv.view(length, n, 3, heads, emb // heads).permute(2, 1, 3, 0, 4).unbind(0)
    mask = _sdpa_mask(attn_mask, n, heads, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    # out: (N, H, L, D) -> the input's layout
    out = out.transpose(1, 2).reshape(n, length, emb) if mod.batch_first else out.permute(2, 0, 1, 3).reshape(length, n, emb)
    return mod.out_proj(out)


def _sdpa_mask(mask: Tensor | None, n: int, heads: int, dtype: torch.dtype) -> Tensor | None:
    """MHA's attn_mask (bool True = masked, or additive; (L, S) or (N*H, L, S)) in SDPA's convention."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.view(n, heads, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return ~mask  # SDPA: True = attend
    return mask.to(dtype)


# ----------------------------------------------------------------------------- class token only
class _ClassTokenOnly:
    """open_clip ``ResidualAttentionBlock`` that, while ``class_token_only`` is set (see
    :func:`class_token_only`), computes its output for the class token alone.

    For a tower pooled at the class token the last block's other outputs are never read: their
    keys and values are still needed, but not their queries, attention rows, out-projection and
    MLP, ~80 % of the block.  Hooks fire as usual (a pre-hook still sees the whole input); a
    patched (explicit, relevance) attention, cross-attention or a mask takes the normal path.
    """

    class_token_only = 0  # how many active class_token_only() contexts hold this block (0: off)

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        attn = self.attn  # type: ignore[attr-defined]
        if (not self.class_token_only or k_x is not None or v_x is not None or attn_mask is not None
                or not isinstance(attn, FusedMultiheadAttention) or "forward" in attn.__dict__
                or (attn.training and attn.dropout > 0)):
            return super().forward(q_x, k_x, v_x, attn_mask)  # type: ignore[misc]
        first = attn.batch_first
        y = (q_x[:, :1] if first else q_x[:1]) + self.ls_1(class_query_attention(attn, self.ln_1(q_x)))  # type: ignore[attr-defined]
        return y + self.ls_2(self.mlp(self.ln_2(y)))  # type: ignore[attr-defined]


def class_query_attention(mod: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Self-attention output of the first token only: (N, 1, E) / (1, N, E) for batch- / sequence-first ``x``."""
    emb, heads = mod.embed_dim, mod.num_heads
    w, b = mod.in_proj_weight, mod.in_proj_bias
    first = mod.batch_first
    q = F.linear(x[:, :1] if first else x[:1], w[:emb], None if b is None else b[:emb])
    kv = F.linear(x, w[emb:], None if b is None else b[emb:])
    if first:
        n, length = x.shape[:2]
        q = q.view(n, 1, heads, emb // heads).transpose(1, 2)
        k, v = kv.view(n, length, 2, heads, emb // heads).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        length, n = x.shape[:2]
        q = q.view(1, n, heads, emb // heads).permute(1, 2, 0, 3)
        k, v = kv.view(length, n, 2, heads, emb // heads).permute(2, 1, 3, 0, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, H, 1, D)
    out = out.transpose(1, 2).reshape(n, 1, emb) if first else out.permute(2, 0, 1, 3).reshape(1, n, emb)
    return mod.out_proj(out)


_CLASS_TOKEN_ONLY_LOCK = threading.Lock()


@contextmanager
def class_token_only(model: nn.Module) -> Iterator[bool]:
    """While active, the last block of ``model``'s open_clip image tower (held by :func:`hold_frozen_in`)
    outputs the class token only -- for callers that read nothing but the pooled embedding
    (``encode_image`` of a tower pooled at the class token).  Yields whether it applies."""
    visual = getattr(model, "visual", model)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    block = blocks[-1] if blocks is not None and len(blocks) else None
    eligible = (isinstance(block, _ClassTokenOnly) and getattr(visual, "attn_pool", None) is None
                and getattr(visual, "pool_type", None) == "tok" and not getattr(visual, "output_tokens", False))
    if not eligible:
        yield False
        return
    with _CLASS_TOKEN_ONLY_LOCK:  # counted: shards of one batch enter it from several threads at once
        block.class_token_only += 1  # type: ignore[union-attr]
    try:
        yield True
    finally:
        with _CLASS_TOKEN_ONLY_LOCK:
            block.class_token_only -= 1  # type: ignore[union-attr]
            if not block.class_token_only:  # type: ignore[union-attr]
                del block.class_token_only  # type: ignore[union-attr]  # back to the class default


# ----------------------------------------------------------------------------- the cast
_VARIANTS: dict[tuple[type, type], type] = {}


def _variant(mixin: type, cls: type) -> type:
    """A subclass of ``cls`` with ``mixin``'s forward, created once and importable (picklable)."""
    key = (mixin, cls)
    if key not in _VARIANTS:
        name = f"{cls.__name__}{mixin.__name__.strip('_')}"
        variant = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = variant
        _VARIANTS[key] = variant
    return _VARIANTS[key]


def _swap(module: nn.Module, mixin: type) -> None:
    if not isinstance(module, mixin):
        module.__class__ = _variant(mixin, type(module))


def _is_open_clip(module: nn.Module, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("open_clip") for c in type(module).__mro__)


def _is_quick_gelu(module: nn.Module) -> bool:
    return _is_open_clip(module, "QuickGELU")


def hold_frozen_in(module: nn.Module, dtype: torch.dtype | None) -> int:
    """Hold ``module``'s frozen parts in ``dtype`` (see the module docstring); returns the number
    of parameter elements cast.  ``dtype=None`` does nothing.  Calling it again is a no-op."""
    if dtype is None:
        return 0
    if dtype not in LOW_DTYPES:
        raise ConfigError(f"frozen weights can be held in bfloat16 or float16, not {dtype}")
    cast = 0
    for sub in module.modules():
        params = list(sub.named_parameters(recurse=False))
        if isinstance(sub, NORM_TYPES):
            _swap(sub, _NormInFp32)
            for _, p in params:  # norms compute in fp32: their parameters stay (or become) fp32
                if p.is_floating_point() and p.dtype != torch.float32 and not p.requires_grad:
                    p.data = p.data.float()
            continue
        for name, p in params:
            if p.requires_grad or not p.is_floating_point() or name in KEEP_FP32 or p.dtype == dtype:
                continue
            p.data = p.data.to(dtype)
            cast += p.numel()
        frozen = not any(p.requires_grad for p in sub.parameters())
        if type(sub) is nn.MultiheadAttention and frozen:
            sub.__class__ = FusedMultiheadAttention
        elif isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and frozen:
            _swap(sub, _CastInput)
        elif _is_quick_gelu(sub):
            _swap(sub, _QuickGELUFewerAllocations)
        elif _is_open_clip(sub, "ResidualAttentionBlock") and frozen:
            _swap(sub, _ClassTokenOnly)
    return cast


def frozen_dtypes(module: nn.Module) -> dict[str, int]:
    """Parameter elements per dtype name, frozen and trainable separately (for logs and tests)."""
    out: dict[str, int] = {}
    for p in module.parameters():
        key = f"{'trainable' if p.requires_grad else 'frozen'} {str(p.dtype).replace('torch.', '')}"
        out[key] = out.get(key, 0) + p.numel()
    return out


def fp32_head(like: Tensor) -> Any:
    """Autocast off on ``like``'s device: class heads (cosine, logit scale) computed in fp32."""
    return torch.autocast(like.device.type, enabled=False)


def trainable_in_fp32(module: nn.Module) -> nn.Module:
    """Make every trainable floating parameter fp32 (in place; e.g. LoRA weights created in the
    dtype of a base held in bf16), so weights, gradients and optimizer state are fp32."""
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return module


def compile_frozen_tower(model: nn.Module) -> nn.Module:
    """``torch.compile`` the forward of ``model``'s image tower (``model.visual``, else ``model``) in place.

    For evaluation of a frozen tower (zero-shot: ``run.compile: true``).  Inductor fuses the
    memory-bound work between the matmuls (layer norms, QuickGELU, residual adds, casts), which
    on a 2-core CPU does not scale with the second core in eager mode (``docs/benchmarks_speed.md``:
    ViT-B/16 ``encode_image`` 70 % -> 73 % of the bf16 matmul peak on 2 threads, 71 % -> 81 % on 1).  The bound
    ``forward`` is replaced, not the module, so parameter names, state dicts and feature-cache
    fingerprints are unchanged.  The first batches pay the compile time (about 20-100 s for a
    ViT-B/16 on 2 cores; a new batch size or the class-token-only switch compiles once more).
    """
    tower = getattr(model, "visual", model)
    if not getattr(tower, "_backmix_compiled", False):
        tower.forward = torch.compile(tower.forward)
        tower._backmix_compiled = True
    return model


class ShardedForward:
    """A module's ``forward`` run as ``workers`` single-threaded shards of the batch in parallel.

    On a CPU, torch parallelises each op over its intra-op threads; the memory-bound ops between
    the matmuls (layer norms, activations, residual adds, the flash-attention kernel at ViT sizes)
    barely gain from the second thread.  Splitting the *batch* over worker threads that each run
    with one intra-op thread keeps every core on its own whole forward (data parallelism inside
    one process; the ops release the GIL).  Applies only where no graph is recorded
    (``torch.no_grad`` / ``inference_mode``), on CPU tensors, with at least two samples per
    shard; otherwise it is the wrapped forward.  Worker threads inherit the caller's autocast,
    grad and inference mode (torch keeps them per thread).  The first call runs its shards one
    after the other, so a ``torch.compile``-d forward compiles once, for one thread.  Outputs
    (tensors, tuples, dicts or :class:`~backmix_vlm.models.output.ModelOutput`) are joined
    along the batch.  The wrapped forward must be safe to run from two threads at once (hooks
    that collect tensors must check their thread, as ``encode_image_global_local`` does).
    """

    def __init__(self, forward: Any, workers: int) -> None:
        self.forward = forward
        self.workers = int(workers)
        self._pool: Any = None
        self._warm = False

    def _applies(self, x: Any, args: tuple, kwargs: dict) -> bool:
        return (self.workers > 1 and not args and not kwargs and isinstance(x, Tensor) and x.device.type == "cpu"
                and not torch.is_grad_enabled() and x.shape[0] >= 2 * self.workers)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._applies(x, args, kwargs):
            return self.forward(x, *args, **kwargs)
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="backmix-shard")
        inference = torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")

        def run(shard: Tensor) -> Any:
            with torch.inference_mode(inference), torch.no_grad(), \
                    torch.autocast("cpu", dtype=dtype, enabled=autocast):
                return self.forward(shard)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            shards = x.chunk(self.workers)
            if self._warm:
                outs = list(self._pool.map(run, shards))
            else:
                outs = [self._pool.submit(run, shard).result() for shard in shards]
                self._warm = True
        finally:
            torch.set_num_threads(threads)
        return join_batches(outs)


def join_batches(outs: list[Any]) -> Any:
    """Concatenate per-shard outputs along the batch: tensors, tuples / lists, dicts and dataclasses
    of them (``None`` fields stay ``None``)."""
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(outs)
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(join_batches([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: join_batches([o[k] for o in outs]) for k in first}
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{f.name: join_batches([getattr(o, f.name) for o in outs])
                                             for f in dataclasses.fields(first)})
    raise TypeError(f"cannot join per-shard outputs of type {type(first).__name__} along the batch")


def shard_batches(module: nn.Module, workers: int | str) -> nn.Module:
    """Run ``module``'s inference batches as ``workers`` parallel single-threaded shards
    (:class:`ShardedForward`), in place; ``workers`` 0 or 1 leaves it as it is, ``"auto"`` is
    one worker per torch thread.

    Like :func:`compile_frozen_tower` the bound ``forward`` is replaced, not the module (names,
    state dicts and feature-cache fingerprints unchanged); shard after compiling, so each worker
    runs the compiled forward.
    """
    check_eval_workers(workers)
    if workers == "auto":  # one per intra-op thread; a no-op off the CPU (ShardedForward applies to CPU tensors)
        workers = torch.get_num_threads()
    if workers >= 2 and not isinstance(module.forward, ShardedForward):
        module.forward = ShardedForward(module.forward, workers)
    return module
