"""Multi-process (data-parallel) runs: one process per device, started by `torchrun` (CPU: gloo) or
`accelerate launch` (GPU: nccl), or by `recalign run --processes N`, which re-launches itself with torchrun.

This module owns the process's one `accelerate.Accelerator` (created on first use, only when the launcher
started more than one process; a single process imports nothing and every helper is the identity). The
layers above use it through `current()`:

- the LLM steps (`llm.steps`) shard each micro-batch over the processes and average the gradients before
  the optimizer step (DDP's arithmetic: every process holds the same weights at every step);
- scoring (`Backbone.score_yes_no`) gives each process whole batches and adds the results up (every row
  comes from exactly one process, so the scores are those of one process);
- the run directory (`runs.RunDir`) is written by the main process only; the others wait at a barrier.

FSDP / DeepSpeed and accelerate's mixed precision are not used: an accelerate config asking for them is a
one-line error (LoRA weights are small enough to replicate; precision is `model.dtype`).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch

from recalign.errors import InputError

T = TypeVar("T")
_LEAVE_TIMEOUT_S = 120  # how long a finished process waits at exit for the others


class Processes:
    """The processes of this run: `rank` of `size`; `main` writes the run directory."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.size = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over the processes (a new tensor, on `tensor`'s device)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        work = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items` (round-robin: batches sorted by length stay balanced)."""
        return list(items[self.rank::self.size]) if self.active else list(items)

    def chunk(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous part of `items` (sizes differ by at most one; may be empty)."""
        if not self.active:
            return list(items)
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start:start + base + (self.rank < extra)])

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the main process's values of `tensors` into every process's (in place)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in tensors:
                work = tensor.detach().to(self.device, copy=True)
                dist.broadcast(work, src=0)
                tensor.copy_(work.to(tensor.device))

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Every process's gradients replaced by their mean over the processes (one all-reduce)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads])) / self.size
        offset = 0
        for parameter, grad in zip(parameters, grads):
            size = grad.numel()
            parameter.grad = flat[offset:offset + size].view_as(grad).to(grad.dtype)
            offset += size

    def shard_loss(self, loss_fn: Callable) -> Callable:
        """A `train_loop` loss function that computes `loss_fn` on this process's part of each micro-batch.

        Its value is the micro-batch's loss (the parts' losses weighted by their sizes, summed over the
        processes) and its gradient this part's share scaled so that `average_gradients` gives the gradient
        of the whole micro-batch; the token count is the micro-batch's. A process whose part is empty runs
        one example with weight 0 (every process takes part in every all-reduce)."""
        if not self.active:
            return loss_fn

        def sharded(batch):
            mine = self.chunk(batch)
            share = len(mine) / len(batch)
            out = loss_fn(mine or list(batch[:1]))
            loss, n_tokens = out if isinstance(out, tuple) else (out, 0)
            totals = self.sum(torch.tensor([float(loss.detach()) * share, float(n_tokens) if mine else 0.0],
                                           dtype=torch.float64))
            local = loss * (share * self.size)
            return local + (totals[0].to(local.device, local.dtype) - local.detach()), int(totals[1])

        return sharded


_CURRENT: Processes | None = None


def current() -> Processes:
    """This process's `Processes` (the Accelerator is created on the first call of a multi-process run)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = _start()
    return _CURRENT


def launched_size() -> int:
    """How many processes the launcher started (torchrun / accelerate set WORLD_SIZE); 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def available_devices() -> tuple[int, str]:
    """(how many processes this machine can give a device each, what they are): GPUs, else CPU cores."""
    if torch.cuda.is_available() and torch.cuda.device_count():
        return torch.cuda.device_count(), "GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU core(s)"


def needs_launch(processes: int) -> bool:
    """Whether `--processes N` must start N processes (False inside a launched run or for N = 1)."""
    if processes < 1:
        raise InputError(f"--processes must be >= 1, got {processes}")
    started = launched_size()
    if started > 1:
        if processes not in (1, started):
            raise InputError(f"--processes {processes}, but the launcher started {started} processes; give one of the two")
        return False
    if processes == 1:
        return False
    available, what = available_devices()
    if processes > available:
        raise InputError(f"--processes {processes}: this machine has {available} {what}; at most one process each")
    check_launch_config(processes, available if what == "GPU(s)" else 0)
    return True


def launch(processes: int, args: list[str]) -> int:
    """`torchrun --standalone --nproc_per_node PROCESSES -m recalign ARGS`; its exit code. On CPUs each process
    gets an equal share of the cores (OMP_NUM_THREADS), unless it is set."""
    import subprocess
    import sys

    env = dict(os.environ)
    available, what = available_devices()
    if what != "GPU(s)":
        env.setdefault("OMP_NUM_THREADS", str(max(1, available // processes)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "recalign", *args]
    return subprocess.call(command, env=env)


def check_launch_config(size: int, cuda_devices: int) -> None:
    """What a launcher's (accelerate config's) environment asks for that a recalign run cannot do."""
    def on(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

    for name, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if on(name):
            raise InputError(f"the accelerate config asks for {what}; recalign trains LoRA data-parallel (DDP): "
                             f"use distributed_type MULTI_GPU (or MULTI_CPU)")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision not in ("", "no"):
        raise InputError(f"the accelerate config sets mixed_precision {precision}; recalign sets precision with "
                         f"model.dtype: use mixed_precision no")
    if size <= 1 and on("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        raise InputError("accelerate launch --cpu with several processes starts one process here (it expects MPI); "
                         "use torchrun --nproc_per_node N -m recalign run ... or recalign run ... --processes N")
    if size > 1 and cuda_devices and not on("ACCELERATE_USE_CPU") and size > cuda_devices:
        raise InputError(f"{size} processes but {cuda_devices} GPU(s): at most one process per GPU")


def _start() -> Processes:
    size = launched_size()
    cuda_devices = torch.cuda.device_count() if size > 1 and torch.cuda.is_available() else 0
    check_launch_config(size, cuda_devices)
    if size <= 1:
        return Processes()
    from accelerate import Accelerator

    use_cpu = not cuda_devices or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    accelerator = Accelerator(cpu=use_cpu)
    processes = Processes(accelerator)
    if processes.device.type == "cuda":
        torch.cuda.set_device(processes.device)  # model.device auto / cuda = this process's GPU
    if not processes.main:
        os.environ["RECALIGN_QUIET"] = "1"  # one console: the main process's
    atexit.register(_stop)
    return processes


_FAILED = False


def note_failure() -> None:
    """This process exits on an error: at exit it leaves without waiting for the others."""
    global _FAILED
    _FAILED = True


def _stop() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    # the processes leave together: one that closes its connections while another still has gloo's reader
    # thread on them can make that other process abort (SIGABRT) on its way out, failing a finished run
    if not _FAILED:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=_LEAVE_TIMEOUT_S))
            else:
                dist.barrier()
        except Exception:  # a process failed or left already: nothing to wait for
            pass
    dist.destroy_process_group()
