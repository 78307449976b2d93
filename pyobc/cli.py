"""The ``pyobc`` command line (reference with examples: ``docs/cli.md``).

Examples:
    pyobc demo --quick                                   # the built-in default job, in under a minute
    pyobc score --model resnet20 --method oba --output scores.pt
    pyobc prune --model mypkg.nets:build --data mypkg.data:loader --ratio 0.5 --output pruned.pt
    pyobc compare --model resnet20 --methods magnitude jacobian oba --ratios 0.2 0.4 0.6 --output-dir out
    pyobc info                                           # versions, op backends, available criteria
    pyobc bench --quick                                  # compiled ops against their reference kernels

User mistakes (a bad entry point, a missing file, an unknown method, a ratio out of range) end with one line
``pyobc: error: ...`` on stderr and exit status 2; ``PYOBC_TRACEBACK=1`` shows the traceback behind it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import pyobc  # cheap: the package imports its submodules on first use

# torch and the pyobc modules that import it are imported inside the functions that need them, so that
# `pyobc --help` and mistakes in the arguments answer at once instead of after seconds of importing torch.
# None of these imports dodges a cycle: the command line is the top layer and may import anything.

__all__ = ["main", "build_parser", "UserError"]


class UserError(Exception):
    """A mistake on the command line: printed as one line, exit status 2, no traceback."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _user_errors(what: str) -> Iterator[None]:
    """Turn the errors pyobc documents for bad input (ValueError, TypeError, NotImplementedError) raised while
    doing ``what`` into :class:`UserError`; anything else is a bug and keeps its traceback."""
    from .entrypoints import EntryPointError

    try:
        yield
    except UserError:
        raise
    except EntryPointError as exc:
        raise UserError(str(exc)) from exc
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(f"{what}: {_one_line(exc)}") from exc


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``pyobc: error: ...``) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pyobc: error: {message} (see '{self.prog} --help')\n")


# -- argument types: their ArgumentTypeError messages end up in _Parser.error ----------------------------------

def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1) (the fraction removed), got {text}")
    return value


