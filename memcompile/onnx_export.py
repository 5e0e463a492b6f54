"""`export_onnx`: a converted model to an ONNX file that ONNX Runtime runs.

The model is exported with the dynamo-based `torch.onnx.export`; the memory-layer ops are
lowered by `passes/lower_onnx.py` in the "decomposed" form (standard ONNX ops) or the
"custom" form (`com.memcompile` nodes with ONNX function bodies, and native kernels in
`memcompile.runtime.ort_session`). Dimension 0 of every input is the batch and dimension 1
of token inputs the sequence; both stay dynamic unless `dynamic=False`. The file is written
to a temporary name beside `path` and renamed into place, so an error leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .runtime import MemcompileError, MemoryLayer
from .runtime.errors import first_line, is_integer, quieted_loggers
from .runtime.memory_layer import value_owners
from .runtime.modes import training_mode
from .runtime.outputs import refuse_existing, staging_directory

log = logging.getLogger(__name__)

FORMS = ("decomposed", "custom")
# Above this many bytes of weights the tensors go to a `<name>.data` file beside the model
# (a protobuf holds at most 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


class _Outputs(nn.Module):
    """Calls the model with named tensors and returns its tensor outputs as a tuple.

    HF models return a ModelOutput (a dict): its tensors are kept, in order, and named by
    their keys; caches are switched off (`use_cache=False`) so none is returned.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], extra: dict) -> None:
        super().__init__()
        self.model, self.names, self.extra = model, list(names), extra

    def forward(self, *tensors: torch.Tensor):
        out = self.model(**dict(zip(self.names, tensors)), **self.extra)
        return tuple(tensor for _, tensor in _tensor_outputs(out))


def _tensor_outputs(out) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if isinstance(out, Mapping):
        return [(str(k), v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    return []


def _lowering():
    """passes.lower_onnx, imported on use: onnx and onnxscript are an optional extra."""
    try:
        from .passes import lower_onnx
    except ImportError as error:
        raise MemcompileError(
            f"ONNX export needs onnx and onnxscript ({error}): pip install 'memcompile[onnx]'"
        ) from None
    return lower_onnx


def _check_options(form: str, opset: int | None) -> int:
    lower_onnx = _lowering()
    if form not in FORMS:
        raise MemcompileError(f"unknown ONNX form {form!r}: choose one of {', '.join(FORMS)}")
    if opset is None:
        return lower_onnx.DEFAULT_OPSET
    low, high = lower_onnx.MIN_OPSET, lower_onnx.MAX_OPSET
    if not is_integer(opset) or not low <= opset <= high:
        raise MemcompileError(
            f"ONNX opset {opset!r} is not supported: choose {low} to {high} "
            f"(default {lower_onnx.DEFAULT_OPSET})"
        )
    return opset


_NOT_A_PROGRAM = (
    "export_onnx takes the converted nn.Module (what memcompile.transform returns), not a "
    "torch.export program (.pt2), whose module cannot be exported again: convert the model "
    "itself with memcompile.transform, or memcompile.load a checkpoint, and export that"
)


def check_exportable(model: nn.Module) -> None:
    """Bad input (one line) unless `model` is a module with memory layers that export_onnx
    can export: not a torch.export program, no fused updates or sharding, no meta tensors."""
    from .api import graph_memory_lookups

    if isinstance(model, torch.export.ExportedProgram) or (
        isinstance(model, nn.Module) and graph_memory_lookups(model)
    ):
        raise MemcompileError(_NOT_A_PROGRAM)
    if not isinstance(model, nn.Module):
        raise MemcompileError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, MemoryLayer) for m in model.modules()):
        raise MemcompileError(
            f"{type(model).__name__} has no memory layers: convert it first with "
            "memcompile.transform(model, layers=...) (or `memcompile convert`)"
        )
    if any(
        owner.bag_impl is not None and not getattr(owner.bag_impl, "gradients_only", False)
        for owner in value_owners(model)
    ):
        raise MemcompileError(
            f"the value tables of {type(model).__name__} have fused updates or a plan's "
            "sharding (a bag_impl): export before fuse_value_updates/apply_plan, or call "
            "handle.remove() first"
        )
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        raise MemcompileError(
            f"{type(model).__name__} has tensors on the meta device (lazy value tables): call "
            "memcompile.runtime.materialize_values(model) before exporting"
        )
    if any(t.dtype == torch.bfloat16 for t in tensors):
        # The file would be written, and ONNX Runtime's CPU provider has no bfloat16 Gemm.
        raise MemcompileError(
            f"{type(model).__name__} has bfloat16 tensors, which ONNX Runtime cannot run: "
            "export a float32 or float16 copy (memcompile export --dtype float32; in Python "
            "model.float() or model.half())"
        )


