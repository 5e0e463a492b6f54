"""`calibrate`: train replace-mode memory layers to reproduce the FFNs they replaced.

A replace-mode conversion swaps an FFN for a freshly initialised memory layer, so a trained
model loses what that FFN computed. Calibration is layer-wise distillation: the original
model runs on the calibration batches, forward hooks capture each replaced FFN's input and
output (for a split FFN such as BERT's intermediate/output, the output of the down
projection), and each memory layer is trained on those pairs alone, with every other
weight of the model frozen. Only the original model is run: the memory layers are trained
on its activations directly, each independently of the others (one optimizer, so a shared
value table gets the gradients of every layer).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .api import find_ffn_blocks
from .passes import FFNBlock
from .passes.blocks import inside
from .passes.capture import is_projection
from .runtime import MemcompileError, MemoryLayer
from .runtime.errors import first_line, is_integer, is_number
from .runtime.fused_values import fused_value_ids
from .runtime.modes import training_mode
from .training import param_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCalibration:
    """One memory layer's calibration: relative errors ||memory(x) - ffn(x)|| / ||ffn(x)||.

    `error_before`/`error_after` are measured on held-out tokens (a share of the captured
    ones that is never trained on; the training tokens when `heldout=0`),
    `train_error_after` on the tokens trained on.
    """

    index: int | str
    path: str
    tokens: int
    heldout_tokens: int
    error_before: float
    error_after: float
    train_error_after: float


@dataclass(frozen=True)
class CalibrationReport:
    layers: tuple[LayerCalibration, ...]
    steps: int

    def summary(self) -> str:
        lines = [
            f"calibrated {len(self.layers)} memory layers, {self.steps} steps; relative error "
            "on held-out tokens:"
        ]
        for c in self.layers:
            lines.append(
                f"  block {c.index} ({c.path}): {c.error_before:.3f} -> {c.error_after:.3f} "
                f"(trained on {c.tokens:,} tokens: {c.train_error_after:.3f})"
            )
        return "\n".join(lines)

    def worse(self) -> list[LayerCalibration]:
        """The layers that calibration left further from their FFN than it found them (on
        held-out tokens): a learning rate too high, as a rule."""
        return [c for c in self.layers if c.error_after > c.error_before]


@dataclass
class _Target:
    """A memory layer and where the FFN it replaced reads its input and writes its output."""

    path: str
    layer: MemoryLayer
    block: FFNBlock
    entry: nn.Module  # its input[0] is the FFN's input
    exit: nn.Module  # its output is the FFN's output


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _hook_points(original: nn.Module, block: FFNBlock) -> tuple[nn.Module, nn.Module]:
    if block.kind == "split":
        return original.get_submodule(block.path), original.get_submodule(block.exit_path)
    prefix = block.capture.path if not block.capture.whole_model else ""
    linears = block.match.linears
    first = original.get_submodule(_join(prefix, linears[0]))
    last = original.get_submodule(_join(prefix, linears[-1]))
    if not (is_projection(first) and is_projection(last)):
        raise MemcompileError(
            f"block {block.label} ({block.path}): its projections are not modules (a functional "
            "F.linear), so their activations cannot be captured with hooks"
        )
    return first, last


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _targets(model: nn.Module, original: nn.Module) -> list[_Target]:
    layers = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, MemoryLayer) and m.config.mode == "replace"
    ]
    if not layers:
        raise MemcompileError(
            "the model has no replace-mode memory layers: calibrate trains the layers that "
            "replaced an FFN (augment-mode layers start exact and need no calibration)"
        )
    if any(isinstance(_submodule(original, path), MemoryLayer) for path, _ in layers):
        raise MemcompileError(  # `original is model` too, before tracing it
            "`original` is the converted model (transform works in place): pass the "
            "model as it was before transform (a copy.deepcopy made before it; on the "
            "command line --original, the model the checkpoint was converted from)"
        )
    blocks = find_ffn_blocks(original)
    targets = []
    for path, layer in layers:
        owners = [b for b in blocks if inside(path, b.path)]
        if not owners:
            raise MemcompileError(
                f"the original model has no FFN block at {path}: pass the model that was "
                f"converted (its FFN blocks: {', '.join(b.path for b in blocks[:4]) or 'none'}"
                f"{', ...' if len(blocks) > 4 else ''})"
            )
        if layer.query.weight.dtype == torch.float16:
            raise MemcompileError(
                f"the memory layer at {path} is float16, whose AdamW steps underflow: "
                "calibrate in float32 or bfloat16 (model.float()) and cast afterwards"
            )
        block = max(owners, key=lambda b: len(b.path))
        if (block.d_model, block.d_out or block.d_model) != (layer.d_in, layer.d_out):
            raise MemcompileError(
                f"block {block.label} of the original model maps {block.d_model} -> "
                f"{block.d_out or block.d_model}, the memory layer at {path} {layer.d_in} -> "
                f"{layer.d_out}: pass the model that was converted"
            )
        targets.append(_Target(path, layer, block, *_hook_points(original, block)))
    return targets


def text_batches(
    tokenizer: Any, texts: list[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches of `texts` (an HF tokenizer), padded: inputs for `calibrate`."""
    if getattr(tokenizer, "pad_token", None) is None:
        # Causal LM tokenizers often have no pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(dict(encoded))
    return batches


