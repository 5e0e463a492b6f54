"""memcompile checkpoints: a directory with `memcompile.json` and `model.safetensors`.

`memcompile.json` records the source model (how to rebuild it: an HF config and class),
the transforms applied (layers and MemoryConfig, in order), the tensors that are
aliases of others (tied weights) and the dtypes of buffers the state dict leaves out (a
model cast to fp16 has fp16 rotary `inv_freq`, which transformers rebuilds in float32).
Loading rebuilds the base model, re-applies the transforms, copies the saved tensors in and
casts those buffers, so outputs are bit-identical. No pickle is ever read. Writes go to a
temporary directory renamed into place, so an interrupted or failed save leaves nothing
behind.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .api import RECIPE_ATTRIBUTE, transform
from .passes.find_ffn import LEGACY_LABELS_ATTRIBUTE
from .passes.share import POOL_NAME
from .runtime import MemcompileError, MemoryConfig, materialize_values
from .runtime.distributed import PLAN_ATTRIBUTE
from .runtime.errors import require
from .runtime.outputs import atomic_directory

log = logging.getLogger(__name__)

FORMAT = "memcompile-checkpoint"
# 2: block labels stay fixed across conversions (a label in a later step names the block it
# named in the first). Version 1's later steps numbered the blocks left unconverted: a model
# rebuilt from one keeps that numbering (LEGACY_LABELS_ATTRIBUTE) and is saved as version 1.
FORMAT_VERSION = 2
MANIFEST = "memcompile.json"
WEIGHTS = "model.safetensors"
PICKLED_SOURCE = "source_module.pt"


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def model_source(model: nn.Module) -> dict:
    """How to rebuild the model before its transforms: an HF class and config."""
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and hasattr(config, "to_dict"):
        return {"kind": "transformers", "class": type(model).__name__, "config": config.to_dict()}
    raise MemcompileError(
        f"cannot record how to rebuild a {type(model).__name__}: memcompile checkpoints hold "
        "transformers models, or modules given as a trusted pickle"
    )


def load_trusted_pickle(path: Path, trust_pickle: bool, refusal: str):
    """Where memcompile unpickles a file: only with the user's explicit trust flag, else
    MemcompileError(refusal). (A .pt2's pickled payloads are torch.export.load's, under
    the same flag: program.load_program.)"""
    if not trust_pickle:
        raise MemcompileError(refusal)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # trusted, see above
    except (ModuleNotFoundError, AttributeError) as error:
        raise MemcompileError(
            f"{path} needs the code that defines its model, which Python cannot import here "
            f"({error}): put that module on PYTHONPATH"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError) as error:
        raise MemcompileError(f"{path} is not a readable torch.save file: {error}") from None


def build_source(source: dict, directory: Path, trust_pickle: bool = False) -> nn.Module:
    """The base model of a checkpoint, with fresh weights (the saved ones are copied in later)."""
    if source.get("kind") == "pickle":
        refusal = (
            f"{directory} rebuilds its model from a pickled module ({PICKLED_SOURCE}): "
            "loading it runs the code it contains; pass trust_pickle=True (--trust-pickle) "
            "only if you trust it"
        )
        return load_trusted_pickle(directory / PICKLED_SOURCE, trust_pickle, refusal)
    if source.get("kind") != "transformers":
        raise MemcompileError(f"unknown source model kind {source.get('kind')!r} in {MANIFEST}")
    transformers = require("transformers", "hf", f"rebuilding the {source['class']} model")
    cls = getattr(transformers, source["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise MemcompileError(f"{source['class']!r} is not a transformers model class")
    from .model_io import refuse_config_requests  # (model_io imports this module)

    config_dict = dict(source["config"])
    refuse_config_requests(directory / MANIFEST, config_dict)
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    return cls._from_config(config)


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases: tied tensors are stored once; returns (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def _lazy_recipes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Init recipes of the value tables still on the meta device (never materialised)."""
    recipes = {}
    for name, tensor in tensors.items():
        if not tensor.is_meta:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        recipe = getattr(owner, "values_init", None)
        if not name.endswith(".values") or recipe is None:
            raise MemcompileError(
                f"{name} is on the meta device and has no init recipe: materialise the model "
                "before saving it"
            )
        recipes[name] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "std": recipe.std,
            "seed": recipe.seed,
        }
    return recipes


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    force: bool = False,
    pickled_source: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (converted or not) as a memcompile checkpoint directory.

    HF models are recorded by class and config. Other models only with `pickled_source`,
    the `torch.save`d base module they were converted from, which is copied in and makes
    loading need `trust_pickle=True`.
    """
    if not isinstance(model, nn.Module):
        raise MemcompileError(f"save takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise MemcompileError(f"save takes a directory path, got {path!r}")
    if getattr(model, PLAN_ATTRIBUTE, None) is not None:
        raise MemcompileError(
            "save takes a model on one process; this one is laid out by apply_plan: save it "
            "with memcompile.runtime.save_distributed, or load "
            "memcompile.runtime.full_state_dict(model) (rank 0) into memcompile.load(the "
            "checkpoint it came from) and save that"
        )
    if pickled_source is not None and not Path(pickled_source).is_file():
        raise MemcompileError(f"pickled_source {pickled_source} is not a file")
    source = {"kind": "pickle"} if pickled_source is not None else model_source(model)
    manifest = {
        "format": FORMAT,
        "version": 1 if getattr(model, LEGACY_LABELS_ATTRIBUTE, False) else FORMAT_VERSION,
        "source": source,
        "transforms": getattr(model, RECIPE_ATTRIBUTE, []),
    }
    tensors, manifest["aliases"] = _unique_tensors(model)
    manifest["buffer_dtypes"] = _unsaved_buffer_dtypes(model)
    manifest["lazy_values"] = _lazy_recipes(model, tensors)
    tensors = {name: t for name, t in tensors.items() if name not in manifest["lazy_values"]}
    with atomic_directory(path, force=force) as tmp:
        if pickled_source is not None:
            shutil.copyfile(pickled_source, tmp / PICKLED_SOURCE)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("saved %s (%d tensors)", path, len(tensors))
    return Path(path)


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise MemcompileError(f"{path} is not a memcompile checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise MemcompileError(f"{path} is not a memcompile checkpoint (no {MANIFEST})") from None
    except json.JSONDecodeError as error:
        raise MemcompileError(f"{path / MANIFEST} is not valid JSON: {error}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("version"), int)
    ):
        raise MemcompileError(f"{path / MANIFEST} is not a memcompile checkpoint manifest")
    if manifest["version"] > FORMAT_VERSION:
        raise MemcompileError(
            f"{path} was written by a newer memcompile (format {manifest['version']}); "
            "upgrade memcompile to load it"
        )
    return manifest


def _copy_in(model: nn.Module, name: str, saved: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    target = module._parameters.get(attr)
    if target is None:
        target = module._buffers.get(attr)
    if target is None:
        raise MemcompileError(f"checkpoint tensor {name} has no place in the rebuilt model")
    if target.shape != saved.shape:
        raise MemcompileError(
            f"checkpoint tensor {name} has shape {tuple(saved.shape)}, the rebuilt model "
            f"{tuple(target.shape)}: the checkpoint does not match its manifest"
        )
    # A model saved in another floating dtype than it was built in is fine; a float
    # weight stored as integers (or the other way) is not this model's.
    if saved.is_floating_point() != target.is_floating_point():
        raise MemcompileError(
            f"checkpoint tensor {name} is {saved.dtype}, the rebuilt model holds "
            f"{target.dtype}: the checkpoint does not match its manifest"
        )
    if saved.data_ptr() % 64:
        # safetensors hands out views at any offset of its file; CPU matmul kernels may
        # round differently on unaligned data, so a loaded model would not be bit-identical.
        saved = saved.clone()
    if target.is_meta:  # a lazily created value table: it gets its first real storage
        module._parameters[attr] = nn.Parameter(saved, requires_grad=target.requires_grad)
        return
    # Replacing .data keeps the Parameter object, so tied weights stay tied.
    target.data = saved.to(target.device)


def load(
    path: str | os.PathLike, *, trust_pickle: bool = False, materialize: bool = True
) -> nn.Module:
    """Rebuild a checkpoint's model: base model, transforms re-applied, saved tensors copied in.

    Value tables stored as an init recipe (`--lazy-init`) are built from it, chunk by chunk,
    unless `materialize=False` leaves them on the meta device (for
    `memcompile.runtime.materialize_values` on their final device).
    """
    path = Path(path)
    manifest = read_manifest(path)
    try:
        return _rebuild(path, manifest, trust_pickle, materialize)
    except MemcompileError as error:
        if str(path) in str(error):
            raise
        raise MemcompileError(f"{path}: {error}") from None
    except (KeyError, TypeError, AttributeError, ValueError, OSError, SafetensorError) as error:
        # A hand-edited or truncated checkpoint: say which file, not where it broke.
        raise MemcompileError(
            f"{path} cannot be rebuilt from its {MANIFEST} and {WEIGHTS} "
            f"({type(error).__name__}: {error}): the checkpoint is damaged or edited"
        ) from None


def _unsaved_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Dtypes of the floating buffers the state dict leaves out (non-persistent)."""
    saved = set(model.state_dict())
    return {
        name: str(buffer.dtype).removeprefix("torch.")
        for name, buffer in model.named_buffers()
        if name not in saved and buffer.is_floating_point()
    }