def _damping(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"damping must be a number >= 0, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"damping must be >= 0, got {text}")
    return value


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum`` (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive")
_count = _int_at_least(0, "non-negative")


def _max_batches(text: str) -> int | None:
    return None if text.lower() == "all" else _positive_int(text)


def _option(text: str) -> tuple[str, Any]:
    key, eq, raw = text.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"criterion options are KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)  # numbers, booleans, None, strings in quotes...
    except (ValueError, SyntaxError):
        value = raw  # ...and bare words as strings (hessian=full)
    return key, value


def _format(text: str) -> str:
    if text not in ("csv", "md"):
        raise argparse.ArgumentTypeError(f"format must be csv or md, got {text!r}")
    return text


# -- shared helpers ----------------------------------------------------------------------------------------

def _check_method(name: str) -> str:
    from .criteria import get_method

    try:
        get_method(name)
    except (ValueError, TypeError) as exc:
        raise UserError(_one_line(exc)) from None
    return name


def _device(text: str | None):
    import torch

    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: not a device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text}: CUDA is not available in this torch ({torch.__version__})")
    return device


def _writable(path: str | None, option: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if not p.parent.exists():
        raise UserError(f"{option} {path}: the folder {str(p.parent)!r} does not exist")
    return p


@dataclasses.dataclass
class _Inputs:
    """What score/prune/compare work on."""

    model: Any
    loader: Any
    loss_fn: Any
    example_inputs: Any
    label: str  # for messages and plot titles
    fresh: str  # how to build a fresh model for pyobc.load
    zoo: bool
    image_size: int


def _load_inputs(args: argparse.Namespace) -> _Inputs:
    import torch

    from . import datasets, models
    from .entrypoints import EntryPointError, example_inputs_of, first_batch, loader_from, loss_from, model_from

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model
    zoo = ":" not in spec
    if zoo and spec not in models.names():
        raise UserError(f"--model {spec!r}: not a zoo model ({', '.join(models.names())}) and not an entry point "
                        "MODULE:FUNCTION or FILE.py:FUNCTION")
    if not zoo and args.data is None:
        raise UserError(f"--model {spec} needs --data MODULE:FUNCTION (a loader of (inputs, targets) batches)")
    try:
        loss_fn = loss_from(args.loss) if args.loss else None
        loader = loader_from(args.data) if args.data else None
        if zoo:
            model = models.trained(spec, image_size=args.image_size, channels=1, epochs=args.train_epochs,
                                   progress=args.progress)
            if loader is None:
                loader = datasets.digits("train", batch_size=args.batch_size, image_size=args.image_size, channels=1,
                                         shuffle=False)
            fresh = f"pyobc.models.get({spec!r}, in_channels=1, input_size={args.image_size})"
        else:
            model = model_from(spec)
            fresh = f"{spec.rpartition(':')[2]}()"
        example = example_inputs_of(first_batch(loader))
    except EntryPointError as exc:
        raise UserError(str(exc)) from exc
    return _Inputs(model, loader, loss_fn, example, spec, fresh, zoo, args.image_size)


def _score(inputs: _Inputs, method: str, args: argparse.Namespace):
    with _user_errors(f"scoring with {method!r}"):
        return pyobc.score(inputs.model, inputs.loader, method, loss_fn=inputs.loss_fn, max_batches=args.max_batches,
                           device=_device(args.device), progress=args.progress, ignored_layers=args.ignore or (),
                           **dict(args.option or []))


def _scores_json(scores, output: Path | None) -> dict:
    layers = [{"root": g.root, "channels": g.size, "mean": float(v.float().mean()) if v.numel() else None,
               "min": float(v.min()) if v.numel() else None, "max": float(v.max()) if v.numel() else None}
              for g, v in zip(scores.groups, scores.values)]
    return {"method": scores.method, "groups": len(scores.groups), "channels": scores.num_channels,
            "batches": scores.batches, "samples": scores.samples, "seconds": scores.seconds,
            "output": None if output is None else str(output), "layers": layers,
            "scores": {g.root: [float(x) for x in v.tolist()] for g, v in zip(scores.groups, scores.values)}}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- commands ------------------------------------------------------------------------------------------------

def _demo_lm(args: argparse.Namespace, methods: list[str] | None, out: Any) -> list:
    from .demo_lm import run_lm_demo, select_criteria

    try:
        select_criteria(methods)
    except ValueError as exc:
        raise UserError(_one_line(exc)) from None
    try:
        return run_lm_demo(methods, ratio=args.ratio, quick=args.quick, batches=args.batches, threads=args.threads,
                           reconstruct=args.reconstruct, progress=args.progress, out=out)
    except ImportError as exc:  # transformers missing or broken: say so in one line
        raise UserError(_one_line(exc)) from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    methods = [_check_method(m) for m in args.methods] if args.methods else None
    out = sys.stderr if args.json else sys.stdout
    t0 = time.perf_counter()
    ratio = 0.5 if args.ratio is None and not args.lm else args.ratio
    if args.lm:
        rows = _demo_lm(args, methods, out)
    else:
        rows = run_demo(methods, ratio=ratio, batches=args.batches, quick=args.quick,
                        finetune_epochs=args.finetune_epochs, equivalent=args.equivalent, threads=args.threads,
                        progress=args.progress, out=out, reconstruct=args.reconstruct)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"lm": args.lm, "quick": args.quick, "ratio": ratio, "seconds": seconds,
                     "rows": [r.to_dict() for r in rows]})
    else:
        print(f"\n(demo took {seconds:.1f} s)")
    return 0


def _score_cmd(args: argparse.Namespace) -> int:
    method = _check_method(args.method)
    output = _writable(args.output, "--output")
    inputs = _load_inputs(args)
    scores = _score(inputs, method, args)
    if output is not None:
        scores.save(output)
    if args.json:
        _print_json(_scores_json(scores, output))
    else:
        print(repr(scores))
        print(f"scored in {scores.seconds or 0.0:.2f} s")
        print(f"saved to {output} (pyobc.Scores.load, or torch.load(weights_only=True))" if output else
              "not saved (pass --output FILE)")
    return 0


def _load_scores(path: str):
    from .scoring.scores import Scores

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--scores {path}: no such file")
    try:
        return Scores.load(p)
    except ValueError as exc:
        raise UserError(f"--scores {path}: {_one_line(exc)}") from exc
    except Exception as exc:  # torch.load on a corrupt or foreign file raises many types
        raise UserError(f"--scores {path}: not a readable pyobc scores file ({type(exc).__name__})") from exc


