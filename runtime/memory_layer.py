"""`MemoryLayer`: the product-key memory layer, and `MemoryPool`, a value table shared by layers.

Parameter names, shapes, init and forward math follow DESIGN.md ("The memory layer");
they are the checkpoint format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _global_hooks

from ..kernels import cpu, ops, reference
from .config import MemoryConfig
from .errors import MemcompileError, is_integer
from .init import POOL_SEED_TAG, ValuesInit, derive_seed, normal_, uniform_

# Sub-stream tags of a layer's seed, one per parameter.
_QUERY, _KEYS, _VALUES, _SWILU, _OUT = range(5)


class MemoryPool(nn.Module):
    """A value table (n_keys**2, v_dim) that several memory layers read.

    With `lazy=True` the table stays on the meta device until `materialize_values`.
    """

    def __init__(
        self,
        n_rows: int,
        v_dim: int,
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        lazy: bool = False,
    ) -> None:
        super().__init__()
        self.seed = seed
        self.values_init = ValuesInit(v_dim**-0.5, derive_seed(seed, POOL_SEED_TAG))
        self.values = self.values_init.new_table((n_rows, v_dim), dtype, device, lazy)

    # Replaces `ops.bag` for this table (sharded execution, fused value updates); called as
    # bag_impl(values, indices, weights) with indices and weights of shape (N, heads*knn).
    bag_impl = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input, unchanged: the pool sits at the model's root, and an nn.Sequential
        root calls every child in turn, the pool last."""
        return x

    def extra_repr(self) -> str:
        return f"rows={self.values.shape[0]}, v_dim={self.values.shape[1]}"


