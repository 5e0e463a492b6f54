"""A converted causal LM decodes under torch.compile with a static KV cache and gives the
tokens of eager decoding: the memory ops trace into one graph, with no graph break.

transformers compiles the decode step itself when generate() gets a static cache and a
`CompileConfig` (mode="reduce-overhead", CUDA graphs on a GPU); the prefill runs eagerly,
so the cache is allocated and marked static outside the compiled region. Compiling
`model.forward` by hand compiles the prefill too: the cache is then allocated inside the
graph and fed back as a mutated input, the pattern of pytorch/pytorch#192748 (a
segmentation fault under CUDA graphs, seen here on an H100 with torch 2.11).
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import memcompile

from models import CASES, VOCAB, build

LLAMA = next(c for c in CASES if c.name == "llama")


def _compile_config(device: str) -> CompileConfig:
    if device == "cuda":
        return CompileConfig(fullgraph=True)  # mode="reduce-overhead", Inductor
    # CPU: aot_eager checks tracing without minutes of C++ compilation on a 2-core box;
    # transformers compiles on other devices than accelerators only when told to.
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    return config


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
        compiled = model.generate(ids, cache_implementation="static",
                                  compile_config=_compile_config(device), **settings)  # fmt: skip
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled decode step ran
    assert counters["graph_break"] == {}  # fullgraph: the memory ops traced into the graph
    assert torch.equal(compiled, eager)