def _named_inputs(model: nn.Module, example_inputs) -> dict[str, torch.Tensor]:
    """The example inputs by forward-parameter name: a tensor, a tuple or a dict of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        named = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        try:
            bound = inspect.signature(model.forward).bind_partial(*example_inputs)
        except TypeError as error:
            raise MemcompileError(
                f"example inputs do not fit the model's forward: {error}"
            ) from None
        named = dict(bound.arguments)
    else:
        raise MemcompileError(
            "example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
            f"{type(example_inputs).__name__}"
        )
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise MemcompileError(
                f"example input {name!r} is a {type(value).__name__}, not a tensor"
            )
    if not named:
        raise MemcompileError("export_onnx needs at least one example input tensor")
    return named


def _dynamic_axes(named: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Dim 0 of every input is the batch; dim 1 is a sequence for token inputs (integer
    tensors: ids, masks, positions) and `*_embeds`, not for pixels or audio features.
    Decoder inputs get their own sequence axis: an axis name shared by two inputs tells
    ONNX Runtime that their lengths are equal."""
    axes = {}
    for name, tensor in named.items():
        axes[name] = {0: "batch"}
        if not tensor.is_floating_point() or name.endswith("embeds"):
            axes[name][1] = "decoder_seq" if name.startswith("decoder_") else "seq"
    return axes


def _check_dynamic_shapes(named: dict[str, torch.Tensor]) -> None:
    for name, dims in _dynamic_axes(named).items():
        shape = tuple(named[name].shape)
        if len(shape) < len(dims):
            raise MemcompileError(
                f"example input {name!r} has shape {shape}: a dynamic export takes a batch "
                f"dimension first, e.g. shape {(2, *shape)}, or pass dynamic=False"
            )
        if min(shape[: len(dims)]) < 2:
            what = "batch and sequence dimensions" if len(dims) == 2 else "batch dimension"
            raise MemcompileError(
                f"example input {name!r} has shape {shape}: its dynamic {what} need an "
                "example size >= 2 (a size-1 example would be fixed at 1), or pass "
                "dynamic=False"
            )


def _example_outputs(model: nn.Module, named: dict, extra: dict) -> dict[str, tuple]:
    """Runs the model once: an input it rejects is bad input. Returns each output's shape,
    by name."""
    try:
        with torch.no_grad():
            out = model(**named, **extra)
    except Exception as error:  # noqa: BLE001 - any failure here is the example's fault
        first = first_line(error)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in named.items())
        raise MemcompileError(
            f"{type(model).__name__} fails on the example inputs ({shapes}): "
            f"{type(error).__name__}: {first}"
        ) from None
    shapes = {name: tuple(tensor.shape) for name, tensor in _tensor_outputs(out)}
    if not shapes:
        raise MemcompileError(f"{type(model).__name__} returns no tensor to export")
    return shapes


def _check_in_onnxruntime(path: Path, named: dict, shapes: dict[str, tuple]) -> None:
    """The written model runs in ONNX Runtime on the example inputs and gives the example's
    output shapes. An exporter can write a graph that ONNX Runtime rejects: torch 2.13 at
    opset 23 writes Llama's rotary embedding for a batch of one."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # the error below says it; ORT would log it again
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: v.detach().cpu().numpy() for k, v in named.items() if k in wanted}
        results = session.run(None, feeds)
    except Exception as error:  # noqa: BLE001 - whatever ORT refuses, the file is unusable
        first = first_line(error)
        raise MemcompileError(
            f"ONNX Runtime cannot run the exported model on the example inputs ({first}): "
            "nothing was written; another opset may export differently"
        ) from None
    got = {o.name: tuple(r.shape) for o, r in zip(session.get_outputs(), results)}
    wrong = [name for name, shape in got.items() if shapes.get(name, shape) != shape]
    if wrong:
        raise MemcompileError(
            f"the exported model's {wrong[0]} has shape {got[wrong[0]]} in ONNX Runtime, "
            f"not {shapes[wrong[0]]} as in PyTorch: nothing was written"
        )


def _extra_kwargs(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", False) else {}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress (and, when it fails, its graphs: the error raised
    says what failed), logs that torchvision ops are unavailable and warns about axis
    names: none of it concerns a memcompile user."""
    quiet = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
    with quieted_loggers(_NOISY_LOGGERS), quiet[0], quiet[1], warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


