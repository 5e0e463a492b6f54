"""`memcompile plan`: writes a schema-valid plan for the checkpoint, prints the table, refuses
bad input with one line and exit code 2, and writes nothing then."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

import memcompile
from memcompile.cli import main
from memcompile.runtime import load_plan, model_fingerprint
from memcompile.runtime.plan import SCHEMA_PATH

from models import CASES, build

LLAMA = next(c for c in CASES if c.name == "llama")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "ckpt"
    model = memcompile.transform(build(LLAMA), layers=[0, 2], mem_size="4K", knn=4, heads=2)
    memcompile.save(model, path)
    return path


def test_plan_writes_a_valid_plan_and_prints_the_table(ckpt, tmp_path):
    out = tmp_path / "plan.json"
    result = _run("plan", ckpt, "--gpus", "4", "--nodes", "2", "--tokens-per-step", "2048",
                  "--quiet", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))
    assert data["mesh"] == {"nodes": 2, "gpus_per_node": 4, "world_size": 8}
    assert data["tokens_per_step"] == 2048
    assert data["model_fingerprint"] == model_fingerprint(memcompile.load(ckpt))
    (table,) = data["tables"]
    assert table["name"] in result.output and table["strategy"] in result.output
    assert "estimated step" in result.output
    assert result.output.count("\n") > 8  # a row per rank, at least


def test_plan_json_output_and_forced_strategy(ckpt, tmp_path):
    out = tmp_path / "plan.json"
    result = _run("plan", ckpt, "--gpus", "2", "--strategy", "rowwise", "--mode", "infer",
                  "--json", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads(out.read_text())
    assert load_plan(out).tables[0].strategy == "rowwise"
    assert printed["mode"] == "infer"


def test_plan_bandwidth_overrides_change_the_estimate(ckpt, tmp_path):
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    args = ("--gpus", "4", "--strategy", "colwise", "--quiet")
    assert _run("plan", ckpt, *args, "-o", fast).exit_code == 0
    assert _run("plan", ckpt, *args, "--intra-node", "1e9", "-o", slow).exit_code == 0
    assert load_plan(slow).step_time_s > load_plan(fast).step_time_s
    assert load_plan(slow).bandwidth.intra_node == 1e9


@pytest.mark.parametrize(
    "args, message",
    [
        (("--gpus", "0"), "--gpus must be a positive integer"),
        (("--gpus", "2", "--nodes", "-1"), "--nodes must be a positive integer"),
        (("--gpus", "2", "--gpu-mem", "lots"), "is not a memory size"),
        (("--gpus", "2", "--gpu-mem", "1KB"), "the dense part alone does not fit"),
        (("--gpus", "2", "--gpu-mem", "24"), "--gpu-mem 24 needs a unit: e.g. 24GB"),
        (("--gpus", "2", "--gpu-mem", "0GiB"), "--gpu-mem must be an integer >= 1"),
        (("--gpus", "2", "--tokens-per-step", "0"), "--tokens-per-step must be an integer >= 1"),
        (("--gpus", "2", "--strategy", "host"), "inference only"),
        (("--gpus", "2", "--hbm", "-1"), "--hbm must be a positive finite number"),
        (("--gpus", "2", "--host-link", "0"), "--host-link must be a positive finite"),
        (("--gpus", "2", "--intra-node", "inf"), "--intra-node must be a positive finite"),
    ],
)
def test_plan_bad_input_exits_2_with_one_line_and_writes_nothing(ckpt, tmp_path, args, message):
    out = tmp_path / "plan.json"
    result = _run("plan", ckpt, *args, "--quiet", "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_plan_refuses_a_model_that_is_not_a_checkpoint(tmp_path):
    hf = tmp_path / "hf"
    build(LLAMA).save_pretrained(hf)
    result = _run("plan", hf, "--gpus", "2", "-o", tmp_path / "plan.json")
    assert result.exit_code == 2
    assert "convert the model first" in result.output
    assert not (tmp_path / "plan.json").exists()


def test_plan_refuses_to_overwrite_without_force(ckpt, tmp_path):
    out = tmp_path / "plan.json"
    out.write_text("keep me")
    result = _run("plan", ckpt, "--gpus", "2", "--quiet", "-o", out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_text() == "keep me"
    assert _run("plan", ckpt, "--gpus", "2", "--quiet", "--force", "-o", out).exit_code == 0
    assert load_plan(out).mesh.world_size == 2
