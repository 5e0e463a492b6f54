"""Sharded weighted bags: the memory lookup of a value table split over a group of ranks.

`ShardedBag` is what `apply_plan` installs as a table owner's `bag_impl`. Each call is one
"reader" call (a memory layer reading the table) and issues exactly the collectives of the
plan (DESIGN.md, "The plan"; `runtime/plan.py` predicts their bytes):

colwise, shard (rows, c_r) of columns torch.chunk(v_dim, G)[r]:
  forward   1 all_gather token counts (one int64)   2 all_gather indices (t_max, P) int64
            3 all_gather weights (t_max, P)          4 all_to_all the (t_s, c_r) bag rows back
  backward  5 all_to_all grad_out column blocks      6 all_to_all partial weight grads back
rowwise, shard (n_r, v_dim) of rows torch.chunk(rows, G)[r]:
  forward   1 all_to_all [pairs, tokens] per peer   2 all_to_all the routed (row, token, weight)
            pairs as int32                           3 all_to_all (t_s, v) partial sums back
  backward  4 all_to_all grad_out to every owner    5 all_to_all per-pair weight grads back

Collectives are called as `torch.distributed.<op>(...)` at call time (a test may wrap them);
a failure becomes one `CollectiveError` line naming the table, the collective and the rank.
Value gradients are scaled by `grad_scale` (1/group size in training: each rank's loss is a
mean over its own tokens, and the group's shard of the gradient of their mean is 1/size of
their sum; replica groups then average theirs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels import ops
from ..kernels.reference import accumulation_dtype
from .errors import first_line
from .plan import chunk_ranges

log = logging.getLogger(__name__)


class CollectiveError(RuntimeError):
    """A collective of a sharded lookup failed: a peer rank raised, exited or timed out."""


@dataclass(frozen=True)
class ShardSpec:
    """One table's layout on this rank: the group it is split over and this rank's part."""

    table: str  # the values parameter's name, for messages
    strategy: str  # colwise | rowwise
    group: dist.ProcessGroup | None  # the table's shard group (None: the default group)
    size: int  # G, ranks in the shard group
    index: int  # this rank's position in the shard group
    rows: int  # of the whole table
    v_dim: int
    grad_scale: float = 1.0

    @property
    def row_ranges(self) -> list[tuple[int, int]]:
        if self.strategy == "rowwise":
            return chunk_ranges(self.rows, self.size)
        return [(0, self.rows)] * self.size

    @property
    def col_ranges(self) -> list[tuple[int, int]]:
        if self.strategy == "colwise":
            return chunk_ranges(self.v_dim, self.size)
        return [(0, self.v_dim)] * self.size


def run_collective(label: str, op: str, what: str, *args, **kwargs) -> None:
    """`torch.distributed.<op>(*args, **kwargs)`; a failure becomes one CollectiveError line
    "<label>: <op> of <what> failed on rank R (...)"."""
    try:
        getattr(dist, op)(*args, **kwargs)
    except Exception as error:  # gloo and NCCL raise RuntimeError and DistBackendError
        first = first_line(error) or type(error).__name__
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise CollectiveError(
            f"{label}: {op} of {what} failed on rank {rank} (a peer rank raised, "
            f"exited or timed out): {first[:300]}"
        ) from error


def _call(spec: ShardSpec, op: str, what: str, *args, **kwargs) -> None:
    run_collective(f"table {spec.table}", op, what, *args, group=spec.group, **kwargs)


# torch 2.13 deprecates all_gather_into_tensor (a FutureWarning on every first call) for
# all_gather_single, which takes the same arguments and which torch 2.5-2.12 lack.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def _all_gather(spec: ShardSpec, what: str, tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.new_empty((spec.size * tensor.shape[0], *tensor.shape[1:]))
    _call(spec, ALL_GATHER, what, out, tensor.contiguous())
    return out


def _all_to_all(
    spec: ShardSpec, what: str, tensor: torch.Tensor, send: list[int], recv: list[int]
) -> torch.Tensor:
    """all_to_all_single along dim 0: `send[k]` rows to peer k, `recv[k]` rows from it."""
    out = tensor.new_empty((sum(recv), *tensor.shape[1:]))
    _call(spec, "all_to_all_single", what, out, tensor.contiguous(), recv, send)
    return out


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


class _ColwiseBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, indices, weights, spec: ShardSpec, fused=None):
        t = indices.shape[0]
        counts = _all_gather(spec, "token counts", indices.new_tensor([t]))
        tokens = counts.tolist()
        t_max = max(tokens)
        all_indices = _all_gather(spec, "indices", _pad_rows(indices, t_max))
        all_weights = _all_gather(spec, "weights", _pad_rows(weights, t_max))
        if min(tokens) != t_max:  # drop the padding: rows of source s are s*t_max + [0, t_s)
            keep = torch.cat([torch.arange(t_s) + s * t_max for s, t_s in enumerate(tokens)])
            keep = keep.to(indices.device)
            all_indices, all_weights = all_indices[keep], all_weights[keep]
        width = shard.shape[1]
        local = ops.bag(shard, all_indices, all_weights)  # (sum t_s, c_r), sources in order
        widths = [c1 - c0 for c0, c1 in spec.col_ranges]
        out = _all_to_all(
            spec,
            "bag rows",
            local.reshape(-1),
            [t_s * width for t_s in tokens],
            [t * w for w in widths],
        )
        blocks = out.split([t * w for w in widths])
        ctx.save_for_backward(shard, all_indices, all_weights)
        ctx.spec, ctx.tokens, ctx.t, ctx.fused = spec, tokens, t, fused
        return torch.cat([b.view(t, w) for b, w in zip(blocks, widths)], dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        shard, all_indices, all_weights = ctx.saved_tensors
        spec, tokens, t = ctx.spec, ctx.tokens, ctx.t
        width = shard.shape[1]
        grad_out = grad_out.to(shard.dtype)
        blocks = [grad_out[:, c0:c1].reshape(-1) for c0, c1 in spec.col_ranges]
        sizes = [b.numel() for b in blocks]
        grad_local = _all_to_all(
            spec, "output gradients", torch.cat(blocks), sizes, [t_s * width for t_s in tokens]
        ).view(-1, width)
        if ctx.fused is not None:
            # Fused value updates (runtime/fused_values.py): this rank steps its columns of
            # the picked rows in place; the table gets no gradient.
            scale = spec.grad_scale
            grad_weights = ctx.fused.backward_step(
                shard.detach(), all_indices, all_weights, grad_local * scale,
                ctx.needs_input_grad[2],
            )  # fmt: skip
            grad_shard = None
            if grad_weights is not None and scale != 1.0:
                grad_weights = grad_weights / scale
        else:
            grad_shard, grad_weights = ops.bag_backward(grad_local, shard, all_indices, all_weights)
            if spec.grad_scale != 1.0:
                grad_shard = grad_shard.mul_(spec.grad_scale)
        grad_w = None
        if ctx.needs_input_grad[2]:
            picks = all_indices.shape[1]
            back = _all_to_all(
                spec,
                "weight gradients",
                grad_weights.reshape(-1),
                [t_s * picks for t_s in tokens],
                [t * picks] * spec.size,
            )
            grad_w = back.view(spec.size, t, picks).sum(0)
        return grad_shard, None, grad_w, None, None


def _wire_dtype(weights: torch.Tensor) -> torch.dtype:
    """The dtype weights travel in: their own, or float32 for 16-bit ones (whole int32 words)."""
    return weights.dtype if weights.element_size() >= 4 else torch.float32


def _pack_pairs(rows: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(pairs, 2 + words) int32: local row, source token, the weight's bits (1 word for fp32)."""
    weights = weights.to(_wire_dtype(weights))
    words = weights.element_size() // 4
    bits = weights.contiguous().view(torch.int32).view(rows.shape[0], words)
    return torch.cat([rows.to(torch.int32)[:, None], tokens.to(torch.int32)[:, None], bits], 1)


