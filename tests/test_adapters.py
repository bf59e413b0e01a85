"""What every adapter guarantees: exact trainable set, frozen base, eval-mode base, small checkpoints."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from backmix_vlm.adapters import ADAPTERS, CoOp, CoOpConfig, LoCoOp, VPT, VPTConfig, create_adapter
from backmix_vlm.errors import ConfigError, DataError, ModelError
from backmix_vlm.models.output import ModelOutput

NAMES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tiny(tiny_clip):  # built once per session (conftest.py)
    return tiny_clip


def _timm():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                             drop_rate=0.5, proj_drop_rate=0.5).eval()


# (id, builder, exact trainable names)
CASES = [
    ("coop", lambda b: create_adapter("coop", b, NAMES, {"n_ctx": 4}), ["ctx"]),
    ("coop-csc", lambda b: create_adapter("coop", b, NAMES, {"n_ctx": 2, "class_specific": True}), ["ctx"]),
    ("locoop", lambda b: create_adapter("locoop", b, NAMES, {"ctx_init": "a photo of a"}), ["ctx"]),
    ("vpt-clip", lambda b: create_adapter("vpt", b, NAMES, {"num_tokens": 3}),
     ["prompt_embeddings", "head.weight", "head.bias"]),
    ("vpt-clip-deep-text", lambda b: create_adapter("vpt", b, NAMES, {"deep": True, "head": "zeroshot_text"}),
     ["prompt_embeddings", "deep_prompt_embeddings"]),
    ("vpt-timm-deep", lambda b: create_adapter("vpt", _timm(), NAMES, VPTConfig(num_tokens=2, deep=True)),
     ["prompt_embeddings", "deep_prompt_embeddings", "head.weight", "head.bias"]),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request, tiny):
    name, build, names = request.param
    return name, build(tiny), names


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_registry_lists_the_methods():
    assert sorted(ADAPTERS.names()) == ["coop", "locoop", "lora", "vpt"]


def test_exact_trainable_parameter_set(case):
    _, adapter, names = case
    assert adapter.trainable_parameter_names() == names
    assert [p.data_ptr() for p in adapter.trainable_parameters()] == \
        [dict(adapter.named_parameters())[n].data_ptr() for n in names]
    assert not any(p.requires_grad for p in adapter.base.parameters())
    assert adapter.num_trainable() == sum(dict(adapter.named_parameters())[n].numel() for n in names)


def test_base_stays_in_eval_mode_while_training(case):
    _, adapter, _ = case
    adapter.train()
    assert adapter.training
    assert not adapter.base.training and not any(m.training for m in adapter.base.modules())
    adapter.eval()
    assert not adapter.training


def test_optimizer_step_changes_only_adapter_parameters(case):
    name, adapter, names = case
    base_before = {k: v.clone() for k, v in adapter.base.state_dict().items()}
    train_before = adapter.state_dict_trainable()
    # every parameter handed to SGD, weight decay on: frozen ones must still not move
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    adapter.train()
    labels = torch.tensor([0, 2])
    loss = adapter.loss(adapter(_images()), labels)
    loss.backward()
    opt.step()
    assert all(torch.equal(base_before[k], v) for k, v in adapter.base.state_dict().items())
    after = adapter.state_dict_trainable()
    assert list(after) == names
    assert all(not torch.equal(train_before[n], after[n]) for n in names), name


def test_forward_shapes(case):
    name, adapter, _ = case
    adapter.eval()
    with torch.no_grad():
        out = adapter(_images())
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 3)
    assert out.features.shape == (2, 32)  # CLIP embed dim and timm width are both 32 here
    if name.startswith(("coop", "locoop")) or name.endswith("text"):
        assert out.cosine.shape == (2, 3) and out.cosine.abs().max() <= 1 + 1e-6
    if name == "locoop":  # local features (GL-MCM) on by default for LoCoOp
        assert out.local_cosine.shape == (2, 16, 3) and out.local_logits.shape == (2, 16, 3)


def test_trainable_checkpoint_round_trip(tiny):
    a = CoOp(tiny, NAMES, CoOpConfig(n_ctx=4))
    with torch.no_grad():
        a.ctx.add_(1.0)
    state = a.state_dict_trainable()
    assert list(state) == ["ctx"] and state["ctx"].data_ptr() != a.ctx.data_ptr()  # a copy
    b = CoOp(tiny, NAMES, CoOpConfig(n_ctx=4))
    b.load_state_dict_trainable(state)
    with torch.no_grad():
        torch.testing.assert_close(b(_images()).logits, a(_images()).logits, rtol=0, atol=0)
    with pytest.raises(ModelError, match="shape.*n_ctx"):
        CoOp(tiny, NAMES, CoOpConfig(n_ctx=5)).load_state_dict_trainable(state)
    with pytest.raises(ModelError, match="missing.*prompt_embeddings"):
        VPT(tiny, NAMES).load_state_dict_trainable(state)


def test_create_adapter_accepts_dataclass_mapping_or_none(tiny):
    assert isinstance(create_adapter("coop", tiny, NAMES), CoOp)  # defaults: n_ctx 16
    assert create_adapter("coop", tiny, NAMES).ctx.shape == (16, 64)
    assert create_adapter("COOP", tiny, NAMES, CoOpConfig(n_ctx=3)).ctx.shape == (3, 64)
    assert isinstance(create_adapter("locoop", tiny.model, NAMES, {"n_ctx": 2}), LoCoOp)  # bare model
    with pytest.raises(ConfigError, match="needs a LoCoOpConfig"):
        create_adapter("locoop", tiny, NAMES, VPTConfig())
    with pytest.raises(ConfigError, match="expected a mapping"):
        create_adapter("vpt", tiny, NAMES, 3)
    with pytest.raises(DataError, match="at least one class"):
        create_adapter("coop", tiny, [])
    with pytest.raises(ModelError, match="open_clip CLIP"):
        create_adapter("coop", _timm(), NAMES)
