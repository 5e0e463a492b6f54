"""Damaged or hand-edited checkpoints: one MemcompileError naming the checkpoint, never a
KeyError or a safetensors error from deep inside the rebuild."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo import ZOO

import memcompile
from memcompile import MemcompileError

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama-mem"
    model = memcompile.transform(build(LLAMA), [1], mem_size=256, knn=4, heads=2)
    return memcompile.save(model, path)


def _edit_manifest(manifest: dict, case: str):
    if case == "a list":
        return [manifest]
    if case == "no transforms":
        return {k: v for k, v in manifest.items() if k != "transforms"}
    if case == "unknown config key":
        manifest["transforms"][0]["config"]["topk"] = 3
    if case == "no such layer":
        manifest["transforms"][0]["layers"] = [7]
    if case == "no source class":
        del manifest["source"]["class"]
    if case == "an untied alias":
        manifest["aliases"][VICTIM] = "lm_head.weight"
    return manifest


VICTIM = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("a list", "is not a memcompile checkpoint manifest"),
        ("no transforms", "the checkpoint is damaged or edited"),
        ("unknown config key", "the checkpoint is damaged or edited"),
        ("no such layer", "llama-mem: layer 7 is not an FFN block"),
        ("no source class", "the checkpoint is damaged or edited"),
        ("no weights", "the checkpoint is damaged or edited"),
        ("truncated weights", "the checkpoint is damaged or edited"),
        ("an untied alias", f"says {VICTIM} is lm_head.weight, which the rebuilt model does"),
        ("integer weights", f"{VICTIM} is torch.int8, the rebuilt model holds torch.float32"),
        ("a fifo for weights", "model.safetensors is not a regular file"),
    ],
)
def test_a_damaged_checkpoint_is_one_error_naming_it(ckpt, tmp_path, case, message):
    copy = shutil.copytree(ckpt, tmp_path / "llama-mem")
    manifest = json.loads((copy / "memcompile.json").read_text())
    (copy / "memcompile.json").write_text(json.dumps(_edit_manifest(manifest, case)))
    weights = copy / "model.safetensors"
    if case == "no weights":
        weights.unlink()
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    if case in ("an untied alias", "integer weights"):  # the weight left out, or as int8
        tensors = load_file(weights)
        victim = tensors.pop(VICTIM)
        if case == "integer weights":
            tensors[VICTIM] = victim.to(torch.int8)
        save_file(tensors, weights)
    if case == "a fifo for weights":
        weights.unlink()
        os.mkfifo(weights)
    with pytest.raises(MemcompileError, match=message) as raised:
        memcompile.load(copy)
    assert "\n" not in str(raised.value) and "llama-mem" in str(raised.value)


def test_a_file_inside_a_checkpoint_is_not_one(ckpt):
    with pytest.raises(MemcompileError, match="is not a memcompile checkpoint directory"):
        memcompile.load(ckpt / "model.safetensors")
    assert isinstance(memcompile.load(ckpt).model.layers[1].mlp, memcompile.MemoryLayer)


def test_save_refuses_what_it_cannot_write(tmp_path):
    model = memcompile.transform(build(LLAMA), [1], mem_size=256, knn=4, heads=2)
    for args, kwargs, message in [
        ((model, None), {}, "save takes a directory path, got None"),
        (("model", tmp_path / "a"), {}, "save takes a torch.nn.Module"),
        ((model, tmp_path / "b"), {"pickled_source": tmp_path / "gone.pt"}, "is not a file"),
    ]:
        with pytest.raises(MemcompileError, match=message):
            memcompile.save(*args, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_loaded_model_is_bit_identical_and_its_tensors_aligned(tmp_path):
    # BART's outputs moved by 1e-7 when its tensors kept safetensors' unaligned offsets.
    case = next(c for c in ZOO if c.name == "bart")
    model = case.build().eval()
    memcompile.transform(model, layers=["encoder.1", "decoder.0"], mem_size=256, knn=4, heads=2)
    loaded = memcompile.load(memcompile.save(model, tmp_path / "ckpt"))
    assert all(t.data_ptr() % 64 == 0 for t in [*loaded.parameters(), *loaded.buffers()])
    inputs = case.example_inputs(seed=1)
    with torch.no_grad():
        assert torch.equal(case.output(loaded, inputs), case.output(model, inputs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_before_saving_loads_bit_identical(tmp_path, dtype):
    # .to(dtype) casts the rotary inv_freq buffer, which the state dict leaves out and
    # transformers rebuilds in float32: the checkpoint records its dtype.
    model = build(LLAMA).to(dtype)
    memcompile.transform(model, [1], mem_size=256, knn=4, heads=2, mode="augment")
    loaded = memcompile.load(memcompile.save(model, tmp_path / "ckpt"))
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(LLAMA.logits(loaded, ids), LLAMA.logits(model, ids))
    assert {b.dtype for b in loaded.buffers() if b.is_floating_point()} == {dtype}


def test_a_model_cast_between_two_transforms_loads_bit_identical(tmp_path):
    # The recipe replays both transforms on a float32 model: the second one's float16 must
    # not clash with the shared table the first one made in float32 there.
    model = build(LLAMA)
    memcompile.transform(model, [1], mem_size=256, knn=4, heads=2)
    model.half()
    memcompile.transform(model, [2], mem_size=256, knn=4, heads=2, dtype="float16")
    loaded = memcompile.load(memcompile.save(model, tmp_path / "ckpt"))
    assert loaded.memcompile_pool.values.dtype == torch.float16
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(LLAMA.logits(loaded, ids), LLAMA.logits(model, ids))