class MemoryLayer(nn.Module):
    """Product-key memory (Lample et al. 2019) with the Memory+ gating (Berges et al. 2024).

    Maps (..., d_in) to (..., d_out). `config` must be resolved (k_dim and v_dim set).
    With `augment=True` the output is exactly zero at init (zero `out` weight, or a zero
    `gate`), so adding the layer to a block leaves the block's outputs unchanged.
    With `own_values=False` the layer holds no values until `attach_pool` gives it a shared
    `MemoryPool`; with `lazy_values=True` its own values stay on the meta device until
    `materialize_values`. Inputs of another dtype than the layer's are cast in and out.
    """

    _memcompile_converted = True
    bag_impl = None  # as MemoryPool.bag_impl, for a layer that owns its values
    # (position among the model's FFN blocks, module path) of the block transform made this
    # layer for: the blocks converted later keep the labels they had (passes/find_ffn.py).
    source_block: tuple[int, str] | None = None

    def __init__(
        self,
        d_in: int,
        d_out: int,
        config: MemoryConfig,
        *,
        augment: bool = False,
        own_values: bool = True,
        lazy_values: bool = False,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MemoryConfig):
            raise MemcompileError(f"config takes a MemoryConfig, got {type(config).__name__}")
        for name, width in (("d_in", d_in), ("d_out", d_out)):
            if not is_integer(width) or width < 1:
                raise MemcompileError(f"{name} must be a positive integer, got {width!r}")
        d_in, d_out = int(d_in), int(d_out)
        if config.k_dim is None or config.v_dim is None:
            config = config.resolve(d_in, d_out)
        self.config = config
        self.d_in, self.d_out = d_in, d_out
        self.heads, self.knn, self.n_keys = config.heads, config.knn, config.n_keys
        self.k_dim, self.v_dim = config.k_dim, config.v_dim
        seed = config.seed if seed is None else seed
        factory = {"dtype": dtype, "device": device}

        self.query = nn.Linear(d_in, self.heads * self.k_dim, **factory)
        bound = math.sqrt(6.0 / (d_in + self.heads * self.k_dim))
        uniform_(self.query.weight, bound, derive_seed(seed, _QUERY))
        nn.init.zeros_(self.query.bias)
        self.query_norm = nn.RMSNorm(self.k_dim, **factory) if config.qk_norm else None

        half = self.k_dim // 2
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, half, **factory))
        uniform_(self.keys, 1.0 / math.sqrt(self.k_dim), derive_seed(seed, _KEYS))

        self._pool: list[MemoryPool] = []
        self.values_init = None
        if own_values:
            self.values_init = ValuesInit(self.v_dim**-0.5, derive_seed(seed, _VALUES))
            shape = (self.n_keys**2, self.v_dim)
            self.values = self.values_init.new_table(shape, dtype, device, lazy_values)

        self.swilu = self.out = self.gate = None
        if config.gating == "swilu":
            self.swilu = nn.Linear(d_in, self.v_dim, **factory)
            normal_(self.swilu.weight, d_in**-0.5, derive_seed(seed, _SWILU))
            nn.init.zeros_(self.swilu.bias)
            self.out = nn.Linear(self.v_dim, d_out, **factory)
            if augment:
                nn.init.zeros_(self.out.weight)
            else:
                normal_(self.out.weight, self.v_dim**-0.5, derive_seed(seed, _OUT))
            nn.init.zeros_(self.out.bias)
        elif augment:
            self.gate = nn.Parameter(torch.zeros((), **factory))

    def attach_pool(self, pool: MemoryPool) -> None:
        """Read values from `pool` (registered elsewhere, e.g. at the model root)."""
        expected = (self.n_keys**2, self.v_dim)
        if tuple(pool.values.shape) != expected:
            raise MemcompileError(
                f"the pool holds {tuple(pool.values.shape)} values and this layer reads "
                f"{expected}: attach a pool of n_keys**2 rows of v_dim"
            )
        self._parameters.pop("values", None)
        self.values_init = None
        self._pool[:] = [pool]

    @property
    def values_owner(self) -> nn.Module:
        """The module holding this layer's value table: its shared pool, or the layer itself."""
        return self._pool[0] if self._pool else self

    @property
    def value_table(self) -> torch.Tensor:
        # From _parameters: nn.Module's __getattr__ costs about a microsecond a name, which
        # a decode step on a small CPU would pay a dozen times in this layer.
        values = self.values_owner._parameters.get("values")
        if values is None:
            raise RuntimeError("this MemoryLayer has no values: call attach_pool(pool) first")
        return values

    def lookup(self, q: torch.Tensor, swilu: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 2-5 of the forward: the weighted bag of values, (N, v_dim), for the
        projected query q (N, heads*k_dim), in the values' dtype; with `swilu` (N, v_dim),
        the Memory+ gate's pre-activation, the bag times silu(swilu), in swilu's dtype."""
        q = q.view(-1, self.heads, self.k_dim)
        if self.query_norm is not None:
            q = self.query_norm(q)
        keys, values = self._parameters["keys"], self.value_table
        if values.is_meta and not q.is_meta:
            raise MemcompileError(
                "this MemoryLayer's value table is not built yet (lazy init, on the meta "
                "device): call memcompile.runtime.materialize_values(model) first"
            )
        bag_impl = _bag_impl(self.values_owner, values)
        if bag_impl is None and not _needs_separate_ops(q, keys, values):
            # Inference: one op, which a backend fuses (top-k with softmax, the bag and its
            # gating; on CUDA the bag reads host-resident values directly).
            return ops.pk_lookup(q, keys, values, self.knn, swilu)
        scores, indices = ops.pk_topk(q, keys, self.knn)
        # Softmax in float32 (float64 for a float64 layer). The dtype is chosen in Python so
        # no `promote_types` call is traced into exported graphs.
        probs = torch.softmax(scores if scores.dtype == torch.float64 else scores.float(), -1)
        picks = self.heads * self.knn
        indices, probs = indices.view(-1, picks), probs.view(-1, picks)
        if bag_impl is not None:
            bag = bag_impl(values, indices, probs)
        elif values.device != q.device:
            # Host-resident values (see `offload_values`): the bag is summed where the table
            # lives and only the (N, v_dim) result crosses to the device.
            bag = ops.bag(values, indices.to(values.device), probs.to(values.device))
            bag = bag.to(q.device, non_blocking=True)
        else:
            bag = ops.bag(values, indices, probs)
        if swilu is None:
            return bag
        if torch.compiler.is_exporting():  # plain ops, which the ONNX lowering knows
            return reference.silu_gate(bag, swilu)
        return ops.silu_gate(bag, swilu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.d_in,) or not x.is_floating_point():
            raise MemcompileError(
                f"the memory layer takes floating-point inputs of width {self.d_in} in their "
                f"last dimension, got {x.dtype} {tuple(x.shape)}"
            )
        modules = self._modules  # not self.query etc.: see value_table
        query, swilu, out = modules["query"], modules.get("swilu"), modules.get("out")
        y = self._decode(x, query, swilu, out)
        if y is None:
            y = self._forward_ops(x, query, swilu, out)
        if self.gate is not None:  # gating "none" with augment: a learned scale, 0 at init
            y = self.gate * y.to(self.gate.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _forward_ops(self, x, query, swilu, out) -> torch.Tensor:
        """The forward as torch ops (any device, autograd, export), but the `gate` product:
        (..., d_out) in the layer's dtype."""
        dtype = query.weight.dtype
        flat = x.reshape(-1, self.d_in)
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        q, *gate = _project(flat, [query] if swilu is None else [query, swilu])
        y = self.lookup(q, gate[0] if gate else None).to(dtype)
        if out is not None:
            (y,) = _project(y, [out])
        return y.view(*x.shape[:-1], self.d_out)

    def _decode(self, x, query, swilu, out) -> torch.Tensor | None:
        """What `_forward_ops` gives, as one C++ call for a few tokens on the CPU without
        gradients (`kernels.cpu.decode`), in float32; None where that does not apply."""
        # Tracing first: a trace must not record (nor guard on) the token count.
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return None
        if (
            not x.is_cpu
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")  # the ops run in its dtype, the call in float32
            or x.numel() > cpu.MAX_TOKENS * self.d_in
            or self.query_norm is not None
        ):
            return None
        owner = self.values_owner
        values = owner._parameters.get("values")
        gated = swilu is not None  # Memory+: swilu and out, else neither (unless hand-made)
        if values is None or _bag_impl(owner, values) is not None or gated != (out is not None):
            return None
        pairs = _linear_weights([query, swilu, out] if gated else [query])
        if pairs is None:
            return None
        swilu_pair, out_pair = (pairs[1], pairs[2]) if gated else (None, None)
        keys = self._parameters["keys"]
        return cpu.decode(x, pairs[0], swilu_pair, out_pair, keys, values, self.knn)

    def extra_repr(self) -> str:
        c = self.config
        shared = ", shared values" if self._pool else ""
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, n_keys={self.n_keys}, heads={c.heads}, "
            f"knn={c.knn}, k_dim={c.k_dim}, v_dim={c.v_dim}, gating={c.gating}{shared}"
        )


