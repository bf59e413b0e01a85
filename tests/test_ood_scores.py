"""OOD scores: hand-computed values, Mahalanobis vs sklearn, ODIN vs a direct autograd computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from backmix_vlm.errors import ConfigError, RegistryError
from backmix_vlm.ood.scores import SCORES, Score, ScoreSetup, get_score


def fit(score, train):
    score.setup(ScoreSetup(train=train))

LN3 = math.log(3.0)


def test_registry_names_and_unknown_name():
    assert SCORES.names() == sorted(["msp", "maxlogit", "energy", "odin", "mahalanobis", "featnorm", "mcm", "glmcm",
                                     "knn", "vim", "react", "ash_p", "ash_b", "ash_s", "gen", "neglabel"]
                                    + ["entropy", "tempscale", "klm", "scale", "dice", "fdbd", "gradnorm", "rmds",
                                       "she", "nnguide", "openmax", "rankfeat"]  # ood/posthoc
                                    + ["csp", "adaneg"]  # ood/csp.py, ood/adaneg.py
                                    + ["rotpred"])  # engine/methods (RotPred's own score)
    with pytest.raises(RegistryError, match="unknown score 'vimm'; available: adaneg, ash_b, ash_p, ash_s, csp, dice"):
        get_score("vimm")
    s = get_score("Energy", temperature=2)
    assert isinstance(s, Score) and s.name == "energy" and s.temperature == 2.0


def test_bad_params_are_named():
    with pytest.raises(ConfigError, match="score 'energy' got unknown parameter.*temp; accepted: temperature"):
        get_score("energy", temp=2)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        get_score("mcm", temperature=0)
    with pytest.raises(ConfigError, match="accepted: none"):
        get_score("msp", temperature=1)


def test_logit_scores_hand_computed():
    logits = torch.tensor([[0.0, LN3], [2.0, 2.0]])  # softmax [1/4, 3/4] and [1/2, 1/2]
    out = {"logits": logits}
    assert torch.allclose(get_score("msp").postprocess(out), torch.tensor([0.75, 0.5]))
    assert torch.allclose(get_score("maxlogit").postprocess(out), torch.tensor([LN3, 2.0]))
    assert torch.allclose(get_score("energy").postprocess(out), torch.tensor([math.log(4.0), 2.0 + math.log(2.0)]))
    e2 = get_score("energy", temperature=2.0).postprocess(out)
    assert torch.allclose(e2, torch.tensor([2 * math.log(1 + math.sqrt(3.0)), 2 * (1.0 + math.log(2.0))]))
    # ODIN with epsilon 0 is pure temperature scaling: T = 1 -> MSP
    assert torch.allclose(get_score("odin", temperature=1.0, epsilon=0.0).postprocess(out), torch.tensor([0.75, 0.5]))


def test_featnorm():
    out = {"features": torch.tensor([[3.0, 4.0], [0.0, 0.0]])}
    assert torch.equal(get_score("featnorm").postprocess(out), torch.tensor([5.0, 0.0]))


def test_mcm_and_glmcm_hand_computed():
    cosine = torch.tensor([[0.2, 0.2 + LN3]])  # softmax at T=1: [1/4, 3/4]
    local = torch.tensor([[[0.1, 0.1], [0.0, math.log(4.0)]]])  # patch MCMs 1/2 and 4/5
    out = {"cosine": cosine, "local_cosine": local, "logits": 100 * cosine}
    assert torch.allclose(get_score("mcm").postprocess(out), torch.tensor([0.75]))
    assert torch.allclose(get_score("glmcm").postprocess(out), torch.tensor([0.75 + 0.8]))
    # temperature divides the raw cosines
    t = 0.5
    expected = torch.softmax(cosine / t, -1).max() + torch.softmax(local / t, -1).amax(-1).max()
    assert torch.allclose(get_score("glmcm", temperature=t).postprocess(out), expected.reshape(1))


def test_missing_output_says_what_is_needed_and_who_provides_it():
    cnn_out = {"logits": torch.zeros(2, 3), "features": torch.zeros(2, 4), "labels": torch.zeros(2)}
    with pytest.raises(ConfigError, match="score 'mcm' needs the model output 'cosine'.*CLIP.*gave: logits, features, labels"):
        get_score("mcm").postprocess(cnn_out)
    with pytest.raises(ConfigError, match="'local_cosine'"):
        get_score("glmcm").postprocess({**cnn_out, "cosine": torch.zeros(2, 3)})
    with pytest.raises(ConfigError, match="'features'"):
        get_score("featnorm").postprocess({"logits": torch.zeros(2, 3)})


def test_mahalanobis_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    n, d, k = 90, 5, 3
    labels = torch.arange(n) % k
    feats = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3 * torch.eye(k, d)[labels]
    test = torch.randn(7, d, generator=g) * 2
    score = get_score("mahalanobis")
    fit(score, {"features": feats, "labels": labels})
    got = score.postprocess({"features": test}).double().numpy()

    x, y = feats.double().numpy(), labels.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(k)])
    cov = EmpiricalCovariance(assume_centered=False).fit(x - means[y])  # tied covariance (1/N)
    dists = np.stack([cov.mahalanobis(test.double().numpy() - m) for m in means], 1)  # squared distances
    np.testing.assert_allclose(got, -dists.min(1), rtol=1e-5)


def test_mahalanobis_rank_deficient_uses_pseudo_inverse():
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(4, 10, generator=g), torch.tensor([0, 0, 1, 1])  # D > N
    score = get_score("mahalanobis")
    fit(score, {"features": feats, "labels": labels})
    test = torch.randn(3, 10, generator=g)
    x = feats.double().numpy()
    means = np.stack([x[:2].mean(0), x[2:].mean(0)])
    c = x - means[labels.numpy()]
    prec = np.linalg.pinv(c.T @ c / 4)
    t = test.double().numpy()
    d = np.stack([np.einsum("nd,de,ne->n", t - m, prec, t - m) for m in means], 1)
    np.testing.assert_allclose(score.postprocess({"features": test}).double().numpy(), -d.min(1), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(score.postprocess({"features": test})).all()


def test_mahalanobis_needs_fit_and_labels():
    with pytest.raises(ConfigError, match="must be set up"):
        get_score("mahalanobis").postprocess({"features": torch.zeros(2, 3)})
    with pytest.raises(ConfigError, match="'labels'"):
        fit(get_score("mahalanobis"), {"features": torch.zeros(2, 3)})


def _odin_reference(model, x, temperature, epsilon, std=None):
    """x' = x + eps * sign(grad_x log softmax(f(x)/T)[yhat]) (/ std), then MSP at T."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    yhat = logits.argmax(-1)
    logp = torch.log_softmax(logits / temperature, -1).gather(1, yhat[:, None]).sum()
    (grad,) = torch.autograd.grad(logp, x)
    step = torch.sign(grad)
    if std is not None:
        step = step / torch.tensor(std).view(1, -1, 1, 1)
    x2 = x.detach() + epsilon * step
    return torch.softmax(model(x2) / temperature, -1).max(-1).values


