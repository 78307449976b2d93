"""Real architectures for the model-coverage suite (tests/test_real_models.py, bench/bench_models.py).

Not a test file: it builds small, randomly initialised torchvision / timm / transformers models with the
smallest inputs that work, their batches and loss functions, and runs one configuration (a criterion,
``prune``, ``save``/``load``, ``equivalent_prune`` + ``fold``) to an explicit outcome.

The imports are contained here. The torchvision wheel on the package index is a CUDA build whose
``torchvision._meta_registrations`` fails on CPU torch (``operator torchvision::nms does not exist``), and
transformers 5 imports torchvision when it is installed: an empty module stands in for
``_meta_registrations`` before either is imported (the model constructors and ``torchvision.ops`` work
without it). pyobc itself never imports torchvision.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import types
from typing import Any, Callable

import torch
import torch.nn as nn

import pyobc

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import timm  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402

__all__ = ["ARCHS", "CRITERIA", "CONFIGS", "Arch", "Outcome", "State", "build", "loss_of", "run_config", "is_refusal"]

BATCH = 2
#: every criterion with the options a real model needs (one batch each)
CRITERIA: dict[str, tuple[str, dict]] = {
    "magnitude": ("magnitude", {}), "taylor": ("taylor", {}), "obd": ("obd", {}), "jacobian": ("jacobian", {}),
    "oba": ("oba", {}), "sosp-h": ("sosp-h", {}), "sosp-i": ("sosp-i", {}), "ec": ("ec", {}),
}
#: what else runs per architecture, on jacobian scores
STEPS = ["prune", "save", "ep"]
CONFIGS = list(CRITERIA) + STEPS


@dataclasses.dataclass
class Arch:
    """One architecture: a constructor, one batch, the loss, and how to read logits from the output."""

    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, int], Any]  # (generator, batch size) -> one batch
    loss_fn: Callable | None = None
    example: Callable[[Any], Any] = lambda b: b[0]  # noqa: E731
    logits: Callable[[Any], torch.Tensor] = lambda out: out  # noqa: E731


def _images(size: int, classes: int = 10) -> Callable[[torch.Generator, int], Any]:
    return lambda g, n: (torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def _tokens(vocab: int = 256, length: int = 16) -> Callable[[torch.Generator, int], Any]:
    def make(g, n):
        ids = torch.randint(0, vocab, (n, length), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}
    return make


def _lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)


def _vit() -> nn.Module:
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision zero-inits the head: every gradient would be 0
    return m


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


_TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


def _hf_vit() -> nn.Module:
    """A Hugging Face image classifier: its output is an ``ImageClassifierOutput``, read by pyobc's default loss."""
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=10))


def _bert_classifier() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**_TEXT, num_labels=3))


def _classified_tokens(g: torch.Generator, n: int) -> dict:
    """A Hugging Face classification batch: padded token ids, their mask, one label per sequence."""
    ids = torch.randint(0, 256, (n, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def _bert() -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(**_TEXT))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TEXT, num_key_value_heads=2))


def _qwen3() -> nn.Module:
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_TEXT, num_key_value_heads=2, head_dim=16))


def _text(name: str, make: Callable[[], nn.Module]) -> Arch:
    return Arch(name, make, _tokens(), _lm_loss, example=lambda b: b["input_ids"], logits=lambda out: out.logits)


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("tv_resnet18", _tv("resnet18"), _images(32)),
    Arch("tv_resnet50", _tv("resnet50"), _images(32)),
    Arch("tv_mobilenet_v2", _tv("mobilenet_v2"), _images(32)),
    Arch("tv_mobilenet_v3_small", _tv("mobilenet_v3_small"), _images(32)),
    Arch("tv_efficientnet_b0", _tv("efficientnet_b0"), _images(32)),
    Arch("tv_densenet121", _tv("densenet121"), _images(32)),
    Arch("tv_regnet_x_400mf", _tv("regnet_x_400mf"), _images(32)),
    Arch("tv_convnext_tiny", _tv("convnext_tiny"), _images(32)),
    Arch("tv_googlenet", _tv("googlenet", aux_logits=False, init_weights=True), _images(32)),
    Arch("tv_swin_t", _tv("swin_t"), _images(32)),
    Arch("tv_vit", _vit, _images(32)),
    Arch("timm_resnet18", _timm("resnet18"), _images(32)),
    Arch("timm_deit_tiny", _timm("deit_tiny_patch16_224", img_size=32), _images(32)),
    Arch("timm_convnext_atto", _timm("convnext_atto"), _images(32)),
    Arch("timm_mobilevitv2_050", _timm("mobilevitv2_050"), _images(64)),
    Arch("timm_efficientvit_b0", _timm("efficientvit_b0"), _images(64)),
    Arch("timm_levit_128s", _timm("levit_128s", img_size=64), _images(64)),
    Arch("hf_vit", _hf_vit, _images(32), logits=lambda out: out.logits),
    Arch("hf_bert_classifier", _bert_classifier, _classified_tokens,
         example=lambda b: {k: v for k, v in b.items() if k != "labels"}, logits=lambda out: out.logits),
    _text("hf_bert", _bert),
    _text("hf_gpt2", _gpt2),
    _text("hf_llama", _llama),
    _text("hf_qwen3_gqa", _qwen3),
]}


