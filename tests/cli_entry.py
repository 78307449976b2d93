"""Entry points for tests/test_cli.py: ``pyobc score --model tests.cli_entry:build_model --data
tests.cli_entry:build_loader`` (run from the repository root).

A tiny CNN and a seeded random data set, so the CLI tests run in seconds and do not train anything.
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def build_model() -> nn.Module:
    """A small conv net: 1x8x8 images -> 10 classes (seeded, so every call builds the same weights)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def build_loader() -> DataLoader:
    """64 random images with random labels in batches of 16 (its own generator: the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def not_a_model():
    """Returns the wrong type, for the error-path test."""
    return 42


def mean_loss(model, batch):
    """A custom loss_fn(model, batch): mean cross-entropy."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
