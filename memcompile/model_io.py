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

import contextlib
import io
import json
import logging
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from . import checkpoint
from .runtime import MemcompileError
from .runtime.errors import first_line, quieted_loggers, require

log = logging.getLogger(__name__)

PICKLE_RISK = (
    "{path} is a pickled module{what}: loading it runs whatever code the file contains, so "
    "memcompile refuses it by default; pass --trust-pickle only for files you made or trust"
)
PICKLED_OBJECTS = (
    "{path} is a pickle that holds objects other than tensors{what}: loading them runs code "
    "the file names, so memcompile refuses it by default; save the weights on their own "
    "(torch.save(model.state_dict(), ...)) and pass them with --config, or pass --trust-pickle "
    "only for files you made or trust"
)
_CONFIG_UNUSED = (
    "{path} carries its own architecture; --config is for a bare state_dict file: drop --config"
)
# Buffers that transformers computes from the config (older versions saved them): a checkpoint
# with or without them holds the same model.
_DERIVED_BUFFERS = re.compile(r"(^|\.)position_ids$|(^|\.)rotary_emb\.inv_freq$")
# What torch.load raises for a file cut short or damaged (torch and miniz errors, a bad
# struct in a legacy header, bytes that do not decode).
# torch.load reads a file named *.safetensors as one: its SafetensorError is no OSError.
_BROKEN_FILE = (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, struct.error,
                SafetensorError)  # fmt: skip
# What config.json may ask transformers for: its own attention kernels (another value names
# Hub code to fetch and run) and the float dtypes.
_ATTENTION = {"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}
_DTYPES = {"auto", "float32", "float16", "bfloat16", "float64"}


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "checkpoint" | "hf" | "pickle" | "state_dict" | "program"
    pickled_source: Path | None = None  # the trusted pickle a non-HF model was built from
    program: torch.export.ExportedProgram | None = None  # for a .pt2 input


def _transformers():
    return require("transformers", "hf", "reading Hugging Face models")


def _read_config(source: Path, trust_remote_code: bool | None = None):
    """The HF config of `source` (a config file, or a model directory: remote code is found
    next to its config.json), with transformers' logs quieted (they would precede and bury the
    one-line error). `trust_remote_code` None: the caller has no such flag to offer."""
    transformers = _transformers()
    config_file = source / "config.json" if source.is_dir() else source
    try:
        # Checked here: transformers turns bad JSON into an OSError that hides the parse error.
        text = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise MemcompileError(f"{config_file} cannot be read: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MemcompileError(
            f"{config_file} is not a usable HF config: it is not valid JSON ({error}); fix it "
            "or save the config again (config.save_pretrained)"
        ) from None
    if not isinstance(text, dict):
        raise MemcompileError(
            f"{config_file} is not a usable HF config: it holds a JSON {type(text).__name__}, "
            "not an object; give the config.json written by save_pretrained"
        )
    refuse_config_requests(config_file, text)
    try:
        with quieted_loggers(["transformers"]):
            # Local only: a name that is no file must never become a download from the Hub.
            return transformers.AutoConfig.from_pretrained(
                source, trust_remote_code=bool(trust_remote_code), local_files_only=True
            )
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) and trust_remote_code is not None:
            raise MemcompileError(
                f"{source} needs code from the model repository to load: pass "
                "--trust-remote-code only if you trust that code"
            ) from None
        if "model_type" not in text:
            # transformers' message for this lists every model type it knows, in one line.
            raise MemcompileError(
                f'{config_file} is not a usable HF config: it has no "model_type" (e.g. '
                '"llama"); give the config.json written by save_pretrained'
            ) from None
        raise MemcompileError(
            f"{config_file} is not a usable HF config: {first_line(error)}"
        ) from None