_NOISY_LOGGERS = (
    "torch.onnx._internal.exporter._registration",
    "torch.fx.experimental.symbolic_shapes",
)


def _export(module: nn.Module, named: dict, outputs: list[str], form: str, opset: int, dynamic):
    lower_onnx = _lowering()
    shapes = (tuple(_dynamic_axes(named).values()),) if dynamic else None
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                tuple(named.values()),
                dynamo=True,
                opset_version=opset,
                custom_translation_table=lower_onnx.translation_table(form),
                dynamic_shapes=shapes,
                input_names=list(named),
                output_names=outputs,
                verbose=False,
            )
    except Exception as error:  # noqa: BLE001 - the exporter's failures are tracebacks
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        hint = "; where the error is about a shape, dynamic=False may export it" if dynamic else ""
        raise MemcompileError(
            f"torch.onnx.export cannot export {type(module.model).__name__}: "
            f"{type(cause).__name__}: {lines[0] if lines else ''}{hint}"
        ) from None
    model = program.model
    for node in model.graph.all_nodes():
        # The exporter's debug records (Python stack traces with local paths, FX nodes).
        node.metadata_props.clear()
    if form == "custom":
        lower_onnx.attach_functions(model)
    model.producer_name = "memcompile"
    model.metadata_props["memcompile.form"] = form
    return model


def external_data_path(path: str | os.PathLike) -> Path:
    """Where the weights of a model too large for one file go, beside `path`."""
    return Path(f"{path}.data")


def _write(model, path: Path, check) -> None:
    """Saves the ir.Model at `path`, through a temporary directory beside it; `check(staged)`
    runs on the staged file first, and an error there writes nothing."""
    from onnxscript import ir

    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    side_file = external_data_path(path)
    data_name = side_file.name if weights > EXTERNAL_DATA_BYTES else None
    with staging_directory(path) as tmp:
        staged = tmp / path.name
        ir.save(model, staged, external_data=data_name)
        check(staged)
        if data_name is not None:
            os.replace(tmp / data_name, side_file)
        os.replace(staged, path)
        if data_name is None and side_file.is_file():  # a replaced model's weights, unread now
            side_file.unlink()


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    form: str = "decomposed",
    opset: int | None = None,
    dynamic: bool = True,
    *,
    force: bool = False,
) -> Path:
    """Export a model with memory layers to the ONNX file `path`; returns the path.

    `example_inputs`: a tensor, a tuple (positional) or a dict (by name) of tensors that
    the model accepts, e.g. `{"input_ids": ids}`. `form`: "decomposed" (standard ONNX ops,
    any ONNX Runtime provider) or "custom" (`com.memcompile` nodes with function bodies;
    `memcompile.runtime.ort_session` runs them with native kernels). `opset`: the ONNX
    opset, 18 to 23 (default 20). `dynamic`: the batch (dim 0) of every input and the
    sequence (dim 1) of token inputs (integer tensors and `*_embeds`) are dynamic. Inputs
    are named as the forward's parameters, outputs as the model's (`logits`,
    `last_hidden_state`, ...). An existing file is refused, unless `force`, which replaces it.
    """
    opset = _check_options(form, opset)
    refuse_existing(path, force, file=True)  # before the export, whose work would be lost
    check_exportable(model)
    named = _named_inputs(model, example_inputs)
    if dynamic:
        _check_dynamic_shapes(named)
    extra = _extra_kwargs(model)
    with training_mode(model, training=False):
        shapes = _example_outputs(model, named, extra)
        module = _Outputs(model, list(named), extra).eval()
        onnx_model = _export(module, named, list(shapes), form, opset, dynamic)
    path = Path(path)
    _write(onnx_model, path, check=lambda staged: _check_in_onnxruntime(staged, named, shapes))
    counts = _lowering().custom_nodes(onnx_model)
    log.info("wrote %s (%s form, opset %d, custom nodes %s)", path, form, opset, counts or "none")
    return path
