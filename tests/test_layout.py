"""Layout (pyobc.scoring.layout) on the CSR ops: every level is one op call, and it equals the
entry-list form (index_select/index_add over layout.src, layout.dst, layout.member_group) that it
replaced, for 1-d, row-batched and multi-dim input, gradients included; forward-mode AD and vmap
fall back to the entry-list form.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyobc
from pyobc.grouping import build_groups
from pyobc.scoring.layout import Layout


class CountOps(TorchDispatchMode):
    """Counts the ops that reach the backends (each one a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def layout():
    torch.manual_seed(0)
    model = pyobc.models.resnet20(in_channels=1, input_size=8)
    groups = build_groups(model, torch.randn(2, 1, 8, 8))
    return Layout(groups, dict(model.named_parameters()))


@pytest.fixture(scope="module")
def mlp_layout():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    return Layout(build_groups(net, torch.randn(2, 4)), dict(net.named_parameters()))


# the entry-list forms (the pre-CSR implementation)
def old_members(lay, x):
    out = x.new_zeros(x.shape[:-1] + (lay.num_members,))
    return out.index_add_(-1, lay.dst, x.index_select(-1, lay.src))


def old_group_sum(lay, m):
    return m.new_zeros(m.shape[:-1] + (lay.num_channels,)).index_add_(-1, lay.member_group, m)


def old_mean_nonzero(lay, m):
    return old_group_sum(lay, m) / old_group_sum(lay, (m != 0).to(m.dtype)).clamp_min(1)


def old_amax(lay, m):
    out = m.new_full((lay.num_channels,), float("-inf"))
    return out.scatter_reduce(0, lay.member_group, m, reduce="amax")


def old_group_max(lay, c):
    sizes = torch.tensor([g.size for g in lay.groups])
    group_of = torch.repeat_interleave(torch.arange(len(lay.groups)), sizes)
    gmax = c.new_full((len(lay.groups),), float("-inf")).scatter_reduce(0, group_of, c, "amax")
    return gmax.index_select(0, group_of)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["1d", "rows", "2x3"])
def test_levels_match_entry_lists(layout, dtype, lead):
    lay = layout
    x = torch.randn(lead + (lay.num_sources,), dtype=dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    m = lay.members(x)
    assert m.shape == lead + (lay.num_members,) and m.dtype == dtype
    torch.testing.assert_close(m, old_members(lay, x), **tol)
    m = m * (torch.rand_like(m) > 0.3)  # exact zeros for the *_nonzero reduction
    c = lay.group_sum(m)
    assert c.shape == lead + (lay.num_channels,)
    torch.testing.assert_close(c, old_group_sum(lay, m), **tol)
    torch.testing.assert_close(lay.group_mean_nonzero(m), old_mean_nonzero(lay, m), **tol)
    if not lead:
        assert torch.equal(lay.group_amax(m), old_amax(lay, m))
        assert torch.equal(lay.group_max(c), old_group_max(lay, c))
        for got, (a, b) in zip(lay.split(c), zip(lay.group_offsets[:-1], lay.group_offsets[1:])):
            assert torch.equal(got, c[a:b])


def test_one_op_call_per_level(layout):
    lay = layout
    x = torch.randn(4, lay.num_sources)
    m = lay.members(x)
    for fn, arg, want in [(lay.members, x, ["csr_gather_sum"]),
                          (lay.group_sum, m, ["csr_gather_sum"]),
                          (lay.group_mean_nonzero, m, ["csr_gather_reduce"]),
                          (lay.group_amax, m[0], ["csr_gather_reduce"])]:
        with CountOps() as counter:
            fn(arg)
        assert counter.names == want, counter.names


def test_row_views_are_read_in_place(layout):
    lay = layout
    history = torch.randn(lay.num_sources, 6)  # a caller's buffer, one column per batch
    rows = history.t()                           # (6, S) view, strides (1, 6): no copy needed
    with CountOps() as counter:
        out = lay.members(rows)
    assert counter.names == ["csr_gather_sum"]
    torch.testing.assert_close(out, old_members(lay, rows.contiguous()))


def test_gradients_match_entry_lists(mlp_layout):
    lay = mlp_layout
    x = torch.randn(3, lay.num_sources, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, lay.num_channels, dtype=torch.float64)
    (lay.group_sum(lay.members(x)) * g).sum().backward()
    want = torch.autograd.grad((old_group_sum(lay, old_members(lay, x)) * g).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    assert torch.autograd.gradcheck(lambda v: lay.group_mean_nonzero(lay.members(v)), (x,),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda v: lay.group_amax(lay.members(v[0])), (x,),
                                    fast_mode=True)


def test_forward_ad_and_vmap_fall_back(mlp_layout):
    from torch.autograd import forward_ad
    lay = mlp_layout
    x, t = torch.randn(lay.num_sources), torch.randn(lay.num_sources)
    with forward_ad.dual_level():
        out = lay.group_sum(lay.members(forward_ad.make_dual(x, t)))
        tangent = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, old_group_sum(lay, old_members(lay, t)))
    xs = torch.randn(4, lay.num_sources)
    torch.testing.assert_close(torch.vmap(lambda v: lay.group_sum(lay.members(v)))(xs),
                               lay.group_sum(lay.members(xs)))


def test_wrong_length_is_an_error(mlp_layout):
    lay = mlp_layout
    with pytest.raises(ValueError, match=f"must have {lay.num_sources} entries"):
        lay.members(torch.randn(lay.num_sources + 1))
    with pytest.raises(ValueError, match=f"must have {lay.num_members} entries"):
        lay.group_sum(torch.randn(2, lay.num_members - 1))


def test_empty_layout():
    lay = Layout([], {})
    assert lay.members(torch.zeros(0)).shape == (0,)
    assert lay.group_sum(torch.zeros(3, 0)).shape == (3, 0)
    assert lay.group_max(torch.zeros(0)).shape == (0,)
