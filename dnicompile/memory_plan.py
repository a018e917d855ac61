"""Memory plan: what each stage of a compiled program holds in memory during a training step at a given batch,
and which stages would not fit a device of a given size (`dnicompile ... --memory 80GB`).

Nothing is allocated: shapes come from running each stage on fake tensors (torch's FakeTensorMode), which works
as well for a model built on the `meta` device (a 7B-parameter model plans in seconds) as for a real one.

[Note: memory plan] Per stage, for a batch of B samples (the spec's example batch E scaled to B in every input
dimension that is E; what a stage computes for the batch dimension comes from running it, see below):

- parameters: the tensors the stage updates (`Stage.parameters()`), by dtype, numel * element size. A tied
  tensor is counted once, in the stage that owns it (updates it); a stage that only reads one lists its bytes as
  `tied_replica_bytes` (on a device of its own it holds a replica, its gradient and its optimizer state: the
  distributed runtime's replicas; in one process nothing more).
- buffers: the stage's buffers (batch-norm statistics, ...), numel * element size.
- gradients: one of each parameter that requires a gradient, of its dtype.
- optimizer state: found by stepping the stage's optimizer (the spec's class and arguments, built as training
  builds it) once on a 3 x 2 dummy parameter of each dtype: every state tensor shaped like the parameter costs
  its element size per parameter element (Adam / AdamW: exp_avg and exp_avg_sq, 2x the parameters; amsgrad 3x;
  SGD with momentum: momentum_buffer, 1x; without: nothing), and every one-element tensor (Adam's `step`) its
  bytes once per parameter tensor. An optimizer whose state is neither (a factored one) or that cannot step a
  CPU dummy is reported as unknown (None), with the reason, and left out of the total.
- activations: the tensors autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks) while the
  stage's graph runs forward on fake tensors in training mode, inputs requiring a gradient where the cut before
  sends one back; each storage counted once, whole (a saved view keeps its base), parameters, buffers and the
  stage's inputs left out (counted above and below). The last stage includes the spec's loss (cross_entropy, nll,
  mse) on its output. Where the stage does not run at batch B (a size fixed in the traced graph) it runs at the
  example batch and the bytes are scaled by B / E; where it does not run on fake tensors at all, the rule falls
  back to an upper bound, the bytes of every op's output (`activation_rule` says which rule was used). A stage
  with `precision: bf16` runs under autocast where its device allows (cpu, cuda), else at fp32. Attention
  (scaled_dot_product_attention) is counted as a fused kernel keeps it (flash / memory-efficient attention:
  output and log-sum-exp, no (T, T) weights), as torch runs it on GPUs and CPUs where it can; `attention="math"`
  counts the math path instead. Attention a model writes out itself (softmax of a matmul) keeps its weights.
- boundary: the stage's inputs (received), its outputs not already among the saved tensors (sent), and the
  gradients that cross: one of each floating-point input where the cut before sends one back, and one of each
  floating-point output where a gradient comes back or is made for them (exact, delayed, synthetic, local).
- what the cut after the stage adds (the interface runs beside the stage before the cut):
  synthetic gradient: the synthesizers' (and synthetic-input models') parameters, gradients and optimizer state
  (by the synthesizer's optimizer, as above), the activations their prediction and their regression loss save
  (run as the stage is), and cDNI's one-hot labels (B x K floats, per token where the labels are); local loss:
  the head's parameters, gradients, optimizer state, the activations of the head and its loss, and the labels;
  delayed gradient: for each stage of the group before the cut (the stages joined to it by exact cuts), `delay`
  pending batches each keeping the stage's inputs and, by `weights`: stash, a copy of the stage's weights and
  buffers and its activations; current, its activations; recompute, nothing more (only the group's first stage
  keeps its inputs), plus the cut's gradient (delta) once it arrived. `delay: auto` counts the spec's
  `distributed.queue_depth` batches (at least one). Where `measure_every` is set, the step that measures the
  stale-fresh cosine runs one more forward and backward on copies of the weights and compares the gradients in
  float64: 2 x the weights, the activations and the inputs, 4 x the largest parameter, and for stash and current
  the graph of the step's own batch beside them (`delayed_measure_bytes`, held at the end of a step).
- backward: while the backward runs, the gradient of the largest saved floating-point tensor beside the saved
  tensors (`backward_bytes`; the cut models' backward: twice theirs, a layer's incoming and outgoing gradient).
- optimizer step: the temporaries one step makes (`optimizer_workspace_bytes`), measured by stepping the
  optimizer on dummies of 1000 and 2000 elements under an allocation tracker: per element of the largest
  parameter where it steps tensor by tensor (torch's default on CPU; Adam: 2.5x, the previous parameter's
  denominator still alive), per element of all of them with foreach kernels (torch's default on CUDA, and so for a
  model on `meta`, planned for a GPU; Adam: 1x); fused kernels make none.

`total_bytes` of a stage is what a device running that stage alone holds at its peak: the persistent part
(weights, buffers, gradients, optimizer state, the cut models' and a delayed cut's pending batches) plus the
largest of the step's transient parts, which come one after another: forward and backward (activations,
boundary tensors and gradients, the backward's gradient, the cut models' activations), the optimizer step's
temporaries, a delayed cut's measuring step. It is an upper bound of tensor memory (gradients are counted whole
beside all activations, where a real backward frees activations as it allocates gradients), and leaves out
allocator caching and fragmentation, kernels' own scratch memory (convolutions) and the framework's own memory (a
CUDA context is 0.3-0.6 GB). `one_process_bytes` is the plan for running the whole program in one process (the local
runtime): the persistent parts of all stages once, plus the most held at once as the step goes, group by group
(`_one_process`): the activations of a group of stages joined by exact cuts together, the gradients allocated as
the group's backward reaches each stage, and what earlier groups still hold (their gradients, predictions waiting
for the true gradient behind a synthetic cut, the graph of the current batch behind a delayed cut).
benchmarks/memory_plan.py checks both against measured peaks (BENCHMARKS.md, "Memory plan").
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .describe import format_bytes

if TYPE_CHECKING:
    from .program import DecoupledProgram
    from .spec import OptimizerConfig

# --------------------------------------------------------------------------------------------- sizes

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
SIZE_HELP = "e.g. 80GB, 80GiB or 512MB: B, KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB powers of 1024"


def parse_memory(text: str) -> int:
    """Bytes of a size written as a number and a unit (`80GB`, `80 GiB`, `1.5TB`, `512MiB`, `1000000B`); a plain
    integer is bytes. Raises ValueError saying what is accepted."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and unit not in _UNITS) or (not unit and "." in m.group(1)):
        raise ValueError(f"expected a memory size ({SIZE_HELP}), got {text!r}")
    value = float(m.group(1)) * _UNITS[unit or "b"]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a memory size greater than 0 ({SIZE_HELP}), got {text!r}")
    return int(value)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    """One stage's memory at the plan's batch, in bytes ([Note: memory plan] says how each is estimated)."""

    index: int
    name: str
    params: int  # elements of the parameters the stage updates (tied: in the owner only)
    param_bytes: int
    param_bytes_by_dtype: dict[str, int]
    buffer_bytes: int
    grad_bytes: int
    optimizer: str
    optimizer_state_bytes: int | None  # None: unknown (optimizer_rule says why)
    optimizer_rule: str
    activation_bytes: int
    activation_rule: str
    backward_bytes: int  # the gradient of the largest saved floating-point tensor, alive with the activations
    input_bytes: int
    output_bytes: int  # sent, and not already among the saved activations
    boundary_grad_bytes: int
    tied_replica_bytes: int = 0  # tied tensors this stage reads and another owns: replica, its grad and state
    cut: str | None = None  # the cut after the stage: "name (kind)"
    cut_kind: str | None = None
    cut_params: int = 0  # synthesizers / local head
    cut_param_bytes: int = 0
    cut_grad_bytes: int = 0
    cut_optimizer_state_bytes: int | None = 0
    cut_activation_bytes: int = 0
    label_bytes: int = 0  # cDNI's one-hot context, a local head's labels
    cut_backward_bytes: int = 0  # the gradients in flight in the cut models' backward
    delayed_kept_bytes: int = 0  # the pending batches of a delayed cut after this stage's group
    delayed_measure_bytes: int = 0  # what the step that measures the stale-fresh cosine holds
    optimizer_workspace_bytes: int = 0  # the temporaries of the stage's optimizer step
    cut_optimizer_workspace_bytes: int = 0  # ... and of the cut models' step
    notes: list[str] = field(default_factory=list)

    @property
    def cut_bytes(self) -> int:
        """What the cut after the stage adds: its models' weights, gradients, optimizer state and activations, the
        labels, a delayed cut's pending batches and measuring step (the total takes the transient ones at their
        time; `cut_backward_bytes` is apart)."""
        return (
            self.cut_param_bytes
            + self.cut_grad_bytes
            + (self.cut_optimizer_state_bytes or 0)
            + self.cut_activation_bytes
            + self.label_bytes
            + self.delayed_kept_bytes
            + self.delayed_measure_bytes
        )

    @property
    def persistent_bytes(self) -> int:
        """What stays from step to step: weights, gradients, optimizer state (the stage's and its cut models'),
        tied replicas, a delayed cut's pending batches."""
        return (
            self.param_bytes
            + self.buffer_bytes
            + self.grad_bytes
            + (self.optimizer_state_bytes or 0)
            + self.tied_replica_bytes
            + self.cut_param_bytes
            + self.cut_grad_bytes
            + (self.cut_optimizer_state_bytes or 0)
            + self.delayed_kept_bytes
        )

    @property
    def transient_bytes(self) -> int:
        """What one step's forward and backward hold: activations, boundary tensors and their gradients, the cut
        models' activations and labels."""
        return (
            self.activation_bytes
            + self.backward_bytes
            + self.input_bytes
            + self.output_bytes
            + self.boundary_grad_bytes
            + self.cut_activation_bytes
            + self.cut_backward_bytes
            + self.label_bytes
        )

    @property
    def total_bytes(self) -> int:
        """The stage on a device of its own: the persistent part plus the largest of what a step holds at once:
        its forward and backward (`transient_bytes`), the optimizer steps' temporaries (after the backward has freed
        the activations) and a delayed cut's measuring of the stale-fresh cosine (at the end of a step)."""
        return self.persistent_bytes + max(
            self.transient_bytes,
            self.optimizer_workspace_bytes,
            self.cut_optimizer_workspace_bytes,
            self.delayed_measure_bytes,
        )

    @property
    def known(self) -> bool:
        """False where an optimizer's state is unknown (the total leaves it out)."""
        return self.optimizer_state_bytes is not None and self.cut_optimizer_state_bytes is not None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cut_bytes"] = self.cut_bytes
        d["persistent_bytes"] = self.persistent_bytes
        d["transient_bytes"] = self.transient_bytes
        d["total_bytes"] = self.total_bytes
        d["total_known"] = self.known
        return d