def refuse_config_requests(config_file: Path, text: dict) -> None:
    """Bad input for what a config.json may ask of transformers that memcompile does not
    take: quantized weights, an attention implementation from the Hub, an unknown dtype."""
    if "quantization_config" in text:
        raise MemcompileError(
            f"{config_file} describes quantized weights (quantization_config): memcompile "
            "converts floating-point models; give the unquantized model"
        )
    for key in ("attn_implementation", "_attn_implementation"):
        if text.get(key) is not None and text[key] not in _ATTENTION:
            raise MemcompileError(
                f"{config_file} asks for the attention implementation {text[key]!r}, which "
                f"is no transformers built-in: use one of {', '.join(sorted(_ATTENTION))}"
            )
    for key in ("torch_dtype", "dtype"):
        value = text.get(key)
        named = isinstance(value, str) and value.split(".")[-1] in _DTYPES  # "torch.float16" too
        if value is not None and not named:
            raise MemcompileError(
                f"{config_file} gives {key} {value!r}: use one of {', '.join(sorted(_DTYPES))}"
            )


def _load_hf_directory(path: Path, trust_remote_code: bool) -> nn.Module:
    config = _read_config(path, trust_remote_code)
    if not any(path.glob("*.safetensors")):
        raise MemcompileError(
            f"{path} has no .safetensors weights: convert them first (e.g. "
            "save_pretrained(..., safe_serialization=True))"
        )
    cls = _model_class(config)
    try:
        with quieted_loggers(["transformers"]):
            # Mismatched shapes come back in the loading info (not as transformers' error that
            # points at a report the quieted logs no longer show) and are refused below.
            model, info = cls.from_pretrained(
                path,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except Exception as error:  # noqa: BLE001 - weights that do not load are bad input
        unreadable = isinstance(error, (OSError, ValueError, RuntimeError))
        if not unreadable and "safetensor" not in type(error).__name__.lower():
            raise
        raise MemcompileError(
            f"{path}: its weights do not load ({type(error).__name__}: {first_line(error)})"
        ) from None
    fix = (
        "fix the directory: config.json and the complete safetensors of one model, as "
        "save_pretrained writes them"
    )
    if not getattr(config, "architectures", None):
        # AutoModel's fallback is the headless base model: a head in the weights is unexpected.
        fix = 'config.json names no "architectures": add the model class the weights are from'
    _refuse_unfit_weights(
        model,
        info.get("missing_keys", ()),
        info.get("unexpected_keys", ()),
        info.get("mismatched_keys", ()),
        f"{path}: its safetensors do not match config.json's architecture ({type(model).__name__})",
        fix,
    )
    return model.eval()


def _refuse_unfit_weights(
    model: nn.Module,
    missing: Iterable[str],
    unexpected: Iterable[str],
    mismatched: Iterable[tuple],
    problem: str,
    fix: str,
) -> None:
    """Refuse weights that leave part of `model` at its random init (missing, mismatched) or
    that it has no place for (unexpected), less what transformers leaves out on purpose."""
    missing, unexpected = _unaccounted_keys(model, set(missing), set(unexpected))
    parts = []
    if missing:
        parts.append(f"{_weights(missing)} missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{_weights(unexpected)} unexpected ({_some(unexpected)})")
    mismatched = sorted(mismatched)
    if mismatched:
        key, saved, wanted = mismatched[0][:3]
        shape = f"{key} is {list(saved)} in the weights, {list(wanted)} in the model"
        parts.append(f"{_weights(mismatched)} of another shape ({shape})")
    if parts:
        raise MemcompileError(f"{problem}: {'; '.join(parts)}: {fix}")


def _weights(keys: list) -> str:
    return f"{len(keys)} weight{'' if len(keys) == 1 else 's'}"


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _unaccounted_keys(
    model: nn.Module, missing: set[str], unexpected: set[str]
) -> tuple[list[str], list[str]]:
    """Missing and unexpected keys, less those a correct checkpoint may lack or carry: tied
    weights (one copy is saved), non-persistent buffers and buffers computed from the config,
    and the model class's own `_keys_to_ignore_on_load_*` patterns."""
    tensors: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False)]
    named += model.named_buffers(remove_duplicate=False)
    for name, tensor in named:
        tensors.setdefault(id(tensor), []).append(name)
    # A tied weight is one tensor under several names: it is loaded if any of its names is.
    loaded_via_tie = {
        name for names in tensors.values() if not set(names) <= missing for name in names
    }
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in getattr(module, "_non_persistent_buffers_set", ())
    }

    def ignored(attribute: str) -> re.Pattern | None:
        patterns = list(getattr(model, attribute, None) or ())
        return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None

    ignore_missing = ignored("_keys_to_ignore_on_load_missing")
    ignore_unexpected = ignored("_keys_to_ignore_on_load_unexpected")

    def kept(keys: set[str], pattern: re.Pattern | None, allowed: set[str]) -> list[str]:
        return sorted(
            key
            for key in keys
            if key not in allowed
            and key not in non_persistent
            and not _DERIVED_BUFFERS.search(key)
            and not (pattern and pattern.search(key))
        )

    return (
        kept(missing, ignore_missing, loaded_via_tie),
        kept(unexpected, ignore_unexpected, set()),
    )