def _prune_cmd(args: argparse.Namespace) -> int:
    from .compare import default_scope

    output = _writable(args.output, "--output")
    if args.scores:
        scores = _load_scores(args.scores)
        if args.method and args.method != scores.method:
            raise UserError(f"--method {args.method} but --scores {args.scores} holds {scores.method!r} scores")
        method = scores.method
    else:
        scores = None
        method = _check_method(args.method or "jacobian")
    inputs = _load_inputs(args)
    if scores is None:
        scores = _score(inputs, method, args)
    scope = args.scope or default_scope(scores.method)
    with _user_errors("pruning"):
        pruned, report = pyobc.prune(inputs.model, scores, args.ratio, scope=scope, target=args.target,
                                     ignored_layers=args.ignore or (), round_to=args.round_to,
                                     example_inputs=inputs.example_inputs,
                                     reconstruct=inputs.loader if args.reconstruct else None,
                                     reconstruct_batches=args.max_batches, damping=args.damping,
                                     reconstruct_loss_fn=inputs.loss_fn if args.reconstruct else None,
                                     selection=args.selection)
    if output is not None:
        pyobc.save(pruned, output)
    if args.json:
        _print_json(_report_json(report, output, inputs.fresh))
    else:
        print(report)
        if output is not None:
            print(f"\nsaved the pruned model to {output}; load it with pyobc.load({inputs.fresh}, {str(output)!r})")
        else:
            print("\nnot saved (pass --output FILE)")
    return 0


def _report_json(report, output: Path | None, load_with: str) -> dict:
    return {"method": report.method, "ratio": report.ratio, "scope": report.scope, "target": report.target,
            "params_before": report.params_before, "params_after": report.params_after,
            "macs_before": report.macs_before, "macs_after": report.macs_after,
            "channels_before": report.channels_before, "channels_after": report.channels_after,
            "layers": [dataclasses.asdict(w) for w in report.layers],
            "output": None if output is None else str(output), "load_with": load_with,
            "reconstruction": None if report.reconstruction is None else {
                "seconds": report.reconstruction.seconds, "passes": report.reconstruction.passes,
                "peak_bytes": report.reconstruction.peak_bytes,
                "layers": [dataclasses.asdict(f) for f in report.reconstruction.layers]}}


def _compare_cmd(args: argparse.Namespace) -> int:
    from . import compare

    methods = [_check_method(m) for m in args.methods]
    if args.profile_ratio is not None and args.profile_ratio not in args.ratios:
        args.ratios.append(args.profile_ratio)
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir {args.output_dir}: exists and is not a folder")
    inputs = _load_inputs(args)
    eval_loader = _eval_loader(args, inputs)
    log = sys.stderr if args.json else sys.stdout
    if eval_loader is inputs.loader:
        print("note: accuracy is measured on the --data loader (pass --eval-data for held-out data)", file=log)
    print(f"comparing {', '.join(methods)} on {inputs.label} at {', '.join(f'{r:g}' for r in args.ratios)} "
          "of MACs removed (no fine-tuning)", file=log, flush=True)
    with _user_errors("compare"):
        result = compare.run_compare(inputs.model, inputs.loader, eval_loader, methods, args.ratios,
                                     example_inputs=inputs.example_inputs, max_batches=args.max_batches,
                                     scope=args.scope, device=_device(args.device), loss_fn=inputs.loss_fn,
                                     profile_ratio=args.profile_ratio, progress=args.progress, log=log,
                                     method_options=dict(args.option or []), reconstruct=args.reconstruct,
                                     damping=args.damping)
    result.title = inputs.label
    files, plot_error = _write_compare_files(result, out_dir, args.format, args.plot)
    if args.json:
        _print_json(_compare_json(result, files))
    else:
        print()
        print(files[0].read_text() if args.format == "md" else _csv_as_text(files[0]))
        print("wrote " + ", ".join(map(str, files)))
    if plot_error:
        raise UserError(plot_error)
    return 0