def synthetic_batches(
    model: nn.Module, n_batches: int = 16, batch_size: int = 8, seq_len: int = 64, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random token ids for a model with `config.vocab_size`: calibration without text.

    Activations of random tokens are not those of real text, so this is a smoke test, or a
    start; calibrate on text from the model's domain for a usable model.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise MemcompileError(
            f"{type(model).__name__} has no config.vocab_size to draw synthetic token ids "
            "from: calibrate on text instead"
        )
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(vocab, (batch_size, seq_len), generator=generator),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        }
        for _ in range(n_batches)
    ]


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def position_limit(model: nn.Module) -> int | None:
    """The longest input an HF model's positions allow (learned position embeddings), or
    None where its config names none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def _call_original(original: nn.Module, batch) -> None:
    """`original` on a batch; the model refusing it (inputs too long for its positions, a
    wrong dtype) is the batch's fault, said in one line."""
    try:
        _call(original, batch)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        tokens = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() else None
        limit = position_limit(original)
        hint = ""
        if limit is not None and tokens is not None and tokens > limit:
            hint = f"; inputs of {tokens} tokens are more than its {limit} positions: shorten them"
        raise MemcompileError(
            f"the original model ({type(original).__name__}) failed on a calibration batch "
            f"({type(error).__name__}: {first_line(error).rstrip('. ')}){hint}"
        ) from None


def _token_mask(batch, shape: torch.Size) -> torch.Tensor | None:
    """The attention mask of an HF-style batch, when it matches the activations' (B, T)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape[:-1]):
        return mask.bool()
    return None


@torch.no_grad()
def _capture(
    original: nn.Module, targets: list[_Target], batches: Iterable
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, outputs) of each target's FFN in the original model, (tokens, d) each.

    Padding tokens (attention_mask 0 in a Mapping batch) are left out.
    """
    captured: list[dict[str, list[torch.Tensor]]] = [{"x": [], "y": []} for _ in targets]
    handles = []
    for store, target in zip(captured, targets):
        handles.append(
            target.entry.register_forward_hook(
                lambda m, args, kwargs, out, s=store: s["x"].append(
                    args[0] if args else next(iter(kwargs.values()))
                ),
                with_kwargs=True,
            )
        )
        handles.append(
            target.exit.register_forward_hook(lambda m, args, out, s=store: s["y"].append(out))
        )
    result = [([], []) for _ in targets]
    with contextlib.ExitStack() as undo:
        for handle in handles:
            undo.callback(handle.remove)
        undo.enter_context(training_mode(original, training=False))
        for batch in batches:
            for store in captured:
                store["x"].clear()
                store["y"].clear()
            _call_original(original, batch)
            for store, target, (xs, ys) in zip(captured, targets, result):
                if len(store["x"]) != 1 or len(store["y"]) != 1:
                    raise MemcompileError(
                        f"block {target.block.label}: its FFN ran {len(store['x'])} times in "
                        "one forward of the original model; calibrate needs exactly once"
                    )
                x, y = store["x"][0], store["y"][0]
                mask = _token_mask(batch, x.shape)
                x, y = (x[mask], y[mask]) if mask is not None else (x, y)
                xs.append(x.reshape(-1, x.shape[-1]).float())
                ys.append(y.reshape(-1, y.shape[-1]).float())
    if not result or not result[0][0]:
        raise MemcompileError("no calibration batches were given")
    data = [(torch.cat(xs), torch.cat(ys)) for xs, ys in result]
    if not len(data[0][0]):
        raise MemcompileError(
            "the calibration batches hold no tokens (every attention_mask position is 0)"
        )
    return data


@torch.no_grad()
def _relative_error(layer: MemoryLayer, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096):
    """||layer(x) - y|| / ||y|| over all rows (Frobenius norms), in float64."""
    diff = norm = 0.0
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk].to(layer.query.weight)
        yb = y[start : start + chunk].double()
        diff += (layer(xb).double() - yb.to(layer.query.weight.device)).square().sum().item()
        norm += yb.square().sum().item()
    return math.sqrt(diff / max(norm, 1e-30))


@torch.no_grad()
def match_scale(layer: MemoryLayer, x: torch.Tensor, y: torch.Tensor, rows: int = 16384) -> bool:
    """Scale a Memory+ layer's `out` (weight and bias) by the factor a that minimises
    ||a * layer(x) - y|| (least squares, on up to `rows` tokens).

    A fresh layer's output can be orders of magnitude larger than the FFN's (small random
    models) or much smaller (BERT-like models): gradient steps would spend most of their
    time fixing the scale. Returns False, changing nothing, for a layer without `out`.
    """
    if layer.out is None:
        return False
    out = layer(x[:rows]).double()
    target = y[:rows].double()
    factor = (out * target).sum() / out.square().sum().clamp_min(1e-30)
    layer.out.weight.mul_(factor.to(layer.out.weight.dtype))
    layer.out.bias.mul_(factor.to(layer.out.bias.dtype))
    return True


