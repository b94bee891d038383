"""CPU mode: run NeMo 2.7.3 + megatron-core 0.15.3 training on CPU processes over gloo.

NeMo's ``MegatronStrategy`` and megatron-core call CUDA unconditionally in a handful of places,
even with ``nl.Trainer(accelerator="cpu")`` and ``use_cpu_initialization=True``; no flag or
environment variable avoids them (FACTS.md). :func:`enable_cpu_mode` patches exactly those
places, in-process, so that the tests and the CPU demo can run the real NeMo training loop
(``trainer.fit``, pipeline schedules, DDP, optimizer, gradient clipping, NeMo 2 checkpoints) at
TP/PP/DP > 1 under ``torchrun`` with the gloo backend. It does nothing when CUDA is available, and
calling it twice is harmless. Call it in every process before ``trainer.fit`` (importing NeMo
first is not required: the patched modules are imported here).

The patches, each narrow (one library function or one module's view of ``torch``):

1. **Model-parallel RNG tracker on the CPU generator.** ``megatron.core.tensor_parallel.random``
   keeps its tracker states with ``torch.cuda.get_rng_state`` / ``manual_seed`` and its own
   ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` (``torch.cuda.default_generators``). They are
   redirected to the CPU default generator, which is the generator CPU dropout/init draw from.
2. **Seed the tracker.** ``nemo.lightning.megatron_init._set_random_seed`` calls
   ``model_parallel_cuda_manual_seed`` only ``if torch.cuda.device_count() > 0``; without it any
   ``get_cuda_rng_tracker().fork()`` raises ``cuda rng state model-parallel-rng is not added``. The
   wrapper calls it on CPU too, with NeMo's seed (``seed + 100 * pp_rank``).
3. **Device-agnostic** ``torch`` **seen by specific modules** (:data:`SHIMMED_MODULES`, each with
   the call that needs it). Inside those modules only, the name ``torch`` is a proxy that forwards
   everything to the real ``torch`` except: ``torch.cuda.current_device()`` returns the CPU
   device; ``torch.cuda.synchronize`` is a no-op; ``torch.cuda.Stream`` / ``stream`` /
   ``current_stream`` / ``default_stream`` are inert stand-ins; tensor factories
   (``tensor``, ``zeros``, ``empty``, ...) map ``device="cuda"`` to the CPU and ignore
   ``pin_memory``; a tensor made with ``pin_memory=True`` (NeMo's logging idiom
   ``torch.tensor(x, pin_memory=True).to("cuda", non_blocking=True)``) is a
   :class:`HostTensor`, whose ``.to("cuda")`` / ``.cuda()`` stay on the CPU.
   Nothing outside those modules sees a changed ``torch``.
4. **Batches whose** ``.cuda()`` **stays on the CPU.** ``gpt_data_step`` (and most NeMo data steps)
   move the batch with ``tensor.cuda(non_blocking=True)``. ``MegatronParallel.wrapped_forward_step``
   is wrapped so that the data step reads from an iterator that yields batches of
   :class:`HostTensor`: the stock data step, with its per-pipeline-stage key selection, runs
   unchanged.
5. **Gradient clipping.** ``megatron.core.optimizer.clip_grads.get_grad_norm_fp32`` (``device=
   'cuda'`` buffers), ``clip_grad_by_total_norm_fp32`` (``assert param.grad.type() ==
   'torch.cuda.FloatTensor'``) and ``count_zeros_fp32`` (``device='cuda'``) are replaced, in
   ``clip_grads`` and in ``megatron.core.optimizer.optimizer`` (which imported them by name), by
   ports that keep the tensors on the gradients' device and do the same collectives (the
   model-parallel grad-stats group, plus the data-parallel group for DTensor grads). The result is
   the same total norm and the same in-place scaling, so ``clip_grad > 0`` works on CPU.

6. **Checkpoint load.** ``nemo.lightning.io.pl._fix_tensors_device`` asserts
   ``torch.cuda.is_initialized()`` after every distributed-checkpoint load (to move tensors to the
   current GPU). On CPU nothing is on a GPU: it is replaced by the identity in ``nemo.lightning.io.pl``.

7. **Norms under sequence parallelism.** Without Transformer Engine or apex the local layer spec
   builds its norms with ``megatron.core.transformer.torch_norm.WrappedTorchNorm``, whose
   ``__new__`` asserts ``not config.sequence_parallel``. The replacement builds the same torch
   norm and marks its parameters ``sequence_parallel`` as apex's ``FusedLayerNorm`` does, so that
   ``finalize_model_grads`` sums their gradients (each rank's covers only its part of the
   sequence) over the tensor-parallel group.

What this does not cover (not possible on CPU): Transformer Engine layer specs, bf16/FP8 mixed
precision plugins, fused kernels (RoPE/bias/softmax fusions must be off), the distributed
optimizer (``use_distributed_optimizer=False`` must be passed in the ``optim=`` given to the model
constructor), NCCL, CUDA graphs, context parallelism's side streams.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SHIMMED_MODULES", "HostTensor", "cpu_mode_enabled", "enable_cpu_mode"]

_LOG = logging.getLogger(__name__)

# Module -> the CUDA calls in it that run on the CPU training path (megatron-core 0.15.3, NeMo 2.7.3).
SHIMMED_MODULES: dict[str, str] = {
    # forward_backward_no_pipelining / _pipelining_without_interleaving / _with_interleaving:
    # `total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`.
    "megatron.core.pipeline_parallel.schedules": "device='cuda' token counter in all three schedules",
    # _communicate / _communicate_shapes: recv buffers on `torch.cuda.current_device()`, and
    # `torch.cuda.synchronize()` after batched isend/irecv.
    "megatron.core.pipeline_parallel.p2p_communication": "current_device() buffers, synchronize()",
    # The tracker's get_rng_state/manual_seed (see _patch_rng) and current_device().
    "megatron.core.tensor_parallel.random": "torch.cuda RNG state functions",
    # GlobalMemoryBuffer.get_tensor: `torch.empty(..., device=torch.cuda.current_device())`.
    "megatron.core.utils": "GlobalMemoryBuffer on current_device()",
    # _gather_along_first_dim / _reduce_scatter_along_first_dim: outputs on current_device().
    "megatron.core.tensor_parallel.mappings": "gather/scatter outputs on current_device()",
    # LinearWithGradAccumulationAndAsyncCommunication (all-gather buffers), GPU init path.
    "megatron.core.tensor_parallel.layers": "all-gather buffers on current_device()",
    # split/gather helpers for sequence-parallel and checkpoint tensors.
    "megatron.core.tensor_parallel.utils": "gather buffers on current_device()",
    # RotaryEmbedding.forward: `self.inv_freq.to(device=torch.cuda.current_device())` (RoPE models).
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to current_device()",
    # get_default_causal_mask (local DotProductAttention with a causal mask and no attention_mask):
    # `torch.ones(sq, sq, device="cuda")`.
    "megatron.core.transformer.utils": "default causal mask on device='cuda'",
    # _ParamAndGradBucketGroup: torch.cuda.stream()/default_stream(); buffers on current_device().
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device(), streams",
    # DistributedDataParallel.__init__: `torch.cuda.Stream(device=torch.cuda.current_device())`.
    "megatron.core.distributed.distributed_data_parallel": "communication stream",
    # Timer.start/stop (barrier=True): torch.cuda.synchronize(); Timers._get_elapsed_time_all_ranks:
    # buffer on current_device() (NeMo's ProgressPrinter logs the Megatron timers every step).
    "megatron.core.timers": "synchronize(), gather buffer on current_device()",
    # FP32Optimizer/ChainedOptimizer.get_loss_scale: `torch.tensor([1.0], device=current_device())`.
    "megatron.core.optimizer.optimizer": "loss-scale tensor on current_device()",
    # Distributed checkpoint save (NeMo 2 checkpoints are Megatron dist checkpoints):
    # FileSystemWriterAsync.preload_tensors calls torch.cuda.synchronize();
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize() before the write",
    # save_state_dict_async_finalize / verify_global_md_reuse: flags on device='cuda' / current_device();
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "all-reduced flags on 'cuda'",
    # FullyParallelSaveStrategyWrapper / load: torch.cuda.synchronize() around the exchange;
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "synchronize()",
    # AsyncCallsQueue / TemporalAsyncCaller (async save, NeMo's default): flags on current_device().
    "megatron.core.dist_checkpointing.strategies.async_utils": "flags on current_device(), synchronize()",
    # MegatronParallel.forward: `torch.tensor(0.0, device=torch.cuda.current_device())` on non-last
    # pipeline stages; init_model_parallel: `with torch.cuda.stream(torch.cuda.Stream())`;
    # default_data_step: move_data_to_device(batch, torch.cuda.current_device());
    # MaskedTokenLossReduction.reduce: zeros on current_device().
    "nemo.lightning.megatron_parallel": "current_device(), Stream(), stream()",
    # MegatronStrategy.training_step/optimizer_step logging:
    # `torch.tensor(x, pin_memory=True).to("cuda", non_blocking=True)`.
    "nemo.lightning.pytorch.strategies.megatron_strategy": "pinned logging tensors sent to 'cuda'",
    # MegatronDataSampler.on_megatron_step_end logging: the same pinned-tensor idiom.
    "nemo.lightning.pytorch.plugins.data_sampler": "pinned logging tensors sent to 'cuda'",
    # ModelCheckpoint: `torch.tensor(0.0, device=torch.cuda.current_device())` for a missing monitor.
    "nemo.lightning.pytorch.callbacks.model_checkpoint": "monitor placeholder on current_device()",
    # PreemptionCallback.interrupted: the stop flag broadcast from rank 0 on current_device().
    "nemo.lightning.pytorch.callbacks.preemption": "interrupted flag on current_device()",
}

_ENABLED = False


def cpu_mode_enabled() -> bool:
    """Whether :func:`enable_cpu_mode` has patched this process."""
    return _ENABLED


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    """True for ``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")`` and bare CUDA indices (ints)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