def _eval_loader(args: argparse.Namespace, inputs: _Inputs):
    """The loader compare measures accuracy on: --eval-data, else the digits test split for a zoo model
    on its default data, else the --data loader itself."""
    from . import datasets
    from .entrypoints import EntryPointError, loader_from

    if args.eval_data:
        try:
            return loader_from(args.eval_data, "--eval-data")
        except EntryPointError as exc:
            raise UserError(str(exc)) from exc
    if inputs.zoo and args.data is None:
        return datasets.digits("test", batch_size=256, image_size=inputs.image_size, channels=1)
    return inputs.loader


def _write_compare_files(result, out_dir: Path, fmt: str, plot: bool) -> tuple[list[Path], str | None]:
    """Write the tables (and the plots when ``plot``) to ``out_dir``; returns the files written, the
    comparison table first, and why the plots could not be drawn (None if they were, or were not asked for)."""
    from . import compare

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"compare.{fmt}"
    layer_table = out_dir / f"layer_profile.{fmt}"
    compare.write_table(result, table, fmt)
    compare.write_layer_table(result, layer_table, fmt)
    files = [table, layer_table]
    if plot:
        try:
            compare.plot_accuracy(result, out_dir / "accuracy_vs_macs.png")
            compare.plot_layer_profile(result, out_dir / "layer_profile.png")
        except compare.PlotUnavailable as exc:
            return files, f"{exc}; or pass --no-plot. The tables were written to {out_dir}"
        files += [out_dir / "accuracy_vs_macs.png", out_dir / "layer_profile.png"]
    return files, None


def _compare_json(result, files: list[Path]) -> dict:
    return {"baseline_accuracy": result.baseline_accuracy, "params_before": result.params_before,
            "macs_before": result.macs_before, "profile_ratio": result.profile_ratio,
            "rows": [dataclasses.asdict(r) for r in result.rows],
            "layers": [{"root": layer, "channels": n, **{m: result.kept[m][i] for m in result.kept}}
                       for i, (layer, n) in enumerate(zip(result.layers, result.layer_sizes))],
            "files": [str(f) for f in files]}


def _csv_as_text(path: Path) -> str:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _info(args: argparse.Namespace) -> int:
    from .versions import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .microbench import extension_status, format_bench, run_bench

    device = _device(args.device) or "cpu"
    ok, why = extension_status(str(getattr(device, "type", device)))
    if not ok:
        if args.json:
            _print_json({"device": str(device), "compiled": False, "reason": why, "results": []})
        else:
            print(f"pyobc bench: nothing to compare: {why}")
        return 0
    results = run_bench(quick=args.quick, device=str(device), repeats=args.repeats, progress=args.progress,
                        only=args.only)
    if args.only and not results:
        raise UserError(f"--only {args.only!r} matches no benchmark case")
    if args.json:
        _print_json({"device": str(device), "compiled": True, "reason": why, "quick": args.quick,
                     "results": [r.to_dict() for r in results]})
    else:
        print(f"pyobc bench on {device} ({why}); medians of {args.repeats or (5 if args.quick else 15)} "
              "interleaved runs; ratio > 1: the compiled kernel is faster\n")
        print(format_bench(results))
    return 0


# -- the parser ----------------------------------------------------------------------------------------------

_FMT = argparse.RawDescriptionHelpFormatter


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: only when stderr is a terminal)")


