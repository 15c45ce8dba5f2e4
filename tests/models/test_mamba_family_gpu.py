"""The Mamba MIL family on a CUDA GPU: each model with its scans on the Triton kernels gives the
logits and parameter gradients of the same model on the PyTorch reference scans (float32, same
weights, same bag). Skipped without CUDA; the CPU tests cover the models on the reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mambapath.models import Bag, create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAMILY = ("mamba_mil", "bimamba_mil", "srmamba_mil", "mamba2d_mil", "mambaback")
#: paper-like sizes, small enough to run in seconds (d_state 16: the kernels' main path)
SIZES = {
    "mamba_mil": dict(d_model=128, n_layers=2, d_state=16),
    "bimamba_mil": dict(d_model=128, n_layers=2, d_state=16),
    "srmamba_mil": dict(d_model=128, n_layers=2, d_state=16, rate=10),
    "mamba2d_mil": dict(d_model=128, n_layers=2, d_state=16),
    "mambaback": dict(dims=(128, 128), depths=(1, 1), d_state=16, headdim=32),
}


def make_bag(n_tiles: int, seed: int = 0) -> Bag:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_tiles / 0.6)))
    cells = rng.choice(side * side, size=n_tiles, replace=False)
    grid = torch.as_tensor(np.stack([cells // side, cells % side], axis=1))
    features = torch.randn(n_tiles, 256, generator=torch.Generator().manual_seed(seed))
    return Bag.single(features, grid=grid).to("cuda")


@pytest.mark.parametrize("name", FAMILY)
def test_triton_scans_match_reference_scans(name):
    torch.manual_seed(0)
    reference = create_model(name, in_dim=256, n_outputs=4, scan_backend="reference", **SIZES[name]).cuda()
    triton = copy.deepcopy(reference)
    for module in triton.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = "triton"
    assert any(getattr(m, "scan_backend", None) == "triton" for m in triton.modules())
    reference.train()
    triton.train()
    bag = make_bag(3000)
    outputs = {}
    for label, model in (("reference", reference), ("triton", triton)):
        torch.manual_seed(1)  # the same dropout masks in both
        logits = model(bag)
        (logits * torch.arange(1, 5, device="cuda")).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs[label] = (logits.detach(), grads)
    (ref_logits, ref_grads), (tri_logits, tri_grads) = outputs["reference"], outputs["triton"]
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert ref_grads.keys() == tri_grads.keys()
    # a gradient far below the model's largest is numerically zero (the attention score's bias:
    # softmax ignores a shift), so each is measured against its own size or 1e-3 of the largest
    largest = max(g.abs().max() for g in ref_grads.values())
    errors = {}
    for n in ref_grads:
        scale = torch.maximum(ref_grads[n].abs().max(), 1e-3 * largest)
        errors[n] = ((tri_grads[n] - ref_grads[n]).abs().max() / scale).item()
    worst = {n: f"{e:.1e}" for n, e in sorted(errors.items(), key=lambda kv: -kv[1])[:5]}
    assert max(errors.values()) < 1e-3, f"{name}: largest relative gradient differences {worst}"