def _model_class(config) -> type:
    return _named_class(config) or _transformers().AutoModel


def _named_class(config) -> type | None:
    """The model class config.json's "architectures" names, if transformers has it."""
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return None


# The heads tried, in this order, for a config that names no architecture (as
# `LlamaConfig(...).save_pretrained` writes it).
_AUTO_CLASSES = (
    "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
)  # fmt: skip


def _class_for_weights(config, keys: set[str]) -> type:
    """The model class config.json names or, where it names none, the one of its auto
    classes whose parameter names fit `keys` (a state_dict's) best; built on the meta
    device to compare, so nothing is allocated."""
    named = _named_class(config)
    if named is not None:
        return named
    transformers, best = _transformers(), None
    for name in _AUTO_CLASSES:
        try:
            with torch.device("meta"), quieted_loggers(["transformers"]):
                model = getattr(transformers, name).from_config(config)
        except (AttributeError, KeyError, ValueError):  # no such head for this model type
            continue
        misfit = len(set(model.state_dict()) ^ keys)
        if best is None or misfit < best[0]:
            best = (misfit, type(model))
    if best is None:
        raise MemcompileError(
            f'no transformers model class takes this config ({type(config).__name__}): add '
            '"architectures" with the model class the weights are from to config.json'
        )
    return best[1]