def _model_args(p: argparse.ArgumentParser, *, method: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="SPEC",
                   help="a zoo name (e.g. resnet20: trained on the built-in digits, cached) or an entry point "
                        "MODULE:FUNCTION / FILE.py:FUNCTION returning an nn.Module")
    g.add_argument("--data", metavar="SPEC", help="entry point returning a loader of (inputs, targets) batches "
                                                  "(default for zoo models: the digits train split)")
    g.add_argument("--loss", metavar="SPEC", help="entry point naming loss_fn(model, batch) -> mean loss "
                                                  "(default: cross-entropy on (inputs, targets))")
    g.add_argument("--max-batches", type=_max_batches, default=8, metavar="N",
                   help="batches to score on, or 'all' (default: 8)")
    g.add_argument("--device", metavar="DEV", help="score on this device (cpu, cuda, cuda:1; default: the model's)")
    g.add_argument("--ignore", nargs="+", metavar="LAYER", help="layers whose width must not change")
    g.add_argument("-O", "--option", action="append", type=_option, metavar="KEY=VALUE",
                   help="criterion option, repeatable (e.g. -O hessian=full for oba)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's choice; 1 is often faster on a busy CPU)")
    z = p.add_argument_group("zoo models")
    z.add_argument("--image-size", type=int, choices=(8, 16, 32), default=16, help="digits image size (16)")
    z.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="digits batch size (64)")
    z.add_argument("--train-epochs", type=_positive_int, default=None, metavar="N",
                   help="training epochs when the model is not cached yet (default: the zoo recipe)")
    _progress_flag(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyobc`` argument parser (every command, its options and examples).

    Example:
        >>> build_parser().parse_args(["prune", "--model", "resnet20", "--ratio", "0.3"]).ratio
        0.3
    """
    parser = _Parser(
        prog="pyobc", description="Structured pruning with exact second-order criteria.",
        epilog="Examples:\n"
               "  pyobc demo --quick\n"
               "  pyobc score --model resnet20 --method oba --output scores.pt\n"
               "  pyobc prune --model mypkg.nets:build --data mypkg.data:loader --ratio 0.5 --output pruned.pt\n"
               "  pyobc compare --model resnet20 --methods magnitude jacobian oba --output-dir out\n"
               "  pyobc info --json\n"
               "  pyobc bench --quick\n\n"
               "Errors in the input end with one line 'pyobc: error: ...' and exit status 2 "
               "(PYOBC_TRACEBACK=1 shows the traceback).",
        formatter_class=_FMT)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_parser in (_add_demo_parser, _add_score_parser, _add_prune_parser, _add_compare_parser,
                       _add_info_parser, _add_bench_parser):
        add_parser(sub)
    return parser


def _add_demo_parser(sub: Any) -> None:
    """``pyobc demo``: the built-in job, every method on the digits-trained ResNet-20."""
    demo = sub.add_parser(
        "demo", help="score, prune, fine-tune and evaluate ResNet-20 on the built-in digits with every method",
        description="Trains ResNet-20 on the UCI digits once (cached under $PYOBC_CACHE or ~/.cache/pyobc), scores "
                    "it with every criterion, physically removes channels until the given fraction of MACs is "
                    "gone, fine-tunes briefly (for jacobian also through Equivalent Pruning adapters) and prints "
                    "one table: scoring time and its ratio to a forward+backward, params and MACs after, "
                    "accuracy after pruning and after fine-tuning.",
        epilog="Examples:\n  pyobc demo --quick          # 8x8 images, short training: under a minute on 2 cores\n"
               "  pyobc demo                  # 16x16, a few minutes\n"
               "  pyobc demo --methods magnitude jacobian oba --ratio 0.3 --batches 4\n"
               "  pyobc demo --quick --json   # rows as JSON on stdout, progress lines on stderr\n"
               "  pyobc demo --lm             # the tiny Llama: perplexity after pruning 20/30/50% of its parameters",
        formatter_class=_FMT)
    demo.add_argument("--quick", action="store_true", help="small preset: 8x8 images, 3-epoch model, 2 batches, "
                                                           "1 fine-tuning epoch (under a minute)")
    demo.add_argument("--methods", nargs="+", metavar="NAME", help="criteria to run (default: all but oracle)")
    demo.add_argument("--lm", action="store_true",
                      help="the language-model demo instead: the trained tiny Llama (GQA), KV heads and MLP neurons "
                           "pruned to 20/30/50%% of all parameters (--quick: 20%%) with every criterion and the LLM "
                           "baselines (Torch-Pruning's uniform magnitude, LLM-Pruner's element-wise Taylor), "
                           "held-out perplexity before/after pruning, with reconstruction and after a short "
                           "recovery (--finetune-epochs and --equivalent do not apply)")
    demo.add_argument("--ratio", type=_ratio, default=None,
                      help="fraction of MACs to remove (0.5); with --lm, one fraction of all parameters")
    demo.add_argument("--batches", type=_positive_int, default=None,
                      help="batches of 64 training images to score on (8; --quick: 2); with --lm, calibration "
                           "batches of 8x128 tokens (8; --quick: 4)")
    demo.add_argument("--finetune-epochs", type=_count, default=None, metavar="N",
                      help="fine-tuning epochs (3; --quick: 1; 0 skips fine-tuning)")
    demo.add_argument("--equivalent", action=argparse.BooleanOptionalAction, default=True,
                      help="add the jacobian Equivalent Pruning row (default: yes)")
    demo.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                      help="torch intra-op threads (default: 1, the fastest on a busy or small CPU)")
    demo.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                      help="also prune with least-squares reconstruction of the layers that lost inputs and report "
                           "that accuracy (default: yes)")
    demo.add_argument("--json", action="store_true", help="rows as JSON on stdout")
    _progress_flag(demo)
    demo.set_defaults(func=_demo)


def _add_score_parser(sub: Any) -> None:
    """``pyobc score``: score a model's channels and save the scores."""
    score = sub.add_parser(
        "score", help="score the prunable channels of a model and save the scores",
        description="Scores every prunable channel group of the model (higher = more important) and saves the "
                    "scores (pyobc.Scores; loads with torch.load(weights_only=True)).",
        epilog="Examples:\n  pyobc score --model resnet20 --method oba --output scores.pt\n"
               "  pyobc score --model mypkg.nets:build --data mypkg.data:train_loader --method jacobian \\\n"
               "      --max-batches 50 --device cuda --output scores.pt\n"
               "  pyobc score --model ./net.py:build --data ./net.py:loader --method taylor --json",
        formatter_class=_FMT)
    score.add_argument("--method", default="jacobian", metavar="NAME",
                       help="criterion (default: jacobian; see 'pyobc info')")
    score.add_argument("--output", "-o", metavar="FILE", help="write the scores here")
    score.add_argument("--json", action="store_true", help="machine-readable output (scores per layer)")
    _model_args(score)
    score.set_defaults(func=_score_cmd)


def _add_prune_parser(sub: Any) -> None:
    """``pyobc prune``: prune a model with fresh or saved scores and save it."""
    prune = sub.add_parser(
        "prune", help="score (or read scores) and physically prune a model; save it with pyobc.save",
        description="Removes the lowest-scored channels of every group with pyobc.prune and writes the pruned "
                    "model with pyobc.save; load it with pyobc.load(<freshly built model>, FILE).",
        epilog="Examples:\n  pyobc prune --model resnet20 --method oba --ratio 0.5 --target macs --output pruned.pt\n"
               "  pyobc prune --model mypkg.nets:build --data mypkg.data:loader --scores scores.pt \\\n"
               "      --ratio 0.3 --scope local --output pruned.pt --json\n"
               "  pyobc prune --model resnet20 --method taylor --ratio 0.5 --target macs --reconstruct -o pruned.pt",
        formatter_class=_FMT)
    prune.add_argument("--method", default=None, metavar="NAME", help="criterion (default: jacobian, or the "
                                                                      "method of --scores)")
    prune.add_argument("--scores", metavar="FILE", help="scores from 'pyobc score --output' instead of scoring now")
    prune.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of the target quantity to remove (0.5)")
    prune.add_argument("--target", choices=("channels", "params", "macs"), default="channels",
                       help="what the ratio measures (channels)")
    prune.add_argument("--scope", choices=("global", "local"), default=None,
                       help="rank all channels together, or every group alike (default: local for magnitude, "
                            "global otherwise)")
    prune.add_argument("--round-to", type=_positive_int, default=None, metavar="N",
                       help="kept channel counts are multiples of N")
    prune.add_argument("--reconstruct", action="store_true",
                       help="refit the layers that lost inputs by least squares on --max-batches batches of --data "
                            "so that their outputs match the unpruned model's")
    prune.add_argument("--damping", type=_damping, default=0.01, help="reconstruction damping (0.01)")
    prune.add_argument("--selection", choices=("scores", "obs", "scores*obs"), default="scores",
                       help="rank channels by the scores (default), the structured OBS error, or both; the OBS "
                            "ones need --reconstruct")
    prune.add_argument("--output", "-o", metavar="FILE", help="write the pruned model here (pyobc.save)")
    prune.add_argument("--json", action="store_true", help="machine-readable report")
    _model_args(prune)
    prune.set_defaults(func=_prune_cmd)


def _add_compare_parser(sub: Any) -> None:
    """``pyobc compare``: methods against each other at several ratios; tables and plots."""
    comp = sub.add_parser(
        "compare", help="compare methods: accuracy against MACs removed, and per-layer kept channels",
        description="Scores the model once per method, prunes it physically at every ratio (target macs: the "
                    "ratio is the fraction of MACs removed) and evaluates it without fine-tuning. Writes "
                    "compare.csv (or .md), layer_profile.csv, accuracy_vs_macs.png and layer_profile.png (the "
                    "fraction of each layer's channels every method keeps: the layers a method thins least are "
                    "its architectural bottlenecks). Plots need matplotlib (pip install 'pyobc[plot]').",
        epilog="Examples:\n  pyobc compare --model resnet20 --methods magnitude taylor jacobian oba \\\n"
               "      --ratios 0.2 0.4 0.6 --output-dir out\n"
               "  pyobc compare --model mypkg.nets:build --data mypkg.data:train --eval-data mypkg.data:val \\\n"
               "      --methods jacobian oba --ratios 0.3 0.5 --output-dir out --format md",
        formatter_class=_FMT)
    comp.add_argument("--methods", nargs="+", metavar="NAME", default=["magnitude", "taylor", "jacobian", "oba"],
                      help="criteria (default: magnitude taylor jacobian oba)")
    comp.add_argument("--ratios", nargs="+", type=_ratio, metavar="R", default=[0.1, 0.3, 0.5],
                      help="fractions of MACs to remove (default: 0.1 0.3 0.5)")
    comp.add_argument("--output-dir", required=True, metavar="DIR", help="folder for the tables and plots")
    comp.add_argument("--format", type=_format, default="csv", help="table format: csv or md (csv)")
    comp.add_argument("--eval-data", metavar="SPEC", help="entry point of the evaluation loader (default: the "
                                                          "digits test split for zoo models, else --data)")
    comp.add_argument("--scope", choices=("global", "local"), default=None,
                      help="default: local for magnitude, global otherwise")
    comp.add_argument("--profile-ratio", type=_ratio, default=None, metavar="R",
                      help="ratio of the per-layer profile (default: the ratio closest to 0.5)")
    comp.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                      help="write the PNG plots (default: yes; --no-plot writes the tables only)")
    comp.add_argument("--reconstruct", action="store_true",
                      help="also prune with least-squares reconstruction (calibrated on --max-batches batches of "
                           "--data) and add its accuracy (column reconstructed_accuracy)")
    comp.add_argument("--damping", type=_damping, default=0.01, help="reconstruction damping (0.01)")
    comp.add_argument("--json", action="store_true", help="results as JSON on stdout")
    _model_args(comp)
    comp.set_defaults(func=_compare_cmd)


