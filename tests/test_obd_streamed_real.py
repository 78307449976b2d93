"""OBD's streamed backward against the all-at-once one on real architectures.

``PerSamplePass(..., sq_sums=True)`` (what OBD runs) computes each layer's squared per-sample gradient
sums inside the backward pass, as the layer's output gradient arrives, reaching the layers through a scalar
added to the batch's float inputs; the other path asks ``autograd.grad`` for every recorded output at once.
Both feed the same closed forms (checked against per-sample loops in tests/test_criteria.py), so any
difference is a gradient the streamed pass missed, got twice, or got for the wrong call. The models cover
what the streamed pass has to get right: ``ReLU(inplace=True)`` and ``out += identity`` (ResNet),
concatenation (DenseNet), attention (DeiT), and token ids with no float input, where every output takes
the fallback call (GPT-2, whose Conv1D layers are served by vmap). Measured on all 23 architectures of
tests/real_models.py (2026-12-02, records without outputs): identical scores but for MobileViT, 2.9e-7 of its
largest score.
"""
from __future__ import annotations

import pytest

import pyobc
import pyobc.criteria.obd as obd_module
from pyobc.scoring.per_sample_pass import PerSamplePass
from real_models import ARCHS, build

pytestmark = pytest.mark.usefixtures("one_thread")


class _AllAtOnce(PerSamplePass):
    def __init__(self, *args, sq_sums: bool = False, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_densenet121", "timm_deit_tiny", "hf_gpt2"])
def test_streamed_and_all_at_once_agree(name, monkeypatch):
    model, batch = build(name, 2)
    kw = dict(loss_fn=ARCHS[name].loss_fn, granularity="weight")
    streamed = pyobc.score(model, [batch], "obd", **kw).by_parameter()
    monkeypatch.setattr(obd_module, "PerSamplePass", _AllAtOnce)
    whole = pyobc.score(model, [batch], "obd", **kw).by_parameter()
    assert set(streamed) == set(whole) and len(whole) > 0
    assert max(float(v.abs().max()) for v in whole.values()) > 0
    for k, v in whole.items():  # per parameter: scores span orders of magnitude across a model
        assert float((streamed[k] - v).abs().max()) <= 1e-5 * float(v.abs().max()), k
