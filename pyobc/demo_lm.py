"""``pyobc demo --lm``: structured pruning of a trained language model, with the LLM pruning baselines.

Takes the tiny Llama trained offline on pyobc's text corpus (:func:`pyobc.models.trained_lm`: grouped-query
attention, SwiGLU MLP; trained once, then cached), scores its whole KV heads (``heads="kv"``: one KV head with
the query heads that share it) and MLP neurons with every criterion on a few calibration batches of the train
split, removes 20%, 30% and 50% of *all* its parameters (:func:`pyobc.prune` with ``target="params"``; the
token embedding, ``lm_head`` and norms are not prunable, so the table also gives the removal as a share of the
prunable attention and MLP weights) and measures the held-out perplexity on the test split (non-overlapping
windows, :func:`pyobc.metrics.perplexity`): right after pruning (no fine-tuning), after the same pruning with
layer-wise least-squares reconstruction (``reconstruct=`` the calibration batches) and, for magnitude
(uniform) and the best other criterion at each ratio, after a short recovery (AdamW steps on the train split).

The baselines are rows of the same table: Torch-Pruning's LLM recipe is ``magnitude`` (p=2) with the same
fraction cut from every group (``scope="local"``; a second row keeps the attention whole, because a layer with
2 KV heads can only lose 0 or 50% of them and the uniform cut then overshoots the asked ratio), LLM-Pruner's
first-order element-wise importance is ``taylor`` with ``form="elementwise"``. "Best" is chosen on a validation slice at the end of the train split
(held out of calibration and recovery, though the model was trained on it), never on the test split.

Example:
    >>> from pyobc.demo_lm import run_lm_demo
    >>> rows = run_lm_demo(quick=True)          # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import torch
from torch import nn

import pyobc

from . import datasets, losses, metrics, models
from .attention_heads import head_layouts

__all__ = [
    "LM_CRITERIA",
    "LMCriterion",
    "LMDemoSettings",
    "LMJob",
    "LMRow",
    "best_row",
    "format_lm_table",
    "lm_rows",
    "prunable_params",
    "run_lm_demo",
    "select_criteria",
]


@dataclasses.dataclass(frozen=True)
class LMCriterion:
    """One row kind of the table: a label, a :func:`pyobc.score` method with options, a pruning scope."""

    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    scope: str = "global"
    keep_heads: bool = False  #: leave every attention module whole (only MLP neurons are cut)


#: The rows of ``pyobc demo --lm``, in table order.
LM_CRITERIA: tuple[LMCriterion, ...] = (
    LMCriterion("magnitude (uniform) [TP]", "magnitude", scope="local"),
    LMCriterion("magnitude (uniform MLP) [TP]", "magnitude", scope="local", keep_heads=True),
    LMCriterion("magnitude (global)", "magnitude"),
    LMCriterion("taylor elementwise [LLM-Pruner]", "taylor", (("form", "elementwise"),)),
    LMCriterion("taylor", "taylor"),
    LMCriterion("jacobian", "jacobian"),
    LMCriterion("obd", "obd"),
    LMCriterion("oba", "oba"),
    LMCriterion("sosp-h", "sosp-h"),
)
_BASELINE = LM_CRITERIA[0].label  # always recovered: the reference the best criterion is compared with


@dataclasses.dataclass(frozen=True)
class LMDemoSettings:
    """Sizes of a ``pyobc demo --lm`` run; :meth:`quick` and :meth:`full` are the presets.

    Example:
        >>> LMDemoSettings.full().ratios, LMDemoSettings.quick().ratios
        ((0.2, 0.3, 0.5), (0.2,))
    """

    ratios: tuple[float, ...] = (0.2, 0.3, 0.5)  #: fractions of all parameters to remove
    batches: int = 8  #: calibration batches
    batch_size: int = 8  #: windows per calibration and recovery batch
    seq_len: int = 128  #: tokens per window (calibration, recovery, perplexity)
    heads: str = "kv"
    reconstruct: bool = True
    recovery_steps: int = 100  #: AdamW steps after pruning (0: no recovery column)
    recovery_lr: float = 3e-4  #: the end-of-training learning rate of the model's recipe
    validation_tokens: int = 16384  #: the end of the train split, to choose the best criterion on
    threads: int | None = 1  #: torch intra-op threads for the run (None: leave torch's setting)

    @classmethod
    def quick(cls) -> LMDemoSettings:
        """20% only, 4 calibration batches, 30 recovery steps (``pyobc demo --lm --quick``).

        Example:
            >>> LMDemoSettings.quick().batches
            4
        """
        return cls(ratios=(0.2,), batches=4, recovery_steps=30)

    @classmethod
    def full(cls) -> LMDemoSettings:
        """20/30/50%, 8 calibration batches of 8x128 tokens, 100 recovery steps (``pyobc demo --lm``).

        Example:
            >>> LMDemoSettings.full().recovery_steps
            100
        """
        return cls()


@dataclasses.dataclass
class LMRow:
    """One line of the table: a criterion at one ratio."""

    criterion: str
    method: str
    scope: str
    ratio: float  #: asked: fraction of all parameters
    params_after: int
    removed_all: float  #: measured fraction of all parameters removed
    removed_prunable: float  #: the same removal as a fraction of the prunable parameters
    seconds: float | None  #: scoring wall time (shared by the rows of one method and its options)
    per_batch_ratio: float | None  #: scoring time per batch / one forward+backward of a batch
    validation_ppl: float
    ppl: float  #: held-out perplexity after pruning, no fine-tuning
    reconstructed_ppl: float | None = None
    recovered_ppl: float | None = None

    def to_dict(self) -> dict:
        """The row as a plain dict (for JSON).

        Example:
            >>> LMRow("taylor", "taylor", "global", 0.2, 10, 0.2, 0.25, 1.0, 2.0, 4.0, 4.1).to_dict()["ppl"]
            4.1
        """
        return dataclasses.asdict(self)


def prunable_params(groups: Sequence[Any], model: nn.Module) -> int:
    """Number of parameters that belong to some channel group (what pruning can shrink).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> prunable_params(pyobc.build_groups(net, torch.randn(2, 2)), net)   # all but the last bias
        12
    """
    names = {s.param for g in groups for m in g.members for s in m.slices}
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"a token stream of {tokens.numel()} tokens has no window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def _draw(windows: torch.Tensor, count: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch_size`` windows in a seeded random order (cycling when too few)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=g)
    idx = order[torch.arange(count * batch_size) % order.numel()]
    return list(windows[idx].split(batch_size))


def _lm_loss(output: Any, ids: torch.Tensor) -> torch.Tensor:
    return losses.next_token_loss(losses.logits(output), ids)


def _fwd_bwd_seconds(model: nn.Module, batch: torch.Tensor, repeats: int = 3) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.autograd.grad(losses.causal_lm(model, batch), params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first run pays for allocations


@dataclasses.dataclass
class LMJob:
    """What every row is measured on: the model, the calibration, validation, test and recovery data."""

    model: nn.Module
    calibration: list[torch.Tensor]  #: (batch_size, seq_len) token batches from the train split
    validation: torch.Tensor  #: token stream: the end of the train split
    test: torch.Tensor  #: token stream: the test split
    recovery: list[torch.Tensor]
    settings: LMDemoSettings
    out: TextIO = sys.stdout
    progress: bool | None = None
    prunable: int = 0
    fwd_bwd: float = 0.0
    scores: dict = dataclasses.field(default_factory=dict)
    reconstruct_error: str | None = None

    @classmethod
    def build(cls, model: nn.Module, train_tokens: torch.Tensor, test_tokens: torch.Tensor, st: LMDemoSettings,
              out: TextIO = sys.stdout, progress: bool | None = None) -> LMJob:
        """Split ``train_tokens`` into calibration/recovery windows and the validation slice at its end.

        Example:
            >>> m = pyobc.models.tiny_llama(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            ...                             num_attention_heads=4, num_key_value_heads=2, head_dim=4)
            >>> st = LMDemoSettings(batches=2, batch_size=2, seq_len=8, validation_tokens=64, recovery_steps=3)
            >>> job = LMJob.build(m, torch.randint(0, 259, (400,)), torch.randint(0, 259, (64,)), st)
            >>> len(job.calibration), tuple(job.calibration[0].shape), job.validation.numel(), len(job.recovery)
            (2, (2, 8), 64, 3)
        """
        cut = train_tokens.numel() - st.validation_tokens
        if cut < st.seq_len:
            raise ValueError(f"the train stream ({train_tokens.numel()} tokens) is too short for a validation "
                             f"slice of {st.validation_tokens} tokens and one window of {st.seq_len}")
        pool = _windows(train_tokens[:cut], st.seq_len)
        cal = _draw(pool, st.batches, st.batch_size, seed=0)
        job = cls(model, cal, train_tokens[cut:], test_tokens, _draw(pool, st.recovery_steps, st.batch_size, seed=1),
                  st, out, progress)
        job.prunable = prunable_params(pyobc.build_groups(model, cal[0][:2], heads=st.heads), model)
        job.fwd_bwd = _fwd_bwd_seconds(model, cal[0])
        return job

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def ppl(self, model: nn.Module, tokens: torch.Tensor | None = None) -> float:
        """Perplexity on ``tokens`` (default: the test split) in windows of ``seq_len``."""
        tokens = self.test if tokens is None else tokens
        return float(metrics.perplexity(model, tokens, seq_len=self.settings.seq_len, batch_size=32))

    def score(self, crit: LMCriterion) -> tuple[pyobc.Scores, float]:
        """The criterion's scores and scoring seconds (computed once per method and options)."""
        key = (crit.method, crit.options)
        if key not in self.scores:
            t0 = time.perf_counter()
            scores = pyobc.score(self.model, self.calibration, crit.method, loss_fn=losses.causal_lm,
                                 heads=self.settings.heads, progress=self.progress, **dict(crit.options))
            self.scores[key] = (scores, time.perf_counter() - t0)
        return self.scores[key]

    def reconstructed_ppl(self, scores: pyobc.Scores, ratio: float, scope: str,
                          ignored: Sequence[str] = ()) -> float | None:
        """Test perplexity of the same pruning with least-squares reconstruction on the calibration batches
        (None when not asked for, or when it fails: the reason is kept in ``reconstruct_error``)."""
        if not self.settings.reconstruct or self.reconstruct_error is not None:
            return None
        try:
            rebuilt, _ = pyobc.prune(self.model, scores, ratio, scope=scope, target="params", ignored_layers=ignored,
                                     reconstruct=self.calibration, reconstruct_batches=len(self.calibration),
                                     reconstruct_loss_fn=losses.causal_lm, progress=self.progress)
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # reported once, under the table
            self.reconstruct_error = f"{type(exc).__name__}: {exc}"
            return None
        return self.ppl(rebuilt)

    def recover(self, model: nn.Module) -> float | None:
        """Train ``model`` in place for ``recovery_steps`` AdamW steps; its test perplexity afterwards."""
        st = self.settings
        if st.recovery_steps <= 0:
            return None
        models.train(model, [(b, b) for b in self.recovery], epochs=1, lr=st.recovery_lr, weight_decay=0.0,
                     optimizer="adamw", betas=(0.9, 0.95), warmup=0.1, min_lr_ratio=0.1, loss_fn=_lm_loss,
                     max_grad_norm=1.0, progress=self.progress)
        return self.ppl(model)


