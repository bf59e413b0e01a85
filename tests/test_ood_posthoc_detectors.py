"""The post-hoc detectors of ``ood.posthoc`` (entropy, tempscale, klm, scale, dice, fdbd, gradnorm,
rmds, she, nnguide, openmax, rankfeat) and the percentile guard of ASH / SCALE / DICE.

Each score is checked against a hand computation and against its reference formula restated
from OpenOOD v1.5's postprocessor (numpy / scipy / scikit-learn / autograd, as those files
compute it) on small synthetic tensors; then every one runs through the train/eval and ood-job
evaluators, and the jobs that lack an input refuse it by name.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp as np_logsumexp
from torch import nn
from torch.utils.data import Dataset

from backmix_vlm.errors import ConfigError
from backmix_vlm.models.heads import LinearHead
from backmix_vlm.ood.posthoc.logit import fit_temperature
from backmix_vlm.ood.posthoc.openmax import fit_high, w_score, weibull_mle
from backmix_vlm.ood.posthoc.rankfeat import remove_rank1
from backmix_vlm.ood.posthoc.shaping import scale_features
from backmix_vlm.ood.scores import ScoreSetup, ash, build_scores, get_score

NEW = ["entropy", "tempscale", "klm", "scale", "dice", "fdbd", "gradnorm", "rmds", "she", "nnguide", "openmax",
       "rankfeat"]


def _data(n=40, d=6, k=4, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    x = x.relu() + 0.05 if relu else x
    w, b = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    logits = x @ w.T + b
    labels = logits.argmax(1)
    labels[::3] = torch.randint(0, k, (len(labels[::3]),), generator=g)  # some training errors
    return {"features": x, "logits": logits, "labels": labels}, LinearHead(w, b)


def _set_up(name, train=None, head=None, **params):
    s = get_score(name, **params)
    s.setup(ScoreSetup(train=train, head=head))
    return s


def _np(t):
    return t.detach().double().numpy()


# ----------------------------------------------------------------------------- logits
def test_entropy_hand_and_scipy():
    from scipy.stats import entropy

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert get_score("entropy").postprocess({"logits": logits}).item() == pytest.approx(
        0.5 * math.log(0.5) + 0.5 * math.log(0.25), rel=1e-6)
    z = torch.randn(30, 7) * 4
    ref = -entropy(torch.softmax(z.double(), 1).numpy(), axis=1)
    assert np.allclose(get_score("entropy").postprocess({"logits": z}).double().numpy(), ref, atol=1e-6)


def test_tempscale_fits_the_nll_minimum():
    from scipy.optimize import minimize_scalar

    train, _ = _data(n=200, k=5, seed=1)
    z, y = train["logits"], train["labels"]

    def nll(t):
        return float(torch.nn.functional.cross_entropy(z / t, y))

    ref = minimize_scalar(nll, bounds=(1e-3, 1e3), method="bounded", options={"xatol": 1e-10}).x
    t = fit_temperature(z, y)
    assert t == pytest.approx(ref, rel=1e-5)
    eps = 1e-4 * t
    assert nll(t) <= min(nll(t - eps), nll(t + eps))
    s = _set_up("tempscale", train=train)
    assert torch.allclose(s.postprocess(train).double(), torch.softmax(z / t, 1).amax(1), atol=1e-6)
    # a given temperature: no training outputs needed; hand case T = 2
    fixed = _set_up("tempscale", temperature=2.0)
    p = torch.softmax(torch.tensor([[2.0, 0.0]]) / 2, 1)[0, 0]
    assert fixed.postprocess({"logits": torch.tensor([[2.0, 0.0]])}).item() == pytest.approx(float(p))
    # training logits that are fit perfectly have no optimal temperature: refused, naming the key
    with pytest.raises(ConfigError, match="score_params.tempscale.temperature"):
        _set_up("tempscale", train={"logits": z, "labels": z.argmax(1)})


def _klm_reference(train_logits, test_logits):
    """OpenOOD KLMatchingPostprocessor: mean softmax per predicted class (one-hot when none), then
    -pairwise_distances_argmin_min(softmax, templates, metric=scipy.stats.entropy)[1]."""
    import scipy.stats
    from sklearn.metrics import pairwise_distances_argmin_min

    p_train = torch.softmax(train_logits, 1).numpy()
    preds = p_train.argmax(1)
    k = p_train.shape[1]
    templates = [p_train[preds == i].mean(0) if (preds == i).any() else np.eye(k)[i] for i in range(k)]
    p = torch.softmax(test_logits, 1).numpy()
    return -pairwise_distances_argmin_min(p, np.array(templates), metric=lambda a, b: scipy.stats.entropy(a, b))[1]


def test_klm_matches_openood():
    train, _ = _data(n=60, k=5, seed=2)
    train["logits"][:, 4] -= 100  # nobody is predicted as class 4: its template is one-hot
    test, _ = _data(n=25, k=5, seed=3)
    s = _set_up("klm", train=train)
    ref = _klm_reference(train["logits"], test["logits"])
    assert np.allclose(s.postprocess(test).double().numpy(), ref, rtol=1e-5, atol=1e-6)
    # hand case: a sample whose softmax equals a template scores 0 (KL = 0)
    assert s.postprocess({"logits": train["logits"][:1] * 0 + torch.log(torch.softmax(
        train["logits"][train["logits"].argmax(1) == 0], 1).mean(0))[None]}).item() == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- shaping
def _scale_reference(x, percentile):
    """OpenOOD's scale_net.scale on (B, C, 1, 1)."""
    x4 = x.clone()[:, :, None, None]
    inp = x4.clone()
    b, c = x4.shape[:2]
    s1 = x4.sum(dim=[1, 2, 3])
    n = x4.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x4.view((b, c))
    v, i = torch.topk(t, k, dim=1)
    t.zero_().scatter_(dim=1, index=i, src=v)
    s2 = x4.sum(dim=[1, 2, 3])
    return (inp * torch.exp((s1 / s2)[:, None, None, None])).view(b, c)