def _pool_in_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Give the rebuilt (still unbuilt) shared table the dtype a transform step asks for.
    The saved model may have changed dtype between two transforms (`model.half()`), which
    the recipe does not record; the final dtypes come from the saved tensors anyway."""
    pool = getattr(model, POOL_NAME, None)
    if pool is None or dtype is None or pool.values.dtype == dtype or not pool.values.is_meta:
        return
    meta = torch.empty(pool.values.shape, dtype=dtype, device="meta")
    pool.values = nn.Parameter(meta, requires_grad=pool.values.requires_grad)


def _rebuild(path: Path, manifest: dict, trust_pickle: bool, materialize: bool) -> nn.Module:
    model = build_source(manifest["source"], path, trust_pickle)
    if manifest["version"] < 2 and len(manifest["transforms"]) > 1:
        setattr(model, LEGACY_LABELS_ATTRIBUTE, True)
    for step in manifest["transforms"]:
        config = MemoryConfig(**step["config"])
        _pool_in_dtype(model, config.torch_dtype)
        # Values are created lazily: saved ones are copied in, the rest built from recipes.
        transform(model, layers=step["layers"], config=config, lazy_init=True)
    if (path / WEIGHTS).exists() and not (path / WEIGHTS).is_file():  # a FIFO would block
        raise MemcompileError(f"{path / WEIGHTS} is not a regular file")
    saved = load_file(str(path / WEIGHTS))
    lazy = manifest.get("lazy_values", {})
    expected = set(model.state_dict()) - set(manifest.get("aliases", {})) - set(lazy)
    missing, unexpected = expected - set(saved), set(saved) - expected
    if missing or unexpected:
        raise MemcompileError(
            f"{path / WEIGHTS} does not match the rebuilt model: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    for name, tensor in saved.items():
        _copy_in(model, name, tensor)
    rebuilt = model.state_dict(keep_vars=True)
    for name, target in manifest.get("aliases", {}).items():
        if name not in rebuilt or target not in rebuilt or rebuilt[name] is not rebuilt[target]:
            raise MemcompileError(
                f"{path / MANIFEST} says {name} is {target}, which the rebuilt model does not "
                "tie: the checkpoint does not match its manifest"
            )
    for name, dtype in manifest.get("buffer_dtypes", {}).items():
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        if isinstance(owner._buffers.get(leaf), torch.Tensor):  # as the saved model had it
            owner._buffers[leaf] = owner._buffers[leaf].to(getattr(torch, dtype))
    for name, recipe in lazy.items():
        owner = model.get_submodule(name.rpartition(".")[0])
        rebuilt, values = owner.values_init, owner._parameters["values"]
        dtype = getattr(torch, str(recipe.get("dtype")), None)
        stored = (recipe["std"], recipe["seed"], recipe["shape"])
        if stored != (rebuilt.std, rebuilt.seed, list(values.shape)) or not isinstance(
            dtype, torch.dtype
        ):
            raise MemcompileError(f"{name}: the checkpoint's init recipe does not match")
        if values.dtype != dtype:  # the model changed dtype after transform, before save
            meta = torch.empty(values.shape, dtype=dtype, device="meta")
            owner._parameters["values"] = nn.Parameter(meta, requires_grad=values.requires_grad)
    if materialize:
        materialize_values(model)
    return model.eval()
