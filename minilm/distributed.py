"""Training on several processes: torchrun's contract, DDP or FSDP2, and the collectives the loop needs.

A process started by ``torchrun`` finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment (torchrun's contract, the same on one machine or many); :func:`init` joins the process group
with them - nccl on CUDA, gloo on CPU unless ``backend`` says otherwise - and a collective timeout, so a
rank that died or hangs makes the others fail in bounded time instead of waiting forever. Without torchrun
:func:`init` returns a one-process :class:`Parallel` whose methods do nothing, so
:func:`minilm.train.train` has one code path.

How a step is shared: the step's global batch is ``accum * world`` micro-batches of the same
deterministic stream (``data.batch(step, m)``); rank ``r`` draws ``m = r * accum ... r * accum + accum - 1``
(:meth:`Parallel.micro_indices`). The loss is divided by the target tokens of all of them (all-reduced)
and the gradients are *summed* over ranks (DDP: a sum comm hook; FSDP2: sum reductions with divide factor
1), so the update is the one a single process computes over the same global batch. That does not rely on
the backend's averaging: on gloo, FSDP2's AVG reduce-scatter has summed instead of averaged in some
torch versions (pytorch/pytorch#162338); torch 2.13 averages correctly, and sums are right in all.

Checkpoints stay one plain state dict: :meth:`Parallel.full_state` gathers FSDP2's shards (DTensors) into
whole tensors, :meth:`Parallel.local_state` cuts whole tensors back into this rank's shards (weights, EMA
and optimizer state alike), and rank 0 alone writes them, so a run resumes at another world size.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import DistributedConfig
from .errors import ConfigError, TrainingError
from .fileio import short_error
from .precision import resolve_device

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets its environment)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


@dataclass(frozen=True)
class Parallel:
    """This process's place among the ranks, and what the training loop asks of the others."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))   # where this rank trains

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.active and self.strategy == "fsdp"

    def micro_indices(self, accum: int) -> list[int]:
        """This rank's micro-batches among the step's ``accum * world``."""
        return [self.rank * accum + k for k in range(accum)]

    # ---------------------------------------------------------------------------------------------
    # collectives (each is called by every rank at the same point of the loop)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 and sent to every rank (a decision, or a checkpoint only rank 0's
        disk holds: nothing assumes one host)."""
        if not self.active:
            return fn()
        box = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    # ---------------------------------------------------------------------------------------------
    # the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop runs forward/backward through: ``model`` itself (one process, or FSDP2,
        which shards it in place) or a DDP wrapper around it."""
        if not self.active:
            return model
        if self.strategy == "fsdp":
            return _fully_shard(model)
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        # the rotary tables are the only buffers, equal on every rank: no sync before each forward
        new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if new else "broadcast_buffers"      # the name before torch 2.13
        ddp = DistributedDataParallel(model, device_ids=ids, **{sync: False})
        ddp.register_comm_hook(None, _sum_hook)
        return ddp

    def no_sync(self, net: nn.Module) -> Callable[[], Any] | None:
        """A context that skips DDP's gradient sync on all but an accumulated step's last backward."""
        return getattr(net, "no_sync", None) if self.active and self.strategy == "ddp" else None

    def reshard(self, model: nn.Module) -> None:
        """Put FSDP2's sharded parameters back after a forward without backward (evaluation leaves the
        root's gathered), so the model's parameters are its shards again (EMA swaps, checkpoints)."""
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def full_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with every DTensor shard gathered into its whole tensor (a collective under FSDP2)."""
        if not self.sharded:
            return state
        return {k: v.full_tensor() if _is_dtensor(v) else v for k, v in state.items()}

    def local_state(self, state: dict[str, torch.Tensor], like: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Whole tensors cut into this rank's shards, where ``like`` (the live state) holds DTensors."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import distribute_tensor

        out = {}
        for k, v in state.items():
            ref = like.get(k)
            if _is_dtensor(ref):
                v = distribute_tensor(v.to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                                      src_data_rank=None)   # every rank holds the whole tensor
            out[k] = v
        return out

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with whole tensors: what one process would save."""
        sd = optimizer.state_dict()
        if not self.sharded:
            return sd
        return {"state": {pid: self.full_state(st) for pid, st in sd["state"].items()},
                "param_groups": sd["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        if self.sharded:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            sd = {"state": {pid: self.local_state(st, {k: params[int(pid)] for k in st if k != "step"})
                            for pid, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
        optimizer.load_state_dict(sd)

    # ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, step: Callable[[], int]) -> Iterator[None]:
        """Turn a failed collective (a rank died, or the timeout passed) into one actionable line."""
        try:
            yield
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            if not (self.active and _is_comm_error(err)):
                raise
            cause = re.sub(r"^\[[^\]]*\]\s*", "", short_error(err, 300))   # no source location
            cause = cause.split(". ")[0][:120]
            raise TrainingError(
                f"rank {self.rank} of {self.world} lost the other ranks at step {step() + 1} "
                f"({cause}): a rank died, hung past distributed.timeout_s or lost its "
                "network; the last checkpoint was kept: rerun to resume") from None

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Parallel()


def init(cfg: DistributedConfig | None = None, device: str = "auto") -> Parallel:
    """Join torchrun's process group (or, outside torchrun, one process on ``device``)."""
    cfg = cfg or DistributedConfig()
    if not under_torchrun():
        return Parallel(device=resolve_device(device), strategy=cfg.strategy)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda:"):
        raise ConfigError(f"project.device {device!r} names one GPU, but under torchrun each rank takes "
                          "GPU LOCAL_RANK; set project.device: cuda (or auto)")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend nccl needs CUDA, which this machine lacks; use auto or gloo")
    if cuda and local >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                          "start at most that many processes per node")
    where = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s),
                                    device_id=where if cuda else None)
        except (RuntimeError, ValueError) as err:
            raise TrainingError(f"rank {rank} of {world} could not join the others ({short_error(err)}); "
                                "check --rdzv-endpoint / MASTER_ADDR:MASTER_PORT and that every node "
                                "started") from None
    return Parallel(rank=rank, world=world, local_rank=local, strategy=cfg.strategy, device=where)


def _fully_shard(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per block, then the root (embedding, final norm and the head, which may be tied
    to the embedding: one unit). Reductions are plain sums, divided by nothing (see the module doc)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError("distributed.strategy fsdp needs a minilm GPT (blocks under model.layers)")
    for block in layers:
        fully_shard(block)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(1.0)
    return model


def _sum_hook(process_group, bucket):     # no annotations: DDP checks them, and they are strings here
    """DDP comm hook: sum the bucket over ranks (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _is_dtensor(v: Any) -> bool:
    return type(v).__name__ == "DTensor" and hasattr(v, "full_tensor")


_COMM_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "broken pipe",
                 "process group", "processgroup")


def _is_comm_error(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(m in text for m in _COMM_MARKERS)
