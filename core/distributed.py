"""Training on several processes (GPUs, or CPU processes with the gloo backend) with DistributedDataParallel.

`torchrun` starts one process per device and tells each its place through RANK, WORLD_SIZE and LOCAL_RANK. Every
process prepares the same data (rank 0 decodes it first; the others read it from the cache), builds the same model
from the same seed and trains on its share of each batch; DDP averages the gradients, and the loss (`WholeBatchLoss`)
and, on CPUs, batch norm (`WholeBatchNorm2d`) are the whole batch's, so that the ranks together train the steps one
process would. Evaluation is shared too: each rank computes the logits of its `share` of the validation images
every epoch (all ranks get them all back, in order, through `gather_rows`), and at the end its share of the val,
test and training features and logits, which rank 0 alone receives. Rank 0 alone writes the run folder. Without
torchrun (WORLD_SIZE unset or 1) nothing here does anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes of this run on this machine
    # Names this start of the job's processes in the store they share (start() draws it): torchrun's restarts keep
    # the store, and an earlier attempt's keys would otherwise answer this one's waits.
    attempt: str = ""
    # Numbers this process's waits for rank 0 (wait_for_main); every rank waits at the same points in the same order.
    waits: itertools.count = field(default_factory=itertools.count, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process's own GPU (cuda:LOCAL_RANK); a CPU stays the CPU."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer, on every rank (a stop request is read by rank 0 alone)."""
        if not self.active:
            return flag
        value = torch.tensor([1 if flag else 0])
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def wait_for_main(self, name: str, flag: bool = False, poll: float = 0.2) -> bool:
        """Rank 0's `flag`, on every rank, once rank 0 has got here, however long it took: the queue, decoding the
        data, writing the results. A collective would fail after the process group's timeout (30 min by
        default); the other ranks poll the group's key-value store instead (`poll` seconds apart), then all meet at
        a barrier, so rank 0 also knows they have read it. A failure rank 0 announced (`announce_failure`) ends the
        wait with it. Every rank must call it, at the same points in the same order."""
        if not self.active:
            return flag
        store, key = _store(), f"{self._keys}/wait/{next(self.waits)}/{name}"
        if self.is_main:
            store.set(key, "1" if flag else "0")
        else:
            failed = f"{self._keys}/rank0_failed"
            while not store.check([key]):
                if store.check([failed]):
                    raise RuntimeError(f"rank 0 failed: {store.get(failed).decode(errors='replace')}")
                time.sleep(poll)
            flag = store.get(key) == b"1"
        torch.distributed.barrier()
        return flag

    def announce_failure(self, reason: str) -> None:
        """Rank 0 failed: the ranks waiting for it (`wait_for_main`) fail with `reason` instead of waiting until
        torchrun ends them (or forever, without torchrun)."""
        if self.active and self.is_main and torch.distributed.is_initialized():
            with contextlib.suppress(RuntimeError):  # the failure itself is what the caller reports
                _store().set(f"{self._keys}/rank0_failed", reason)

    @property
    def _keys(self) -> str:
        return f"core/{self.attempt}"

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor on this process's device (gloo: CPU tensors)."""
        return summed_over_ranks(values.detach()) if self.active else values

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-d tensor, concatenated in rank order (sizes may differ), on the CPU."""
        return self.gather_rows(values)

    def share(self, n: int) -> tuple[int, int]:
        """This rank's rows (start, stop) of n: contiguous, in rank order, sizes differing by at most one; some
        ranks get none when n is smaller than the world. Contiguous shares make rank order the rows' order."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def gather_rows(self, rows: torch.Tensor, main_only: bool = False) -> torch.Tensor:
        """The whole tensor from every rank's `share` of its rows (any row count, empty included), in row order,
        on the CPU, on every rank; `main_only`: on rank 0, the others get their own rows back. Every rank must
        call it. Objects, not tensors, are exchanged: they travel over gloo and NCCL alike whatever their size."""
        if not self.active:
            return rows.cpu()
        mine = rows.detach().cpu()
        parts: list = [None] * self.world
        if not main_only:
            torch.distributed.all_gather_object(parts, mine)
        else:
            torch.distributed.gather_object(mine, parts if self.is_main else None, dst=0)
            if not self.is_main:
                return mine
        return torch.cat(parts)

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP hands them out only at the start of
        each forward, so after the last step each rank holds statistics its own images updated: evaluated in shares
        without this, each share would be scored by a different model. Every rank must call it."""
        if not self.active:
            return
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def broadcast_object(self, value):
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Distributed()  # one process: no torchrun


def _store() -> torch.distributed.Store:
    # The store every process of the group joined (torchrun's agent store, a TCP store or a file): it has no timeout
    # for a key that is not there yet when polled with check(). PyTorch has no public accessor for it.
    return torch.distributed.distributed_c10d._get_default_store()


def summed_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum over the process group's ranks (a new tensor; every rank must call it), or `values` itself outside
    a group of several processes."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


class _WholeBatchNormFunction(torch.autograd.Function):
    """Batch norm with the whole distributed batch's statistics, forward and backward on PyTorch's own CPU kernels.

    Forward: each rank's mean and variance (native, float32), combined over ranks in float64 (one all-reduce), then
    the native normalisation with them. Backward: the native kernel, given those statistics as the saved ones,
    returns the input's gradient as if this rank's images were the whole batch, and their sums of the output
    gradient and of it times the normalised input (the bias's and weight's gradients); summed over ranks (one
    all-reduce), those sums correct the input's gradient to the whole batch's, as one process's batch norm would
    compute it. Written out rather than left to autograd through plain ops, which
    kept float copies of every activation and halved a 2-process CPU run's speed."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):  # noqa: ANN001, ANN205 - autograd.Function's signature
        channels = x.shape[1]
        count = x.numel() // channels
        if count:
            mean, var = torch.batch_norm_update_stats(x, x.new_zeros(channels, dtype=torch.float32),
                                                      x.new_ones(channels, dtype=torch.float32), 0.0)
            local = torch.cat([mean.double() * count, (var.double() + mean.double() ** 2) * count,
                               mean.new_tensor([count], dtype=torch.float64)])
        else:  # no images on this rank (a last batch smaller than the world): it still joins the sums, with zeros
            local = x.new_zeros(2 * channels + 1, dtype=torch.float64)
        total = summed_over_ranks(local)
        n = float(total[-1])
        whole_mean = total[:channels] / n
        whole_var = (total[channels:2 * channels] / n - whole_mean ** 2).clamp_(min=0)
        mean, var = whole_mean.float(), whole_var.float()
        if module.track_running_stats:
            module.num_batches_tracked.add_(1)
            momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            module.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            module.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1.0, 1.0)), alpha=momentum)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.n = module.eps, n
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, module.eps, False)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, mean, var = ctx.saved_tensors
        scale = weight if weight is not None else torch.ones_like(mean)
        invstd = torch.rsqrt(var + ctx.eps)
        channels = mean.numel()
        count = x.numel() // channels
        if count:  # this rank's batch norm gradient with the whole batch's statistics but its own sums
            grad_local, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out.contiguous(memory_format=_memory_format(x)), x, scale, None, None, mean, invstd, True,
                ctx.eps, [True, True, True])
            local_means = torch.cat([grad_bias, grad_weight]) / count
        else:  # the native kernel divides by the image count (SIGFPE on none); an empty share's sums are zeros
            grad_local, grad_weight, grad_bias = torch.zeros_like(x), torch.zeros_like(mean), torch.zeros_like(mean)
            local_means = torch.zeros(2 * channels, dtype=mean.dtype)
        whole_means = summed_over_ranks(torch.cat([grad_bias, grad_weight])) / ctx.n
        # d(input) = w * invstd * (g - mean(g) - x_hat * mean(g * x_hat)), means over the whole batch; the native
        # kernel took them over this rank's images: what is added is w * invstd * (the difference of the means),
        # x * slope + offset per channel. The kernel subtracts the large parts in float32 inside, so only this small
        # difference is rounded to x's dtype (bf16 kept the gradient of a nearly constant output gradient to 1e-4
        # where subtracting whole terms in bf16 lost half of it).
        shift = local_means - whole_means
        slope = scale * invstd * invstd * shift[channels:]
        offset = scale * invstd * shift[:channels] - slope * mean
        # The native (eval) normalisation kernel with mean 0 and variance 1 computes x * slope + offset in one pass,
        # in float32 inside, in x's dtype and memory format (bf16 channels-last: no float copies).
        correction = torch.batch_norm(x, slope, offset, torch.zeros_like(mean), torch.ones_like(var), False, 0.0, 0.0,
                                      False)
        grad_input = grad_local.add_(correction)
        return (grad_input, grad_weight if weight is not None else None,
                grad_bias if ctx.needs_input_grad[2] else None, None)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class WholeBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises with the statistics of the whole distributed batch (every rank's
    images), as one process computing the same batch would, and updates its running statistics with them.
    torch.nn.SyncBatchNorm does this on GPUs only. In eval mode, or without a process group, it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.distributed.is_initialized():
            return super().forward(x)
        self._check_input_dim(x)
        return _WholeBatchNormFunction.apply(x, self.weight, self.bias, self)


