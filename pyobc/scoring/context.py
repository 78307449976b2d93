"""What a criterion works with: one batch (:class:`Batch`), the loss contract, and :class:`Context`.

This is the scoring engine's leaf: criteria import it, and the engine (:mod:`pyobc.scoring.engine`)
builds one :class:`Context` per :func:`pyobc.score` call and feeds it batches.

The loss contract: ``loss_fn(model, batch) -> scalar tensor``, the *mean* over the batch's samples
(per-sample and micro-batched criteria rely on it; :meth:`Context.micro_batches` checks it once).
:func:`default_loss` is cross-entropy on ``(inputs, targets)`` batches (or dicts with ``"labels"``); Hugging Face causal language models
get :func:`pyobc.losses.causal_lm` instead (:func:`default_loss_for`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grouping import Group
from ..losses import causal_lm, logits
from ..nested import map_tensors
from .capture import Capture, ModifiedInPlace
from .layout import Layout
from .per_sample import ChannelAxes
from .unit_gate import UnitGateSites

__all__ = ["Batch", "Context", "LossFn", "default_loss", "default_loss_for", "is_labelled_dict", "CAUSAL_LM_CLASSES"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of the model's logits against the targets, for ``(inputs, targets)`` batches
    (``model(inputs)``) and for dict batches with a ``"labels"`` entry, the form Hugging Face datasets and
    collators give classifiers (``model(**the other entries)``). The logits are the output itself, its
    ``.logits`` (Hugging Face image and sequence classifiers) or its ``"logits"`` entry
    (:func:`pyobc.losses.logits`).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> wrapped = lambda inputs: {"logits": net(inputs)}
        >>> torch.equal(default_loss(wrapped, (x, y)), default_loss(net, (x, y)))
        True
        >>> keywords = lambda pixel_values: net(pixel_values)
        >>> torch.equal(default_loss(keywords, {"pixel_values": x, "labels": y}), default_loss(net, (x, y)))
        True
    """
    if is_labelled_dict(batch):
        z = model(**{k: v for k, v in batch.items() if k != "labels"})
        return F.cross_entropy(logits(z), batch["labels"])
    inputs, targets = batch
    return F.cross_entropy(logits(model(inputs)), targets)


def is_labelled_dict(batch: Any) -> bool:
    """Whether ``batch`` is a mapping with a ``"labels"`` entry (a Hugging Face classification batch)."""
    return isinstance(batch, Mapping) and "labels" in batch


#: class-name endings of Hugging Face causal language models (``LlamaForCausalLM``, ``GPT2LMHeadModel``)
CAUSAL_LM_CLASSES = ("ForCausalLM", "LMHeadModel")


def default_loss_for(model: nn.Module) -> LossFn:
    """The loss :func:`pyobc.score` uses when none is given: :func:`pyobc.losses.causal_lm` (next-token
    cross-entropy, the labels being the inputs shifted; batches of token ids or ``{"input_ids",
    "attention_mask"}`` dicts) for Hugging Face causal language models, else :func:`default_loss`.

    Example:
        >>> import torch.nn as nn
        >>> default_loss_for(nn.Linear(2, 2)).__name__
        'default_loss'
    """
    if type(model).__name__.endswith(CAUSAL_LM_CLASSES):
        return causal_lm
    return default_loss


