"""KNN, ViM, ReAct, ASH-P/-B/-S and GEN: hand-computed cases, and the reference formulas.

The "reference" functions below restate, in numpy, what OpenOOD's postprocessors and the
authors' code compute (faiss IndexFlatL2 on x / ||x|| + 1e-10; np.linalg.eig of sklearn's
EmpiricalCovariance(assume_centered=True) for ViM; np.percentile over the flattened training
activations for ReAct; the authors' 4-D ash_* functions with np.round), so each score is
checked against the formula as the reference implementations apply it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp as np_logsumexp

from backmix_vlm.errors import ConfigError
from backmix_vlm.models.heads import LinearHead
from backmix_vlm.ood.scores import ScoreSetup, ash, get_score, knn_distance, vim_dim


def _with_head(name: str, weight, bias, **params):
    """A score given the final layer (W, b); set up at once unless it also needs training outputs."""
    s = get_score(name, **params)
    s._test_head = LinearHead(torch.as_tensor(weight, dtype=torch.float64), torch.as_tensor(bias, dtype=torch.float64))
    if "train" not in s.uses:
        s.setup(ScoreSetup(head=s._test_head))
    return s


def fit(score, train):
    """The score's one setup step, with training outputs (and the head _with_head gave it)."""
    score.setup(ScoreSetup(train=train, head=getattr(score, "_test_head", None)))


# ----------------------------------------------------------------------------- KNN
def _knn_reference(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """OpenOOD / Sun et al.: normalizer(x) = x / ||x|| + 1e-10, faiss IndexFlatL2 (squared L2), -D[:, k-1]."""
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    a, b = norm(train.astype(np.float64)), norm(test.astype(np.float64))
    d2 = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return -np.sort(d2, axis=1)[:, k - 1]


def test_knn_hand_computed():
    train = {"features": torch.tensor([[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0]])}  # unit: e1, e2, -e1
    out = {"features": torch.tensor([[3.0, 0.0], [0.0, 0.5]])}
    for k, expected in ((1, [0.0, 0.0]), (2, [-math.sqrt(2), -math.sqrt(2)]), (3, [-2.0, -math.sqrt(2)])):
        s = get_score("knn", k=k)
        fit(s, train)
        assert torch.allclose(s.postprocess(out), torch.tensor(expected), atol=1e-6), k
    with pytest.raises(ConfigError, match="k = 4 neighbours asked from 3 training features"):
        s = get_score("knn", k=4)
        fit(s, train)
        s.postprocess(out)
    with pytest.raises(ConfigError, match="must be set up"):
        get_score("knn").postprocess(out)


def test_knn_matches_reference_formula_and_is_exact_when_chunked():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g) * 2
    ref = _knn_reference(train.numpy(), test.numpy(), 7)
    sq = get_score("knn", k=7, squared=True)
    fit(sq, {"features": train})
    assert np.allclose(sq.postprocess({"features": test}).numpy(), ref, atol=1e-5)
    plain = get_score("knn", k=7)
    fit(plain, {"features": train})
    assert np.allclose(plain.postprocess({"features": test}).numpy(), -np.sqrt(-ref), atol=1e-5)
    # blocks of 64 query x bank entries: several query blocks AND a running top-k over bank blocks
    a = torch.nn.functional.normalize(test, dim=-1)
    b = torch.nn.functional.normalize(train, dim=-1)
    exact = torch.cdist(a.double(), b.double()).sort(dim=1).values[:, 6]
    assert torch.allclose(knn_distance(a, b, 7, max_elements=64 * 10).double(), exact, atol=1e-5)
    assert torch.allclose(knn_distance(a, b, 7).double(), exact, atol=1e-5)
    # without normalisation: plain Euclidean distances
    raw = knn_distance(test, train, 3, max_elements=500).double()
    assert torch.allclose(raw, torch.cdist(test.double(), train.double()).sort(dim=1).values[:, 2], atol=1e-4)


