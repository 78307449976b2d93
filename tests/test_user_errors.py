"""A model that cannot take the data fails with one line naming the model, the shapes and the error
(issue #12, item 9), from the API and from the command line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import pyobc
from pyobc.errors import TracingError


def test_api_error_names_model_shapes_and_cause():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    data = [(torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"model Sequential on inputs of shape \(2, 1, 8, 8\) \(two samples of the "
                                         r"first batch\) failed: RuntimeError: .*3 channels") as e:
        pyobc.score(net, data, "jacobian")
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, RuntimeError)


def test_failing_loss_fn_is_one_line():
    def loss_fn(model, batch):
        return model(batch["x"]).sum()  # the batch is a tuple

    with pytest.raises(ValueError, match=r"loss_fn\(model, batch\) with the model Linear .* TypeError"):
        pyobc.score(nn.Linear(3, 2), [(torch.randn(4, 3), torch.zeros(4))], "jacobian", loss_fn=loss_fn)


def test_user_example_inputs_are_named_as_such():
    with pytest.raises(ValueError, match=r"\(example_inputs\) failed"):
        pyobc.score(nn.Linear(3, 2), None, "magnitude", example_inputs=torch.randn(2, 4))


def test_cli_three_channel_model_on_one_channel_digits():
    proc = subprocess.run([sys.executable, "-m", "pyobc", "score", "--model", "pyobc.models:resnet20",
                           "--data", "pyobc.datasets:digits", "--method", "jacobian"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyobc: error: "), proc.stderr
    assert "CifarResNet" in lines[0] and "(2, 1, 8, 8)" in lines[0] and "3 channels" in lines[0]


class _TracedOnce(nn.Module):
    """A model the tests below give their own Torch-Pruning failure (a fresh class: no cached grouping)."""

    def __init__(self, fail_under_grad: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.fail_under_grad = fail_under_grad

    def forward(self, x):
        if self.fail_under_grad and torch.is_grad_enabled():  # the tracer runs with grad, the first forward not
            raise KeyError("the model's own failure")
        return self.b(torch.relu(self.a(x)))


def test_failure_inside_torch_pruning_is_one_tracing_error(monkeypatch):
    import os
    import torch_pruning as tp

    # a function whose code lives in Torch-Pruning's package, failing as its index mapping does on ShuffleNetV2
    where = os.path.join(os.path.dirname(tp.__file__), "dependency", "index_mapping.py")
    scope: dict = {}
    exec(compile("def update_reshape_index_mapping(*args, **kwargs):\n    return 1 // 0\n", where, "exec"), scope)
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", scope["update_reshape_index_mapping"])
    with pytest.raises(TracingError, match=r"Torch-Pruning's DependencyGraph.* failed on _TracedOnce: "
                       r"ZeroDivisionError: .* in update_reshape_index_mapping \(torch_pruning/dependency/"
                       r"index_mapping.py:2\)") as e:
        pyobc.score(_TracedOnce(), [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))], "jacobian")
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value.__cause__, ZeroDivisionError)
    assert "\n" not in str(e.value)


def test_model_failure_under_the_tracer_keeps_its_own_error():
    with pytest.raises(KeyError, match="the model's own failure"):
        pyobc.score(_TracedOnce(fail_under_grad=True), [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))],
                    "jacobian")