@dataclass
class MemoryPlan:
    """The memory plan of a program at a batch: a StagePlan per stage, and the device size to check against."""

    model: str
    batch: int
    example_batch: int | None
    stages: list[StagePlan]
    device_bytes: int | None = None
    device: str = "cpu"  # the device type the optimizers' steps are planned for (foreach kernels on cuda)
    one_process_bytes: int = 0  # the whole program in one process ([Note: memory plan])
    one_process_before_training_bytes: int = 0  # of which resident before the first step (weights, the batch)
    notes: list[str] = field(default_factory=list)

    def over(self) -> list[tuple[StagePlan, int]]:
        """The stages whose estimate exceeds `device_bytes`, with the excess."""
        if self.device_bytes is None:
            return []
        return [(s, s.total_bytes - self.device_bytes) for s in self.stages if s.total_bytes > self.device_bytes]

    def report(self, device_text: str | None = None) -> list[str]:
        """Lines for the command line: which stages would not fit, by how much (or that all fit)."""
        lines = []
        for s in self.stages:
            if not s.known:
                lines.append(f"{s.name}: optimizer state unknown ({s.optimizer_rule}); left out of its estimate")
        if self.device_bytes is None:
            return lines
        dev = f"{device_text} ({format_bytes(self.device_bytes)})" if device_text else format_bytes(self.device_bytes)
        over = self.over()
        if not over:
            big = max(self.stages, key=lambda s: s.total_bytes)
            lines.append(
                f"memory: every stage fits {dev} at batch {self.batch}; the largest, {big.name}, needs "
                f"{format_bytes(big.total_bytes)} ({format_bytes(self.device_bytes - big.total_bytes)} to spare)"
            )
            return lines
        lines.append(
            f"memory: {len(over)} of {len(self.stages)} stages would not fit {dev} at batch {self.batch}: "
            + "; ".join(f"{s.name} needs {format_bytes(s.total_bytes)}, {format_bytes(x)} over" for s, x in over)
        )
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch": self.batch,
            "example_batch": self.example_batch,
            "device_bytes": self.device_bytes,
            "device": self.device,
            "stages": [s.as_dict() for s in self.stages],
            "over": [{"stage": s.name, "total_bytes": s.total_bytes, "over_bytes": x} for s, x in self.over()],
            "one_process_bytes": self.one_process_bytes,
            "one_process_before_training_bytes": self.one_process_before_training_bytes,
            "notes": list(self.notes),
            "rules": "dnicompile/memory_plan.py, [Note: memory plan]",
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1) + "\n"