def _project(x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """Each module's output for x. Without a gradient to record, plain nn.Linear modules
    skip nn.Module's call machinery (at one token on a CPU it costs as much as reading a
    projection's weights): on CUDA they run as one `linears` op, whose kernel streams two
    weights a launch at decode (the query and gate projections), elsewhere as F.linear. A
    wrapped, hooked or quantized projection runs as its module, and so do exported graphs."""
    pairs = _linear_weights(modules)
    tensors = [t for pair in pairs or () for t in pair if t is not None]
    if pairs is None or _needs_separate_ops(x, *tensors):
        return [module(x) for module in modules]
    if x.device.type == "cuda":
        return ops.linears(x, [weight for weight, _ in pairs], [bias for _, bias in pairs])
    return [F.linear(x, weight, bias) for weight, bias in pairs]


def _linear_weights(modules: list[nn.Module]) -> list[tuple[Tensor, Tensor | None]] | None:
    """(weight, bias) of each module where all are nn.Linear itself, with plain tensor
    weights, their class's forward and no forward hooks (their own or global ones), so
    that their forward is F.linear; else None."""
    if _global_hooks._global_forward_hooks or _global_hooks._global_forward_pre_hooks:
        return None
    pairs = []
    for module in modules:
        if (
            type(module) is not nn.Linear
            or "forward" in module.__dict__  # replaced on the instance (accelerate's offload hooks)
            or module._forward_hooks
            or module._forward_pre_hooks
        ):
            return None
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if type(weight) not in cpu.PLAIN_TENSORS or (
            bias is not None and type(bias) not in cpu.PLAIN_TENSORS
        ):
            return None
        pairs.append((weight, bias))
    return pairs


def _bag_impl(owner: nn.Module, values: torch.Tensor):
    """The owner's `bag_impl` where it applies: one that changes gradients only (row-sparse
    ones) stands aside where none is recorded, and in exported graphs."""
    bag_impl = owner.bag_impl
    if getattr(bag_impl, "gradients_only", False) and (
        torch.compiler.is_exporting() or not (torch.is_grad_enabled() and values.requires_grad)
    ):
        return None
    return bag_impl


def _needs_separate_ops(*tensors: torch.Tensor) -> bool:
    """Whether the work on `tensors` must stay as separate ops (pk_topk and bag, the
    projections' modules) rather than inference's fused ones (pk_lookup, linears): for
    autograd, and in exported graphs, whose lowering (passes/lower_onnx.py) knows those."""
    if torch.compiler.is_exporting():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def value_owners(model: nn.Module) -> list[nn.Module]:
    """The modules holding `model`'s value tables, each once: shared pools (also one that
    sits outside `model`, attached with `attach_pool`) and layers with their own values."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, MemoryLayer) and (module._pool or "values" in module._parameters):
            owners.setdefault(id(module.values_owner), module.values_owner)
        elif isinstance(module, MemoryPool):
            owners.setdefault(id(module), module)
    return list(owners.values())