class WholeBatchLoss(torch.nn.Module):
    """Class-weighted cross-entropy of the whole distributed batch, as this rank's part of it.

    DDP averages the ranks' gradients, so a rank's loss is its images' weighted sum of losses x world / the whole
    batch's weight (summed over ranks): the average of the ranks' losses and of their gradients is then exactly the
    one-process loss of the whole batch and its gradient. Each rank's own weighted mean would weight an image by its
    rank's class mix instead."""

    def __init__(self, class_weights: torch.Tensor, dist: Distributed) -> None:
        super().__init__()
        self.class_weights, self.dist = class_weights, dist

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weighted = torch.nn.functional.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")
        whole = self.dist.sum(self.class_weights[labels].sum())
        return weighted * self.dist.world / whole


def whole_batch_norm(model: torch.nn.Module) -> int:
    """Make every plain BatchNorm2d of `model` a WholeBatchNorm2d, in place, keeping its parameters and buffers (the
    same tensors: an optimizer built on them still holds them; the state dict keeps its keys). Subclasses that do
    more than normalise (an activation inside, e.g.) are left as they are. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = WholeBatchNorm2d
            changed += 1
    return changed


def from_environment() -> Distributed:
    """The process's place as torchrun set it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process
    without torchrun. A launcher that does not set LOCAL_WORLD_SIZE is taken to run every process on this machine
    (the memory budget is then shared by all of them: the safe side)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (torchrun sets them).") \
            from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} does not fit WORLD_SIZE {world}.")
    if world == 1:  # one process: torchrun's other variables, if left in the environment, mean nothing
        return SINGLE
    if not 1 <= local_world <= world or not 0 <= local_rank < local_world:
        raise ValueError(f"LOCAL_RANK {local_rank} and LOCAL_WORLD_SIZE {local_world} do not fit WORLD_SIZE {world}.")
    return Distributed(rank, world, local_rank, local_world)