class _RowwiseBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, indices, weights, spec: ShardSpec, fused=None):
        assert fused is None, "fused value updates take colwise tables"  # fuse_value_updates
        g, (t, picks) = spec.size, indices.shape
        step = spec.row_ranges[0][1]  # torch.chunk rows per rank (the last may hold fewer)
        flat = indices.reshape(-1)
        owner = torch.div(flat, step, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)  # routed pairs stay in token order
        send_pairs = torch.bincount(owner, minlength=g)
        token = torch.arange(t, device=indices.device).repeat_interleave(picks)
        pairs = _pack_pairs((flat - owner * step)[order], token[order], weights.reshape(-1)[order])
        header = torch.stack([send_pairs, torch.full_like(send_pairs, t)], 1).reshape(-1)
        header = _all_to_all(spec, "pair counts", header, [2] * g, [2] * g).view(g, 2).tolist()
        recv_pairs, tokens = [h[0] for h in header], [h[1] for h in header]
        send_pairs = send_pairs.tolist()
        got = _all_to_all(spec, "routed pairs", pairs, send_pairs, recv_pairs)
        offsets = torch.tensor([0, *tokens[:-1]], device=indices.device).cumsum(0)
        source = torch.repeat_interleave(
            torch.arange(g, device=indices.device),
            torch.tensor(recv_pairs, device=indices.device),
        )
        rows, src_token = got[:, 0].long(), got[:, 1].long() + offsets[source]
        pair_weights = got[:, 2:].contiguous().view(_wire_dtype(weights)).view(-1)
        acc = accumulation_dtype(shard.dtype)
        partial = torch.zeros(sum(tokens), shard.shape[1], dtype=acc, device=shard.device)
        partial.index_add_(0, src_token, shard[rows].to(acc) * pair_weights.to(acc)[:, None])
        # In the accumulation dtype: a bf16 partial sum rounded before the sum over ranks
        # put a bf16 row-wise result 2 roundings from one process's (column-wise: none).
        back = _all_to_all(spec, "partial sums", partial, tokens, [t] * g)
        ctx.save_for_backward(shard, rows, src_token, pair_weights, order)
        ctx.spec, ctx.tokens, ctx.pairs = spec, tokens, (send_pairs, recv_pairs)
        ctx.shape, ctx.weights_dtype = (t, picks), weights.dtype
        return back.view(g, t, shard.shape[1]).sum(0).to(shard.dtype)  # t may be 0

    @staticmethod
    def backward(ctx, grad_out):
        shard, rows, src_token, pair_weights, order = ctx.saved_tensors
        spec, tokens, (send_pairs, recv_pairs) = ctx.spec, ctx.tokens, ctx.pairs
        t, picks = ctx.shape
        grad_out = grad_out.to(shard.dtype).contiguous()
        grads = _all_to_all(
            spec, "output gradients", grad_out.repeat(spec.size, 1), [t] * spec.size, tokens
        )
        acc = accumulation_dtype(shard.dtype)
        picked = grads[src_token].to(acc)  # (pairs received, v_dim)
        grad_shard = torch.zeros(shard.shape, dtype=acc, device=shard.device)
        grad_shard.index_add_(0, rows, picked * pair_weights.to(acc)[:, None])
        if spec.grad_scale != 1.0:
            grad_shard.mul_(spec.grad_scale)
        grad_w = None
        if ctx.needs_input_grad[2]:
            pair_grads = (shard[rows].to(acc) * picked).sum(-1).to(ctx.weights_dtype)
            back = _all_to_all(spec, "weight gradients", pair_grads, recv_pairs, send_pairs)
            grad_w = torch.empty_like(back)
            grad_w[order] = back
            grad_w = grad_w.view(t, picks)
        return grad_shard.to(shard.dtype), None, grad_w, None, None