def model_from_hf_config(config_path: str | os.PathLike, state_dict_keys: set[str]) -> nn.Module:
    """A randomly initialised transformers model from a config.json (file or directory):
    the class it names, else the one that fits the names `state_dict_keys` best."""
    config_path = Path(config_path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    if not config_path.is_file():
        raise MemcompileError(
            f"{config_path} does not exist: --config takes an HF config.json or its directory"
        )
    config = _read_config(config_path)
    cls = _class_for_weights(config, state_dict_keys)
    with quieted_loggers(["transformers"]):
        return cls._from_config(config)


def _is_torch_save_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle (older torch.save, pickle.dump)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as error:
        raise MemcompileError(f"{path} cannot be read: {error.strerror or error}") from None
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _unreadable(path: Path, error: BaseException) -> MemcompileError:
    # torch's text for these runs to several sentences about miniz and checkpoints: its
    # first sentence says what broke, the rest is the advice given here.
    reason = first_line(error).split(". ")[0].rstrip(".") or type(error).__name__
    return MemcompileError(
        f"{path} is not a readable torch.save file ({reason}): it is truncated or corrupt, "
        "or was not written by torch.save; save it again"
    )


def _pickle_top(stream) -> object:
    """What one pickle in `stream` builds at its top, read opcode by opcode (nothing is
    unpickled, so no code runs): "container", a class's "module.name", or the int a legacy
    torch.save header holds. Raises ValueError or EOFError on a broken stream."""
    top, strings = None, []
    for opcode, arg, _ in pickletools.genops(stream):
        if top is not None or opcode.name in ("PROTO", "FRAME"):
            continue  # read on to STOP: a pickle cut short is a broken file, not a refusal
        if opcode.name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
            top = "container"
        elif opcode.name in ("GLOBAL", "INST"):
            top = str(arg).replace(" ", ".")
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            top = ".".join(strings[-2:])
        elif "UNICODE" in opcode.name or "STRING" in opcode.name:
            strings.append(str(arg))  # the module and name STACK_GLOBAL takes
        elif opcode.name not in ("MARK", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            top = arg if isinstance(arg, int) else "other"
    if top == "collections.OrderedDict":
        top = "container"
    return top


def _pickled_top_level(path: Path) -> object | None:
    """_pickle_top of the object a torch.save file holds; None for a broken file."""
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                name = next(n for n in archive.namelist() if n.split("/")[-1] == "data.pkl")
                stream = io.BytesIO(archive.read(name))
            else:
                stream = stack.enter_context(open(path, "rb"))
            top = _pickle_top(stream)
            if top == torch.serialization.MAGIC_NUMBER:
                # Legacy torch.save: the magic number, protocol and system info come first.
                for _ in range(2):
                    _pickle_top(stream)
                top = _pickle_top(stream)
            return top
    except (ValueError, EOFError, OSError, StopIteration, zipfile.BadZipFile, struct.error):
        return None


def _pickle_refusal(path: Path, top: object, error: BaseException) -> str:
    if top == "container":
        # torch names the first class its weights-only reader refused: say which objects.
        named = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(error))
        return PICKLED_OBJECTS.format(path=path, what=f" ({named[1]})" if named else "")
    what = f" ({top})" if isinstance(top, str) and top != "other" else ""
    return PICKLE_RISK.format(path=path, what=what)


def _weights_entry(obj: dict) -> str | None:
    """The one entry of a training checkpoint that is a state_dict, if exactly one is."""
    entries = [key for key, value in obj.items() if _is_state_dict(value)]
    return entries[0] if len(entries) == 1 else None


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _load_file(path: Path, trust_pickle: bool, config: str | None) -> LoadedModel:
    if not _is_torch_save_file(path):
        raise MemcompileError(
            f"{path} is not a model file memcompile reads: give an HF model directory, a "
            "memcompile checkpoint, a torch.export program (.pt2) or a torch.save file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only reader refuses both a pickle of objects and a broken stream.
        top = _pickled_top_level(path)
        if top is None:
            raise _unreadable(path, error) from None
        refusal = _pickle_refusal(path, top, error)
        obj = checkpoint.load_trusted_pickle(path, trust_pickle, refusal)
    except _BROKEN_FILE as error:
        raise _unreadable(path, error) from None
    if isinstance(obj, nn.Module):
        if config is not None:
            raise MemcompileError(_CONFIG_UNUSED.format(path=path))
        return LoadedModel(obj.eval(), "pickle", path)
    if _is_state_dict(obj):
        if config is None:
            raise MemcompileError(
                f"{path} is a bare state_dict: it holds weights but no architecture; pass "
                "--config with the model's HF config.json"
            )
        model = model_from_hf_config(config, set(obj))
        expected = model.state_dict()
        mismatched = [
            (key, tuple(value.shape), tuple(expected[key].shape))
            for key, value in obj.items()
            if key in expected and value.shape != expected[key].shape
        ]
        problem = f"{path} does not fit the architecture of {config}"
        fix = "pass --config with the config.json of the model these weights come from"
        # load_state_dict raises on a shape mismatch (even not strict): refuse it first.
        _refuse_unfit_weights(model, (), (), mismatched, problem, fix)
        missing, unexpected = model.load_state_dict(obj, strict=False)
        _refuse_unfit_weights(model, missing, unexpected, (), problem, fix)
        return LoadedModel(model.eval(), "state_dict")
    if isinstance(obj, dict) and (entry := _weights_entry(obj)) is not None:
        raise MemcompileError(
            f"{path} holds a training checkpoint: save its {entry!r} entry on its own "
            f"(torch.save(ckpt[{entry!r}], ...)) and pass it with --config"
        )
    raise MemcompileError(
        f"{path} holds a {type(obj).__name__}, not a model or a state_dict: save the model's "
        "state_dict (torch.save(model.state_dict(), ...)) and pass it with --config"
    )


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
    if config is not None and (path.is_dir() or path.suffix == ".pt2"):
        raise MemcompileError(_CONFIG_UNUSED.format(path=path))
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