def test_scale_hand_and_openood():
    x = torch.arange(1.0, 11.0, dtype=torch.float64).reshape(1, 10)     # sum 55; p = 80 keeps 9 + 10 = 19
    assert torch.allclose(scale_features(x, 80), x * math.exp(55 / 19))
    train, head = _data(n=30, d=20, seed=4)
    for p in (65, 85):
        s = _set_up("scale", head=head, percentile=p)
        ref = torch.logsumexp(head(_scale_reference(train["features"], p)), 1)
        assert torch.allclose(s.postprocess(train).double(), ref, rtol=1e-5)


def _dice_reference(train_x, w, b, x, p):
    """OpenOOD DICEPostprocessor: contrib = mean_act * W, mask = contrib > np.percentile(contrib, p)."""
    mean_act = train_x.mean(0)
    contrib = mean_act[None, :] * w
    mask = contrib > np.percentile(contrib, p)
    return np_logsumexp((x[:, None, :] * (w * mask)).sum(2) + b, axis=1)


def test_dice_matches_openood_and_refuses_an_empty_mask():
    train, head = _data(n=30, d=12, k=5, seed=5)
    for p in (50, 90):
        s = _set_up("dice", train=train, head=head, percentile=p)
        ref = _dice_reference(_np(train["features"]), _np(head.weight), _np(head.bias), _np(train["features"]), p)
        assert np.allclose(s.postprocess(train).double().numpy(), ref, rtol=1e-5)
    # hand case: mean (1, 2), W = [[1, 1]] -> contributions (1, 2); p = 50 -> threshold 1.5 keeps w_2 only
    s = _set_up("dice", train={"features": torch.tensor([[1.0, 2.0]])}, head=LinearHead(torch.ones(1, 2), torch.zeros(1)),
                percentile=50)
    assert s.postprocess({"features": torch.tensor([[3.0, 5.0]])}).item() == pytest.approx(5.0)
    with pytest.raises(ConfigError, match=r"score_params.dice.percentile = 100 keeps 0 of 60 weights"):
        _set_up("dice", train=train, head=head, percentile=100)


# ----------------------------------------------------------------------------- head closed forms
def _fdbd_reference(train_x, w, b, x, distance):
    """OpenOOD fDBDPostprocessor (denominator matrix with 1 on the diagonal)."""
    k = w.shape[0]
    den = np.zeros((k, k))
    for c in range(k):
        d = np.linalg.norm(w - w[c, :], axis=1)
        d[c] = 1
        den[c, :] = d
    out = x @ w.T + b
    values, idx = out.max(1), out.argmax(1)
    sub = np.abs(out - values[:, None])
    norm = np.linalg.norm(x - train_x.mean(0), axis=1) if distance else np.linalg.norm(x, axis=1)
    return (sub / den[idx]).sum(1) / norm