# ----------------------------------------------------------------------------- ViM
def _vim_reference(w, b, train, test, dim):
    """OpenOOD's ViM postprocessor / the authors' benchmark.py, restated."""
    from sklearn.covariance import EmpiricalCovariance

    u = -np.matmul(np.linalg.pinv(w), b)
    ec = EmpiricalCovariance(assume_centered=True)
    ec.fit(train - u)
    eig_vals, eig_vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eig_vecs.T[np.argsort(eig_vals * -1)[dim:]]).T)
    vlogit_train = np.linalg.norm(np.matmul(train - u, ns), axis=-1)
    alpha = (train @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    vlogit = np.linalg.norm(np.matmul(test - u, ns), axis=-1) * alpha
    return -vlogit + np_logsumexp(test @ w.T + b, axis=-1)


def test_vim_hand_computed():
    # W picks x and y, b = 0 -> u = 0; principal axes x, y (variances 8/6, 2/6), residual = z
    w, b = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [0.0, 0.0]
    train = torch.tensor([[2.0, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 0.5], [0, 0, -0.5]])
    s = _with_head("vim", w, b, dim=2)
    fit(s, {"features": train})
    # alpha = mean max-logit / mean |z| = (3 / 6) / (1 / 6) = 3
    out = {"features": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])}
    expected = torch.tensor([math.log(math.e + 1) - 3.0, math.log(2.0)])
    assert torch.allclose(s.postprocess(out), expected, atol=1e-6)


def test_vim_matches_reference_formula():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(5, 16, generator=g), torch.randn(5, generator=g)
    scales = torch.linspace(3.0, 0.1, 16)  # distinct eigenvalues: a unique principal subspace
    train = torch.randn(400, 16, generator=g) * scales + 0.5
    test = torch.randn(50, 16, generator=g) * 1.5
    s = _with_head("vim", w, b, dim=8)
    fit(s, {"features": train})
    ref = _vim_reference(w.double().numpy(), b.double().numpy(), train.double().numpy(), test.double().numpy(), 8)
    assert np.allclose(s.postprocess({"features": test}).numpy(), ref, atol=1e-4)
    # the fit sums float64 statistics over row blocks: any block size gives the same score
    from backmix_vlm.ood.scores import ViM

    ViM.CHUNK, chunk = 37, ViM.CHUNK
    try:
        s2 = _with_head("vim", w, b, dim=8)
        fit(s2, {"features": train})
    finally:
        ViM.CHUNK = chunk
    assert np.allclose(s2.postprocess({"features": test}).numpy(), ref, atol=1e-4)


def test_vim_dim_rule_and_errors():
    assert (vim_dim(2048), vim_dim(768), vim_dim(384), vim_dim(512)) == (1000, 512, 192, 256)
    s = _with_head("vim", torch.eye(2, 4), torch.zeros(2), dim=4)
    with pytest.raises(ConfigError, match=r"vim dim = 4 must be in \[1, 3\]"):
        fit(s, {"features": torch.randn(10, 4)})
    with pytest.raises(ConfigError, match=r"final linear layer.*\(head\)"):
        fit(get_score("vim"), {"features": torch.randn(10, 4)})


# ----------------------------------------------------------------------------- ReAct
def test_react_hand_computed_and_reference():
    train = {"features": torch.arange(11.0).reshape(11, 1).repeat(1, 2)}  # activations 0..10 (twice)
    s = _with_head("react", torch.eye(2), torch.zeros(2))
    fit(s, train)
    assert s._c == pytest.approx(9.0)  # np.percentile(0..10, 90)
    out = {"features": torch.tensor([[10.0, 2.0], [1.0, 1.0]])}
    expected = torch.tensor([np.logaddexp(9.0, 2.0), 1.0 + math.log(2.0)], dtype=torch.float32)
    assert torch.allclose(s.postprocess(out), expected, atol=1e-5)
    # reference: threshold = np.percentile(train.flatten(), p); energy of fc(clip(x, max=threshold))
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 12, generator=g), torch.randn(4, generator=g)
    tr, te = torch.rand(200, 12, generator=g) * 3, torch.rand(30, 12, generator=g) * 4
    s = _with_head("react", w, b, percentile=85)
    fit(s, {"features": tr})
    c = np.percentile(tr.numpy().flatten(), 85)
    ref = np_logsumexp(np.clip(te.double().numpy(), None, c) @ w.double().numpy().T + b.double().numpy(), axis=-1)
    assert np.allclose(s.postprocess({"features": te}).numpy(), ref, atol=1e-4)
    fixed = _with_head("react", w, b, threshold=1.0)  # a given threshold needs no fit
    assert torch.isfinite(fixed.postprocess({"features": te})).all()


# ----------------------------------------------------------------------------- ASH
def _ash_reference(x: torch.Tensor, percentile: float, variant: str) -> torch.Tensor:
    """The authors' ash_p / ash_b / ash_s on (B, C, 1, 1) activations (in place on a copy)."""
    x = x.clone().view(x.shape[0], -1, 1, 1)
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    if variant == "b":
        t.zero_().scatter_(dim=1, index=i, src=(s1 / k).unsqueeze(1).expand(v.shape))
    else:
        t.zero_().scatter_(dim=1, index=i, src=v)
    if variant == "s":
        x = x * torch.exp((s1 / x.sum(dim=[1, 2, 3]))[:, None, None, None])
    return x.view(b, -1)


