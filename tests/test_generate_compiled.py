"""A converted causal LM decodes under torch.compile with a static KV cache (the set-up of
mode="reduce-overhead", which CUDA-graphs the decode step on a GPU) and gives the tokens of
eager decoding: the memory ops trace into one graph, with no graph break."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

import memcompile

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")


def test_generate_under_torch_compile_matches_eager():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = memcompile.transform(build(LLAMA), layers=[0, 2], mem_size="4K", knn=4, heads=2)
    model = model.to(device).eval()
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **settings)
        torch._dynamo.reset()
        counters.clear()
        # CPU: aot_eager checks tracing without minutes of C++ compilation on a 2-core box.
        options = {"mode": "reduce-overhead"} if device == "cuda" else {"backend": "aot_eager"}
        model.forward = torch.compile(model.forward, fullgraph=True, **options)
        compiled = model.generate(ids, cache_implementation="static", **settings)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled forward ran
    assert torch.equal(compiled, eager)