def _row(job: LMJob, crit: LMCriterion, ratio: float) -> tuple[LMRow, nn.Module]:
    """Score (cached), prune, measure: one row without recovery, and the pruned model."""
    scores, seconds = job.score(crit)
    ignored = [h.q for h in head_layouts(job.model)] if crit.keep_heads else []
    pruned, report = pyobc.prune(job.model, scores, ratio, scope=crit.scope, target="params", ignored_layers=ignored)
    removed = report.params_before - report.params_after
    per_batch = seconds / scores.batches / job.fwd_bwd if scores.batches else None
    row = LMRow(crit.label, crit.method, crit.scope, ratio, report.params_after, removed / report.params_before,
                removed / job.prunable, seconds, per_batch, job.ppl(pruned, job.validation), job.ppl(pruned),
                job.reconstructed_ppl(scores, ratio, crit.scope, ignored))
    job.say(f"  {ratio:.0%} {crit.label}: removed {row.removed_all:.1%} of all params "
            f"({row.removed_prunable:.1%} of prunable); perplexity {row.ppl:.3f} pruned"
            + (f", {row.reconstructed_ppl:.3f} reconstructed" if row.reconstructed_ppl is not None else ""))
    return row, pruned


def best_row(rows: Sequence[LMRow]) -> LMRow | None:
    """The row with the lowest validation perplexity other than the uniform-magnitude baseline.

    Example:
        >>> a = LMRow("taylor", "taylor", "global", 0.2, 1, 0.2, 0.2, 1.0, 1.0, 5.0, 5.5)
        >>> b = LMRow("oba", "oba", "global", 0.2, 1, 0.2, 0.2, 1.0, 1.0, 4.0, 6.0)
        >>> best_row([a, b]).criterion
        'oba'
    """
    candidates = [r for r in rows if r.criterion != _BASELINE]
    return min(candidates, key=lambda r: r.validation_ppl) if candidates else None


