"""A model that cannot take the data fails with one line naming the model, the shapes and the error
(issue #12, item 9), from the API and from the command line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import pyobc


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