@pytest.mark.parametrize("std", [None, (0.5, 0.25, 0.2)])
def test_odin_matches_direct_autograd(std):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4))
    x = torch.randn(6, 3, 2, 2)
    odin = get_score("odin", temperature=10.0, epsilon=0.05, std=std)
    assert odin.uses == ("forward",)
    odin.setup(ScoreSetup(forward=model))
    with torch.no_grad():  # runners may call it inside no_grad: it must still get its gradient
        got = odin.image_scores(x)
    expected = _odin_reference(model, x, 10.0, 0.05, std)
    torch.testing.assert_close(got, expected)
    assert all(p.grad is None for p in model.parameters())  # no gradient leaks into the model
    # the perturbation raises the tempered MSP of the predicted class (its purpose)
    plain = torch.softmax(model(x) / 10.0, -1).max(-1).values
    assert (got > plain).all()


def test_odin_default_params_and_cached_outputs_error():
    odin = get_score("odin")
    assert (odin.temperature, odin.epsilon) == (1000.0, 0.0014)
    with pytest.raises(ConfigError, match="cannot run on cached outputs"):
        odin.postprocess({"logits": torch.zeros(2, 3)})
    with pytest.raises(ConfigError, match="epsilon must be >= 0"):
        get_score("odin", epsilon=-1)