def lm_rows(job: LMJob, criteria: Sequence[LMCriterion] = LM_CRITERIA) -> list[LMRow]:
    """Every criterion at every ratio of the settings; recovery for the baseline and the best other row.

    Example:
        >>> # rows = lm_rows(LMJob.build(model, train_tokens, test_tokens, LMDemoSettings.quick()))
    """
    rows: list[LMRow] = []
    for ratio in job.settings.ratios:
        batch = [_row(job, crit, ratio) for crit in criteria]
        best = best_row([r for r, _ in batch])
        for row, pruned in batch:
            if row.criterion == _BASELINE or row is best:
                row.recovered_ppl = job.recover(pruned)
                if row.recovered_ppl is not None:
                    job.say(f"  {ratio:.0%} {row.criterion}: perplexity {row.recovered_ppl:.3f} after "
                            f"{job.settings.recovery_steps} recovery steps")
        rows += [r for r, _ in batch]
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_lm_table(rows: Sequence[LMRow], params_before: int, validation_ppl: float, test_ppl: float) -> str:
    """The table as text: an ``(unpruned)`` line, then the rows of each ratio.

    Example:
        >>> row = LMRow("taylor", "taylor", "global", 0.2, 800, 0.2, 0.25, 1.5, 3.0, 4.2, 4.5, 4.4, 4.0)
        >>> lines = format_lm_table([row], 1000, 3.5, 3.9).splitlines()
        >>> lines[2].split()[-2:], lines[-1].split()[-9:]
        (['3.500', '3.900'], ['800', '20.0%', '25.0%', '1.50', '3.00', '4.200', '4.500', '4.400', '4.000'])
    """
    head = (f"{'criterion':<32}{'scope':>7}{'asked':>7}{'params':>9}{'removed':>9}{'of prun.':>9}"
            f"{'score s':>9}{'x f+b':>7}{'val ppl':>9}{'ppl':>9}{'ppl rec':>9}{'ppl recov':>10}")
    lines = [head, "-" * len(head)]
    lines.append(f"{'(unpruned)':<32}{'':>7}{'':>7}{params_before:>9}{'':>9}{'':>9}{'':>9}{'':>7}"
                 f"{validation_ppl:>9.3f}{test_ppl:>9.3f}{'':>9}{'':>10}")
    ratio = None
    for r in rows:
        if r.ratio != ratio and ratio is not None:
            lines.append("")
        ratio = r.ratio
        lines.append(f"{r.criterion:<32}{r.scope:>7}{r.ratio:>7.0%}{r.params_after:>9}{r.removed_all:>9.1%}"
                     f"{r.removed_prunable:>9.1%}{_num(r.seconds, '.2f'):>9}{_num(r.per_batch_ratio, '.2f'):>7}"
                     f"{r.validation_ppl:>9.3f}{r.ppl:>9.3f}{_num(r.reconstructed_ppl, '.3f'):>9}"
                     f"{_num(r.recovered_ppl, '.3f'):>10}")
    return "\n".join(lines)


