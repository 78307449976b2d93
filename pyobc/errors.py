"""The exception types pyobc raises on purpose, in one leaf module every layer can import.

Most user mistakes are the standard ``TypeError`` / ``ValueError``; the classes here exist where a
caller may want to catch one situation specifically. The data-parallel ones are raised by every rank
together (see :mod:`pyobc.distributed`), but they are defined here because the scoring engine raises
them too and must not depend on the distributed module's internals.

Example:
    >>> import pyobc, torch
    >>> from pyobc.errors import EmptyLoaderError
    >>> try:
    ...     pyobc.score(torch.nn.Linear(2, 2), [], "jacobian")
    ... except EmptyLoaderError as e:
    ...     print(e)
    the loader yielded no batches
"""
from __future__ import annotations

__all__ = ["EmptyLoaderError", "ModelRunError", "TracingError", "GroupSearchTimeout", "PrunedModelError", "DistributedScoringError",
           "ConfigMismatchError", "EmptyShardError", "PeerFailedError"]


class EmptyLoaderError(ValueError):
    """Raised by :func:`pyobc.score` when the loader yields no batches (in any mode)."""


class ModelRunError(ValueError):
    """Running the user's model (or ``loss_fn``) on the first batch failed: the message names the model,
    the input shapes and the original error, which is chained as ``__cause__``."""


class TracingError(NotImplementedError):
    """Torch-Pruning's DependencyGraph, which pyobc uses to find coupled channels, failed inside its own code
    on a model that runs (e.g. ShuffleNet's channel shuffle, a reshape it cannot map): the message names the
    model, the Torch-Pruning function and the original error, which is chained as ``__cause__``."""


class GroupSearchTimeout(RuntimeError):
    """Finding the coupled channels (Torch-Pruning's group search) ran past its time budget; the message
    names the model and the layer it was at, and suggests ``ignored_layers``."""


class PrunedModelError(RuntimeError):
    """A pruned model failed its check forward on the example inputs; the message names the module that
    failed and the ``ignored_layers`` that avoid it. The broken model is never returned."""


class DistributedScoringError(RuntimeError):
    """Base class of the errors that every rank raises together in data-parallel scoring."""


class ConfigMismatchError(DistributedScoringError, ValueError):
    """The ranks disagree on what they score (method, options, model, weights...); same message on every rank."""


class EmptyShardError(DistributedScoringError, ValueError):
    """Some rank's loader yielded no batches; same message on every rank."""


class PeerFailedError(DistributedScoringError):
    """Another rank failed before the ranks combined their accumulators (that rank raises its own error)."""