# --------------------------------------------------------------------------------------------- optimizer state


@dataclass(frozen=True)
class OptimizerLayout:
    """What an optimizer keeps and makes per parameter: state bytes per element and per tensor, and the bytes
    per element of the temporaries a step makes, of the largest parameter (`per_tensor` loops) or of all of them
    (`foreach` kernels); `error` says why it is unknown."""

    per_element: int = 0
    per_tensor: int = 0
    workspace_per_element: float = 0.0
    foreach: bool = False
    error: str | None = None


_LAYOUTS: dict[tuple, OptimizerLayout] = {}
_WORKSPACE_SIZES = (1000, 2000)  # the dummy parameters whose step's temporaries are measured


def optimizer_layout(config: OptimizerConfig, dtype: torch.dtype, foreach: bool = False) -> OptimizerLayout:
    """The state `config`'s optimizer keeps for a parameter of `dtype`, found by one step on a 3 x 2 dummy
    parameter, and the temporaries of a later step, found by stepping dummies of 1000 and 2000 elements under an
    allocation tracker (with `foreach` kernels where asked and the spec leaves `foreach` and `fused` unset)."""
    from .optim import build_optimizer
    from .spec import OptimizerConfig

    args = config.model_extra or {}
    use_foreach = bool(args.get("foreach", foreach and not args.get("fused")))
    key = (config.model_dump_json(), str(dtype), use_foreach)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    try:
        with torch.random.fork_rng(devices=[]):
            dummy = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
            opt, _ = build_optimizer([dummy], config, "optimizer")
            dummy.grad = torch.full_like(dummy, 0.5)
            opt.step()
            state = dict(opt.state[dummy])
            measured = config
            if "foreach" not in args and not args.get("fused"):
                measured = OptimizerConfig.model_validate({**config.model_dump(), "foreach": use_foreach})
            params = [torch.zeros(n, dtype=dtype, requires_grad=True) for n in _WORKSPACE_SIZES]
            opt, _ = build_optimizer(params, measured, "optimizer")
            for _ in range(2):  # the first step makes the state; the second's temporaries are the workspace
                for p in params:
                    p.grad = torch.full_like(p, 0.5)
                tracker = _Allocations()
                with tracker:
                    opt.step()
    except Exception as e:  # e.g. an argument a CPU dummy cannot take
        layout = OptimizerLayout(error=f"{config.name} did not step a CPU dummy ({type(e).__name__}: {e})")
        _LAYOUTS[key] = layout
        return layout
    per_element = per_tensor = 0
    odd = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if tuple(value.shape) == tuple(dummy.shape):
            per_element += value.element_size()
        elif value.numel() == 1:
            per_tensor += tensor_bytes(value)
        else:
            odd.append(f"{name} {list(value.shape)}")
    scale = sum(_WORKSPACE_SIZES) if use_foreach else max(_WORKSPACE_SIZES)
    layout = OptimizerLayout(per_element, per_tensor, tracker.peak / scale, use_foreach)
    if odd:
        layout = OptimizerLayout(error=f"{config.name} keeps state not shaped like the parameter: {odd}")
    _LAYOUTS[key] = layout
    return layout