def test_fdbd_hand_and_openood():
    # hand: W = [[1, 0], [0, 1]], b = 0, x = (3, 1): one boundary at distance (3 - 1) / sqrt 2; ||x|| = sqrt 10
    s = _set_up("fdbd", head=LinearHead(torch.eye(2), torch.zeros(2)), distance_as_normalizer=False)
    assert s.uses == ("head",)
    assert s.postprocess({"features": torch.tensor([[3.0, 1.0]])}).item() == pytest.approx(2 / math.sqrt(2) / math.sqrt(10))
    train, head = _data(n=30, d=8, k=5, seed=6)
    for distance in (True, False):
        s = _set_up("fdbd", train=train, head=head, distance_as_normalizer=distance)
        ref = _fdbd_reference(_np(train["features"]), _np(head.weight), _np(head.bias), _np(train["features"]), distance)
        assert np.allclose(s.postprocess(train).double().numpy(), ref, rtol=1e-6)


def test_gradnorm_equals_the_reference_backward_pass():
    """OpenOOD / the authors: per sample, loss = sum_k -log_softmax(fc(x))_k, score = sum |fc.weight.grad|."""
    train, head = _data(n=12, d=7, k=5, seed=7)
    fc = nn.Linear(7, 5).double()
    fc.weight.data[...] = head.weight
    fc.bias.data[...] = head.bias
    for t in (1.0, 2.0):
        ref = []
        for x in train["features"]:
            fc.zero_grad()
            loss = torch.sum(-torch.ones(1, 5, dtype=torch.float64) * torch.log_softmax(fc(x[None]) / t, dim=-1))
            loss.backward()
            ref.append(fc.weight.grad.abs().sum().item())
        s = _set_up("gradnorm", head=head, temperature=t)
        assert np.allclose(s.postprocess(train).double().numpy(), ref, rtol=1e-6), t


# ----------------------------------------------------------------------------- training statistics
def _rmds_reference(train_x, train_y, x):
    """OpenOOD RMDSPostprocessor with sklearn EmpiricalCovariance (class-centred, then whole-mean-centred)."""
    import sklearn.covariance

    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(0) for c in classes])
    centred = np.concatenate([train_x[train_y == c] - means[i] for i, c in enumerate(classes)])
    prec = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    whole = train_x.mean(0)
    whole_prec = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(train_x - whole).precision_
    t1 = x - whole
    background = -np.einsum("nd,de,ne->n", t1, whole_prec, t1)
    scores = np.stack([-np.einsum("nd,de,ne->n", x - m, prec, x - m) - background for m in means], 1)
    return scores.max(1)


def test_rmds_matches_openood():
    train, _ = _data(n=80, d=5, k=3, seed=8, relu=False)
    test, _ = _data(n=20, d=5, k=3, seed=9, relu=False)
    s = _set_up("rmds", train=train)
    ref = _rmds_reference(_np(train["features"]), train["labels"].numpy(), _np(test["features"]))
    assert np.allclose(s.postprocess(test).double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_she_hand_and_openood():
    train, _ = _data(n=50, d=6, k=4, seed=10)
    x, y, pred = _np(train["features"]), train["labels"].numpy(), train["logits"].argmax(1).numpy()
    patterns = {c: x[(y == c) & (pred == c)].mean(0) for c in set(pred.tolist())}  # OpenOOD's stored patterns
    target = np.stack([patterns[c] for c in pred])
    refs = {"inner_product": (x * target).sum(1), "euclidean": -np.linalg.norm(x - target, axis=1),
            "cosine": (x * target).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(target, axis=1)}
    for metric, ref in refs.items():
        s = _set_up("she", train=train, metric=metric)
        assert np.allclose(s.postprocess(train).double().numpy(), ref, rtol=1e-5), metric
    # hand: class 1 is never predicted right -> the mean of its samples (3, 1); class 0's pattern = (1, 1)
    hand = {"features": torch.tensor([[1.0, 1.0], [4.0, 0.0], [2.0, 2.0]]),
            "logits": torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), "labels": torch.tensor([0, 1, 1])}
    s = _set_up("she", train=hand)
    assert torch.allclose(s.postprocess({"features": torch.tensor([[1.0, 2.0], [1.0, 2.0]]),
                                         "logits": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}), torch.tensor([3.0, 5.0]))
    with pytest.raises(ConfigError, match="score_params.she.metric"):
        get_score("she", metric="l1")