def build(name: str, batch: int = BATCH) -> tuple[nn.Module, Any]:
    """(model in eval mode, one batch of ``batch`` samples), both deterministic for ``name``."""
    torch.manual_seed(0)
    arch = ARCHS[name]
    model = arch.make().eval()
    return model, arch.batch(torch.Generator().manual_seed(1), batch)


def loss_of(name: str, model: nn.Module, batch: Any) -> torch.Tensor:
    """The scalar loss the suite scores with (cross-entropy for images, the LM loss for text)."""
    arch = ARCHS[name]
    if arch.loss_fn is not None:
        return arch.loss_fn(model, batch)
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


@dataclasses.dataclass
class Outcome:
    """``status`` is "ok", "refused" (one pyobc error, raised before any work, naming a way out) or
    "failed" (anything else); ``detail`` the one-line error; ``seconds`` the wall time of the step."""

    status: str
    detail: str = ""
    seconds: float = 0.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    tb = exc.__traceback__
    where = ""
    while tb is not None:  # the innermost frame, to route the failure
        where = f"{tb.tb_frame.f_code.co_filename.rpartition('site-packages/')[2].rpartition('/work/main/')[2]}:{tb.tb_lineno}"
        tb = tb.tb_next
    return f"{type(exc).__name__}: {text[:400]} [{where}]"


def is_refusal(exc: BaseException) -> bool:
    """One pyobc error that names the way out (ignored_layers, another method, a memory limit...): a
    ``NotImplementedError``, or an error class of pyobc's own (e.g. sosp-i's memory estimate)."""
    ours = isinstance(exc, NotImplementedError) or type(exc).__module__.startswith("pyobc")
    return ours and any(w in str(exc) for w in ("ignored_layers", "use ", "max_memory"))


class State:
    """What the configurations of one architecture share: the model, its batch, jacobian scores, the pruned model."""

    def __init__(self, name: str):
        self.name = name
        self.arch = ARCHS[name]
        self.model, self.batch = build(name)
        self.example = self.arch.example(self.batch)
        with torch.no_grad():
            self.reference = self.logits(self.model)
        self.cache: dict[str, Any] = {}

    def logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():  # a dict of inputs is keywords, as pyobc's example_inputs
            out = model(**self.example) if isinstance(self.example, dict) else model(self.example)
            return self.arch.logits(out)

    def score(self, method: str, **options) -> pyobc.Scores:
        return pyobc.score(self.model, [self.batch], method, loss_fn=self.arch.loss_fn, **options)

    def jacobian(self) -> pyobc.Scores:
        if "jacobian" not in self.cache:
            self.cache["jacobian"] = self.score("jacobian")
        return self.cache["jacobian"]

    def pruned(self) -> nn.Module:
        if "pruned" not in self.cache:
            self.cache["pruned"] = pyobc.prune(self.model, self.jacobian(), 0.3, target="macs",
                                               example_inputs=self.example)
        return self.cache["pruned"][0]


def _check_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        raise AssertionError(f"{what}: outputs differ (max abs diff {diff})")


def _criterion(state: State, config: str) -> None:
    method, options = CRITERIA[config]
    scores = state.score(method, **options)
    if not scores.groups or not all(torch.isfinite(v).all() for v in scores.values):
        raise AssertionError(f"{config}: {len(scores.groups)} groups, or non-finite scores")


def _prune(state: State) -> None:
    pruned = state.pruned()
    report = state.cache["pruned"][1]
    out = state.logits(pruned)
    if out.shape != state.reference.shape or not torch.isfinite(out).all():
        raise AssertionError(f"pruned output {tuple(out.shape)} (expected {tuple(state.reference.shape)}) or non-finite")
    if not report.macs_after < report.macs_before:
        raise AssertionError(f"MACs did not go down: {report.macs_before} -> {report.macs_after}")


def _save(state: State, tmp: str) -> None:
    pruned = state.pruned()
    path = f"{tmp}/{state.name}.pt"
    pyobc.save(pruned, path)
    again = build(state.name)[0]
    pyobc.load(again, path, example_inputs=state.example)
    _check_close(state.logits(again.eval()), state.logits(pruned), "load(save(pruned))")


def _ep(state: State) -> None:
    adapted = pyobc.equivalent_prune(state.model, state.jacobian(), 0.3, target="macs", example_inputs=state.example)
    _check_close(state.logits(adapted.eval()), state.logits(state.pruned()), "equivalent_prune vs prune")
    _check_close(state.logits(pyobc.fold(adapted).eval()), state.logits(adapted), "fold vs adapted")


def run_config(state: State, config: str, tmp: str) -> Outcome:
    """Run one configuration of ``state``'s architecture to an :class:`Outcome`."""
    t0 = time.perf_counter()
    try:
        if config in CRITERIA:
            _criterion(state, config)
        elif config == "prune":
            _prune(state)
        elif config == "save":
            _save(state, tmp)
        elif config == "ep":
            _ep(state)
        else:
            raise KeyError(config)
    except Exception as exc:  # the outcome records it; the caller decides what passes
        status = "refused" if is_refusal(exc) else "failed"
        return Outcome(status, _one_line(exc), time.perf_counter() - t0)
    return Outcome("ok", "", time.perf_counter() - t0)