def select_criteria(methods: Sequence[str] | None) -> tuple[LMCriterion, ...]:
    """The rows whose method is in ``methods`` (both magnitude rows for ``magnitude``, both Taylor rows for
    ``taylor``); all of :data:`LM_CRITERIA` for None.

    Example:
        >>> [c.label for c in select_criteria(["taylor"])]
        ['taylor elementwise [LLM-Pruner]', 'taylor']
    """
    if not methods:
        return LM_CRITERIA
    from .criteria import get_method

    names = {get_method(m).name for m in methods}
    chosen = tuple(c for c in LM_CRITERIA if c.method in names)
    if not chosen:
        raise ValueError(f"none of {list(methods)} is a criterion of the language-model demo; its criteria are "
                         f"{sorted({c.method for c in LM_CRITERIA})}")
    return chosen


def run_lm_demo(methods: Sequence[str] | None = None, *, ratio: float | None = None, quick: bool = False,
                batches: int | None = None, threads: int | None = None, reconstruct: bool | None = None,
                settings: LMDemoSettings | None = None, model: nn.Module | None = None,
                train_tokens: torch.Tensor | None = None, test_tokens: torch.Tensor | None = None,
                out: TextIO = sys.stdout, progress: bool | None = None) -> list[LMRow]:
    """Run the language-model demo and print its table to ``out``; returns the rows.

    Args:
        methods: criteria to run (rows of :data:`LM_CRITERIA` whose method is named; default all).
        ratio: one fraction of all parameters to remove instead of the preset's 20/30/50%.
        quick: the small preset (:meth:`LMDemoSettings.quick`).
        batches, threads, reconstruct: override the preset's values (``threads`` restored afterwards).
        model, train_tokens, test_tokens: another causal LM and token streams than the trained tiny Llama
            and pyobc's text corpus (for tests and experiments).

    Example:
        >>> rows = run_lm_demo(["jacobian"], quick=True)        # doctest: +SKIP
    """
    st = settings or (LMDemoSettings.quick() if quick else LMDemoSettings.full())
    overrides = {"ratios": None if ratio is None else (ratio,), "batches": batches, "threads": threads,
                 "reconstruct": reconstruct}
    st = dataclasses.replace(st, **{k: v for k, v in overrides.items() if v is not None})
    criteria = select_criteria(methods)
    before = torch.get_num_threads()
    if st.threads is not None:
        torch.set_num_threads(st.threads)
    try:
        if model is None:
            model = models.trained_lm("tiny-llama", progress=progress)
        train_tokens = datasets.text_tokens("train") if train_tokens is None else train_tokens
        test_tokens = datasets.text_tokens("test") if test_tokens is None else test_tokens
        job = LMJob.build(model.eval(), train_tokens, test_tokens, st, out, progress)
        _header(job, quick)
        val, test = job.ppl(model, job.validation), job.ppl(model)
        rows = lm_rows(job, criteria)
        job.say("")
        job.say(format_lm_table(rows, sum(p.numel() for p in model.parameters()), val, test))
        _footer(job)
        return rows
    finally:
        torch.set_num_threads(before)