def _add_info_parser(sub: Any) -> None:
    """``pyobc info``: versions, op backends and criteria."""
    info = sub.add_parser("info", help="versions, op backends and available criteria",
                          description="Versions, which backend (compiled or reference) serves each op on CPU and "
                                      "CUDA and why the compiled library is absent if it is, and the criteria.",
                          epilog="Examples:\n  pyobc info\n  pyobc info --json", formatter_class=_FMT)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)


def _add_bench_parser(sub: Any) -> None:
    """``pyobc bench``: compiled ops against their reference kernels."""
    bench = sub.add_parser(
        "bench", help="time the compiled ops against their pure-PyTorch reference kernels",
        description="Runs each op of pyobc.ops and its reference kernel on the same inputs, interleaved, and "
                    "prints the medians and their ratio (> 1: the compiled kernel is faster).",
        epilog="Examples:\n  pyobc bench --quick\n  pyobc bench --device cuda --repeats 30\n"
               "  pyobc bench --only csr --json", formatter_class=_FMT)
    bench.add_argument("--quick", action="store_true", help="small inputs and 5 repeats (a few seconds)")
    bench.add_argument("--device", metavar="DEV", help="cpu (default) or cuda")
    bench.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                       help="timed runs per side (15; --quick: 5)")
    bench.add_argument("--only", metavar="TEXT", help="only cases whose op or description contains TEXT")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    _progress_flag(bench)
    bench.set_defaults(func=_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyobc`` console script; returns the exit status.

    Example:
        >>> main(["info", "--json"])     # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if os.environ.get("PYOBC_TRACEBACK"):
            raise
        print(f"pyobc: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyobc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pyobc ... | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