class HostTensor(torch.Tensor):
    """A CPU tensor whose ``.cuda()`` / ``.to("cuda")`` return a plain CPU tensor.

    Used for the two idioms that move host data "to the GPU" with a tensor *method* (which no
    module-level patch can reach): NeMo's pinned logging scalars and the batch dicts that data
    steps move with ``.cuda(non_blocking=True)``. It does not propagate: every operation on it,
    including ``.cuda()`` / ``.to()``, returns an ordinary :class:`torch.Tensor`.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def cuda(self, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Return the tensor itself, as a plain CPU tensor (no copy)."""
        del device, non_blocking, kwargs
        return self.as_subclass(torch.Tensor)

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Like :meth:`torch.Tensor.to`, with any CUDA device replaced by the CPU."""
        args = tuple(_cpu_if_cuda(a) if isinstance(a, str | torch.device) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        kwargs.pop("non_blocking", None)
        return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the tensor itself, as a plain tensor."""
        del args, kwargs
        return self.as_subclass(torch.Tensor)


def _as_host(value: Any) -> Any:
    """Batch (tensor / dict / list / tuple, nested) with every tensor viewed as a HostTensor."""
    if isinstance(value, torch.Tensor):
        return value if isinstance(value, HostTensor) else value.as_subclass(HostTensor)
    if isinstance(value, dict):
        return type(value)((k, _as_host(v)) for k, v in value.items())
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_as_host(v) for v in value)
    if isinstance(value, list):
        return [_as_host(v) for v in value]
    return value


