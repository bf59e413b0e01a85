"""extract_outputs: batching, concatenation, bf16 autocast, safetensors cache (hit / stale key)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from backmix_vlm.errors import ConfigError, DataError
from backmix_vlm.models.output import ModelOutput
from backmix_vlm.ood.features import (
    cache_file,
    cache_key,
    extract_outputs,
    model_fingerprint,
    image_scores_loader,
)
from backmix_vlm.ood.scores import ScoreSetup, get_score


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.calls += 1
        f = self.body(x)
        return ModelOutput(logits=self.head(f), features=f)


def make_loader(n: int = 10, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 4, 4, generator=g)
    ds = TensorDataset(images, torch.arange(n) % 3, torch.arange(n))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def test_extract_concatenates_batches_like_one_forward():
    torch.manual_seed(0)
    net, loader = TinyNet().eval(), make_loader()
    out = extract_outputs(net, loader, device="cpu")
    assert set(out) == {"logits", "features", "labels", "indices"}
    assert net.calls == 3  # 10 samples in batches of 4
    full = net(loader.dataset.tensors[0])
    torch.testing.assert_close(out["logits"], full.logits)
    torch.testing.assert_close(out["features"], full.features)
    assert torch.equal(out["labels"], torch.arange(10) % 3) and out["labels"].dtype == torch.int64
    assert torch.equal(out["indices"], torch.arange(10))
    assert out["logits"].dtype == torch.float32 and not out["logits"].requires_grad
    # keep drops the rest of the model outputs, never labels / indices
    kept = extract_outputs(net, loader, device="cpu", keep=("logits",))
    assert set(kept) == {"logits", "labels", "indices"}


def test_plain_tensor_forward_and_two_tuple_batches():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])) for _ in range(2)]
    out = extract_outputs(lin, batches, device="cpu")
    assert set(out) == {"logits", "labels"} and out["logits"].shape == (4, 2)


def test_cache_hit_reuses_and_stale_key_recomputes(tmp_path):
    torch.manual_seed(0)
    net, loader = TinyNet().eval(), make_loader()
    path = cache_file(tmp_path, "cifar10/test", model="tiny", transform="resize32")
    assert path.parent == tmp_path and path.name.startswith("cifar10_test-") and path.suffix == ".safetensors"
    first = extract_outputs(net, loader, device="cpu", cache_path=path)
    assert path.is_file() and net.calls == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic write left no temp file

    again = extract_outputs(net, loader, device="cpu", cache_path=path)
    assert net.calls == 3  # loaded, not recomputed
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)

    # a different transform (or model) is a different key -> a new file, recomputed
    stale = cache_file(tmp_path, "cifar10/test", model="tiny", transform="crop32")
    assert stale != path
    extract_outputs(net, loader, device="cpu", cache_path=stale)
    assert net.calls == 6 and stale.is_file()


def test_cache_key_is_stable_and_sensitive():
    assert cache_key(model="a", data={"name": "cifar10", "split": "test"}) == cache_key(
        data={"split": "test", "name": "cifar10"}, model="a")
    assert cache_key(model="a", size=32) != cache_key(model="a", size=224)
    assert len(cache_key(x=1)) == 16


def test_model_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a = TinyNet()
    b = TinyNet()
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_bf16_autocast_path_runs_and_stays_float32_on_output():
    torch.manual_seed(0)
    net, loader = TinyNet().eval(), make_loader()
    ref = extract_outputs(net, loader, device="cpu")
    out = extract_outputs(net, loader, device="cpu", precision="bf16")
    assert out["logits"].dtype == torch.float32
    torch.testing.assert_close(out["logits"], ref["logits"], atol=5e-2, rtol=5e-2)
    assert not torch.equal(out["logits"], ref["logits"])  # autocast really ran in bf16


def test_bad_inputs():
    net = TinyNet()
    with pytest.raises(ConfigError, match="precision.*choose one of auto, no, bf16, fp16"):
        extract_outputs(net, make_loader(), device="cpu", precision="fp8")
    with pytest.raises(ConfigError, match="keep.*'logit'"):
        extract_outputs(net, make_loader(), device="cpu", keep=("logit",))
    with pytest.raises(DataError, match="no batches"):
        extract_outputs(net, [], device="cpu", desc="empty set")


def test_image_scores_loader_matches_per_batch_odin():
    torch.manual_seed(0)
    net, loader = TinyNet().eval(), make_loader()
    odin = get_score("odin", temperature=5.0, epsilon=0.01)
    odin.setup(ScoreSetup(forward=net))
    got = image_scores_loader(odin, loader, device="cpu")
    expected = torch.cat([odin.score_images(net, x) for x, _, _ in loader])
    torch.testing.assert_close(got, expected)
    assert got.shape == (10,)
