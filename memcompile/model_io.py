"""Reading the models `memcompile convert` and `inspect` accept, detected from the path.

- a memcompile checkpoint directory (`memcompile.json`): rebuilt with `checkpoint.load`;
- a torch.export program (`.pt2`): its module, one graph of ATen ops;
- an HF model directory (`config.json` + safetensors): transformers' Auto classes, never
  remote code unless asked;
- a pickled full module (`torch.save(model)`): refused unless the user trusts it, since
  unpickling runs arbitrary code;
- a bare state_dict: needs the architecture, from an HF config (`config=`).
Files are probed with `torch.load(weights_only=True)`, which never runs code.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .runtime import MemcompileError
from .runtime.errors import first_line, require

log = logging.getLogger(__name__)

PICKLE_RISK = (
    "{path} is a pickled module: loading it runs whatever code the file contains, so "
    "memcompile refuses it by default; pass --trust-pickle only for files you made or trust"
)


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "checkpoint" | "hf" | "pickle" | "state_dict" | "program"
    pickled_source: Path | None = None  # the trusted pickle a non-HF model was built from
    program: torch.export.ExportedProgram | None = None  # for a .pt2 input


def _transformers():
    return require("transformers", "hf", "reading Hugging Face models")


def _load_hf_directory(path: Path, trust_remote_code: bool) -> nn.Module:
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise MemcompileError(
                f"{path} needs code from the model repository to load: pass "
                "--trust-remote-code only if you trust that code"
            ) from None
        raise MemcompileError(f"{path}: cannot read config.json: {error}") from None
    if not any(path.glob("*.safetensors")):
        raise MemcompileError(
            f"{path} has no .safetensors weights: convert them first (e.g. "
            "save_pretrained(..., safe_serialization=True))"
        )
    cls = _model_class(config)
    try:
        model = cls.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True, local_files_only=True
        )
    except Exception as error:  # noqa: BLE001 - weights that do not load are bad input
        unreadable = isinstance(error, (OSError, ValueError, RuntimeError))
        if not unreadable and "safetensor" not in type(error).__name__.lower():
            raise
        raise MemcompileError(
            f"{path}: its weights do not load ({type(error).__name__}: {first_line(error)})"
        ) from None
    return model.eval()


def _model_class(config) -> type:
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def model_from_hf_config(config_path: str | os.PathLike) -> nn.Module:
    """A randomly initialised transformers model from a config.json (file or directory)."""
    transformers = _transformers()
    config_path = Path(config_path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    if not config_path.is_file():
        raise MemcompileError(
            f"{config_path} does not exist: --config takes an HF config.json or its directory"
        )
    try:
        # Local only: a name that is no file must never become a download from the Hub.
        config = transformers.AutoConfig.from_pretrained(config_path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MemcompileError(f"{config_path} is not a usable HF config: {error}") from None
    return _model_class(config)._from_config(config)


def _is_torch_save_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle (older torch.save, pickle.dump)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _load_file(path: Path, trust_pickle: bool, config: str | None) -> LoadedModel:
    if not _is_torch_save_file(path):
        raise MemcompileError(
            f"{path} is not a model file memcompile reads: give an HF model directory, a "
            "memcompile checkpoint, a torch.export program (.pt2) or a torch.save file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refusal = PICKLE_RISK.format(path=path)
        obj = checkpoint.load_trusted_pickle(path, trust_pickle, refusal)
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as error:
        raise MemcompileError(f"{path} is not a readable torch.save file: {error}") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickle", path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if config is None:
            raise MemcompileError(
                f"{path} is a bare state_dict: it holds weights but no architecture; pass "
                "--config with the model's HF config.json"
            )
        model = model_from_hf_config(config)
        missing, unexpected = model.load_state_dict(obj, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise MemcompileError(
                f"{path} does not fit the architecture of {config}: missing "
                f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        return LoadedModel(model.eval(), "state_dict")
    raise MemcompileError(f"{path} holds a {type(obj).__name__}, not a model or a state_dict")


def load_model(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    trust_pickle: bool = False,
    config: str | None = None,
    materialize: bool = True,
) -> LoadedModel:
    """Load the model at `path`, whatever of the accepted kinds it is. `materialize=False`
    leaves a checkpoint's lazy value tables on the meta device (for reading the model's
    structure without building tables that may not fit in memory)."""
    path = Path(path)
    if not path.exists():
        raise MemcompileError(f"{path} does not exist")
    if path.is_dir():
        if checkpoint.is_checkpoint(path):
            model = checkpoint.load(path, trust_pickle=trust_pickle, materialize=materialize)
            pickled = path / checkpoint.PICKLED_SOURCE
            return LoadedModel(model, "checkpoint", pickled if pickled.is_file() else None)
        if (path / "config.json").is_file():
            return LoadedModel(_load_hf_directory(path, trust_remote_code), "hf")
        raise MemcompileError(
            f"{path} is a directory with neither memcompile.json nor config.json: give a "
            "memcompile checkpoint or an HF model directory"
        )
    if path.suffix == ".pt2":
        from .program import load_program

        program = load_program(path, trust_pickle)
        return LoadedModel(program.module(), "program", program=program)
    return _load_file(path, trust_pickle, config)
