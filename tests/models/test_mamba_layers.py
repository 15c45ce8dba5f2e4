"""Mamba-family layers against plain float64 loops over positions, and chunked == whole.

Each reference below re-derives a layer from its equations, one position (or cell) at a time,
using only the layer's parameters: nothing of the layer's own forward is reused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambapath.models.layers.attention_pool import AttentionPool, StreamingAttentionPool
from mambapath.models.layers.bidirectional import BiMamba, BiMamba2
from mambapath.models.layers.gated_cnn import GatedCNNBlock
from mambapath.models.layers.mamba import Mamba
from mambapath.models.layers.mamba2 import Mamba2
from mambapath.models.layers.mamba2d import Mamba2D

ATOL = 1e-9  # float64 loop against float64 layer


def _causal_conv_loop(x, weight, bias):
    """x (C, L), depthwise weight (C, 1, K): y[c, t] = b[c] + sum_k w[c, k] x[c, t - K + 1 + k]."""
    channels, length = x.shape
    width = weight.shape[-1]
    y = torch.zeros_like(x)
    for t in range(length):
        for k in range(width):
            s = t - width + 1 + k
            if s >= 0:
                y[:, t] += weight[:, 0, k] * x[:, s]
    return y + (bias[:, None] if bias is not None else 0)


def _scan_loop(u, dt, A, B, C, D, z):
    """u, dt, z (C, L); A (C, N); B, C (C, N, L) per channel. h_t = exp(dt A) h + dt B u."""
    channels, length = u.shape
    h = torch.zeros(channels, A.shape[1], dtype=u.dtype)
    y = torch.zeros_like(u)
    for t in range(length):
        h = torch.exp(dt[:, t, None] * A) * h + dt[:, t, None] * B[:, :, t] * u[:, t, None]
        y[:, t] = (h * C[:, :, t]).sum(-1) + D * u[:, t]
    return y * F.silu(z)


def _mamba_mixer_loop(mixer, xz):
    """xz (C2, L) for one sequence -> gated scan output (d_inner, L)."""
    x, z = xz.chunk(2, dim=0)
    x = F.silu(_causal_conv_loop(x, mixer.conv1d.weight, mixer.conv1d.bias))
    proj = mixer.x_proj.weight @ x  # (R + 2N, L)
    dt_low, B, C = torch.split(proj, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=0)
    dt = F.softplus(mixer.dt_proj.weight @ dt_low + mixer.dt_proj.bias[:, None])
    A = -torch.exp(mixer.A_log)
    d_inner = x.shape[0]
    Bc = B[None].expand(d_inner, -1, -1)
    Cc = C[None].expand(d_inner, -1, -1)
    return _scan_loop(x, dt, A, Bc, Cc, mixer.D, z)


def _mamba_loop(block, x):
    """x (L, D) -> (L, D) through one Mamba block."""
    xz = block.in_proj.weight @ x.T
    return (block.out_proj.weight @ _mamba_mixer_loop(block.mixer, xz)).T


def _mamba2_mixer_loop(mixer, zxbcdt):
    d_inner, G, N, H, P = mixer.d_inner, mixer.ngroups, mixer.d_state, mixer.nheads, mixer.headdim
    z, xBC, dt_raw = torch.split(zxbcdt, [d_inner, d_inner + 2 * G * N, H], dim=0)
    xBC = F.silu(_causal_conv_loop(xBC, mixer.conv1d.weight, mixer.conv1d.bias))
    x, B, C = torch.split(xBC, [d_inner, G * N, G * N], dim=0)
    length = x.shape[1]
    B = B.reshape(G, N, length)
    C = C.reshape(G, N, length)
    y = torch.zeros_like(x)
    for head in range(H):
        group = head // (H // G)
        chans = slice(head * P, (head + 1) * P)
        dt = F.softplus(dt_raw[head] + mixer.dt_bias[head])  # (L,)
        a = -torch.exp(mixer.A_log[head])
        h = torch.zeros(P, N, dtype=x.dtype)
        for t in range(length):
            h = torch.exp(dt[t] * a) * h + dt[t] * x[chans, t, None] * B[group, None, :, t]
            y[chans, t] = h @ C[group, :, t] + mixer.D[head] * x[chans, t]
    return y * F.silu(z)


def _mamba2_loop(block, x):
    y = _mamba2_mixer_loop(block.mixer, block.in_proj.weight @ x.T).T  # (L, d_inner)
    G = block.norm.groups
    yg = y.reshape(y.shape[0], G, -1)
    yg = yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + block.norm.eps)
    return (block.out_proj.weight @ (yg.reshape(y.shape) * block.norm.weight).T).T


def _chunks(length, sizes):
    start = 0
    for size in sizes:
        if start >= length:
            return
        yield start, min(start + size, length)
        start += size
    if start < length:
        yield start, length


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_mamba_matches_loop_and_streams():
    block = Mamba(6, d_state=3, d_conv=4, expand=2).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    y = block(x)
    for b in range(2):
        torch.testing.assert_close(y[b], _mamba_loop(block, x[b]), atol=ATOL, rtol=0)
    state, parts = None, []
    for start, end in _chunks(13, [1, 4, 2, 5]):
        part, state = block.forward_chunk(x[:, start:end], state)
        parts.append(part)
    torch.testing.assert_close(torch.cat(parts, dim=1), y, atol=ATOL, rtol=0)
    step_out, state = block.step(x[:, 0])
    torch.testing.assert_close(step_out, y[:, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_matches_loop_and_streams(ngroups):
    block = Mamba2(8, d_state=3, d_conv=3, expand=2, headdim=4, ngroups=ngroups).double()
    x = torch.randn(1, 11, 8, dtype=torch.float64)
    y = block(x)
    torch.testing.assert_close(y[0], _mamba2_loop(block, x[0]), atol=ATOL, rtol=0)
    state, parts = None, []
    for start, end in _chunks(11, [3, 3, 1, 2]):
        part, state = block.forward_chunk(x[:, start:end], state)
        parts.append(part)
    torch.testing.assert_close(torch.cat(parts, dim=1), y, atol=ATOL, rtol=0)


def test_mamba2_heads_share_one_decay():
    block = Mamba2(8, d_state=4, headdim=4)
    assert block.mixer.A_log.shape == (block.mixer.nheads,) == (4,)
    assert block.mixer.dt_bias.shape == block.mixer.D.shape == (4,)


@pytest.mark.parametrize("make", [BiMamba, BiMamba2], ids=["bimamba", "bimamba2"])
def test_bidirectional_adds_a_reversed_scan(make):
    kwargs = dict(d_state=3, headdim=4) if make is BiMamba2 else dict(d_state=3)
    layer = make(8, **kwargs).double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    y = layer(x)[0]
    if make is BiMamba:
        xz = layer.block.in_proj.weight @ x[0].T
        inner = _mamba_mixer_loop(layer.block.mixer, xz) + _mamba_mixer_loop(layer.mixer_backward, xz.flip(-1)).flip(-1)
        expected = (layer.block.out_proj.weight @ inner).T
        torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)
    # with the backward mixer a copy of the forward one, reversing the input reverses the output
    layer.mixer_backward.load_state_dict(layer.block.mixer.state_dict())
    torch.testing.assert_close(layer(x.flip(1)), layer(x).flip(1), atol=ATOL, rtol=0)
    # and the layer sees both sides: the first output depends on the last input
    x2 = x.clone()
    x2[0, -1] += 1.0
    assert (layer(x2)[0, 0] - layer(x)[0, 0]).abs().max() > 1e-6


def test_gated_cnn_matches_loop_and_streams():
    block = GatedCNNBlock(6, kernel_size=4, conv_ratio=0.5).double()
    x = torch.randn(1, 10, 6, dtype=torch.float64)
    y = block(x)[0]
    hidden, ident, conv = block.split_sizes
    h = F.layer_norm(x[0], (6,), block.norm.weight, block.norm.bias, block.norm.eps)
    g, i, c = torch.split(h @ block.fc1.weight.T + block.fc1.bias, [hidden, ident, conv], dim=-1)
    c = _causal_conv_loop(c.T, block.conv.weight, block.conv.bias).T
    expected = (F.gelu(g) * torch.cat([i, c], dim=-1)) @ block.fc2.weight.T + block.fc2.bias + x[0]
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)
    state, parts = None, []
    for start, end in _chunks(10, [2, 1, 3]):
        part, state = block.forward_chunk(x[:, start:end], state)
        parts.append(part)
    torch.testing.assert_close(torch.cat(parts, dim=1)[0], y, atol=ATOL, rtol=0)


def test_mamba2d_matches_a_cell_by_cell_loop():
    block = Mamba2D(4, d_state=2, d_conv=3, expand=1).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    y = block(x)[0]
    xz = (x[0] @ block.in_proj.weight.T).permute(2, 0, 1)  # (2 C, H, W)
    u, z = xz.chunk(2, dim=0)
    u = F.silu(F.conv2d(u[None], block.conv2d.weight, block.conv2d.bias, padding=1, groups=u.shape[0])[0])
    proj = torch.einsum("rc,chw->rhw", block.x_proj.weight, u)
    dt_low, B, C = torch.split(proj, [block.dt_rank, block.d_state, block.d_state], dim=0)
    dt = F.softplus(torch.einsum("cr,rhw->chw", block.dt_proj.weight, dt_low) + block.dt_proj.bias[:, None, None])
    A = -torch.exp(block.A_log)  # (C, N)
    channels, height, width = u.shape
    g = torch.zeros(channels, A.shape[1], height, width, dtype=torch.float64)
    h = torch.zeros_like(g)
    out = torch.zeros(channels, height, width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            a = torch.exp(dt[:, i, j, None] * A)
            xin = dt[:, i, j, None] * B[None, :, i, j] * u[:, i, j, None]
            g[..., i, j] = a * (g[..., i, j - 1] if j > 0 else 0) + xin  # along the row
            h[..., i, j] = a * (h[..., i - 1, j] if i > 0 else 0) + g[..., i, j]  # down the column
            out[:, i, j] = (h[..., i, j] * C[None, :, i, j]).sum(-1) + block.D * u[:, i, j]
    expected = ((out * F.silu(z)).permute(1, 2, 0)) @ block.out_proj.weight.T
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)


def test_streaming_attention_pool_equals_softmax_pooling():
    pool = AttentionPool(5, hidden=4).double()
    h = torch.randn(2, 23, 5, dtype=torch.float64) * 3
    scores = (torch.tanh(h @ pool.score[0].weight.T + pool.score[0].bias) @ pool.score[2].weight.T)[..., 0]
    weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
    expected = (weights[..., None] * h).sum(1) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(pool(h), expected, atol=ATOL, rtol=0)
    stream = StreamingAttentionPool(pool)
    for start, end in _chunks(23, [4, 1, 7, 3]):
        stream.update(h[:, start:end])
    torch.testing.assert_close(stream.result(), expected, atol=ATOL, rtol=0)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 20:] = False
    torch.testing.assert_close(pool(h, mask)[1], pool(h[1:, :20])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: Mamba(8, d_state=2),
        lambda: Mamba2(8, d_state=2, headdim=4),
        lambda: BiMamba(8, d_state=2),
        lambda: BiMamba2(8, d_state=2, headdim=4),
        lambda: GatedCNNBlock(8),
    ],
    ids=["mamba", "mamba2", "bimamba", "bimamba2", "gated_cnn"],
)
def test_layers_backward_reaches_every_parameter(layer):
    module = layer()
    x = torch.randn(2, 7, 8, requires_grad=True)
    module(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mamba2d_backward_reaches_every_parameter():
    module = Mamba2D(4, d_state=2)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    module(x).pow(2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