def _nnguide_reference(bank_x, bank_logits, x, logits, k):
    """OpenOOD NNGuidePostprocessor: normalizer(x) = x / ||x|| + 1e-10, bank * logsumexp, faiss IndexFlatIP mean top-k."""
    norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    guide = norm(bank_x) * np_logsumexp(bank_logits, axis=-1)[:, None]
    sims = norm(x) @ guide.T
    conf = -np.sort(-sims, axis=1)[:, :k].mean(1)
    return conf * np_logsumexp(logits, axis=-1)


def test_nnguide_matches_openood_on_its_bank():
    train, _ = _data(n=40, d=6, k=4, seed=11)
    test, _ = _data(n=15, d=6, k=4, seed=12)
    s = _set_up("nnguide", train=train, k=5, alpha=1.0)  # the whole training set as the bank
    ref = _nnguide_reference(_np(train["features"]), _np(train["logits"]), _np(test["features"]), _np(test["logits"]), 5)
    assert np.allclose(s.postprocess(test).double().numpy(), ref, rtol=1e-6)
    # alpha = 0.25: the bank is 10 of the 40 samples, drawn with the seed (same seed, same bank)
    sub = _set_up("nnguide", train=train, k=3, alpha=0.25, seed=4)
    assert sub._bank.shape[0] == 10
    assert torch.equal(sub._bank, _set_up("nnguide", train=train, k=3, alpha=0.25, seed=4)._bank)
    with pytest.raises(ConfigError, match=r"bank \(alpha = 0.01 of 40 training samples = 1\) is smaller than k = 100"):
        _set_up("nnguide", train=train)


# ----------------------------------------------------------------------------- OpenMax
def test_weibull_mle_matches_scipy_and_w_score_is_libmr_cdf():
    from scipy.stats import weibull_min

    rng = np.random.default_rng(0)
    for shape, scale in ((1.5, 2.0), (8.0, 10003.0), (3000.0, 10001.0)):
        x = weibull_min.rvs(shape, scale=scale, size=30, random_state=rng)
        c, _, s = weibull_min.fit(x, floc=0)
        got_scale, got_shape = weibull_mle(x)
        assert got_shape == pytest.approx(c, rel=1e-3) and got_scale == pytest.approx(s, rel=1e-4)
        # the exact maximum: at least scipy's likelihood, and both score equations vanish
        ll = lambda k, lam: weibull_min.logpdf(x, k, scale=lam).sum()  # noqa: E731
        assert ll(got_shape, got_scale) >= ll(c, s) - 1e-9
        y = x / got_scale
        assert abs(len(x) / got_shape + np.log(y).sum() - (y ** got_shape * np.log(y)).sum()) < 1e-6 * len(x)
        assert abs((y ** got_shape).sum() - len(x)) < 1e-8 * len(x)
    # fit_high: the tail shifted so its minimum sits at 10000; w_score = Weibull CDF there
    tail = np.array([0.5, 1.0, 1.3, 2.0, 2.2, 3.1])
    scale, shape, small = fit_high(tail)
    assert small == 0.5
    assert (scale, shape) == pytest.approx(weibull_mle(tail + 10000 - 0.5))
    d = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    expect = 1 - np.exp(-((np.clip(d.numpy() + 10000 - 0.5, 0, None)) / scale) ** shape)
    assert np.allclose(w_score(d, *(torch.tensor(v, dtype=torch.float64) for v in (scale, shape, small))).numpy(), expect)
    with pytest.raises(ConfigError, match="at least two distinct values"):
        weibull_mle(np.array([3.0, 3.0]))


