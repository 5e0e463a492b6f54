"""torch.export programs (.pt2): `memcompile convert` rewrites the ATen graph and writes a
.pt2 back; dynamic batch and sequence dimensions survive."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from zoo import ZOO

import memcompile
from memcompile.cli import main
from memcompile.program import load_program

from models import CASES, VOCAB, build

EXAMPLE = next(c for c in CASES if c.name == "example")
SMALL = ["--mem-size", "256", "--knn", "4", "--heads", "2", "--quiet"]


class GatedStack(nn.Module):
    """SwiGLU blocks and fused gate_up blocks (Phi-3 style), in one plain module."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.gate = nn.ModuleList(nn.Linear(d, h) for _ in range(2))
        self.up = nn.ModuleList(nn.Linear(d, h) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(h, d) for _ in range(2))
        self.gate_up = nn.Linear(d, 2 * h)
        self.fused_down = nn.Linear(h, d)

    def forward(self, x):
        for gate, up, down in zip(self.gate, self.up, self.down):
            x = x + down(F.silu(gate(x)) * up(x))
        a, b = self.gate_up(x).chunk(2, dim=-1)
        return x + self.fused_down(F.gelu(a) * b)


def _export(model, example, path):
    dims = {0: torch.export.Dim("batch", max=32), 1: torch.export.Dim("seq", max=64)}
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=(dims,))
    torch.export.save(program, path)
    return program


def _convert(source, out, *args):
    return CliRunner().invoke(
        main, ["convert", str(source), *map(str, args), *SMALL, "-o", str(out)]
    )