class _HostBatchIterator:
    """Iterator wrapper: yields the wrapped iterator's batches with tensors as HostTensor."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self._inner = inner

    def __iter__(self) -> _HostBatchIterator:
        return self

    def __next__(self) -> Any:
        return _as_host(next(self._inner))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ----------------------------------------------------------------------------------------------
# The module-scoped torch proxy (patch 3)
# ----------------------------------------------------------------------------------------------


class _InertStream:
    """Stands in for ``torch.cuda.Stream`` / ``current_stream()``: CPU work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def wait_stream(self, stream: Any) -> None:
        """No-op."""

    def wait_event(self, event: Any) -> None:
        """No-op."""

    def record_event(self, event: Any = None) -> Any:
        """No-op; returns ``event``."""
        return event

    def synchronize(self) -> None:
        """No-op."""


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager[Any]:
    del stream
    return contextlib.nullcontext()


class _CudaOnCpu(types.SimpleNamespace):
    """``torch.cuda`` as seen by a shimmed module: device/stream calls answer for the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _make_cuda_on_cpu() -> _CudaOnCpu:
    return _CudaOnCpu(
        current_device=lambda: _CPU,
        synchronize=lambda device=None: None,
        Stream=_InertStream,
        stream=_stream_context,
        current_stream=lambda device=None: _InertStream(),
        default_stream=lambda device=None: _InertStream(),
        # The RNG tracker (megatron.core.tensor_parallel.random) keeps CPU generator states.
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        empty_cache=lambda: None,
    )


def _factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory: CUDA device -> CPU; ``pin_memory=True`` -> a HostTensor."""

    @functools.wraps(fn)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        pinned = bool(kwargs.pop("pin_memory", False))
        out = fn(*args, **kwargs)
        return out.as_subclass(HostTensor) if pinned else out

    return make


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