def test_ash_hand_computed():
    x = torch.arange(1.0, 11.0).reshape(1, 10)  # sum 55; p = 80 keeps k = 2 entries: 9 and 10
    ones = torch.ones(1, 10)  # one logit = the sum of the shaped features; logsumexp of one logit = itself
    expect = {"ash_p": 19.0, "ash_b": 55.0, "ash_s": 19.0 * math.exp(55.0 / 19.0)}
    for name, value in expect.items():
        s = _with_head(name, ones, torch.zeros(1), percentile=80)
        assert s.postprocess({"features": x}).item() == pytest.approx(value, rel=1e-6), name
    assert torch.equal(ash(x, 80, "p"), torch.tensor([[0.0] * 8 + [9.0, 10.0]]))
    assert torch.equal(ash(x, 80, "b"), torch.tensor([[0.0] * 8 + [27.5, 27.5]]))
    # D = 10, p = 65: round(6.5) = 6 (half to even, as np.round) -> k = 4
    assert int((ash(x, 65, "p") != 0).sum()) == 4
    with pytest.raises(ConfigError, match=r"ash_b percentile must be in \[0, 100\)"):
        get_score("ash_b", percentile=100)


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("percentile", [65, 90])
def test_ash_matches_authors_functions(variant, percentile):
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(20, 64, generator=g)) + 0.01  # post-ReLU-like activations
    assert torch.allclose(ash(x, percentile, variant), _ash_reference(x, percentile, variant), rtol=1e-5)
    w, b = torch.randn(7, 64, generator=g), torch.randn(7, generator=g)
    s = _with_head(f"ash_{variant}", w, b, percentile=percentile)
    ref = torch.logsumexp(_ash_reference(x, percentile, variant) @ w.T + b, dim=-1)
    assert torch.allclose(s.postprocess({"features": x}), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GEN
def test_gen_hand_computed_and_reference():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert get_score("gen", gamma=1.0).postprocess({"logits": logits}).item() == pytest.approx(-(0.25 + 2 * 0.1875))
    assert get_score("gen", gamma=1.0, M=2).postprocess({"logits": logits}).item() == pytest.approx(-(0.25 + 0.1875))
    # reference (OpenOOD): sort ascending, take the last M, -sum p^g (1-p)^g; M > K is capped
    g = torch.Generator().manual_seed(4)
    z = torch.randn(40, 10, generator=g) * 3
    for gamma, m in ((0.1, 100), (0.5, 3)):
        p = torch.softmax(z.double(), dim=1)
        top = torch.sort(p, dim=1)[0][:, -m:]
        ref = -torch.sum(top ** gamma * (1 - top) ** gamma, dim=1)
        assert torch.allclose(get_score("gen", gamma=gamma, M=m).postprocess({"logits": z}).double(), ref, atol=1e-6)


def test_head_scores_need_features():
    s = _with_head("react", torch.eye(2), torch.zeros(2), threshold=1.0)
    with pytest.raises(ConfigError, match="needs the model output 'features'"):
        s.postprocess({"logits": torch.zeros(1, 2)})


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_head_reproduces_sklearn_on_raw_features():
    from sklearn.linear_model import LogisticRegression

    from backmix_vlm.models.heads import fit_linear_probe

    g = torch.Generator().manual_seed(5)
    x = torch.randn(150, 6, generator=g) * torch.tensor([10.0, 1, 1, 0.1, 3, 1]) + 5  # badly scaled, off-centre
    y = (x[:, :3] - x[:, :3].mean(0)).argmax(dim=1)
    head = fit_linear_probe(x, y)
    xs = x.double().numpy()
    mu, sigma = xs.mean(0), xs.std(0) + 1e-6
    clf = LogisticRegression(max_iter=1000, random_state=0).fit((xs - mu) / sigma, y.numpy())
    assert np.allclose(head(x.double()).numpy(), clf.decision_function((xs - mu) / sigma), atol=1e-6)
    # labels with a gap (class 1 absent): the head still has one row per label id, argmax never picks 1
    y2 = torch.where(y == 1, torch.tensor(2), y)
    head2 = fit_linear_probe(x, y2)
    assert head2.num_classes == 3 and not (head2(x).argmax(-1) == 1).any()