def _train(model, targets, splits, steps, lr, value_lr, batch_tokens, generator, callback):
    """The distillation loop: only the memory layers' parameters train."""
    params = {id(p): p for p in model.parameters()}
    for t in targets:
        params.update({id(p): p for p in (*t.layer.parameters(), t.layer.value_table)})
    trainable = {id(p) for t in targets for p in (*t.layer.parameters(), t.layer.value_table)}
    flags = {key: p.requires_grad for key, p in params.items()}
    with contextlib.ExitStack() as undo:
        for key, p in params.items():
            undo.callback(p.requires_grad_, flags[key])
            p.requires_grad_(key in trainable)
        optimizer = torch.optim.AdamW(param_groups(model, lr, 0.0, value_lr))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
        undo.enter_context(training_mode(*(t.layer for t in targets), training=True))
        for step in range(1, steps + 1):
            total = 0.0
            for target, ((x, y), _) in zip(targets, splits):
                picks = torch.randint(len(x), (min(batch_tokens, len(x)),), generator=generator)
                picks = picks.to(x.device)
                want = y[picks]
                scale = want.square().mean().clamp_min(1e-12)
                loss = F.mse_loss(target.layer(x[picks]), want) / scale
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise MemcompileError(
                    f"calibration diverged at step {step} (loss {total}): lower lr or value_lr"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if callback is not None:
                callback(step, total / len(targets))


def calibrate(
    model: nn.Module,
    original: nn.Module,
    batches: Iterable,
    steps: int = 300,
    lr: float = 3e-3,
    *,
    value_lr: float = 1e-2,
    batch_tokens: int = 1024,
    heldout: float = 0.1,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> CalibrationReport:
    """Train each replace-mode memory layer of `model` to reproduce the FFN it replaced.

    `original` is the model before conversion, with its trained weights; `batches` are its
    inputs: a Mapping is called as `original(**batch)` (HF tokenizer output; padding tokens
    are skipped), a tuple as `original(*batch)`, anything else as `original(batch)`. The
    FFNs' inputs and outputs are captured once (they are held in memory: tokens x d_model
    x 2 floats per layer); `heldout` of the tokens are kept apart to measure the error.
    Each Memory+ layer's output is first rescaled to the FFN's (`match_scale`); then each
    step trains every memory layer on `batch_tokens` random training tokens with the
    relative squared error ||memory(x) - ffn(x)||^2 / ||ffn(x)||^2, AdamW through
    `param_groups(lr, value_lr=value_lr)`, the rate decayed along a cosine to 0; all other
    parameters are frozen (their requires_grad flags are restored afterwards).
    `callback(step, loss)` is called after every step (a progress bar, say).
    Changes `model` in place and returns a `CalibrationReport`.
    """
    if not (is_integer(steps) and is_integer(batch_tokens) and is_number(heldout)):
        raise MemcompileError(
            f"calibrate takes integer steps and batch_tokens and a number heldout, got "
            f"{steps!r}, {batch_tokens!r}, {heldout!r}"
        )
    if steps < 0 or batch_tokens < 1 or not 0 <= heldout < 1:
        raise MemcompileError("calibrate needs steps >= 0, batch_tokens >= 1, 0 <= heldout < 1")
    if fused_value_ids(model):
        raise MemcompileError(
            "the model's values have fused updates, which would step them instead of "
            "calibrate's AdamW at value_lr: call handle.remove() first, fuse again after"
        )
    targets = _targets(model, original)
    data = _capture(original, targets, batches)
    generator = torch.Generator().manual_seed(seed)
    splits = []  # per target: (train x, train y), (held-out x, held-out y) or None
    for target, (x, y) in zip(targets, data):
        weight = target.layer.query.weight
        x, y = x.to(weight.device, weight.dtype), y.to(weight.device, weight.dtype)
        order = torch.randperm(len(x), generator=generator).to(weight.device)
        n_held = min(len(x) - 1, math.ceil(heldout * len(x)))
        held, kept = order[:n_held], order[n_held:]
        splits.append(((x[kept], y[kept]), (x[held], y[held]) if n_held else None))
    before = [
        _relative_error(target.layer, *(held or train))
        for target, (train, held) in zip(targets, splits)
    ]
    if steps:
        for target, ((x, y), _) in zip(targets, splits):
            match_scale(target.layer, x, y)
        _train(model, targets, splits, steps, lr, value_lr, batch_tokens, generator, callback)
    results = []
    for target, (train, held), error in zip(targets, splits, before):
        results.append(
            LayerCalibration(
                index=target.block.index,
                path=target.path,
                tokens=len(train[0]),
                heldout_tokens=len(held[0]) if held else 0,
                error_before=error,
                error_after=_relative_error(target.layer, *(held or train)),
                train_error_after=_relative_error(target.layer, *train),
            )
        )
    report = CalibrationReport(tuple(results), steps)
    log.info("%s", report.summary())
    for c in report.worse():
        log.warning(
            "calibration made block %s worse on held-out tokens (relative error %.4g -> %.4g): "
            "lower lr or value_lr", c.index, c.error_before, c.error_after
        )
    return report
