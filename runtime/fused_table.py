"""The fused optimizer of one value table: `FusedTable`, a bag whose backward steps the
table's touched rows in place (`memcompile::fused_row_update`) with its float32 state, and
`ValueOptimizer`, its hyperparameters. `fused_values.fuse_value_updates` installs one per
table of a model; its docstring states the semantics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..kernels import fused_update as fused_ops
from ..kernels import ops
from .errors import MemcompileError, is_integer, is_number
from .sharded_bag import run_collective

OPTIMIZERS = fused_ops.OPTIMIZERS


@dataclass(frozen=True)
class ValueOptimizer:
    """Hyperparameters of a fused value update."""

    name: str  # "rowwise_adagrad" | "adam"
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW-style), touched rows only
    max_grad_norm: float | None = None
    accumulation_steps: int = 1
    stochastic_rounding: bool = False  # bf16 tables only
    # Row-wise Adagrad's starting sum (torch.optim.Adagrad's name): damps a row's first
    # steps, which without it move every element by about lr whatever the gradient's size.
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise MemcompileError(
                f"unknown value optimizer {self.name!r}: use one of {', '.join(OPTIMIZERS)}"
            )
        if len(self.betas) != 2:
            raise MemcompileError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        settings = {
            "lr": self.lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "max_grad_norm": 1.0 if self.max_grad_norm is None else self.max_grad_norm,
            "beta1": self.betas[0],
            "beta2": self.betas[1],
            "initial_accumulator_value": self.initial_accumulator_value,
        }
        for name, value in settings.items():
            if not is_number(value):
                raise MemcompileError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.lr > 0, f"lr must be positive, got {self.lr!r}"),
            (self.eps > 0, f"eps must be positive, got {self.eps!r}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            (self.initial_accumulator_value >= 0,
             f"initial_accumulator_value must be >= 0, got {self.initial_accumulator_value!r}"),
            (self.initial_accumulator_value == 0 or self.name == "rowwise_adagrad",
             "initial_accumulator_value is row-wise Adagrad's: leave it 0 for adam"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}"),
            (is_integer(self.accumulation_steps) and self.accumulation_steps >= 1,
             f"accumulation_steps must be an int >= 1, got {self.accumulation_steps!r}"),
            (isinstance(self.stochastic_rounding, bool),
             f"stochastic_rounding must be True or False, got {self.stochastic_rounding!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise MemcompileError(message)


class StepCounter:
    """Counts the steps of the user's optimizer (the `step_with` guard)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.steps = 0
        self.hook = optimizer.register_step_post_hook(self._count)

    def _count(self, *_args) -> None:
        self.steps += 1