class _TorchOnCpu(types.SimpleNamespace):
    """The ``torch`` a shimmed module sees: the real one, plus the CPU answers above."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _make_torch_on_cpu() -> _TorchOnCpu:
    attrs: dict[str, Any] = {name: _factory(getattr(torch, name)) for name in _FACTORIES}
    return _TorchOnCpu(cuda=_make_cuda_on_cpu(), **attrs)


def _shim_modules() -> None:
    proxy = _make_torch_on_cpu()
    for name in SHIMMED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"cpu_mode: {name} does not import torch as `torch`; the shim would not apply")
        setattr(module, "torch", proxy)  # noqa: B010 (a module global, set from outside)


# ----------------------------------------------------------------------------------------------
# RNG (patches 1 and 2)
# ----------------------------------------------------------------------------------------------


def _patch_rng() -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # CudaRNGStatesTracker.fork/add and model_parallel_cuda_manual_seed read/write the "CUDA" RNG
    # state through these two helpers (torch.cuda.default_generators on a GPU).
    def get_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        del device, clone, graph_safe
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        del device, graph_safe
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state

    # NeMo seeds the tracker only `if torch.cuda.device_count() > 0`.
    from nemo.lightning import megatron_init

    original = megatron_init._set_random_seed

    @functools.wraps(original)
    def set_random_seed(seed_: int) -> None:
        original(seed_)
        seed = seed_ + 100 * parallel_state.get_pipeline_model_parallel_rank()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    megatron_init._set_random_seed = set_random_seed


# ----------------------------------------------------------------------------------------------
# Data steps (patch 4)
# ----------------------------------------------------------------------------------------------


def _patch_data_steps() -> None:
    from nemo.lightning.megatron_parallel import MegatronParallel

    original = MegatronParallel.wrapped_forward_step

    @functools.wraps(original)
    def wrapped_forward_step(
        self: Any, forward_step: Any, loss_reduction: Any, data_step: Any, context: Any
    ) -> Any:
        inner = original(self, forward_step, loss_reduction, data_step, context)

        @functools.wraps(inner)
        def forward_step_func(dataloader_iter: Any, model: Any) -> Any:
            if isinstance(dataloader_iter, list):
                dataloader_iter = [_HostBatchIterator(it) for it in dataloader_iter]
            elif dataloader_iter is not None:
                dataloader_iter = _HostBatchIterator(dataloader_iter)
            return inner(dataloader_iter, model)

        return forward_step_func

    MegatronParallel.wrapped_forward_step = wrapped_forward_step


# ----------------------------------------------------------------------------------------------
# Gradient clipping (patch 5)
# ----------------------------------------------------------------------------------------------


def get_grad_norm_fp32(
    grads_for_norm: list[torch.Tensor] | torch.Tensor,
    norm_type: float = 2,
    grad_stats_parallel_group: dist.ProcessGroup | None = None,
) -> float:
    """Device-agnostic port of ``megatron.core.optimizer.clip_grads.get_grad_norm_fp32``.

    Same result and collectives as the original; accumulates in fp32 on the gradients' device.

    Args:
        grads_for_norm: Gradients (already filtered for shared / TP-duplicate parameters).
        norm_type: The p of the p-norm, or ``inf``.
        grad_stats_parallel_group: Group over which the partial norms are reduced.

    Returns:
        The total norm over all ranks of the group.
    """
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    data_parallel_group = None
    for grad in grads_for_norm:
        data_parallel_group = get_data_parallel_group_if_dtensor(grad, data_parallel_group)
    grads = [to_local_if_dtensor(grad) for grad in grads_for_norm]
    device = grads[0].device if grads else _CPU
    norm_type = float(norm_type)

    if norm_type == math.inf:
        total = torch.zeros(1, dtype=torch.float, device=device)
        for grad in grads:
            total = torch.maximum(total, grad.detach().abs().max().float().view(1))
        op = dist.ReduceOp.MAX
    else:
        total = torch.zeros(1, dtype=torch.float, device=device)
        for grad in grads:
            total += torch.linalg.vector_norm(grad.detach().float(), norm_type) ** norm_type
        op = dist.ReduceOp.SUM
    if data_parallel_group:
        dist.all_reduce(total, op=op, group=data_parallel_group)
    dist.all_reduce(total, op=op, group=grad_stats_parallel_group)
    value = float(total.item())
    return value if norm_type == math.inf else value ** (1.0 / norm_type)


def clip_grad_by_total_norm_fp32(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Device-agnostic port of ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32``.

    Scales the gradients in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1
    (the original does the same through ``multi_tensor_scale``).

    Args:
        parameters: Parameters whose ``.grad`` (or ``.decoupled_grad``) is scaled.
        max_norm: The clipping threshold.
        total_norm: The norm from :func:`get_grad_norm_fp32`.
        use_decoupled_grad: Read ``.decoupled_grad`` instead of ``.grad``.

    Raises:
        TypeError: A gradient is not fp32 (or bf16 for decoupled grads), as in the original.
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
    grads = []
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is None:
            continue
        if grad.dtype not in allowed:
            raise TypeError(
                f"clip_grad_by_total_norm_fp32: {attr} has dtype {grad.dtype}, expected {allowed}"
            )
        grads.append(to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.mul_(clip_coeff)


def count_zeros_fp32(
    parameters: list[torch.Tensor] | torch.Tensor,
    grad_stats_parallel_group: dist.ProcessGroup,
    use_decoupled_grad: bool = False,
) -> float:
    """Device-agnostic port of ``megatron.core.optimizer.clip_grads.count_zeros_fp32``.

    Args:
        parameters: Parameters whose gradient zeros are counted (shared and TP-duplicate ones
            are skipped, as in the original).
        grad_stats_parallel_group: Group over which the counts are summed.
        use_decoupled_grad: Read ``.decoupled_grad`` instead of ``.grad``.

    Returns:
        The number of zero gradient entries over all ranks of the group.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    total: torch.Tensor | None = None
    data_parallel_group = None
    for param in parameters:
        grad_obj = getattr(param, attr, None)
        if grad_obj is None or not param_is_not_shared(param):
            continue
        if not param_is_not_tensor_parallel_duplicate(param):
            continue
        data_parallel_group = get_data_parallel_group_if_dtensor(grad_obj, data_parallel_group)
        grad = to_local_if_dtensor(grad_obj).detach()
        zeros = (grad.numel() - torch.count_nonzero(grad)).float().view(1)
        total = zeros if total is None else total + zeros
    if total is None:
        total = torch.zeros(1, dtype=torch.float)
    if data_parallel_group:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=data_parallel_group)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=grad_stats_parallel_group)
    return float(total.item())