def optimizer_state_bytes(
    config: OptimizerConfig | None, params: list[torch.Tensor], foreach: bool = False
) -> tuple[int | None, int, str]:
    """Bytes of the state `config`'s optimizer keeps for `params` after its first step (those that require a
    gradient), the bytes of the temporaries its step makes, and the rule used; None where unknown."""
    params = [p for p in params if p.requires_grad]
    if config is None or not params:
        return 0, 0, "no parameters to update"
    total = workspace = 0
    rules = []
    for dtype in sorted({p.dtype for p in params}, key=str):
        layout = optimizer_layout(config, dtype, foreach)
        if layout.error:
            return None, 0, layout.error
        mine = [p for p in params if p.dtype == dtype]
        total += sum(p.numel() for p in mine) * layout.per_element + layout.per_tensor * len(mine)
        reach = sum(p.numel() for p in mine) if layout.foreach else max(p.numel() for p in mine)
        workspace = max(workspace, int(layout.workspace_per_element * reach))
        size = _dtype_bytes(dtype)
        factor = f"{layout.per_element / size:g}x" if layout.per_element % size == 0 else f"{layout.per_element} B/el."
        rules.append(
            f"{factor} {_name(dtype)} params" + (f" + {layout.per_tensor} B/tensor" if layout.per_tensor else "")
        )
    how = (
        "foreach"
        if any(optimizer_layout(config, d, foreach).foreach for d in {p.dtype for p in params})
        else "per tensor"
    )
    return total, workspace, f"{config.name}: " + ", ".join(rules) + f"; step {how}"


