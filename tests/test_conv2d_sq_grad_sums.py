"""pyobc.ops.conv2d_sq_grad_sums (OBD's squared per-sample weight gradients of a 2-D convolution) against
per-sample gradients from torch.func in float64, and its use by OBD. The opcheck samples are in
tests/test_ops.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, vmap

import pyobc
import pyobc.ops as ops
import pyobc.scoring.per_sample as per_sample
from pyobc.ops import reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (N, C, Co, H, W, kernel, stride, padding, dilation)
CASES = [
    (4, 3, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (5, 16, 8, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1)),
    (3, 4, 6, 10, 7, (3, 2), (1, 2), (2, 0), (2, 1)),
    (2, 3, 4, 7, 7, (1, 1), (1, 1), (0, 0), (1, 1)),
    (6, 8, 8, 8, 8, (5, 5), (1, 1), (2, 2), (1, 1)),
    (1, 2, 3, 4, 4, (3, 3), (1, 1), (3, 3), (1, 1)),  # padding wider than the kernel reach: zero rows
    (7, 64, 64, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),  # more weights per thread than samples
]


def per_sample_sq_sums(x, g, k, s, p, d):
    """sum_n (d<conv(x_n, W), g_n>/dW)^2 by torch.func, float64: independent of both kernels."""
    w = torch.zeros(g.shape[1], x.shape[1], *k, dtype=torch.float64)

    def one(xn, gn):
        return grad(lambda w_: (F.conv2d(xn[None], w_, None, s, p, d) * gn[None]).sum())(w)

    return vmap(one)(x.double(), g.double()).square().sum(0)


def _inputs(case, dtype=torch.float32, seed=0):
    n, c, co, h, w, k, s, p, d = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    g = torch.randn(n, co, ho, wo, generator=gen, dtype=torch.float64).to(dtype)
    return x, g, k, s, p, d


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_per_sample_gradients(case, dtype):
    x, g, k, s, p, d = _inputs(case, dtype)
    want = per_sample_sq_sums(x, g, k, s, p, d)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    for fn in (ops.conv2d_sq_grad_sums, reference.conv2d_sq_grad_sums):
        got = fn(x, g, k, s, p, d)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **tol)


def test_layouts_threads_and_empty_batch():
    x, g, k, s, p, d = _inputs(CASES[1], torch.float64, seed=1)
    want = per_sample_sq_sums(x, g, k, s, p, d)
    cl = ops.conv2d_sq_grad_sums(x.contiguous(memory_format=torch.channels_last), g.transpose(2, 3)
                                 .contiguous().transpose(2, 3), k, s, p, d)
    torch.testing.assert_close(cl, want, rtol=1e-12, atol=1e-12)
    threads = torch.get_num_threads()
    try:  # one task, and more tasks than samples
        for t in (1, 8):
            torch.set_num_threads(t)
            torch.testing.assert_close(ops.conv2d_sq_grad_sums(x[:3], g[:3], k, s, p, d),
                                       per_sample_sq_sums(x[:3], g[:3], k, s, p, d), rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
    empty = ops.conv2d_sq_grad_sums(x[:0], g[:0], k, s, p, d)
    assert empty.shape == (8, 16, 3, 3) and not empty.any()


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, g: ops.conv2d_sq_grad_sums(x.half(), g.half(), (3, 3), (1, 1), (1, 1), (1, 1)), TypeError, "float32"),
    (lambda x, g: ops.conv2d_sq_grad_sums(x, g.double(), (3, 3), (1, 1), (1, 1), (1, 1)), TypeError, "same dtype"),
    (lambda x, g: ops.conv2d_sq_grad_sums(x, g, 3, (1, 1), (1, 1), (1, 1)), TypeError, "two ints"),
    (lambda x, g: ops.conv2d_sq_grad_sums(x, g, (3, 3), (1, 1), (0, 0), (1, 1)), ValueError, "must have shape"),
    (lambda x, g: ops.conv2d_sq_grad_sums(x[0], g[0], (3, 3), (1, 1), (1, 1), (1, 1)), ValueError, "4-d"),
    (lambda x, g: ops.conv2d_sq_grad_sums(x, g, (3, 3), (0, 1), (1, 1), (1, 1)), ValueError, ">= 1"),
    (lambda x, g: ops.conv2d_sq_grad_sums([1.0], g, (3, 3), (1, 1), (1, 1), (1, 1)), TypeError, "torch.Tensor"),
    (lambda x, g: ops.conv2d_sq_grad_sums(x.requires_grad_(), g, (3, 3), (1, 1), (1, 1), (1, 1)), RuntimeError,
     "not differentiable"),
])
def test_argument_errors(call, exc, match):
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    with pytest.raises(exc, match=match):
        call(x, g)


def test_direct_op_call_checks_in_cpp():
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 4, 4)
    with pytest.raises(RuntimeError, match="must have shape"):
        torch.ops.pyobc.conv2d_sq_grad_sums(x, g, [3, 3], [1, 1], [1, 1], [1, 1])


def test_torch_compile_fullgraph():
    x, g, k, s, p, d = _inputs(CASES[0])
    f = torch.compile(lambda a, b: ops.conv2d_sq_grad_sums(a, b, k, s, p, d) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, g), 2 * ops.conv2d_sq_grad_sums(x, g, k, s, p, d))


class SmallMaps(nn.Module):
    """A conv on 8x8 maps (the op's path), one on 16x16 (the chunked path), a stride-2 conv with bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu(self.c(F.relu(self.b(h))))
        return self.fc(h.mean((2, 3)))


def test_obd_uses_the_op_on_small_maps_and_matches_a_loop(monkeypatch):
    torch.manual_seed(0)
    model = SmallMaps().double()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (6,))
    calls = []
    real = ops.conv2d_sq_grad_sums
    monkeypatch.setattr(per_sample.ops, "conv2d_sq_grad_sums", lambda *a: calls.append(a[1].shape) or real(*a))
    by_param = pyobc.score(model, [(x, y)], "obd", granularity="weight").by_parameter()
    assert sorted(tuple(s[2:]) for s in calls) == [(8, 8), (8, 8)]  # b and c; a has 256 positions
    params = dict(model.named_parameters())
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(6):  # one backward per sample
        loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        for k, gk in zip(params, torch.autograd.grad(loss, list(params.values()))):
            fisher[k] += gk ** 2 / 6
    for k, v in params.items():
        torch.testing.assert_close(by_param[k].double(), 0.5 * v.detach() ** 2 * fisher[k], rtol=1e-9, atol=1e-15)


@needs_cuda
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(case):
    x, g, k, s, p, d = _inputs(case, torch.float64)
    got = ops.conv2d_sq_grad_sums(x.cuda(), g.cuda(), k, s, p, d).cpu()
    torch.testing.assert_close(got, per_sample_sq_sums(x, g, k, s, p, d), rtol=1e-10, atol=1e-10)
