"""`MemoryLayer`: the product-key memory layer, and `MemoryPool`, a value table shared by layers.

Parameter names, shapes, init and forward math follow DESIGN.md ("The memory layer");
they are the checkpoint format.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _global_hooks

from ..kernels import ops, reference
from .config import MemoryConfig
from .errors import MemcompileError
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

    def forward(self, x):
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
            if not isinstance(width, numbers.Integral) or isinstance(width, bool) or width < 1:
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
            raise ValueError(f"pool holds {tuple(pool.values.shape)} values, need {expected}")
        self._parameters.pop("values", None)
        self.values_init = None
        self._pool[:] = [pool]

    @property
    def values_owner(self) -> nn.Module:
        """The module holding this layer's value table: its shared pool, or the layer itself."""
        return self._pool[0] if self._pool else self

    @property
    def value_table(self) -> torch.Tensor:
        if self._pool:
            return self._pool[0].values
        if "values" not in self._parameters:
            raise RuntimeError("this MemoryLayer has no values: call attach_pool(pool) first")
        return self.values

    def lookup(self, q: torch.Tensor, swilu: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 2-5 of the forward: the weighted bag of values, (N, v_dim), for the
        projected query q (N, heads*k_dim), in the values' dtype; with `swilu` (N, v_dim),
        the Memory+ gate's pre-activation, the bag times silu(swilu), in swilu's dtype."""
        q = q.view(-1, self.heads, self.k_dim)
        if self.query_norm is not None:
            q = self.query_norm(q)
        values = self.value_table
        if values.is_meta and not q.is_meta:
            raise MemcompileError(
                "this MemoryLayer's value table is not built yet (lazy init, on the meta "
                "device): call memcompile.runtime.materialize_values(model) first"
            )
        bag_impl = self.values_owner.bag_impl
        if bag_impl is None and not _needs_separate_ops(q, self.keys, values):
            # Inference: one op, which a backend fuses (top-k with softmax, the bag and its
            # gating; on CUDA the bag reads host-resident values directly).
            return ops.pk_lookup(q, self.keys, values, self.knn, swilu)
        scores, indices = ops.pk_topk(q, self.keys, self.knn)
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
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in).to(self.query.weight.dtype)
        projections = [self.query] if self.swilu is None else [self.query, self.swilu]
        q, *swilu = _project(flat, projections)
        y = self.lookup(q, swilu[0] if swilu else None).to(flat.dtype)
        if self.out is not None:
            (y,) = _project(y, [self.out])
        elif self.gate is not None:
            y = self.gate * y
        return y.to(x.dtype).view(*lead, self.d_out)

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
    plain = all(_plain_linear(module) for module in modules)
    weights = [module.weight for module in modules] if plain else []
    biases = [module.bias for module in modules] if plain else []
    if not plain or _needs_separate_ops(x, *weights, *(b for b in biases if b is not None)):
        return [module(x) for module in modules]
    if x.device.type == "cuda":
        return ops.linears(x, weights, biases)
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear itself, with plain tensor weights, its class's forward and no forward
    hooks (its own or global ones): its forward is F.linear."""
    if (
        type(module) is not nn.Linear
        or "forward" in module.__dict__  # replaced on the instance (accelerate's offload hooks)
        or module._forward_hooks
        or module._forward_pre_hooks
        or _global_hooks._global_forward_hooks
        or _global_hooks._global_forward_pre_hooks
    ):
        return False
    plain = (torch.Tensor, nn.Parameter)
    params = module._parameters  # not module.weight: nn.Module's __getattr__ is slow
    return type(params.get("weight")) in plain and (
        params.get("bias") is None or type(params["bias"]) in plain
    )


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