def test_program_augment_is_exact_on_new_shapes_and_replace_swaps_ops(tmp_path):
    source = tmp_path / "example.pt2"
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    original = _export(build(EXAMPLE), ids, source)

    result = _convert(source, tmp_path / "augment.pt2", "--layers", "0,2", "--mode", "augment")
    assert result.exit_code == 0, result.output
    converted = torch.export.load(tmp_path / "augment.pt2")
    probe = torch.randint(1, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(converted.module()(probe), original.module()(probe))

    result = _convert(source, tmp_path / "replace.pt2", "--layers", "1")
    assert result.exit_code == 0, result.output
    replaced = torch.export.load(tmp_path / "replace.pt2")
    ops = [n.target for n in replaced.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.memcompile.pk_topk.default) == 1
    assert ops.count(torch.ops.memcompile.bag.default) == 1
    names = set(replaced.state_dict)
    assert "blocks.1.mlp.fc_in.weight" not in names and "blocks.0.mlp.fc_in.weight" in names
    assert "blocks.1.mlp.memory.keys" in names and "memcompile_pool.values" in names
    with torch.no_grad():
        assert replaced.module()(probe).shape == (3, 21, VOCAB)

    # A converted program lists its lookups, and is not converted again (the graph holds
    # memcompile ops, no MemoryLayer modules).
    listed = CliRunner().invoke(main, ["inspect", str(tmp_path / "augment.pt2"), "--json"])
    assert json.loads(listed.output)["graph_memory_lookups"] == 2
    again = _convert(tmp_path / "replace.pt2", tmp_path / "again.pt2", "--layers", "0")
    assert again.exit_code == 2 and not (tmp_path / "again.pt2").exists()
    assert again.output.count("\n") == 1 and "already holds memory lookups" in again.output
    with pytest.raises(memcompile.MemcompileError, match="convert the original program"):
        memcompile.transform(replaced.module(), layers=[0], mem_size=256, knn=4, heads=2)
    lazy = _convert(source, tmp_path / "lazy.pt2", "--layers", "0", "--lazy-init")
    assert lazy.exit_code == 2 and not (tmp_path / "lazy.pt2").exists()
    assert lazy.output.count("\n") == 1 and "drop --lazy-init" in lazy.output


class _Scaled(nn.Module):
    """A program called with a keyword input as well: forward(x, scale=...)."""

    def __init__(self):
        super().__init__()
        self.stack = GatedStack()

    def forward(self, x, scale=None):
        return self.stack(x) * scale


def test_keyword_inputs_keep_their_dynamic_dims(tmp_path):
    x, scale = torch.randn(2, 5, 16), torch.randn(2, 1, 1)
    batch, seq = torch.export.Dim("batch", max=32), torch.export.Dim("seq", max=64)
    dims = {"x": {0: batch, 1: seq}, "scale": {0: batch}}
    program = torch.export.export(_Scaled().eval(), (x,), {"scale": scale}, dynamic_shapes=dims)
    torch.export.save(program, tmp_path / "kw.pt2")
    result = _convert(tmp_path / "kw.pt2", tmp_path / "out.pt2", "--layers", "stack", "--mode",
                      "augment")  # fmt: skip
    assert result.exit_code == 0, result.output
    converted = torch.export.load(tmp_path / "out.pt2")
    probe = torch.randn(3, 11, 16), torch.randn(3, 1, 1)  # a new batch and length
    with torch.no_grad():
        expected = program.module()(probe[0], scale=probe[1])
        assert torch.equal(converted.module()(probe[0], scale=probe[1]), expected)


def test_gated_and_fused_programs(tmp_path):
    torch.manual_seed(0)
    model = GatedStack()
    source = tmp_path / "gated.pt2"
    original = _export(model, torch.randn(2, 5, 16), source)
    listed = CliRunner().invoke(main, ["inspect", str(source), "--json", "--quiet"])
    assert listed.exit_code == 0, listed.output
    blocks = json.loads(listed.output)["blocks"]
    assert [(b["path"], b["kind"]) for b in blocks] == [
        ("", "gated"),
        ("", "gated"),
        ("", "fused_gated"),
    ] or [b["kind"] for b in blocks] == ["gated", "gated", "fused_gated"]

    labels = ",".join(str(b["index"]) for b in blocks)
    result = _convert(source, tmp_path / "out.pt2", "--layers", labels, "--mode", "augment")
    assert result.exit_code == 0, result.output
    x = torch.randn(4, 7, 16)
    with torch.no_grad():
        expected = original.module()(x)
        assert torch.equal(torch.export.load(tmp_path / "out.pt2").module()(x), expected)


class Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def test_exported_gpt2_conv1d_and_decomposed_gelu_are_found_and_converted(tmp_path):
    """In ATen, GPT-2's Conv1D is view/addmm/view and its gelu_new is mul/pow/tanh/add."""
    source = tmp_path / "gpt2.pt2"
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    original = _export(Logits(next(c for c in ZOO if c.name == "gpt2").build()), ids, source)
    listed = CliRunner().invoke(main, ["inspect", str(source), "--json", "--quiet"])
    blocks = json.loads(listed.output)["blocks"]
    assert [(b["index"], b["kind"], b["activation"]) for b in blocks] == [
        (i, "mlp", "gelu_tanh") for i in range(3)
    ]
    assert {(b["d_model"], b["d_hidden"]) for b in blocks} == {(32, 128)}

    result = _convert(source, tmp_path / "augment.pt2", "--layers", "0,2", "--mode", "augment")
    assert result.exit_code == 0, result.output
    probe = torch.randint(1, VOCAB, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original.module()(probe)
        assert torch.equal(torch.export.load(tmp_path / "augment.pt2").module()(probe), expected)

    result = _convert(source, tmp_path / "replace.pt2", "--layers", "1")
    assert result.exit_code == 0, result.output
    replaced = torch.export.load(tmp_path / "replace.pt2")
    ops = [n.target for n in replaced.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.memcompile.pk_topk.default) == 1
    assert ops.count(torch.ops.aten.tanh.default) == 2  # blocks 0 and 2 keep their gelu
    assert not any("h.1.mlp.c_fc" in name for name in replaced.state_dict)
    with torch.no_grad():
        assert replaced.module()(probe).shape == expected.shape


class PointwiseBetween(nn.Module):
    def __init__(self, between, d=16, h=32):
        super().__init__()
        self.up, self.down, self.between = nn.Linear(d, h), nn.Linear(h, d), between

    def forward(self, x):
        return x + self.down(self.between(self.up(x)))


def test_an_activation_export_decomposes_is_named_by_its_curve():
    quick_gelu = PointwiseBetween(lambda h: h * torch.sigmoid(1.702 * h))
    program = torch.export.export(quick_gelu.eval(), (torch.randn(2, 5, 16),))
    (block,) = memcompile.find_ffn_blocks(program.module())
    assert (block.kind, block.activation, block.d_hidden) == ("mlp", "quick_gelu", 32)

    affine = PointwiseBetween(lambda h: (h * 0.5 + 1.0) / 3.0)  # no activation: no FFN
    program = torch.export.export(affine.eval(), (torch.randn(2, 5, 16),))
    assert memcompile.find_ffn_blocks(program.module()) == []
    with pytest.raises(memcompile.MemcompileError, match="no FFN blocks found in the graph:"):
        memcompile.transform(program.module(), [0])


class AddmmProjection(nn.Module):
    """Holds a projection's `weight` (in, out) and `bias`, applied by the parent's forward."""

    def __init__(self, d_in, d_out, as_buffer=False):
        super().__init__()
        weight = torch.randn(d_in, d_out) * 0.1
        if as_buffer:
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(d_out))


class AddmmMLP(nn.Module):
    """up and down as addmm on x.view(-1, d): Conv1D's pattern unless `layout` breaks it."""

    def __init__(self, layout="conv1d", d=16, h=64):
        super().__init__()
        self.layout = layout
        halves = 2 if layout == "split_rows" else 1  # each row of x split in two
        self.up = AddmmProjection(d // halves, h // halves)
        self.down = AddmmProjection(h, d, as_buffer=layout == "buffer")

    def forward(self, x):
        batch, seq, d = x.shape
        flat = x.reshape(-1, d // 2) if self.layout == "split_rows" else x.view(-1, d)
        h = torch.addmm(self.up.bias, flat, self.up.weight)
        h = F.gelu(h.view(batch, seq, -1))
        y = torch.addmm(self.down.bias, h.reshape(-1, h.shape[-1]), self.down.weight)
        if self.layout == "to_heads":
            return x + y.view(batch, seq, d, 1).squeeze(-1)
        return x + y.view(batch, seq, d)


@pytest.mark.parametrize("layout", ["to_heads", "split_rows", "buffer"])
def test_an_addmm_that_is_no_conv1d_is_no_projection(layout):
    program = torch.export.export(AddmmMLP(layout).eval(), (torch.randn(2, 5, 16),))
    assert memcompile.find_ffn_blocks(program.module()) == []


def test_an_addmm_mlp_is_a_conv1d_ffn():
    program = torch.export.export(AddmmMLP().eval(), (torch.randn(2, 5, 16),))
    (block,) = memcompile.find_ffn_blocks(program.module())
    assert (block.kind, block.d_model, block.d_hidden, block.activation) == ("mlp", 16, 64, "gelu")


@pytest.mark.parametrize(("source", "out"), [("a.pt2", "out"), ("a.pt", "out.pt2")])
def test_program_in_program_out(tmp_path, source, out):
    (tmp_path / source).write_bytes(b"")
    result = _convert(tmp_path / source, tmp_path / out, "--layers", "0")
    assert result.exit_code == 2 and ".pt2" in result.output
    assert not (tmp_path / out).exists()


def test_not_a_program(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    result = _convert(tmp_path / "bad.pt2", tmp_path / "out.pt2", "--layers", "0")
    assert result.exit_code == 2 and "not a torch.export program" in result.output
    assert not (tmp_path / "out.pt2").exists()


def test_a_programs_blocks_count_their_own_parameters(tmp_path):
    """In a program every FFN lies in one graph: each block counts the weights its
    projections read, not its enclosing module's (here the whole model)."""
    model = nn.Sequential(
        nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16), nn.LayerNorm(16),
        nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16),
    ).eval()  # fmt: skip
    program = torch.export.export(model, (torch.randn(2, 16),))
    torch.export.save(program, tmp_path / "seq.pt2")
    listed = CliRunner().invoke(main, ["inspect", str(tmp_path / "seq.pt2"), "--json"])
    assert listed.exit_code == 0, listed.output
    own = [sum(p.numel() for i in pair for p in model[i].parameters()) for pair in [(0, 2), (4, 6)]]
    assert [b["params"] for b in json.loads(listed.output)["blocks"]] == own


def test_an_hf_program_returning_its_model_output_loads_in_a_fresh_process(tmp_path):
    """A program exported from an HF model as it is returns a ModelOutput, which torch can
    read back only once transformers has defined (registered) that class: the CLI, in a
    process that has not imported it, loads the program all the same."""
    model = next(case for case in ZOO if case.name == "llama").build().eval()
    model.config.use_cache = False  # a cache object is no exportable output
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.export.save(torch.export.export(model, (ids,), strict=False), tmp_path / "hf.pt2")
    done = subprocess.run(
        [sys.executable, "-m", "memcompile.cli", "inspect", str(tmp_path / "hf.pt2"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert [b["kind"] for b in json.loads(done.stdout)["blocks"]] == ["gated"] * 3
    assert done.stderr.strip() == ""


def test_only_transformers_own_modules_are_imported_for_an_archive():
    from memcompile import program

    said = "NotImplementedError: Deserializing {} in pytree is not registered."
    assert not program._import_output_types([said.format("os.path.Anything")])
    assert not program._import_output_types([said.format("transformers.no_such_module.X")])


def test_a_broken_archive_says_why_in_one_line(tmp_path):
    source = tmp_path / "ok.pt2"
    _export(build(EXAMPLE), torch.randint(1, VOCAB, (2, 9)), source)
    (tmp_path / "cut.pt2").write_bytes(source.read_bytes()[:2000])
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "cut.pt2")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "not a torch.export program" in result.output and "warnings above" not in result.output


class _MakesDirectory:
    """A pickled payload whose unpickling creates a directory: code run by loading."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _archive_with_a_pickled_weight(source, out, marker):
    """`source` (a torch.export.save archive) with its first weight stored as a pickle."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        names = src.namelist()
        config_name = next(n for n in names if n.endswith("weights_config.json"))
        config = json.loads(src.read(config_name))
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        weight_name = next(n for n in names if n.endswith("/weights/" + entry["path_name"]))
        payload = io.BytesIO()
        torch.save(_MakesDirectory(marker), payload)
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename == weight_name:
                data = payload.getvalue()
            dst.writestr(info, data)


def test_a_program_with_pickled_payloads_is_refused_unless_trusted(tmp_path):
    _export(GatedStack(), torch.randn(2, 5, 16), tmp_path / "plain.pt2")
    marker = tmp_path / "code_ran"
    _archive_with_a_pickled_weight(tmp_path / "plain.pt2", tmp_path / "crafted.pt2", marker)

    result = _convert(tmp_path / "crafted.pt2", tmp_path / "out.pt2", "--layers", "0")
    assert result.exit_code == 2, result.output
    assert "pickled payloads" in result.output and "--trust-pickle" in result.output
    assert not marker.exists() and not (tmp_path / "out.pt2").exists()
    with pytest.raises(memcompile.MemcompileError, match="trust_pickle=True"):
        load_program(tmp_path / "crafted.pt2")
    assert not marker.exists()
    # the archive really is dangerous: trusted, its payload runs (and is no weight)
    with pytest.raises(memcompile.MemcompileError, match="not a torch.export program"):
        load_program(tmp_path / "crafted.pt2", trust_pickle=True)
    assert marker.is_dir()
    # the guard is gone after the load: the untouched archive loads, pickles work again
    assert isinstance(load_program(tmp_path / "plain.pt2"), torch.export.ExportedProgram)
    assert pickle.loads(pickle.dumps([1])) == [1]
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def _archive_with_code(source, out, marker):
    """`source` with its first shape expression made to run Python (torch's deserializer
    parses each with sympy.sympify, Python's eval), still giving the expression's value."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("models/model.json"):
                text = data.decode()
                start = text.index('"expr_str": "') + len('"expr_str": "')
                end = text.index('"', start)
                payload = f"(__import__('pathlib').Path('{marker}').mkdir(), {text[start:end]})[1]"
                data = (text[:start] + payload + text[end:]).encode()
            dst.writestr(info, data)


def test_code_a_program_archive_would_run_is_refused_unless_trusted(tmp_path):
    _export(GatedStack(), torch.randn(2, 5, 16), tmp_path / "plain.pt2")
    marker = tmp_path / "code_ran"
    _archive_with_code(tmp_path / "plain.pt2", tmp_path / "crafted.pt2", marker)
    with pytest.raises(memcompile.MemcompileError, match="shape expression .* trust_pickle=True"):
        load_program(tmp_path / "crafted.pt2")
    assert not marker.exists()
    load_program(tmp_path / "crafted.pt2", trust_pickle=True)  # the archive really runs code
    assert marker.is_dir()
    with zipfile.ZipFile(tmp_path / "plain.pt2") as src:
        prefix = src.namelist()[0].split("/")[0]
    compiled = tmp_path / "compiled.pt2"
    with zipfile.ZipFile(tmp_path / "plain.pt2") as src, zipfile.ZipFile(compiled, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        dst.writestr(f"{prefix}/data/aotinductor/model/model.wrapper.so", b"\x7fELF")
    result = _convert(compiled, tmp_path / "out.pt2", "--layers", "0")
    assert result.exit_code == 2 and "holds compiled code" in result.output
    assert isinstance(load_program(tmp_path / "plain.pt2"), torch.export.ExportedProgram)


def test_the_pickle_guard_holds_on_the_loading_thread_only():
    """While one thread loads a .pt2, another unpickles as before; guarded loads from two
    threads leave pickle.loads as it was."""
    from memcompile import program

    inside, release = threading.Event(), threading.Event()
    refused = []

    def load():
        with program._unpickling_refused():
            try:
                pickle.loads(pickle.dumps([1]))
            except pickle.UnpicklingError:
                refused.append(True)
            inside.set()
            release.wait(10)

    loader = threading.Thread(target=load)
    loader.start()
    assert inside.wait(10)
    assert pickle.loads(pickle.dumps([2])) == [2]  # this thread is not loading
    second = threading.Thread(target=load)  # waits for the first load to end
    second.start()
    release.set()
    loader.join(10)
    second.join(10)
    assert refused == [True, True]
    assert pickle.loads is program._PICKLE_LOADS


@pytest.mark.parametrize("mode", ["replace", "augment"])
def test_ffns_back_to_back_in_a_program_convert_as_the_module_does(mode):
    """A flat Sequential of three FFNs as a torch.export program: a block's input is the
    exit of the block before it, rewritten first."""

    def flat():
        torch.manual_seed(0)
        ffns = [(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3)]
        return nn.Sequential(*[m for ffn in ffns for m in ffn]).eval()

    x = torch.randn(2, 5, 16)
    program = torch.export.export(flat(), (x,)).module()
    module = flat()
    options = dict(mem_size=64, knn=4, heads=2, mode=mode)
    memcompile.transform(program, layers=[0, 1, 2], **options)
    memcompile.transform(module, layers=[0, 1, 2], **options)
    with torch.no_grad():
        assert torch.equal(program(x), module(x))
        if mode == "augment":
            assert torch.equal(program(x), flat()(x))