def _header(job: LMJob, quick: bool) -> None:
    st, model = job.settings, job.model
    total = sum(p.numel() for p in model.parameters())
    info = getattr(model, "trained_info", None)
    name = f"{info.name} ({'cached' if info.from_cache else 'trained now'})" if info is not None else "a causal LM"
    job.say(f"pyobc {pyobc.__version__} demo --lm{' (quick)' if quick else ''}: {name}, {total} parameters, "
            f"{job.prunable} ({job.prunable / total:.1%}) prunable (attention heads and MLP neurons; the token "
            f"embedding, lm_head and norms are not)")
    job.say(f"removing {', '.join(f'{r:.0%}' for r in st.ratios)} of ALL parameters (pyobc.prune target='params'); "
            f"heads={st.heads!r}; calibration: {st.batches} batches of {st.batch_size}x{st.seq_len} tokens "
            f"({st.batches * st.batch_size * st.seq_len} tokens) of the train split; perplexity: test split, "
            f"{job.test.numel()} tokens in non-overlapping windows of seq_len {st.seq_len}, no fine-tuning")


def _footer(job: LMJob) -> None:
    st = job.settings
    recovery = (f"ppl recov: after {st.recovery_steps} AdamW steps (lr {st.recovery_lr:g}, batches of "
                f"{st.batch_size}x{st.seq_len} train tokens, lr warm-up then cosine), only for {_BASELINE} and the row "
                f"with the lowest val ppl at each ratio (to keep the demo short)" if st.recovery_steps > 0 else "no recovery")
    job.say(f"\nparams: all parameters after pruning; removed: measured share of all parameters, of prun.: the "
            f"same removal as a share of the {job.prunable} prunable ones. score s: pyobc.score wall time "
            f"(tracing included); x f+b: per batch, over one forward+backward of a batch ({job.fwd_bwd * 1e3:.1f} ms). "
            f"val ppl: the last {st.validation_tokens} tokens of the train split (seen in training, held out of "
            f"calibration and recovery; used to pick the best row, never the test split). ppl: test perplexity "
            f"after pruning, no fine-tuning. ppl rec: the same pruning with reconstruct= the calibration batches "
            f"(layers that lost inputs refit by least squares). {recovery}. [TP]: Torch-Pruning's LLM recipe "
            f"(magnitude p=2, the same fraction of every group: with few KV heads per layer the attention groups "
            f"can only lose whole heads, so the uniform cut can overshoot the asked ratio; 'uniform MLP' keeps "
            f"the attention whole and cuts the same fraction of every MLP); [LLM-Pruner]: its first-order "
            f"element-wise Taylor importance (ranked globally here).")
    if job.reconstruct_error is not None:
        job.say(f"reconstruction failed on this model ({job.reconstruct_error}); ppl rec is left empty")
