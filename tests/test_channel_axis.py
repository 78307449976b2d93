"""Channel axes from how a layer is applied, not from its class (issue #12, item 1).

The same network written two ways — a norm subclass that permutes inside its own ``forward`` (ConvNeXt's
``LayerNorm2d``) and a plain ``nn.LayerNorm`` between explicit permutes — must get identical scores from
every criterion. The plain spelling is the one checked against dense Hessians elsewhere
(tests/test_oba.py, test_sosp.py, test_criteria.py), so equality here is a check against an independent
computation. Width 8 equals the channel count, where a guess from shapes alone is ambiguous.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyobc
from pyobc.scoring.capture import Capture
from pyobc.scoring.per_sample import probe_channel_axes

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

METHODS = [("magnitude", {}), ("taylor", {}), ("obd", {}), ("jacobian", {}), ("jacobian", {"rows": "sample"}),
           ("oba", {}), ("oba", {"hessian": "full"}), ("sosp-h", {}), ("sosp-i", {}), ("ec", {})]


class LN2d(nn.LayerNorm):
    """Channels-first LayerNorm as ConvNeXt writes it."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Permuted(nn.Module):
    """A plain nn.LayerNorm applied channels-last between two explicit permutes."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BNSiLU(nn.BatchNorm2d):
    """A norm subclass that applies an activation after its affine map (timm's BatchNormAct2d)."""

    def forward(self, x):
        return F.silu(super().forward(x))


class LNTokens(nn.LayerNorm):
    """LayerNorm over C of an (N, C, L) tensor: applied to (N, L, C) inside its forward."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _conv_net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(torch.linspace(-0.3, 0.3, 8) if name.endswith("bias") else torch.linspace(0.5, 1.5, 8))
    return net.eval()


def _tokens_net(subclass: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = LNTokens(8) if subclass else nn.LayerNorm(8)
    net = nn.Sequential(nn.Conv1d(3, 8, 1), norm if subclass else Permuted1d(norm), nn.Conv1d(8, 8, 1), nn.GELU(),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
        norm.bias.copy_(torch.linspace(-0.3, 0.3, 8))
    return net.eval()


class Permuted1d(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class SeparateAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.silu(self.bn(x))


PAIRS = {
    # name: (subclass spelling, plain spelling, input shape)
    "layernorm2d": (lambda: _conv_net(LN2d(8)), lambda: _conv_net(Permuted(nn.LayerNorm(8))), (4, 3, 8, 8)),
    "layernorm2d_w6": (lambda: _conv_net(LN2d(8)), lambda: _conv_net(Permuted(nn.LayerNorm(8))), (4, 3, 6, 5)),
    "batchnorm_act": (lambda: _conv_net(BNSiLU(8)), lambda: _conv_net(SeparateAct()), (4, 3, 8, 8)),
    "tokens_ncl": (lambda: _tokens_net(True), lambda: _tokens_net(False), (4, 3, 8)),
}


def _flat(scores) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in scores.values])


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("method,options", METHODS, ids=[m + "".join(f"-{v}" for v in o.values()) for m, o in METHODS])
def test_subclass_and_plain_spelling_score_the_same(pair, method, options):
    make_sub, make_plain, shape = PAIRS[pair]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)) for _ in range(2)]
    if pair == "batchnorm_act" and method == "sosp-i":  # per-sample gates need a per-channel affine output
        with pytest.raises(NotImplementedError, match=r"1 \(BNSiLU"):
            pyobc.score(make_sub(), data, method, **options)
        return
    sub = pyobc.score(make_sub(), data, method, **options)
    plain = pyobc.score(make_plain(), data, method, **options)
    assert [gr.size for gr in sub.groups] == [gr.size for gr in plain.groups]
    torch.testing.assert_close(_flat(sub), _flat(plain), rtol=1e-9, atol=1e-13)


def test_probe_finds_the_axis_that_scales_with_the_parameters():
    ln, bn_act, tok = LN2d(8), BNSiLU(8), LNTokens(8)
    with torch.no_grad():
        ln.bias.uniform_(-1, 1)
        bn_act.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 8, 8)  # H = W = C: shapes alone cannot tell
    mods = {"ln": ln, "bn": bn_act, "tok": tok}
    with Capture(mods) as cap, torch.no_grad():
        ln(x), bn_act(x), tok(torch.randn(2, 8, 8))
    axes = probe_channel_axes(mods, cap.records)
    assert axes == {ln: 1, bn_act: None, tok: 1}  # SiLU after the affine map: no gate axis