def _openmax_reference(train_logits, train_labels, logits, tail, alpha):
    """OpenOOD's OpenMax: MAVs of correct samples, tails of euclidean distances, the per-sample
    recalibration loop (compute_openmax_prob); libmr's MR replaced by fit_high / w_score."""
    k = train_logits.shape[1]
    pred = train_logits.argmax(1)
    models = []
    for c in range(k):
        av = train_logits[(pred == c) & (train_labels == c)]
        mav = av.mean(0)
        dist = np.linalg.norm(av - mav, axis=1)
        models.append((mav, fit_high(np.sort(dist)[-tail:])))
    out = []
    for z in logits:
        ranked = z.argsort()[::-1][:alpha]
        omega = np.zeros(k)
        omega[ranked] = [((alpha + 1) - i) / float(alpha) for i in range(1, alpha + 1)]
        scores, scores_u = [], []
        for c, (mav, (scale, shape, small)) in enumerate(models):
            ws = 1 - math.exp(-((max(np.linalg.norm(z - mav) + 10000 - small, 0)) / scale) ** shape)
            modified = z[c] * (1 - ws * omega[c])
            scores.append(modified)
            scores_u.append(z[c] - modified)
        denom = np.exp(scores).sum() + np.exp(np.sum(scores_u))
        out.append(-np.exp(np.sum(scores_u)) / denom)
    return np.array(out)


def test_openmax_matches_openood_loop():
    train, _ = _data(n=120, d=6, k=4, seed=22)   # 27, 7, 20, 38 correct samples per class
    test, _ = _data(n=20, d=6, k=4, seed=14)
    for tail, alpha in ((20, 3), (5, 2)):
        s = _set_up("openmax", train=train, tail=tail, alpha=alpha)
        ref = _openmax_reference(_np(train["logits"]), train["labels"].numpy(), _np(test["logits"]), tail, alpha)
        assert np.allclose(s.postprocess(test).double().numpy(), ref, rtol=1e-5, atol=1e-7)
    bad = dict(train, labels=torch.zeros_like(train["labels"]))
    with pytest.raises(ConfigError, match="openmax': class 1 has 0 correctly classified"):
        _set_up("openmax", train=bad)
    two = {"logits": torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 4.0]]),
           "labels": torch.tensor([0, 0, 1, 1, 1])}   # 2 samples: both at the same distance from their mean
    with pytest.raises(ConfigError, match="openmax': class 0 has 2 correctly classified .* at least 3"):
        _set_up("openmax", train=two)


# ----------------------------------------------------------------------------- RankFeat
def test_remove_rank1_matches_openood_svd():
    g = torch.Generator().manual_seed(15)
    f = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64).relu()
    x = f.view(3, 5, 16)
    u, s, v = torch.linalg.svd(x, full_matrices=False)
    ref = (x - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])).view(3, 5, 4, 4)
    out = remove_rank1(f)
    assert torch.allclose(out, ref, atol=1e-12)
    sv = torch.linalg.svdvals(out.view(3, 5, 16))
    assert torch.allclose(sv[:, 0], s[:, 1]) and torch.allclose(sv[:, -1], torch.zeros(3, dtype=torch.float64), atol=1e-10)


# ----------------------------------------------------------------------------- percentile guard (ASH / SCALE)
def test_a_percentile_that_keeps_no_activation_is_refused():
    x = torch.rand(4, 10) + 0.1
    head = LinearHead(torch.randn(3, 10), torch.zeros(3))
    for name in ("ash_p", "ash_b", "ash_s", "scale"):
        # D = 10: p = 96 rounds 9.6 to 10 activations pruned -> k = 0 (inside the accepted [0, 100))
        with pytest.raises(ConfigError, match=rf"score_params.{name}.percentile = 96 keeps 0 of 10 activations.*at most 90"):
            _set_up(name, head=head, percentile=96)
        s = _set_up(name, head=head, percentile=90)    # keeps 1: a real score, not NaN or a constant
        v = s.postprocess({"features": x})
        assert torch.isfinite(v).all() and len(set(v.tolist())) == 4, name
    with pytest.raises(ConfigError, match=r"score_params.ash_s.percentile = 95 keeps 0 of 10"):
        ash(x, 95, "s")
    with pytest.raises(ConfigError, match=r"score_params.scale.percentile = 99 keeps 0 of 10"):
        scale_features(x, 99)


# ----------------------------------------------------------------------------- the jobs
class CamNet(nn.Module):
    """A CNN with a Conv1x1-GAP head (the toolkit's CamClassifier): exposes its last feature map."""

    def __new__(cls):
        from backmix_vlm.models.cnn import CamClassifier

        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        model = CamClassifier(body, num_features=8, num_classes=3, stride=1).eval()
        with torch.no_grad():  # centre the logits so that every class gets predicted
            model.head.conv.bias -= torch.tensor([-0.0735, -0.0488, -0.2386])
        return model


