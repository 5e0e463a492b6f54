"""The `memcompile` CLI: inputs detected from the path, checkpoints, exit codes, nothing
half-written on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import SMALL, run_cli
from zoo import DECODER

import memcompile
from memcompile import checkpoint

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")
EXAMPLE = next(c for c in CASES if c.name == "example")


def _ids(seed=0, seq=9):
    return torch.randint(1, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return LLAMA.logits(model, ids)


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_convert_hf_directory_augment_round_trip_is_exact(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = run_cli("convert", hf_dir, "--layers", "0,2", "--mode", "augment", *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["memcompile.json", "model.safetensors"]
    loaded = memcompile.load(out)
    assert [b.path for b in memcompile.find_ffn_blocks(loaded)] == ["model.layers.1.mlp"]
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(build(LLAMA), ids))


def test_convert_replace_matches_the_python_api_and_converts_again(hf_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", first).exit_code == 0
    result = run_cli("convert", first, "--layers", "2", *SMALL, "-o", second, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["converted"] == [2]

    expected = build(LLAMA)
    options = dict(mem_size=256, knn=4, heads=2)
    memcompile.transform(expected, layers=[1], **options)
    memcompile.transform(expected, layers=[2], **options)
    loaded = memcompile.load(second)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    ids = _ids(1)
    assert torch.equal(_logits(loaded, ids), _logits(expected, ids))


def test_pickled_module_is_refused_without_trust(tmp_path):
    model_file, out = tmp_path / "model.pt", tmp_path / "out"
    torch.save(build(EXAMPLE), model_file)
    result = run_cli("convert", model_file, "--layers", "1", *SMALL, "-o", out)
    assert result.exit_code == 2
    assert "pickled module" in result.output and "--trust-pickle" in result.output
    assert not out.exists() and not _leftovers(tmp_path, "out")

    result = run_cli("convert", model_file, "--layers", "1", *SMALL, "-o", out, "--trust-pickle")
    assert result.exit_code == 0, result.output
    with pytest.raises(memcompile.MemcompileError, match="trust_pickle"):
        memcompile.load(out)
    loaded = memcompile.load(out, trust_pickle=True)
    expected = memcompile.transform(build(EXAMPLE), layers=[1], mem_size=256, knn=4, heads=2)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), expected(_ids()))


def test_bare_state_dict_needs_a_config(hf_dir, tmp_path):
    state_file, out = tmp_path / "weights.pt", tmp_path / "out"
    original = build(LLAMA)
    torch.save(original.state_dict(), state_file)
    result = run_cli("convert", state_file, "--layers", "1", *SMALL, "-o", out)
    assert result.exit_code == 2
    assert "bare state_dict" in result.output and "--config" in result.output
    assert not out.exists()

    config = hf_dir / "config.json"
    args = ("convert", state_file, "--config", config, "--layers", "1", "--mode", "augment")
    result = run_cli(*args, *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    assert torch.equal(_logits(memcompile.load(out), _ids()), _logits(original, _ids()))


def test_existing_output_is_kept_unless_forced(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"

    result = run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["memcompile.json", "model.safetensors"]
    assert not _leftovers(tmp_path, "out")


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing(hf_dir, tmp_path, monkeypatch, interruption):
    def explode(*args, **kwargs):
        raise interruption("disk full")

    monkeypatch.setattr(checkpoint, "save_file", explode)
    out = tmp_path / "new" / "out"
    result = run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out)
    assert result.exit_code != 0
    assert not (tmp_path / "new").exists()  # nor the folder it made for the output


def test_sigterm_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    """`timeout`, `kill` and a cancelled CI job send SIGTERM: the command ends as after
    Ctrl-C, its staged files and the folders it made removed."""
    real_save_file = checkpoint.save_file

    def terminated_while_writing(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)  # a whole staged file, then:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "save_file", terminated_while_writing)
    out = tmp_path / "new" / "out"
    result = run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", out)
    assert result.exit_code == 143 and "terminated: nothing was written" in result.output
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back


def test_once_the_output_is_in_place_the_process_ignores_sigterm(hf_dir, tmp_path, monkeypatch):
    """As the process itself (the `memcompile` script), a SIGTERM after the outputs are in
    place would end it with 143, the status that says nothing was written."""
    from memcompile.cli import common

    monkeypatch.setattr(common, "PROCESS_ENTRY", True)
    try:
        result = run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", tmp_path / "out")
        assert result.exit_code == 0, result.output
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--layers", "7"], "valid layers are 0-2"),
        (["--layers", "1,1"], "listed twice"),
        (["--layers", "1", "--mem-size", "1000"], "not a perfect square"),
        (["--layers", "1", "--knn", "64", "--mem-size", "256"], "knn=64 is larger"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(hf_dir, tmp_path, args, phrase):
    out = tmp_path / "out"
    result = run_cli("convert", hf_dir, *args, "--quiet", "-o", out)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0]
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_missing_path_and_unknown_directory(tmp_path):
    assert run_cli("inspect", tmp_path / "nope").exit_code == 2
    result = run_cli("inspect", tmp_path)
    assert result.exit_code == 2 and "neither memcompile.json nor config.json" in result.output


def test_inspect_table_and_json(hf_dir):
    result = run_cli("inspect", hf_dir, "--mem-size", "256", "--knn", "4", "--heads", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    blocks = report["blocks"]
    assert [b["index"] for b in blocks] == [0, 1, 2]
    model = build(LLAMA)
    mlp = model.model.layers[0].mlp
    assert blocks[0]["params"] == sum(p.numel() for p in mlp.parameters())

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(1, 32))
    assert blocks[0]["ffn_flops_per_token"] == counter.get_total_flops()

    layer = memcompile.MemoryLayer(32, 32, memcompile.MemoryConfig(mem_size=256, knn=4, heads=2))
    values = layer.values.numel()
    assert blocks[0]["memory_params"] == sum(p.numel() for p in layer.parameters()) - values
    assert blocks[0]["value_params"] == values
    assert blocks[0]["memory_bytes"]["bfloat16"] == 2 * (blocks[0]["memory_params"] + values)

    table = run_cli("inspect", hf_dir, "--mem-size", "256", "--knn", "4", "--quiet")
    assert table.exit_code == 0
    assert (
        "model.layers.2.mlp" in table.output
        and "value table: 8,192 parameters (float32 32.0 KiB" in table.output
    )


def test_layers_take_ranges(hf_dir, tmp_path):
    small = ["--mem-size", "256", "--knn", "4", "--heads", "2", "--json", "-q"]
    result = run_cli("convert", hf_dir, "--layers", "0-1", *small, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["converted"] == [0, 1]
    backwards = run_cli("convert", hf_dir, "--layers", "2-1", *small, "-o", tmp_path / "b")
    assert backwards.exit_code == 2 and backwards.output.strip().splitlines() == [
        "error: --layers 2-1 runs backwards: write 1-2"
    ]
    assert not (tmp_path / "b").exists()


def test_inspect_counts_an_inline_ffn_by_its_projections(tmp_path):
    # BART's fc1/fc2 are children of the whole encoder layer: the layer is no FFN.
    from zoo import ZOO

    bart = next(case for case in ZOO if case.name == "bart").build()
    bart.save_pretrained(tmp_path / "bart")
    report = json.loads(run_cli("inspect", tmp_path / "bart", "--json").output)
    layer = bart.model.encoder.layers[0]
    ffn = sum(p.numel() for m in (layer.fc1, layer.fc2) for p in m.parameters())
    assert ffn < sum(p.numel() for p in layer.parameters())
    assert [b["params"] for b in report["blocks"]] == [ffn] * 4


def test_mixture_of_experts_is_reported_and_refused(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        **dict(DECODER, num_hidden_layers=2, num_local_experts=2, num_experts_per_tok=1)
    )
    path = tmp_path / "mixtral"
    MixtralForCausalLM(cfg).save_pretrained(path)
    listed = run_cli("inspect", path, "--quiet", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["moe_blocks"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    result = run_cli("convert", path, "--layers", "0", *SMALL, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "mixture-of-experts" in result.output
    assert not (tmp_path / "out").exists()


def test_dense_layers_of_a_model_with_moe_blocks_convert(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        **DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],  # layers 0 and 2 are MoE blocks, each with a shared expert
    )
    path = tmp_path / "qwen2moe"
    original = Qwen2MoeForCausalLM(cfg).eval()
    original.save_pretrained(path)
    listed = json.loads(run_cli("inspect", path, "--quiet", "--json").output)
    assert listed["moe_blocks"] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert [(b["index"], b["path"]) for b in listed["blocks"]] == [(1, "model.layers.1.mlp")]
    table = run_cli("inspect", path, "--quiet").output
    assert "mixture-of-experts block 2 (not convertible): model.layers.2.mlp" in table

    refused = run_cli("convert", path, "--layers", "0", *SMALL, "-o", tmp_path / "moe")
    assert refused.exit_code == 2 and "layer 0 is a mixture-of-experts block" in refused.output
    args = ["--layers", "1", "--mode", "augment", *SMALL, "-o", tmp_path / "out"]
    assert run_cli("convert", path, *args).exit_code == 0
    converted = memcompile.load(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)


@pytest.mark.parametrize("command", [[], ["inspect"], ["convert"]])
def test_help_shows_an_example(command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0
    assert "memcompile" in result.output and ("Example" in result.output or not command)


def test_console_script_exit_codes(hf_dir, tmp_path):
    exe = Path(sys.executable).parent / "memcompile"
    ok = subprocess.run([exe, "inspect", hf_dir, "-q"], capture_output=True, text=True)
    assert ok.returncode == 0 and "3 FFN blocks" in ok.stdout
    bad = subprocess.run(
        [exe, "convert", hf_dir, "--layers", "5", "-q", "-o", tmp_path / "o"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: layer 5")
    usage = subprocess.run([exe, "convert", hf_dir], capture_output=True, text=True)
    assert usage.returncode == 2


def test_remote_code_is_refused_without_trust(tmp_path):
    model_dir, out = tmp_path / "mystery", tmp_path / "out"
    model_dir.mkdir()
    config = {
        "model_type": "mystery",
        "architectures": ["MysteryModel"],
        "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig"},
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_mystery.py").write_text("raise SystemExit('code ran')\n")
    result = run_cli("convert", model_dir, "--layers", "0", *SMALL, "-o", out)
    assert result.exit_code == 2
    assert "--trust-remote-code" in result.output and "code ran" not in result.output
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_inspect_lists_the_memory_layers_a_checkpoint_already_has(hf_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_cli("convert", hf_dir, "--layers", "1", *SMALL, "-o", ckpt).exit_code == 0
    result = run_cli("inspect", ckpt, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [b["index"] for b in report["blocks"]] == [0, 2]
    assert report["memory_layers"] == [
        {"path": "model.layers.1.mlp", "rows": 256, "v_dim": 32, "heads": 2, "knn": 4,
         "mode": "replace", "shared_values": True}
    ]  # fmt: skip
    text = run_cli("inspect", ckpt, "--quiet").output
    assert "memory layer (replace): model.layers.1.mlp: 256 x 32 values" in text
    own = tmp_path / "own"  # a table per layer: not shared
    assert (
        run_cli("convert", hf_dir, "--layers", "1", *SMALL, "--no-share", "-o", own).exit_code == 0
    )
    report = json.loads(run_cli("inspect", own, "--quiet", "--json").output)
    assert [m["shared_values"] for m in report["memory_layers"]] == [False]
    assert "shared values" not in run_cli("inspect", own, "--quiet").output
