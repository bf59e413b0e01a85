"""OOD / open-set scores by name (OpenOOD-style postprocessors): one ``setup``, one ``postprocess``.

A score maps a dict of one set's model outputs (the :class:`~backmix_vlm.models.output.ModelOutput`
fields plus ``labels``, as :func:`backmix_vlm.ood.features.extract_outputs` returns them) to one
number per sample, **higher = more likely known**.  Every score has the same two steps, run by
:class:`backmix_vlm.ood.pipeline.ScoringPipeline` once per evaluation:

* ``setup(ScoreSetup)``: what the score needs beyond a set's outputs, declared in ``uses``:
  ``train`` (the ID training set's outputs: Mahalanobis, KNN, ViM, ReAct), ``head`` (the model's
  final linear layer: ViM, ReAct, ASH), ``forward`` (the model itself, for scores that run it on
  the images: ODIN) and ``text`` (the CLIP text side: NegLabel).
* ``postprocess(outputs)``: the per-sample scores of one set.  A score that uses ``forward``
  gets, per batch of images, ``image_scores(images)`` during the pipeline's forward pass; its
  values reach ``postprocess`` as the output named after the score.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from ..models.heads import LinearHead

SCORES: Registry[type["Score"]] = Registry("score")

# Which models fill each output key: shown when a score asks for one that is absent.
PROVIDERS = {
    "logits": "every model",
    "features": "every model (CNN penultimate layer, ViT / CLIP image embedding)",
    "labels": "extract_outputs (the dataset labels)",
    "cosine": "CLIP models and CLIP prompt adapters (zero-shot CLIP, CoOp, LoCoOp)",
    "local_cosine": "CLIP models with patch-level features (zero-shot CLIP, CoOp, LoCoOp)",
    "local_logits": "CLIP models with patch-level features (zero-shot CLIP, CoOp, LoCoOp)",
    "cam": "CNNs with a Conv1x1-GAP CAM head",
}


@dataclass(frozen=True)
class TextSide:
    """The CLIP text side a zero-shot job offers: ``encode(words, templates) -> (M, D)``, the ID
    class embeddings, class names and prompt templates."""

    encode: Callable[[list[str], Any], Tensor]
    class_features: Tensor
    classnames: Sequence[str]
    templates: Any


@dataclass(frozen=True)
class ScoreSetup:
    """Everything a score's ``setup`` may draw on; an evaluation fills what it has."""

    train: Mapping[str, Tensor] | None = None     # ID training outputs (features, logits, labels)
    head: "LinearHead | None" = None              # the final layer: logits = features @ W.T + b
    forward: Callable[[Tensor], Any] | None = None  # images -> logits or ModelOutput
    text: TextSide | None = None


#: the setup inputs (``Score.uses``): what a score using each one does, for error messages
SETUP_INPUTS = {
    "train": "must be fit on training features (train / fewshot / eval: the training set; ood: `train:`)",
    "head": "re-runs the model's final linear layer (found in the model, or the ood job's linear probe)",
    "forward": "runs the model on the images",
    "text": "encodes words with the CLIP text encoder (the zeroshot job)",
}