class Images(Dataset):
    def __init__(self, n, seed, model=None, shift=0.0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 4, 4, generator=g) + shift
        if model is not None:  # training labels: the model's prediction, every third one wrong
            with torch.no_grad():
                pred = model(self.x).logits.argmax(1)
            pred[::3] = (pred[::3] + 1) % 3
            self.labels = pred.tolist()
        else:
            self.labels = torch.randint(0, 3, (n,), generator=g).tolist()
        self.classes = ["a", "b", "c"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i], i


PARAMS = {"nnguide": {"k": 3, "alpha": 0.5}, "openmax": {"tail": 5}, "scale": {"percentile": 50}}


def test_every_detector_runs_in_the_train_eval_and_ood_jobs():
    from backmix_vlm.config import EvalConfig
    from backmix_vlm.ood import Evaluator, OpenSetEvaluator
    from backmix_vlm.ood.features import extract_outputs

    model = CamNet()
    known, near, train = Images(20, 1), Images(12, 2, shift=1.5), Images(90, 3, model=model)
    cfg = EvalConfig(scores=NEW, score_params=PARAMS, batch_size=8, num_workers=0)
    ev = OpenSetEvaluator(known, {"near": near}, cfg, device="cpu", fit_set=train)
    ev(model)
    job = Evaluator(model, known, {"near": near}, train_data=train, device="cpu", batch_size=8)
    job.run(NEW, PARAMS)
    for name in NEW:
        a, b = ev.per_sample[f"known::{name}"], ev.per_sample[f"unknown::near::{name}"]
        assert a.shape == (20,) and b.shape == (12,) and np.isfinite(a).all() and np.isfinite(b).all(), name
        assert np.allclose(job.per_sample[f"known::{name}"], a, rtol=1e-5, atol=1e-6), name   # same numbers, both jobs
        assert 0 <= ev.result["results"]["near"][name]["auroc"] <= 1
    # rankfeat = energy of the head on the feature map minus its rank-1 part, per image
    fmap = model.forward_features(known.x)
    logits = model.head(remove_rank1(fmap))[0]
    assert np.allclose(ev.per_sample["known::rankfeat"], torch.logsumexp(logits, 1).detach().numpy(), rtol=1e-5)
    # the cached-output scores equal postprocess on the extracted outputs
    out = extract_outputs(model, torch.utils.data.DataLoader(known, batch_size=8), device="cpu")
    assert np.allclose(ev.per_sample["known::entropy"], get_score("entropy").postprocess(out).numpy())


def test_jobs_refuse_a_detector_whose_input_they_lack():
    OFFERS = ("forward", "text")   # backmix_vlm.jobs.zeroshot.OFFERS (not imported: it loads open_clip)

    for name, what in (("klm", "training"), ("rmds", "training"), ("she", "training"), ("nnguide", "training"),
                       ("openmax", "training"), ("tempscale", "training"), ("dice", "training"),
                       ("fdbd", "training"), ("scale", "final linear layer"), ("gradnorm", "final linear layer")):
        with pytest.raises(ConfigError, match=rf"eval.scores: '{name}' .*{what}.*a zero-shot run"):
            build_scores(["msp", name], offers=OFFERS, job="a zero-shot run")
    # what does not need the missing input is accepted
    ok = build_scores(["entropy", "rankfeat"], offers=OFFERS)
    assert [s.name for s in ok] == ["entropy", "rankfeat"]
    assert build_scores(["tempscale"], {"tempscale": {"temperature": 2.0}}, offers=OFFERS)[0].uses == ()
    assert build_scores(["fdbd"], {"fdbd": {"distance_as_normalizer": False}}, offers=("head",))[0].uses == ("head",)
    # rankfeat on a model without a feature map (a CLIP, a ViT, a linear probe): refused at setup
    with pytest.raises(ConfigError, match="'rankfeat' needs the model's last feature map.*Linear does not expose"):
        get_score("rankfeat").setup(ScoreSetup(forward=nn.Linear(3, 2)))
    with pytest.raises(ConfigError, match="needs the model output 'features'"):
        _set_up("gradnorm", head=LinearHead(torch.eye(2), torch.zeros(2))).postprocess({"logits": torch.zeros(1, 2)})
    with pytest.raises(ConfigError, match="score 'she' needs the model output 'labels'"):
        _set_up("she", train={"features": torch.zeros(3, 2), "logits": torch.zeros(3, 2)})