class _FusedBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, table):
        ctx.table = table
        ctx.save_for_backward(values, indices, weights)
        return ops.bag(values, indices, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        try:
            values, indices, weights = ctx.saved_tensors
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            raise MemcompileError(
                "this lookup's value rows were updated in place after it ran (fused value "
                "updates step inside the backward): a second backward through one forward "
                "(retain_graph=True) is not supported; run the forward again"
            ) from None
        update, want_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_w = ctx.table._backward(values, indices, weights, grad_out.contiguous(), update,
                                     want_weights)  # fmt: skip
        return None, None, None if grad_w is None else grad_w.to(weights.dtype), None


def _in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


class FusedTable:
    """The fused optimizer of one value table (or one column shard of it).

    Call it as a bag, `table(values, indices, weights)` (it is the owner's `bag_impl`); its
    backward updates `values` in place. State: `step`, `state` (Adagrad: "sum" (rows,);
    Adam: "exp_avg", "exp_avg_sq" (rows, v_dim)), `last_grad_norm` when clipping.
    """

    def __init__(
        self,
        values: torch.Tensor,
        optimizer: ValueOptimizer,
        *,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        if values.is_meta:
            raise MemcompileError(
                "the value table is still on the meta device (lazy init): call "
                "memcompile.runtime.materialize_values(model) before fuse_value_updates"
            )
        if values.dim() != 2:
            raise MemcompileError(f"a value table is (rows, v_dim), got {tuple(values.shape)}")
        self.values, self.optimizer, self.seed = values, optimizer, seed
        self.lr_lambda = lr_lambda
        self.process_group = process_group
        acc = fused_ops.accumulation_dtype(values.dtype)
        shape_a, shape_b = fused_ops.state_shapes(optimizer.name, tuple(values.shape))
        names = ("sum",) if optimizer.name == "rowwise_adagrad" else ("exp_avg", "exp_avg_sq")
        tensors = [torch.zeros(s, dtype=acc, device=values.device) for s in (shape_a, shape_b)]
        if optimizer.name == "rowwise_adagrad":
            tensors[0].fill_(optimizer.initial_accumulator_value)
        self.state = dict(zip(names, tensors))
        self._state_a, self._state_b = tensors
        self.step = 0
        self.width = values.shape[1]
        if process_group is not None:  # the full row width over the column shards
            width = torch.tensor([self.width], device=values.device)
            run_collective("a fused value table", "all_reduce", "its row width", width,
                           group=process_group)  # fmt: skip
            self.width = int(width)
        self.last_grad_norm: torch.Tensor | None = None
        self.step_counter: StepCounter | None = None
        self._counter_mark: int | None = None
        self._forwards = 0  # grad-enabled lookups since the last update
        self._recomputed = False  # a lookup was recomputed inside this backward pass
        self._pending: list[tuple[torch.Tensor, ...]] = []  # this backward pass
        self._accumulated: list[tuple[torch.Tensor, ...]] = []  # earlier micro-batches
        self._micro_batches = 0
        self._window_mark = 0  # the step counter when this accumulation window began

    def __call__(self, values, indices, weights) -> torch.Tensor:
        return self.bag(values, indices, weights)

    @property
    def lr(self) -> float:
        """The learning rate of the next update: `optimizer.lr * lr_lambda(step)`."""
        if self.lr_lambda is None:
            return self.optimizer.lr
        factor = self.lr_lambda(self.step)
        if isinstance(factor, torch.Tensor) and factor.numel() == 1 and factor.is_floating_point():
            factor = factor.item()
        if not is_number(factor) or factor < 0:
            raise MemcompileError(
                f"lr_lambda({self.step}) returned {factor!r}: it must return a finite "
                "number >= 0 (the factor of the value lr at that update)"
            )
        return self.optimizer.lr * float(factor)

    def note_lookup(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Count a lookup that will reach `backward_step` (how readers share one step)."""
        if torch.is_grad_enabled() and (values.requires_grad or weights.requires_grad):
            self._forwards += 1
            if _in_backward_pass():
                # Recomputed by activation checkpointing. Reentrant checkpointing runs each
                # segment's backward as a pass of its own, whose end is not the step's: the
                # update waits for the end of the pass running now (the outer one), after
                # every segment has recomputed its lookups from the rows as they were.
                self._recomputed = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def backward_step(self, values, indices, weights, grad_out, want_weights: bool):
        """The backward of a lookup done elsewhere (a sharded bag): steps the rows, returns
        the weight gradient (from the rows before the step) or None."""
        return self._backward(values, indices, weights, grad_out, True, want_weights)

    def bag(self, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """`ops.bag(values, indices, weights)` whose backward steps `values` (this table)."""
        if values is not self.values:
            raise MemcompileError("this FusedTable updates another tensor than `values`")
        if values.device != self._state_a.device:
            raise MemcompileError(
                f"values are on {values.device}, their fused optimizer state on "
                f"{self._state_a.device}: move the model before fuse_value_updates"
            )
        if fused_ops.accumulation_dtype(values.dtype) != self._state_a.dtype:
            raise MemcompileError(
                f"values are {values.dtype} now, their fused optimizer state "
                f"{self._state_a.dtype}: change the model's dtype before fuse_value_updates"
            )
        self.note_lookup(values, weights)
        return _FusedBag.apply(values, indices, weights, self)

    # --- backward ---------------------------------------------------------------------

    def _backward(self, values, indices, weights, grad_out, update: bool, want_weights: bool):
        if not update:  # frozen values: the weight gradient only
            return fused_ops.bag_weight_grad(grad_out, values, indices) if want_weights else None
        alone = self._forwards == 1 and not (self._pending or self._accumulated)
        if alone and not self._recomputed and self.optimizer.accumulation_steps == 1:
            # The only reader of this step: weight gradient and update in one kernel.
            return self._update(indices, weights.detach(), grad_out, want_weights)
        grad_w = fused_ops.bag_weight_grad(grad_out, values, indices) if want_weights else None
        self._pending.append((indices, weights.detach(), grad_out))
        if not self._recomputed:  # else the outer pass's callback is queued (note_lookup)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        return grad_w

    def _end_of_backward(self) -> None:
        self._recomputed = False
        if not self._pending:  # another reader's callback already took this pass
            return
        counter = self.step_counter
        if counter is not None and self._micro_batches == 0:
            self._window_mark = counter.steps
        elif counter is not None and counter.steps != self._window_mark:
            self._pending, self._accumulated, self._micro_batches = [], [], 0
            raise MemcompileError(
                f"optimizer.step() ran between the micro-batches of one fused update "
                f"(accumulation_steps={self.optimizer.accumulation_steps}): step the "
                "optimizer once per that many backward passes"
            )
        self._accumulated += self._pending
        self._pending = []
        self._micro_batches += 1
        if self._micro_batches < self.optimizer.accumulation_steps:
            return
        batches, self._accumulated, self._micro_batches = self._accumulated, [], 0
        parts = list(zip(*batches))
        self._update(*(torch.cat(p) if len(p) > 1 else p[0] for p in parts), False)

    @torch.no_grad()
    def _update(self, indices, weights, grad_out, want_weights: bool):
        counter = self.step_counter
        if counter is not None:
            if self._counter_mark is not None and counter.steps == self._counter_mark:
                self._pending, self._accumulated, self._micro_batches = [], [], 0
                raise MemcompileError(
                    "fused value update: a second backward before optimizer.step(); for "
                    "gradient accumulation pass accumulation_steps=k to fuse_value_updates"
                )
            self._counter_mark = counter.steps
        opt, lr = self.optimizer, self.lr
        row_sq = scale = None
        if opt.max_grad_norm is not None or (
            self.process_group is not None and opt.name == "rowwise_adagrad"
        ):
            row_sq = fused_ops.row_grad_sq(self.values, indices, weights, grad_out)
            if self.process_group is not None:
                run_collective("a fused value table", "all_reduce", "per-row squared norms",
                               row_sq, group=self.process_group)  # fmt: skip
            if opt.max_grad_norm is not None:
                self.last_grad_norm = row_sq.sum().sqrt()
                scale = (opt.max_grad_norm / (self.last_grad_norm + 1e-6)).clamp(max=1.0)
                scale = scale.reshape(1).float()
            if opt.name == "adam":
                row_sq = None
        self.step += 1
        self._forwards = 0
        grad_w = fused_ops.fused_row_update(
            self.values, self._state_a, self._state_b, indices, weights, grad_out, row_sq,
            scale, opt.name, lr, opt.eps, opt.betas[0], opt.betas[1], opt.weight_decay,
            self.width, self.step, fused_ops.mix_seed(self.seed, self.step),
            opt.stochastic_rounding, want_weights,
        )  # fmt: skip
        return grad_w if want_weights else None

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"optimizer", "hyperparameters", "step", "seed", "state": {name: tensor}} (the
        tensors themselves, as torch optimizers do: copy them to keep a snapshot)."""
        if self._pending or self._accumulated:
            # The buffered micro-batches are not state: a resumed run would lose them.
            raise MemcompileError(
                "cannot save optimizer state in the middle of an accumulation window "
                f"(accumulation_steps={self.optimizer.accumulation_steps}): save after the "
                "update"
            )
        return {
            "optimizer": self.optimizer.name,
            "hyperparameters": asdict(self.optimizer),
            "step": self.step,
            "seed": self.seed,
            "state": dict(self.state),
        }

    def check_state_dict(self, state: dict) -> None:
        """MemcompileError unless `state` (a `state_dict()`) fits this table."""
        if not isinstance(state, dict) or state.get("optimizer") != self.optimizer.name:
            got = state.get("optimizer") if isinstance(state, dict) else type(state).__name__
            raise MemcompileError(
                f"state of a {got!r} value optimizer cannot be loaded into a "
                f"{self.optimizer.name!r} one"
            )
        if self._pending or self._accumulated:
            raise MemcompileError("cannot load optimizer state in the middle of accumulation")
        saved = state.get("state")
        if not isinstance(saved, dict) or set(saved) != set(self.state):
            raise MemcompileError(
                f"the saved state holds {sorted(saved) if isinstance(saved, dict) else saved!r}"
                f"; the {self.optimizer.name} optimizer keeps {sorted(self.state)}"
            )
        if not all(is_integer(state.get(k)) and state[k] >= 0 for k in ("step", "seed")):
            raise MemcompileError("the saved state needs integer 'step' and 'seed' (>= 0)")
        for name, tensor in self.state.items():
            got = saved[name]
            if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
                got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise MemcompileError(
                    f"optimizer state {name!r} is {got}, this table needs {tuple(tensor.shape)}"
                )
            if not got.is_floating_point():
                raise MemcompileError(f"optimizer state {name!r} is {got.dtype}, not floating")
            # Adagrad's sums and Adam's second moments are square roots' arguments.
            if name in ("sum", "exp_avg_sq") and not bool((got >= 0).all()):
                raise MemcompileError(f"optimizer state {name!r} holds negative or NaN entries")

    def load_state_dict(self, state: dict) -> None:
        """Load a `state_dict()`: all of it, or (MemcompileError) nothing. The hyperparameters
        stay those given to `fuse_value_updates`."""
        self.check_state_dict(state)
        for name, tensor in self.state.items():
            tensor.copy_(state["state"][name])
        self.step, self.seed = state["step"], state["seed"]