class Score:
    """Base class: ``setup(ScoreSetup)`` once, then ``postprocess(outputs) -> Tensor[N]`` per set."""

    name: str = ""
    requires: tuple[str, ...] = ("logits",)   # output keys postprocess reads
    uses: tuple[str, ...] = ()                # ScoreSetup fields setup needs (SETUP_INPUTS)

    def setup(self, inputs: ScoreSetup) -> None:
        """Take what ``uses`` names from ``inputs`` (training statistics, head, model, text)."""
        for key in self.uses:
            if getattr(inputs, key) is None:
                raise ConfigError(f"score '{self.name}' {SETUP_INPUTS[key]}; this evaluation does not "
                                  f"give it ({key})")
        self._setup(inputs)

    def _setup(self, inputs: ScoreSetup) -> None:
        """Subclasses: keep what they need (no-op for scores that read only a set's outputs)."""

    def image_scores(self, images: Tensor) -> Tensor:
        """Scores of one batch of images through the model (scores that use ``forward``)."""
        raise NotImplementedError(f"score '{self.name}' reads cached outputs only")

    def postprocess(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """Per-sample scores of one set (float32, higher = more likely known)."""
        self.check(outputs, self.requires)
        return self._score(outputs).float()

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def check(self, outputs: Mapping[str, Tensor], keys: tuple[str, ...]) -> None:
        """Fail clearly when an output this score reads is absent (e.g. MCM on a CNN)."""
        for key in keys:
            if outputs.get(key) is None:
                have = ", ".join(k for k, v in outputs.items() if v is not None) or "nothing"
                raise ConfigError(
                    f"score '{self.name}' needs the model output '{key}', which "
                    f"{PROVIDERS.get(key, 'no known model')} provide(s); this model gave: {have}. "
                    f"Pick scores this model supports (e.g. msp, maxlogit, energy)."
                )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def get_score(name: str, **params: Any) -> Score:
    """Build the score registered as ``name`` with its parameters (e.g. ``temperature=2``)."""
    cls = SCORES.get(name)
    accepted = _accepted(cls)
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ConfigError(
            f"score '{name}' got unknown parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)


def build_scores(names: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None, *,
                 offers: Sequence[str] | None = None, job: str = "this evaluation", std: Sequence[float] | None = None,
                 where: str = "eval") -> list[Score]:
    """The scores ``names`` with their ``params`` (``<where>.scores`` / ``<where>.score_params``).

    The one place a configured score list is checked: names from :data:`SCORES`, each listed
    once, parameters accepted by the score, and (``offers``) every setup input a score
    ``uses`` among what the job offers.  ODIN gets the transform's ``std`` (pixel-space step).
    """
    params = dict(params or {})
    names = list(names)
    if not names:
        raise ConfigError(f"{where}.scores: list at least one score")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}.scores: listed more than once: {', '.join(dupes)}")
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ConfigError(f"{where}.score_params: {', '.join(unknown)} not in {where}.scores ({', '.join(names)})")
    built = []
    for name in names:
        if name not in SCORES:
            raise ConfigError(f"{where}.scores: unknown score '{name}'; available: {', '.join(SCORES.names())}")
        p = dict(params.get(name) or {})
        if std is not None and "std" in _accepted(SCORES.get(name)):
            p.setdefault("std", list(std))
        try:
            score = get_score(name, **p)
        except ConfigError as e:
            raise ConfigError(f"{where}.score_params.{name}: {e}") from None
        missing = [u for u in score.uses if offers is not None and u not in offers]
        if missing:
            raise ConfigError(f"{where}.scores: '{name}' {SETUP_INPUTS[missing[0]]}, which {job} does not have; "
                              f"pick other scores (e.g. msp, maxlogit, energy)")
        built.append(score)
    return built


def _accepted(cls: type) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind in kinds and p.name != "self"]


def _register(name: str) -> Callable[[type[Score]], type[Score]]:
    def deco(cls: type[Score]) -> type[Score]:
        cls.name = name
        return SCORES.register(name)(cls)

    return deco


def _positive(value: float, what: str) -> float:
    if not value > 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- logit scores
@_register("msp")
class MSP(Score):
    """Maximum softmax probability (Hendrycks & Gimpel 2017): the paper's default score."""

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs["logits"].float().softmax(dim=-1).amax(dim=-1)


@_register("maxlogit")
class MaxLogit(Score):
    """Maximum logit (Vaze et al. 2022, Hendrycks et al. 2022): no softmax normalisation."""

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs["logits"].float().amax(dim=-1)