class ShardedBag:
    """`bag_impl` of a table split over a group: `(values, indices, weights) -> (N, v_dim)`.

    `values` is the owner's parameter: a DTensor (its local shard is used) or the local
    shard itself; indices are global row ids.
    """

    def __init__(self, spec: ShardSpec) -> None:
        if spec.strategy not in ("colwise", "rowwise"):
            raise ValueError(f"ShardedBag splits colwise or rowwise, not {spec.strategy!r}")
        self.spec = spec
        self._fn = _ColwiseBag if spec.strategy == "colwise" else _RowwiseBag
        self.fused = None  # a FusedTable of this rank's columns (fuse_value_updates)

    def __call__(
        self, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        local = values.to_local() if hasattr(values, "to_local") else values
        r0, r1 = self.spec.row_ranges[self.spec.index]
        c0, c1 = self.spec.col_ranges[self.spec.index]
        if tuple(local.shape) != (r1 - r0, c1 - c0):
            raise RuntimeError(
                f"table {self.spec.table}: local shard is {tuple(local.shape)}, the plan "
                f"gives rank {self.spec.index} of its group {(r1 - r0, c1 - c0)}"
            )
        if self.fused is not None:
            self.fused.note_lookup(local, weights)
        return self._fn.apply(
            local, indices.contiguous(), weights.contiguous(), self.spec, self.fused
        )

    def __repr__(self) -> str:
        s = self.spec
        return f"ShardedBag({s.table}, {s.strategy}, group of {s.size}, index {s.index})"