class _Allocations(TorchDispatchMode):
    """The bytes of the tensors that ops make (not views of their inputs, not in-place results) while they live,
    and their peak: the temporaries of an optimizer step on (small, real) dummies."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.known: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in inputs and ptr not in self.known:
                    self.known.add(ptr)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr, storage.nbytes())
        return out

    def _free(self, ptr: int, nbytes: int) -> None:
        self.known.discard(ptr)
        self.live -= nbytes


# --------------------------------------------------------------------------------------------- fake runs


class _Saved:
    """saved_tensors_hooks that record the storages autograd saves (each once, whole)."""

    def __init__(self) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.storages: dict[Any, int] = {}
        self.floating: set = set()  # storages saved from floating-point tensors (their gradients exist)

    def key(self, t: torch.Tensor):
        return self._ref(t.untyped_storage())

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        key = self._ref(s)
        self.storages[key] = s.nbytes()
        if t.dtype.is_floating_point:
            self.floating.add(key)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def bytes(self, exclude) -> int:
        return sum(n for k, n in self.storages.items() if k not in exclude)

    def largest_floating(self, exclude) -> int:
        return max((n for k, n in self.storages.items() if k not in exclude and k in self.floating), default=0)


def _storage_bytes(tensors, seen, key) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            k = key(t)
            if k not in seen:
                seen.add(k)
                total += t.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def _training_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _tensor_meta(node) -> tuple[tuple[int, ...], torch.dtype] | None:
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(d) for d in meta.shape), meta.dtype
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(d) for d in val.shape), val.dtype
        except (TypeError, ValueError):
            return None
    return None


def _at_batch(shape: tuple[int, ...], example: int | None, batch: int) -> tuple[int, ...]:
    if shape and example is not None and shape[0] == example:
        return (batch, *shape[1:])
    return shape


def _device(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


@dataclass
class _Run:
    activation_bytes: int
    input_bytes: int
    output_bytes: int
    float_input_bytes: int
    float_output_bytes: int
    rule: str
    outputs: Any = None
    backward_bytes: int = 0  # the gradient of the largest floating-point saved tensor


_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as a fused kernel runs it (flash attention: it saves the output and one
    log-sum-exp per query, not the (T, T) weights), or None where that kernel does not take these arguments."""
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is None or enable_gqa:
        return None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device).masked_fill(
            attn_mask.logical_not(), float("-inf")
        )
    try:
        return fused(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    except Exception:
        return None


class _Interpreter(torch.fx.Interpreter):
    """Runs a stage node by node, attention as a fused kernel (`fused`) or as written (the math path that keeps the
    (T, T) attention weights for the backward)."""

    def __init__(self, gm, fused: bool) -> None:
        super().__init__(gm)
        self.fused = fused
        self.attention: set[str] = set()  # how attention ran: "fused", "math"

    def call_function(self, target, args, kwargs):
        if target in _SDPA:
            out = _fused_attention(*args, **kwargs) if self.fused else None
            self.attention.add("fused" if out is not None else "math")
            if out is not None:
                return out
        return super().call_function(target, args, kwargs)


def _run_stage(program, stage, batch: int, grad_in: bool, mode, loss_fn=None, labels=None, fused=True) -> _Run:
    """The stage's forward (and the spec's loss, for the last) on fake tensors at `batch`, counting what autograd
    saves ([Note: memory plan])."""
    gm = stage.graph_module
    device = _device(gm)
    example = program.example_batch
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    metas = [_tensor_meta(n) for n in placeholders]
    if any(m is None for m in metas):
        raise _NoRun("an input of the stage is not a tensor with known shape")
    saved = _Saved()
    with mode:
        tensors = {n: mode.from_tensor(p).requires_grad_(p.requires_grad) for n, p in gm.named_parameters()}
        tensors.update({n: mode.from_tensor(b) for n, b in gm.named_buffers()})
        inputs = []
        for node, (shape, dtype) in zip(placeholders, metas):
            val = node.meta.get("val")  # an exported graph knows where each input was (a model on meta: cpu ids)
            at = val.device if isinstance(val, torch.Tensor) else device
            x = torch.empty(_at_batch(shape, example, batch), dtype=dtype, device=at)
            inputs.append(x.requires_grad_(grad_in and (dtype.is_floating_point or dtype.is_complex)))
    autocast = contextlib.nullcontext()
    if getattr(stage, "precision", "fp32") == "bf16" and device.type in ("cpu", "cuda"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    interpreter = _Interpreter(gm, fused)
    with torch.random.fork_rng(devices=[]), _training_mode(gm), mode, saved.hooks(), autocast:
        with _reparametrize_module(gm, tensors, tie_weights=True):  # a tied tensor under each of its names
            out = interpreter.run(*inputs)
        if loss_fn is not None and labels is not None and isinstance(out, torch.Tensor):
            shape, dtype = labels
            target = torch.zeros(shape, dtype=dtype, device=out.device)
            loss_fn(out, target)
    exclude: set = set()
    _storage_bytes([*tensors.values()], exclude, saved.key)
    input_bytes = _storage_bytes(inputs, exclude, saved.key)
    activations = saved.bytes(exclude)
    backward = saved.largest_floating(exclude)
    flat, _ = tree_flatten(out)
    outs = [t for t in flat if isinstance(t, torch.Tensor)]
    exclude |= set(saved.storages)
    output_bytes = _storage_bytes(outs, exclude, saved.key)
    return _Run(
        activation_bytes=activations,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        float_input_bytes=sum(tensor_bytes(x) for x in inputs if x.dtype.is_floating_point),
        float_output_bytes=sum(tensor_bytes(t) for t in outs if t.dtype.is_floating_point),
        rule="saved tensors (fake run)" + _attention_rule(interpreter.attention),
        outputs=out,
        backward_bytes=backward,
    )


def _attention_rule(how: set[str]) -> str:
    if not how:
        return ""
    if how == {"fused"}:
        return "; attention as a fused kernel: no (T, T) weights kept"
    return "; attention as written: its (T, T) weights kept" if how == {"math"} else "; attention fused where it can be"


class _NoRun(Exception):
    pass


def _upper_bound(program, stage, batch: int, reason: str) -> _Run:
    """Every op's output kept: the fallback where the stage does not run on fake tensors."""
    gm = stage.graph_module
    example = program.example_batch
    scale = batch / example if example else 1.0
    acts = ins = float_ins = largest = 0
    for n in gm.graph.nodes:
        meta = _tensor_meta(n)
        if meta is None:
            continue
        b = math.prod(meta[0]) * _dtype_bytes(meta[1])
        if n.op == "placeholder":
            ins += b
            float_ins += b if meta[1].is_floating_point else 0
        elif n.op in ("call_function", "call_method", "call_module"):
            acts += b
            largest = max(largest, b if meta[1].is_floating_point else 0)
    outs = sum(math.prod(t.shape) * _dtype_bytes(t.dtype) for t in stage.outputs)
    float_outs = sum(math.prod(t.shape) * _dtype_bytes(t.dtype) for t in stage.outputs if t.dtype.is_floating_point)
    return _Run(
        activation_bytes=int(acts * scale),
        input_bytes=int(ins * scale),
        output_bytes=int(outs * scale),
        float_input_bytes=int(float_ins * scale),
        float_output_bytes=int(float_outs * scale),
        rule=f"upper bound: every op's output at the example batch x {scale:g} ({reason})",
        backward_bytes=int(largest * scale),
    )


def _estimate_stage(program, stage, batch: int, grad_in: bool, loss_fn, labels, fused: bool) -> _Run:
    from torch._subclasses.fake_tensor import FakeTensorMode

    example = program.example_batch
    try:
        return _run_stage(program, stage, batch, grad_in, FakeTensorMode(), loss_fn, labels, fused)
    except Exception as e:
        first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if example and batch != example:  # a size fixed in the traced graph: run at the example batch and scale
        try:
            at_example = labels and (_at_batch(labels[0], batch, example), labels[1])
            run = _run_stage(program, stage, example, grad_in, FakeTensorMode(), loss_fn, at_example, fused)
            s = batch / example
            return _Run(
                int(run.activation_bytes * s),
                int(run.input_bytes * s),
                int(run.output_bytes * s),
                int(run.float_input_bytes * s),
                int(run.float_output_bytes * s),
                f"saved tensors (fake run) at the example batch {example}, x {s:g} (at batch {batch}: {first})",
                run.outputs,
                int(run.backward_bytes * s),
            )
        except Exception:
            pass
    return _upper_bound(program, stage, batch, f"the fake run failed: {first}")


# --------------------------------------------------------------------------------------------- labels


def _labels(program, batch: int) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of a batch's labels: the named input of `loss: {from_output, labels}`, else what the
    spec's built-in loss takes for the program's class scores."""
    spec = program.spec
    example = program.example_batch
    if not isinstance(spec.loss, str):
        name = spec.loss.labels
        if name is None or name not in program.input_names:
            return None
        x = program.example_inputs[list(program.input_names).index(name)]
        return _at_batch(tuple(x.shape), example, batch), x.dtype
    scores = [t for t in program.stages[-1].outputs if t.dtype.is_floating_point]
    if not scores:
        return None
    shape = _at_batch(tuple(scores[0].shape), example, batch)
    if spec.loss in ("cross_entropy", "nll"):
        return shape[:-1], torch.int64
    if spec.loss == "mse":
        return shape, scores[0].dtype
    return None


def _loss_fn(spec):
    from .losses import LOSSES

    return LOSSES.get(spec.loss) if isinstance(spec.loss, str) else None


# --------------------------------------------------------------------------------------------- cut models


@dataclass
class _CutModels:
    params: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_state_bytes: int | None = 0
    activation_bytes: int = 0
    label_bytes: int = 0
    workspace_bytes: int = 0
    backward_bytes: int = 0
    rule: str = ""


def _cut_models(program, runtime, cut, batch: int, mode, labels, context_bytes: int, foreach: bool) -> _CutModels:
    """What a synthetic or local cut's own models cost ([Note: memory plan]); their modules are fake."""
    iface = runtime.interfaces[cut.index]
    out = _CutModels()
    if iface.kind not in ("synthetic", "local"):
        return out
    example = program.example_batch
    groups = []  # (parameters, optimizer config)
    if iface.kind == "synthetic":
        groups.append((list(iface.models.grad.parameters()), cut.synthetic_gradient.optimizer))
        if cut.synthetic_input is not None:
            groups.append((list(iface.models.input.parameters()), cut.synthetic_input.optimizer))
    else:
        groups.append((list(iface.head.parameters()), cut.local_loss.optimizer))
    rules = []
    for params, config in groups:
        out.params += sum(p.numel() for p in params)
        out.param_bytes += sum(tensor_bytes(p) for p in params)
        out.grad_bytes += sum(tensor_bytes(p) for p in params if p.requires_grad)
        state, workspace, rule = optimizer_state_bytes(config, params, foreach)
        rules.append(rule)
        out.workspace_bytes = max(out.workspace_bytes, workspace)
        out.optimizer_state_bytes = (
            None if state is None or out.optimizer_state_bytes is None else out.optimizer_state_bytes + state
        )
    out.rule = "; ".join(rules)
    device = next((p.device for params, _ in groups for p in params), torch.device("cpu"))
    saved = _Saved()
    with torch.random.fork_rng(devices=[]), mode:
        h = {
            b.name: torch.empty(_at_batch(tuple(b.shape), example, batch), dtype=b.dtype, device=device)
            for b in cut.boundary
        }
        target = torch.zeros(labels[0], dtype=labels[1], device=device) if labels else None
        for m in iface.modules():
            m.train()
        with saved.hooks():
            if iface.kind == "synthetic":
                context = None
                if runtime.num_classes and target is not None:
                    context = torch.zeros((*target.shape, runtime.num_classes), device=device)
                preds = iface.predict(h, context)
                for p in preds.values():
                    torch.nn.functional.mse_loss(p, torch.zeros_like(p))
                if iface.has_input and program.stages[0].inputs:
                    x0 = program.stages[0].inputs[0]
                    iface.predict_input(torch.empty(_at_batch(x0.shape, example, batch), dtype=x0.dtype, device=device))
                out.label_bytes = (
                    context_bytes if context is not None and cut.synthetic_gradient.condition_on_labels else 0
                )
            else:
                leaves = [h[n].requires_grad_(True) for n in iface.names if n in h]
                if leaves and target is not None:
                    iface.loss_fn(iface.head(*leaves), target)
                out.label_bytes = tensor_bytes(target) if target is not None else 0
    exclude: set = set()
    _storage_bytes([p for params, _ in groups for p in params], exclude, saved.key)
    _storage_bytes(list(h.values()), exclude, saved.key)
    out.activation_bytes = saved.bytes(exclude)
    out.backward_bytes = 2 * saved.largest_floating(exclude)  # a layer's incoming and outgoing gradients
    return out


# --------------------------------------------------------------------------------------------- the plan


def plan_memory(
    program: DecoupledProgram,
    batch: int | None = None,
    device_bytes: int | None = None,
    device: str | None = None,
    attention: str = "fused",
) -> MemoryPlan:
    """The memory plan of `program` at `batch` (default: the spec's train.batch_size), checked against a device
    of `device_bytes` (optional). `device` ("cpu", "cuda", ...; default: where the model's parameters are, and
    "cuda" for a model on `meta`) decides whether optimizers step with foreach kernels (torch's default on CUDA)
    or tensor by tensor. `attention`: "fused" counts scaled_dot_product_attention as a fused kernel keeps it
    (flash or memory-efficient attention, torch's choice on GPUs and for CPU: the output and a log-sum-exp per
    query), "math" as its math path (the (T, T) weights too). Allocates nothing of the model's size: see
    [Note: memory plan]."""
    if attention not in ("fused", "math"):
        raise ValueError(f"attention is 'fused' or 'math', not {attention!r}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .runtime.local import LocalRuntime

    spec = program.spec
    batch = int(batch or spec.train.batch_size)
    if device is None:
        device = _device(program.model).type
        device = "cuda" if device == "meta" else device
    foreach = torch.device(device).type in ("cuda", "xpu")
    labels = _labels(program, batch)
    loss_fn = _loss_fn(spec)
    mode = FakeTensorMode()
    with torch.random.fork_rng(devices=[]), mode:  # the cuts' own models, fake (no memory, no draws)
        runtime = LocalRuntime(program, program.interface_classes)
    context_bytes = 0
    if runtime.num_classes and labels is not None:
        context_bytes = math.prod(labels[0]) * runtime.num_classes * 4  # one-hot float32
    stages: list[StagePlan] = []
    runs: list[_Run] = []
    owned: dict[int, int] = {}
    for t in getattr(program.partition, "tied", ()):
        if t.parameter:
            owned[id(program.model.get_parameter(t.names[0]))] = t.owner
    last = program.stages[-1].index
    for stage in program.stages:
        before = program.cut_before(stage.index)
        grad_in = before is not None and runtime.interfaces[before.index].sends_back
        run = _estimate_stage(
            program,
            stage,
            batch,
            grad_in,
            loss_fn if stage.index == last else None,
            labels if stage.index == last else None,
            attention == "fused",
        )
        runs.append(run)
        params = stage.parameters()
        by_dtype: dict[str, int] = {}
        for p in params:
            by_dtype[_name(p.dtype)] = by_dtype.get(_name(p.dtype), 0) + tensor_bytes(p)
        opt_bytes, workspace, opt_rule = optimizer_state_bytes(stage.optimizer_config, params, foreach)
        borrowed = [p for p in stage.graph_module.parameters() if id(p) in stage.borrowed]
        replica = 0
        if borrowed:
            state, _, _ = optimizer_state_bytes(stage.optimizer_config, borrowed, foreach)
            replica = sum(2 * tensor_bytes(p) for p in borrowed) + (state or 0)
        after = program.cut_after(stage.index)
        grad_out = run.float_output_bytes if after is not None else 0
        plan = StagePlan(
            index=stage.index,
            name=stage.name,
            params=sum(p.numel() for p in params),
            param_bytes=sum(tensor_bytes(p) for p in params),
            param_bytes_by_dtype=by_dtype,
            buffer_bytes=sum(tensor_bytes(b) for b in stage.graph_module.buffers()),
            grad_bytes=sum(tensor_bytes(p) for p in params if p.requires_grad),
            optimizer=stage.optimizer_config.name,
            optimizer_state_bytes=opt_bytes,
            optimizer_rule=opt_rule,
            activation_bytes=run.activation_bytes,
            activation_rule=run.rule,
            backward_bytes=run.backward_bytes,
            input_bytes=run.input_bytes,
            output_bytes=run.output_bytes,
            boundary_grad_bytes=(run.float_input_bytes if grad_in else 0) + grad_out,
            tied_replica_bytes=replica,
            optimizer_workspace_bytes=workspace,
        )
        if after is not None:
            plan.cut = f"{after.name} ({after.kind})"
            plan.cut_kind = after.kind
            models = _cut_models(program, runtime, after, batch, mode, labels, context_bytes, foreach)
            plan.cut_params = models.params
            plan.cut_param_bytes = models.param_bytes
            plan.cut_grad_bytes = models.grad_bytes
            plan.cut_optimizer_state_bytes = models.optimizer_state_bytes
            plan.cut_activation_bytes = models.activation_bytes
            plan.label_bytes = models.label_bytes
            plan.cut_optimizer_workspace_bytes = models.workspace_bytes
            plan.cut_backward_bytes = models.backward_bytes
            if models.rule:
                plan.notes.append(f"cut models: {models.rule}")
        if stage.precision == "bf16" and "autocast" not in run.rule and _device(stage.graph_module).type == "meta":
            plan.notes.append("precision bf16: activations estimated at the traced dtypes (no autocast on meta)")
        stages.append(plan)
    _add_delayed(program, runtime, stages, runs)
    result = MemoryPlan(type(program.model).__name__, batch, program.example_batch, stages, device_bytes, device=device)
    _one_process(program, runtime, result, runs)
    return result


def _group_before(program, runtime, cut_index: int) -> list[int]:
    """The stages joined by exact cuts that end at the cut `cut_index`."""
    stages = [cut_index]
    before = program.cut_before(cut_index)
    while before is not None and runtime.interfaces[before.index].exact:
        stages.insert(0, before.index)
        before = program.cut_before(before.index)
    return stages


def _add_delayed(program, runtime, stages: list[StagePlan], runs: list[_Run]) -> None:
    """Each delayed cut's pending batches and its stale-fresh measurement, on the stages of its group."""
    spec = program.spec
    for cut in program.cuts:
        iface = runtime.interfaces[cut.index]
        if iface.kind != "delayed":
            continue
        dg = cut.delayed_gradient
        delay = max(1, spec.distributed.queue_depth) if dg.delay == "auto" else int(dg.delay)
        group = _group_before(program, runtime, cut.index)
        for k, i in enumerate(group):
            s, run = stages[i], runs[i]
            weights = sum(tensor_bytes(p) for p in program.stages[i].graph_module.parameters() if p.requires_grad)
            per_batch = run.input_bytes if (k == 0 or dg.weights != "recompute") else 0
            if dg.weights == "stash":
                per_batch += weights + s.buffer_bytes + run.activation_bytes
            elif dg.weights == "current":
                per_batch += run.activation_bytes
            if i == cut.index:
                per_batch += run.float_output_bytes  # delta
            s.delayed_kept_bytes += delay * per_batch
            if dg.predict != "none":  # the weights of the previous forward
                s.delayed_kept_bytes += weights
            if getattr(dg, "measure_every", None):  # copies and fresh gradients, the probe's graph, float64 copies
                largest = max((tensor_bytes(p) for p in program.stages[i].graph_module.parameters()), default=0)
                s.delayed_measure_bytes += 2 * weights + run.activation_bytes + 4 * largest + run.input_bytes
                if dg.weights != "recompute":  # beside the graph of the step's own batch
                    s.delayed_measure_bytes += run.activation_bytes + run.output_bytes
            s.notes.append(f"delayed cut {cut.name}: {delay} pending batch(es), weights: {dg.weights}")


def _one_process(program, runtime, plan: MemoryPlan, runs: list[_Run]) -> None:
    """[Note: memory plan] The program in one process (the local runtime): the persistent parts of every stage
    once (a buffer or a context shared by stages once), plus the most held at once, phase by phase. The local
    runtime runs the stages in groups joined by exact cuts. A group that ends at a synthetic or local cut, or at the
    loss, runs its forward (and a local cut's head learns, on all the group keeps), then its backward (from its last stage to its first, freeing each stage's activations
    as it leaves it, holding the boundary gradients and the gradient of the stage's largest saved tensor), then its
    optimizer step (temporaries in place of the activations). A group that ends at a delayed cut runs only its
    forward then (keeping its graph for stash and current; none for recompute, whose forward runs without one).
    What earlier groups hold stays: behind a synthetic cut the boundary tensors, the synthesizers' predictions and
    then the true gradient; behind a delayed cut the boundary tensors, the graph and the gradient. At the end of
    the step the synthesizers learn and each delayed group runs its due backward (a recompute group rebuilds its
    graph), measures the stale-fresh cosine on some steps and steps its optimizer, with all that is held."""
    stages = plan.stages
    persistent = before_training = 0
    seen_buffers: set[int] = set()
    for s, stage in zip(stages, program.stages):
        buffers = sum(tensor_bytes(b) for b in stage.graph_module.buffers() if id(b) not in seen_buffers)
        seen_buffers |= {id(b) for b in stage.graph_module.buffers()}
        # gradients: cleared at the start of each step, allocated by each group's backward (below)
        persistent += s.persistent_bytes - s.buffer_bytes - s.tied_replica_bytes - s.grad_bytes + buffers
        before_training += s.param_bytes + buffers + s.cut_param_bytes
    context = max((s.label_bytes for s in stages if s.cut_kind == "synthetic"), default=0)
    before_training += runs[0].input_bytes  # the batch itself: there before the first step
    peak = held = 0
    end: list[int] = []  # what each synthesizer's learning and each delayed group's due backward hold at the end
    group: list[int] = []
    previous_kind = None
    for s in stages:
        group.append(s.index)
        if s.cut_kind == "exact":
            continue
        first = 0 if previous_kind in ("synthetic", "delayed") else runs[group[0]].input_bytes
        kept = [runs[i].activation_bytes + runs[i].output_bytes for i in group]
        backward = [stages[i].boundary_grad_bytes + stages[i].backward_bytes for i in group]
        grads = [stages[i].grad_bytes for i in group]
        workspace = max(stages[i].optimizer_workspace_bytes for i in group) + sum(grads)
        if s.cut_kind == "delayed":
            weights = program.cut_after(s.index).delayed_gradient.weights
            graph = sum(runs[i].activation_bytes for i in group) if weights != "recompute" else 0
            outputs = sum(runs[i].output_bytes for i in group)
            peak = max(peak, held + first + graph + outputs)
            held += graph + runs[s.index].output_bytes + runs[s.index].float_output_bytes
            due = (sum(runs[i].activation_bytes for i in group) if weights == "recompute" else 0) + max(backward)
            measure = sum(stages[i].delayed_measure_bytes for i in group)
            end.append(max(due + sum(grads), workspace, measure))
        else:
            # the forward keeps every stage's activations and outputs; the backward goes from the last stage back,
            # each stage's gradients allocated as it gets there
            transient = max(sum(kept[: k + 1]) + backward[k] + sum(grads[k:]) for k in range(len(group))) + first
            if s.cut_kind == "synthetic":  # the predictions' graph lives through the backward, until the end
                transient += s.cut_activation_bytes
            elif s.cut_kind == "local":  # the head learns before the group's backward, on all it kept
                head = s.cut_activation_bytes + s.cut_backward_bytes + s.label_bytes
                transient = max(transient, first + sum(kept) + head)
            peak = max(peak, held + max(transient, workspace))
            held += sum(grads)  # until the next step clears them
            if s.cut_kind == "synthetic":  # h, the predictions' graph and then the true gradient wait for the end
                held += s.cut_activation_bytes + runs[s.index].output_bytes + runs[s.index].float_output_bytes
                end.append(max(s.cut_optimizer_workspace_bytes, s.cut_backward_bytes))
        previous_kind = s.cut_kind
        group = []
    peak = max(peak, held + max(end, default=0))  # (a delayed group's gradients are in its `end`)
    plan.one_process_bytes = persistent + context + peak
    plan.one_process_before_training_bytes = before_training
    if any(not s.known for s in stages):
        plan.notes.append("an optimizer's state is unknown and left out of the totals")