@_register("energy")
class Energy(Score):
    """Negative free energy (Liu et al. 2020): ``T * logsumexp(logits / T)``."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "energy temperature")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        t = self.temperature
        return t * torch.logsumexp(outputs["logits"].float() / t, dim=-1)


@_register("odin")
class ODIN(Score):
    """ODIN (Liang et al. 2018): temperature scaling + a small input perturbation.

    The input moves by ``epsilon`` in the direction that raises the temperature-scaled
    softmax of the predicted class, ``x' = x - epsilon * sign(-grad_x log S_yhat(x; T))``,
    then the score is the MSP at ``T``.  Inputs are normalised tensors: with ``std=None``
    the step is ``epsilon`` in normalised space; pass the transform's per-channel ``std`` to
    get the reference code's pixel-space step (``epsilon / std`` in normalised space).  A
    zero gradient counts as a positive sign, as in the reference (``torch.ge(grad, 0)``).

    The perturbation needs gradients through the model, so cached outputs are not enough:
    ``setup`` takes the model (``forward``) and the pipeline runs :meth:`image_scores` on every
    batch; ``postprocess`` reads those values (output ``odin``), or, given plain outputs, works
    only for ``epsilon = 0`` (pure scaling).
    """

    uses = ("forward",)

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 std: tuple[float, ...] | list[float] | None = None) -> None:
        self.temperature = _positive(temperature, "odin temperature")
        if epsilon < 0:
            raise ConfigError(f"odin epsilon must be >= 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.std = tuple(float(s) for s in std) if std is not None else None
        self._forward: Callable[[Tensor], Any] | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        self._forward = inputs.forward

    def postprocess(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if outputs.get(self.name) is not None:   # the pipeline's image_scores of this set
            return outputs[self.name].float()
        if self.epsilon != 0:
            raise ConfigError(
                "score 'odin' perturbs the input images, so it cannot run on cached outputs; "
                "run it through ScoringPipeline (setup with the model) or set epsilon: 0"
            )
        return super().postprocess(outputs)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return (outputs["logits"].float() / self.temperature).softmax(dim=-1).amax(dim=-1)

    def image_scores(self, images: Tensor) -> Tensor:
        if self._forward is None:
            raise ConfigError("score 'odin' runs the model: call setup(ScoreSetup(forward=model)) first")
        return self.score_images(self._forward, images)

    def score_images(self, forward: Callable[[Tensor], Any], images: Tensor) -> Tensor:
        """ODIN scores of one batch; ``forward`` returns logits or a ModelOutput."""
        t = self.temperature

        def logits_of(x: Tensor) -> Tensor:
            out = forward(x)
            return (out if isinstance(out, Tensor) else out.logits).float()

        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            logits = logits_of(x)
            pred = logits.argmax(dim=-1)
            loss = F.cross_entropy(logits / t, pred, reduction="sum")  # = -sum log S_yhat(x; T)
            (grad,) = torch.autograd.grad(loss, x)
        step = torch.where(grad >= 0, 1.0, -1.0).to(images.dtype)
        if self.std is not None:
            std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
            step = step / std.view(1, -1, *([1] * (images.dim() - 2)))
        with torch.no_grad():
            perturbed = images.detach() - self.epsilon * step
            return (logits_of(perturbed) / t).softmax(dim=-1).amax(dim=-1)


@_register("rotpred")
class RotPred(Score):
    """RotPred's score (Hendrycks et al., NeurIPS 2019; OpenOOD v1.5's ``RotPredPostprocessor``):
    ``KL(uniform || softmax(logits)) - mean_r CE(rotation_head(features(rot_r(x))), r)`` over the four
    rotations r = 0, 90, 180, 270 degrees; the class logits are those of the unrotated image.
    Needs a model trained with ``method: rotpred`` (its ``rotation_head`` on the pooled features).
    The authors' ss-ood code takes both terms in bits (log2): the same ranking (one common factor).
    """

    uses = ("forward",)

    def __init__(self) -> None:
        self._forward: Callable[[Tensor], Any] | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        self._forward = inputs.forward

    def postprocess(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if outputs.get(self.name) is None:
            raise ConfigError("score 'rotpred' runs the model on rotated images; run it through ScoringPipeline")
        return outputs[self.name].float()

    def image_scores(self, images: Tensor) -> Tensor:
        model = self._forward
        while isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        head = getattr(model, "rotation_head", None)
        if head is None:
            raise ConfigError("score 'rotpred' needs a model trained with method: rotpred (a rotation_head)")
        return rotpred_score(model, head, images)


def rotpred_score(forward: Callable[[Tensor], Any], rotation_head: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """The RotPred score of one batch (see :class:`RotPred`); higher = more likely known."""
    n = images.shape[0]
    batch = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    out = forward(batch)
    logits = out.logits[:n].float().log_softmax(-1)
    kl_uniform = (-math.log(logits.shape[-1]) - logits).mean(-1)   # KL(U || p) = sum_k (1/K) log((1/K) / p_k)
    rot = rotation_head(out.features.float()).float()
    target = torch.arange(4, device=rot.device).repeat_interleave(n)
    rot_loss = F.cross_entropy(rot, target, reduction="none").view(4, n).mean(0)
    return kl_uniform - rot_loss


# ----------------------------------------------------------------------------- feature scores
@_register("mahalanobis")
class Mahalanobis(Score):
    """Mahalanobis distance to the closest class mean (Lee et al. 2018), tied covariance.

    ``setup`` estimates class means and one shared covariance (maximum likelihood, 1/N) from
    training ``features`` + ``labels``; the precision is a pseudo-inverse (plus an optional
    ``ridge`` on the diagonal) so rank-deficient features (D > N in few-shot) still work.
    Score = ``-min_c (x - mu_c)^T P (x - mu_c)`` (squared distance; monotone in the distance,
    so every metric is the same).  No input preprocessing or layer ensemble by default.
    """

    requires = ("features",)
    uses = ("train",)

    def __init__(self, ridge: float = 0.0) -> None:
        if ridge < 0:
            raise ConfigError(f"mahalanobis ridge must be >= 0, got {ridge!r}")
        self.ridge = float(ridge)
        self._means: Tensor | None = None
        self._precision: Tensor | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        train_outputs = inputs.train
        assert train_outputs is not None
        self.check(train_outputs, ("features", "labels"))
        x = train_outputs["features"].double()
        y = train_outputs["labels"].long()
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(dim=0) for c in classes])
        centered = x - means[torch.searchsorted(classes, y)]
        cov = centered.T @ centered / x.shape[0]
        cov = cov + self.ridge * torch.eye(cov.shape[0], dtype=cov.dtype)
        self._means, self._precision = means, torch.linalg.pinv(cov, hermitian=True)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._means is None or self._precision is None:
            raise ConfigError("score 'mahalanobis' must be set up with training outputs (features + labels) first")
        x = outputs["features"].double()
        p, mu = self._precision, self._means
        # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, for every (sample, class)
        d = ((x @ p) * x).sum(-1, keepdim=True) - 2 * x @ p @ mu.T + ((mu @ p) * mu).sum(-1)
        return -d.amin(dim=-1)


@_register("featnorm")
class FeatNorm(Score):
    """L2 norm of the features: the paper's FT-Auc score (known samples have larger norms)."""

    requires = ("features",)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs["features"].float().norm(dim=-1)


