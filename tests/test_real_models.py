"""Model coverage: every criterion, prune, save/load and Equivalent Pruning on real architectures.

torchvision (ResNet-18/50, MobileNetV2/V3-small, EfficientNet-B0, DenseNet-121, RegNetX-400MF, ConvNeXt-T,
GoogLeNet, Swin-T, a small VisionTransformer), timm (ResNet-18, DeiT-tiny, ConvNeXt-atto, MobileViTv2-050,
EfficientViT-B0, LeViT-128S) and transformers (a ViT image classifier, a BERT sequence classifier on dict
batches, both with pyobc's default loss; BERT, GPT-2, Llama, Qwen3 with grouped-query attention; tiny
configs) with random initialisation, batch 2 at the smallest input that works (tests/real_models.py).

Each configuration must end in exactly one of two outcomes, recorded as the test's ``outcome`` property
(``pytest --junitxml``): "ok" (finite scores for every group; a pruned model with fewer MACs whose forward
runs; ``load(save(pruned))`` and ``fold(equivalent_prune(...))`` computing the pruned model's outputs), or
"refused" (one ``NotImplementedError`` naming the layers and the way out). Any other error fails the test
with its one-line message and the frame it came from. ``python bench/bench_models.py --table`` writes the
same outcomes into docs/models.md.
"""
from __future__ import annotations

import pytest

from real_models import ARCHS, CONFIGS, State, run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(ARCHS))
def state(request):
    """One model per architecture, shared by its configurations (pytest runs them together)."""
    return State(request.param)


@pytest.mark.parametrize("config", CONFIGS)
def test_configuration_is_ok_or_refused(state, config, tmp_path, record_property):
    outcome = run_config(state, config, str(tmp_path))
    record_property("outcome", outcome.status)
    assert outcome.status in ("ok", "refused"), f"{state.name} / {config}: {outcome.detail}"
    if outcome.status == "refused":
        assert "\n" not in outcome.detail


def test_shufflenet_is_one_tracing_error():
    """Torch-Pruning cannot trace ShuffleNetV2's channel shuffle (its index mapping divides by zero): one
    TracingError naming the model and Torch-Pruning's function, not a ZeroDivisionError from its internals."""
    import torch
    import torchvision  # the contained import: real_models has installed the stand-in module already
    from pyobc.errors import TracingError
    import pyobc

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10).eval()
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(TracingError, match=r"failed on ShuffleNetV2: ZeroDivisionError: .* in "
                                           r"update_reshape_index_mapping \(torch_pruning/"):
        pyobc.score(model, [batch], "jacobian")