@dataclasses.dataclass
class Batch:
    """One batch as the loader yielded it (moved to the scoring device) and its sample count."""

    data: Any
    size: int
    index: int

    def split(self, size: int) -> list["Batch"]:
        """Micro-batches of at most ``size`` samples: every tensor whose leading dim is the batch size
        is sliced along it; everything else is shared."""
        if size >= self.size:
            return [self]

        def part(start: int, stop: int) -> Any:
            return map_tensors(lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == self.size else t,
                               self.data)

        return [Batch(part(i, min(i + size, self.size)), min(i + size, self.size) - i, self.index)
                for i in range(0, self.size, size)]


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class Context:
    """What a criterion sees: the model, its groups and layout, and helpers to run batches.

    ``params`` are detached leaves that share storage with the model's parameters and require grad,
    substituted with ``torch.func.functional_call``: gradients flow to them, never to the model's
    own parameters or their ``.grad``.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group], loss_fn: LossFn, device: torch.device,
                 granularity: str, called: set[str] | None = None, progress: bool = False,
                 channel_axes: ChannelAxes | None = None):
        self.model = model
        self.groups = list(groups)
        self.loss_fn = loss_fn
        self.device = device
        self.granularity = granularity
        self.progress = progress  # criteria with long inner loops may show their own bar
        #: the output channel axes measured for layers with their own ``forward`` (see
        #: :func:`pyobc.scoring.per_sample.probe_channel_axes`); the others follow their class
        self.channel_axes: ChannelAxes = dict(channel_axes or {})
        self.params: dict[str, torch.Tensor] = {
            n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
        self.layout = Layout(self.groups, self.params)
        self.modules = dict(model.named_modules())
        #: modules whose forward runs (hooks on the others would never fire); None = unknown, assume all
        self.called = set(self.modules) if called is None else set(called)
        #: the layout of gated activations, built on first use by :func:`pyobc.scoring.gates.gate_layout`
        self.gate_layout: Layout | None = None
        #: which unit-gate sites must copy (learned on the first gated pass)
        self.unit_gate_sites = UnitGateSites()
        #: per eps scope, what :class:`pyobc.scoring.gates.GatedModel` scales and how (fixed for a run)
        self.gate_eps: dict = {}
        self._loss_module = _LossModule(model, loss_fn)
        self._protect: set[str] = set()
        self._separable_checked = False

    # -- parameters ----------------------------------------------------------------------------------
    @property
    def theta(self) -> dict[str, torch.Tensor]:
        """Parameter values (no grad) by qualified name."""
        return {n: p.detach() for n, p in self.params.items()}

    def member_params(self) -> list[str]:
        """Every parameter some group touches, in layout order."""
        return self.layout.params

    # -- micro-batches -------------------------------------------------------------------------------
    def micro_batches(self, batch: Batch, size: int | None) -> list[tuple[Batch, float]]:
        """``batch`` as micro-batches of at most ``size`` samples with their weights ``n_i / N``.

        Criteria that differentiate twice use this to bound memory: for a loss that is the mean of
        per-sample terms (and a model in eval mode, where samples do not interact), every quantity they
        accumulate is the weighted sum over micro-batches. That assumption is checked once, on the
        first split batch, by comparing the loss with the weighted sum of the micro-batch losses.
        """
        if size is None or size >= batch.size:
            return [(batch, 1.0)]
        parts = batch.split(size)
        if not self._separable_checked:
            with torch.no_grad():
                whole = self.loss(batch).double()
                pieced = sum(self.loss(p).double() * (p.size / batch.size) for p in parts)
            tol = 1e-5 * max(1.0, abs(float(whole)))
            if abs(float(whole) - float(pieced)) > tol:
                raise ValueError(
                    f"micro-batching needs a loss that is the mean of per-sample terms, but the loss of "
                    f"batch {batch.index} ({float(whole):.6g}) differs from the size-weighted mean of its "
                    f"micro-batch losses ({float(pieced):.6g}); pass micro_batch=None")
            self._separable_checked = True
        return [(p, p.size / batch.size) for p in parts]

    # -- running the model ---------------------------------------------------------------------------
    def loss(self, batch: Batch, params: Mapping[str, torch.Tensor] | None = None,
             outputs: list | None = None) -> torch.Tensor:
        """The batch loss with ``params`` (default: :attr:`params`) substituted into the model.

        With ``outputs`` given, the model's outputs of this call are appended to it (for criteria that
        linearise the loss around the logits).
        """
        params = self.params if params is None else params
        handle = None
        if outputs is not None:
            handle = self.model.register_forward_hook(lambda m, a, out: outputs.append(out))
        try:
            loss = torch.func.functional_call(
                self._loss_module, {f"model.{k}": v for k, v in params.items()}, (batch.data,), strict=False)
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        loss = loss.reshape(())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"the loss of batch {batch.index} is {loss.item()}: scores would be meaningless; "
                "check the data and the model (a diverged model or unnormalised inputs)")
        return loss

    def capture_forward(self, batch: Batch, modules: Mapping[str, nn.Module],
                        params: Mapping[str, torch.Tensor] | None = None,
                        outputs: list | None = None,
                        on_output: Callable[[str, int, torch.Tensor], Any] | None = None,
                        ) -> tuple[torch.Tensor, Capture]:
        """Run :meth:`loss` while recording the calls of ``modules`` (see :class:`Capture`, also for
        ``on_output``).

        If a later in-place op overwrote a record, the batch is run again with those modules' tensors
        cloned, and they stay protected for the following batches.
        """
        for _ in range(2):
            cap = Capture(modules, protect=self._protect & set(modules), on_output=on_output)
            out_list: list = [] if outputs is not None else None
            with cap:
                loss = self.loss(batch, params, out_list)
            try:
                cap.check_intact()
            except ModifiedInPlace as e:
                if e.names <= self._protect:
                    raise RuntimeError(f"activations of {sorted(e.names)} change in place in a way pyobc "
                                       "cannot protect against") from None
                self._protect |= e.names
                continue
            if outputs is not None:
                outputs.extend(out_list)
            return loss, cap
        raise AssertionError("unreachable")