# ----------------------------------------------------------------------------- CLIP scores
@_register("mcm")
class MCM(Score):
    """Maximum Concept Matching (Ming et al. 2022): max softmax of raw cosines / T (T = 1)."""

    requires = ("cosine",)

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "mcm temperature")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return (outputs["cosine"].float() / self.temperature).softmax(dim=-1).amax(dim=-1)


@_register("glmcm")
class GLMCM(Score):
    """GL-MCM (Miyai et al. 2023): global MCM + the largest local MCM over patches.

    Local MCM of a patch = max over classes of softmax(local_cosine / T); the score adds the
    best patch to the global MCM, so an image with one clearly known object scores high.
    """

    requires = ("cosine", "local_cosine")

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "glmcm temperature")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        t = self.temperature
        glob = (outputs["cosine"].float() / t).softmax(dim=-1).amax(dim=-1)
        local = (outputs["local_cosine"].float() / t).softmax(dim=-1).amax(dim=-1)  # (N, P)
        return glob + local.amax(dim=-1)


# ----------------------------------------------------------------------------- post-hoc scores (OpenOOD v1.5's strong rows)
def _percentile(value: float, what: str, *, upper_open: bool = False) -> float:
    ok = 0 <= value < 100 if upper_open else 0 <= value <= 100
    if not ok:
        raise ConfigError(f"{what} must be in [0, {'100)' if upper_open else '100]'}, got {value!r}")
    return float(value)