def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    # MegatronOptimizer.clip_grad_norm / get_grad_norm / count_zeros call these by the names
    # imported into megatron.core.optimizer.optimizer; patch both namespaces.
    for module in (clip_grads, optimizer):
        module.get_grad_norm_fp32 = get_grad_norm_fp32
        module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
        module.count_zeros_fp32 = count_zeros_fp32


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _patch_checkpoint_load() -> None:
    from nemo.lightning.io import pl as nemo_pl

    def keep_on_cpu(ckpt: dict[str, Any]) -> dict[str, Any]:
        return ckpt

    nemo_pl._fix_tensors_device = keep_on_cpu


def _patch_sequence_parallel_norm() -> None:
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = WrappedTorchNorm.__new__

    def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return original(cls, config, *args, **kwargs)
        plain = copy.copy(config)  # a shallow copy: the model's config keeps sequence_parallel
        plain.sequence_parallel = False
        norm = original(cls, plain, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True  # read by finalize_model_grads (TP all-reduce of grads)
        return norm

    WrappedTorchNorm.__new__ = new


def enable_cpu_mode() -> bool:
    """Patch NeMo 2.7.3 + megatron-core 0.15.3 so that Megatron training runs on CPU over gloo.

    Idempotent, and a no-op when ``torch.cuda.is_available()`` (nothing is patched on a GPU
    machine). See the module docstring for the list of patches and why each is needed.

    Returns:
        True when CPU mode is active in this process after the call, False on a CUDA machine.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _shim_modules()
    _patch_rng()
    _patch_data_steps()
    _patch_clip_grads()
    _patch_checkpoint_load()
    _patch_sequence_parallel_norm()
    _ENABLED = True
    _LOG.info("nemo_dcod CPU mode enabled: %d modules see a CPU torch.cuda", len(SHIMMED_MODULES))
    return True