class Terminated(Exception):
    """SIGTERM: torchrun ends every process when one of them fails, or the job is cancelled."""


def _terminate(signum, frame) -> None:
    raise Terminated("terminated (SIGTERM): another process of this distributed run failed or the job was stopped")


def process_group_backend(device_spec: str, cuda_available: bool) -> str:
    """The process group's backends for a run on `device_spec`: gloo for CPU tensors always, NCCL for CUDA tensors
    on GPUs. A group of NCCL alone refuses CPU tensors ("No backend type associated with device type cpu"), and the
    stop flag every rank agrees on, the barriers and the gathered predictions travel on the CPU."""
    on_gpus = device_spec.startswith("cuda") or (device_spec == "auto" and cuda_available)
    return "cpu:gloo,cuda:nccl" if on_gpus else "gloo"


def start(dist: Distributed, device_spec: str) -> Distributed:
    """Join the process group (see process_group_backend) and turn SIGTERM into an error, so that the run is
    marked failed with the reason when torchrun ends it. Returns `dist` with this start's `attempt` name, drawn by
    rank 0 and the same on every rank."""
    if not dist.active or torch.distributed.is_initialized():
        return dist
    backend = process_group_backend(device_spec, torch.cuda.is_available())
    if "nccl" in backend:
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group(backend)
    signal.signal(signal.SIGTERM, _terminate)
    return dataclasses.replace(dist, attempt=dist.broadcast_object(uuid.uuid4().hex if dist.is_main else None))


def stop(dist: Distributed) -> None:
    """Leave the process group. The trainer has the ranks of a finished or stopped run wait for each other first;
    a failed rank leaves at once (the others may be in any collective, and torchrun ends them)."""
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def torchrun_commands(nodes: int, gpus_per_node: int, master: str, train_args: list[str],
                      port: int = 29500) -> list[str]:
    """One command per machine for a run over `nodes` machines of `gpus_per_node` GPUs (node 0 is the master)."""
    import shlex

    return [shlex.join(["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}", f"--node-rank={k}",
                        f"--master-addr={master}", f"--master-port={port}", "-m", "core", "train", *train_args])
            for k in range(nodes)]