def kept_count(n: int, percentile: float, key: str) -> int:
    """``n - round(n p / 100)`` (round-half-even, as ``np.round``): how many of ``n`` activations a
    top-k percentile score (ASH, SCALE) keeps; refuses a percentile that keeps none, naming ``key``."""
    k = n - int(round(n * percentile / 100.0))
    if k < 1:
        raise ConfigError(f"{key} = {percentile:g} keeps {k} of {n} activations per sample (k = n - round(n*p/100)); "
                          f"with {n} activations choose a percentile of at most {100.0 * (n - 1) / n:g} (keeps 1)")
    return k


def _device(device: str | None, default: torch.device) -> torch.device:
    """A score's ``device`` option: unset / ``auto`` = where the data already is, else
    :func:`backmix_vlm.runtime.resolve_device`."""
    if device in (None, "", "auto"):
        return default
    from ..runtime import resolve_device

    return resolve_device(device, "knn.device")


def knn_distance(queries: Tensor, bank: Tensor, k: int, *, max_elements: int = 1 << 25) -> Tensor:
    """Exact Euclidean distance from each query to its ``k``-th nearest row of ``bank``.

    Brute force as matrix products on the inputs' device: ``||q - b||^2 = |q|^2 + |b|^2 - 2 q.b``,
    in blocks of at most ``max_elements`` query x bank entries (32 M floats = 128 MB by default:
    10,000 queries against 50,000 training rows run as 15 blocks of 671 queries), with a running
    top-k over bank blocks when the bank is larger than 524,288 rows, so memory never depends on
    the product of the two sizes.  Returns float32 (N,) on the queries' device.
    """
    n, m = queries.shape[0], bank.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"knn: k = {k} neighbours asked from {m} training features; need 1 <= k <= {m}")
    bank_block = min(m, max(k, max_elements // 64))
    q_block = max(1, max_elements // bank_block)
    bank_sq = bank.pow(2).sum(-1)
    out = torch.empty(n, dtype=torch.float32, device=queries.device)
    for i in range(0, n, q_block):
        q = queries[i:i + q_block]
        best: Tensor | None = None  # the k largest of (2 q.b - |b|^2) so far = the k smallest distances
        for j in range(0, m, bank_block):
            sim = torch.addmm(bank_sq[j:j + bank_block].neg().unsqueeze(0), q, bank[j:j + bank_block].T, alpha=2.0)
            cand = sim if best is None else torch.cat([best, sim], dim=1)
            best = cand.topk(min(k, cand.shape[1]), dim=1, sorted=False).values
        kth = best.amin(dim=1)  # type: ignore[union-attr]
        out[i:i + q_block] = (q.pow(2).sum(-1) - kth).clamp_min(0).sqrt().float()
    return out


@_register("knn")
class KNN(Score):
    """Deep nearest neighbours (Sun et al. 2022): ``-||z - z_(k)||``, z = x / ||x||.

    ``setup`` keeps the L2-normalised training features; the score is minus the distance to the
    ``k``-th nearest of them (exact search, :func:`knn_distance`).  ``k = 50`` as in the paper
    for CIFAR-10 (and OpenOOD); the paper uses k = 1000 for ImageNet with all training data.
    The reference code (faiss ``IndexFlatL2``) returns squared distances: the same ranking,
    hence the same metrics; ``squared: true`` returns them as is.  ``device``: where the search
    runs (default: where the features are; "cuda" moves the bank there once).
    """

    requires = ("features",)
    uses = ("train",)

    def __init__(self, k: int = 50, normalize: bool = True, squared: bool = False, device: str | None = None,
                 max_elements: int = 1 << 25) -> None:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ConfigError(f"knn k must be a positive integer, got {k!r}")
        self.k, self.normalize, self.squared, self.device = int(k), bool(normalize), bool(squared), device
        self.max_elements = int(max_elements)
        self._bank: Tensor | None = None

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x

    def _setup(self, inputs: ScoreSetup) -> None:
        assert inputs.train is not None
        self.check(inputs.train, ("features",))
        feats = inputs.train["features"]
        self._bank = self._prepare(feats.to(_device(self.device, feats.device)))

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._bank is None:
            raise ConfigError("score 'knn' must be set up with training outputs (features) first")
        q = self._prepare(outputs["features"].to(self._bank.device))
        d = knn_distance(q, self._bank, self.k, max_elements=self.max_elements)
        return -(d.pow(2) if self.squared else d).cpu()


def vim_dim(num_features: int) -> int:
    """The ViM authors' principal-subspace size: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    if num_features >= 2048:
        return 1000
    if num_features >= 768:
        return 512
    return max(1, num_features // 2)


@_register("vim")
class ViM(Score):
    """Virtual-logit matching (Wang et al. 2022).

    ``setup`` (training features + the final layer W, b): origin ``u = -pinv(W) b``; principal
    subspace = the top ``dim`` eigenvectors of the uncentred covariance of ``x - u``
    (``(x - u)^T (x - u) / N``); residual ``r(x) = ||(x - u) R||`` over the remaining
    eigenvectors R; ``alpha = mean max-logit / mean r`` on the training set.  Score =
    ``logsumexp(W x + b) - alpha r(x)`` — the authors' and OpenOOD's form, a decreasing
    function of the paper's virtual-class softmax probability, so the metrics are the same.
    ``dim`` default: :func:`vim_dim` (the authors' rule; OpenOOD sweeps it per benchmark).
    """

    requires = ("features",)
    uses = ("train", "head")
    CHUNK = 65536

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and (isinstance(dim, bool) or int(dim) != dim or dim < 1):
            raise ConfigError(f"vim dim must be a positive integer (or null for the authors' rule), got {dim!r}")
        self.dim = None if dim is None else int(dim)
        self._u: Tensor | None = None
        self._residual: Tensor | None = None
        self._alpha: float | None = None
        self._head: "LinearHead | None" = None

    def _setup(self, inputs: ScoreSetup) -> None:
        assert inputs.train is not None and inputs.head is not None
        self.check(inputs.train, ("features",))
        head = self._head = inputs.head
        feats = inputs.train["features"].cpu()
        n, d = feats.shape
        dim = vim_dim(d) if self.dim is None else self.dim
        if not 1 <= dim < d:
            raise ConfigError(f"vim dim = {dim} must be in [1, {d - 1}] for {d}-d features")
        w, b = head.weight.double(), head.bias.double()
        u = -torch.linalg.pinv(w) @ b
        chunks = range(0, n, self.CHUNK)  # float64 sums over row blocks: ImageNet-size sets fit in memory
        cov = sum((lambda xc: xc.T @ xc)(feats[i:i + self.CHUNK].double() - u) for i in chunks) / n
        eigvals, eigvecs = torch.linalg.eigh(cov)                 # ascending
        order = torch.argsort(eigvals, descending=True)
        residual = eigvecs[:, order[dim:]].contiguous()           # (D, D - dim)
        vlogit = sum(((feats[i:i + self.CHUNK].double() - u) @ residual).norm(dim=-1).sum() for i in chunks) / n
        maxlogit = sum((feats[i:i + self.CHUNK].double() @ w.T + b).amax(dim=-1).sum() for i in chunks) / n
        self._u, self._residual, self._alpha = u, residual, float(maxlogit / vlogit)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._residual is None or self._u is None or self._alpha is None:
            raise ConfigError("score 'vim' must be set up with training outputs (features) first")
        x = outputs["features"].double().cpu()
        energy = torch.logsumexp(self._head(x), dim=-1)  # type: ignore[misc]
        return energy - self._alpha * ((x - self._u) @ self._residual).norm(dim=-1)


@_register("react")
class ReAct(Score):
    """ReAct (Sun et al. 2021): energy of the logits of features clipped at ``c``.

    ``c`` = the ``percentile``-th percentile of all training activations (every element of
    the training features, numpy's linear interpolation), or ``threshold`` when given.
    Score = ``logsumexp(W min(x, c) + b)``.  p = 90 as in the paper and OpenOOD (OpenOOD
    estimates c on the ID validation split; here, the training set ``setup`` gets).
    """

    requires = ("features",)

    def __init__(self, percentile: float = 90.0, threshold: float | None = None) -> None:
        self.percentile = _percentile(percentile, "react percentile")
        self.threshold = None if threshold is None else float(threshold)
        self.uses = ("head",) if self.threshold is not None else ("train", "head")
        self._c: float | None = self.threshold
        self._head: "LinearHead | None" = None

    def _setup(self, inputs: ScoreSetup) -> None:
        self._head = inputs.head
        if self.threshold is not None:
            return
        assert inputs.train is not None
        self.check(inputs.train, ("features",))
        acts = inputs.train["features"].float().cpu().numpy().reshape(-1)
        self._c = float(np.percentile(acts, self.percentile))

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._c is None:
            raise ConfigError("score 'react' must be set up with training outputs (features) first, or given a threshold")
        if self._head is None:
            raise ConfigError("score 'react' re-runs the final linear layer: call setup(ScoreSetup(head=...)) first")
        x = outputs["features"].float().cpu().clamp(max=self._c)
        return torch.logsumexp(self._head(x), dim=-1)


ASH_VARIANTS = ("p", "b", "s")


def ash(x: Tensor, percentile: float, variant: str) -> Tensor:
    """Activation shaping (Djurisic et al. 2023) of pooled features ``x`` (N, D); returns a new tensor.

    Keep the ``k = D - round(D p / 100)`` largest entries of each row, zero the rest (ties in
    ``topk`` order), then -P: keep them as they are; -B: set each kept entry to
    ``sum(x) / k`` (binarise, preserving the row sum); -S: multiply the pruned row by
    ``exp(sum(x) / sum(pruned))``.  ``round`` is round-half-to-even, as ``np.round``.
    """
    v = variant.lower()
    if v not in ASH_VARIANTS:
        raise ConfigError(f"ash variant {variant!r}; choose one of {', '.join(ASH_VARIANTS)}")
    _percentile(percentile, "ash percentile", upper_open=True)
    n = x.shape[1]
    k = kept_count(n, percentile, f"score_params.ash_{v}.percentile")
    values, idx = x.topk(k, dim=1)
    s1 = x.sum(dim=1, keepdim=True)
    if v == "b":
        return torch.zeros_like(x).scatter_(1, idx, (s1 / k).expand_as(values))
    pruned = torch.zeros_like(x).scatter_(1, idx, values)
    if v == "p":
        return pruned
    return pruned * torch.exp(s1 / pruned.sum(dim=1, keepdim=True))


class _ASH(Score):
    """ASH-P / -B / -S: energy of the logits of shaped penultimate features.

    Score = ``logsumexp(W ash(x) + b)`` (:func:`ash`), applied to the pooled features right
    before the final layer, as the authors do.  ASH assumes non-negative (post-ReLU)
    activations; on signed features (a ViT's normalised token) it still runs but is outside
    the paper's setting.  Default p = 90 (the authors' CIFAR-10 / ImageNet ASH-S setting and
    OpenOOD's default; the paper's ImageNet ResNet-50 table uses ASH-P@60, ASH-B@65, ASH-S@90).
    """

    requires = ("features",)
    uses = ("head",)
    variant = "p"

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = _percentile(percentile, f"ash_{self.variant} percentile", upper_open=True)
        self._head: "LinearHead | None" = None

    def _setup(self, inputs: ScoreSetup) -> None:
        self._head = inputs.head
        if self._head is not None:  # refuse a percentile that keeps nothing before any set is scored
            kept_count(self._head.in_features, self.percentile, f"score_params.{self.name}.percentile")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._head is None:
            raise ConfigError(f"score '{self.name}' re-runs the final linear layer: call setup(ScoreSetup(head=...)) first")
        x = ash(outputs["features"].float().cpu(), self.percentile, self.variant)
        return torch.logsumexp(self._head(x), dim=-1)


@_register("ash_p")
class ASHP(_ASH):
    __doc__ = _ASH.__doc__
    variant = "p"


@_register("ash_b")
class ASHB(_ASH):
    __doc__ = _ASH.__doc__
    variant = "b"


@_register("ash_s")
class ASHS(_ASH):
    __doc__ = _ASH.__doc__
    variant = "s"


@_register("gen")
class GEN(Score):
    """Generalized entropy (Liu et al. 2023): ``-sum_{top M} p^gamma (1 - p)^gamma``.

    Over the ``M`` largest softmax probabilities (``M`` capped at the number of classes);
    gamma = 0.1, M = 100 as in the paper and OpenOOD.
    """

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        self.gamma = _positive(gamma, "gen gamma")
        if isinstance(M, bool) or int(M) != M or M < 1:
            raise ConfigError(f"gen M must be a positive integer, got {M!r}")
        self.M = int(M)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        p = outputs["logits"].double().softmax(dim=-1)
        top = p.topk(min(self.M, p.shape[-1]), dim=-1).values
        g = self.gamma
        return -(top.pow(g) * (1 - top).pow(g)).sum(dim=-1)


# ----------------------------------------------------------------------------- NegLabel (zero-shot CLIP)
@_register("neglabel")
class NegLabel(Score):
    """NegLabel (Jiang et al. 2024): ID-label share of the softmax over ID + mined negative labels.

    Candidates: the shipped WordNet 3.0 nouns and adjectives of ``lexnames`` (default: the
    authors' lexicographer files, :data:`backmix_vlm.data.wordnet.NEGLABEL_LEXNAMES`), or the
    user's ``words`` (a text file, one word per line; nouns) and ``adjectives`` (optional second
    file, prompted "This is a {} photo"), which replace them.  ``setup`` encodes and selects them once with the
    zero-shot job's text encoder (``text``, see :mod:`backmix_vlm.ood.neglabel`); the score then
    reads the cached ID ``cosine`` and the image embedding ``features``.  Defaults are the paper's: 15 % of the
    words kept at the 0.95 similarity quantile, τ = 0.01, 100 groups.
    """

    requires = ("cosine", "features")
    uses = ("text",)

    def __init__(self, words: str | None = None, adjectives: str | None = None, lexnames: list[str] | None = None,
                 ratio: float = 0.15, percentile: float = 0.95, temperature: float = 0.01, ngroup: int = 100,
                 seed: int = 0) -> None:
        self.words, self.adjectives = words, adjectives
        self.lexnames = None if lexnames is None else list(lexnames)
        self.ratio, self.percentile = float(ratio), float(percentile)
        self.temperature = _positive(temperature, "neglabel temperature")
        if isinstance(ngroup, bool) or int(ngroup) != ngroup or ngroup < 1:
            raise ConfigError(f"neglabel ngroup must be a positive integer, got {ngroup!r}")
        self.ngroup, self.seed = int(ngroup), int(seed)
        self._neg: Tensor | None = None
        self._neg_words: list[str] = []

    def set_negatives(self, text_features: Tensor, words: list[str] | None = None) -> None:
        """Unit-norm embeddings (M, D) of the selected negative labels."""
        self._neg = F.normalize(text_features.detach().float().cpu(), dim=-1)
        self._neg_words = list(words or [])

    def _setup(self, inputs: ScoreSetup) -> None:
        """Encode the word lists with the text encoder and keep the negative labels."""
        from ..data.wordnet import NEGLABEL_LEXNAMES
        from .neglabel import candidate_pool, negative_text_features

        text = inputs.text
        assert text is not None
        nouns, adjectives = candidate_pool(self.words, self.adjectives, self.lexnames, NEGLABEL_LEXNAMES,
                                           f"score_params.{self.name}")
        feats, words = negative_text_features(text.encode, text.class_features, nouns,
                                              text.templates, adjectives=adjectives, ratio=self.ratio,
                                              percentile=self.percentile, exclude=list(text.classnames))
        self.set_negatives(feats, words)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        from .neglabel import neglabel_score

        if self._neg is None:
            raise ConfigError("score 'neglabel' has no negative labels: it runs in the zero-shot CLIP job, which "
                              "encodes its word list (or call set_negatives / setup first)")
        img = F.normalize(outputs["features"].float().cpu(), dim=-1)
        neg_cos = torch.cat([img[i:i + 2048] @ self._neg.T for i in range(0, img.shape[0], 2048)])
        return neglabel_score(outputs["cosine"].float().cpu(), neg_cos, temperature=self.temperature,
                              ngroup=self.ngroup, seed=self.seed)
