"""Data-parallel learned matching with ``torch.distributed``: the helpers ``learned_matching`` uses.

    torchrun --nproc_per_node 4 -m glmc_mini align DIR_A DIR_B --method learned --data text.txt --out OUT

Every process holds both endpoint models and iterates the same global batches; each takes its
rows of every batch (``shard``: rank r of W gets the r-th of W near-equal contiguous slices) and
weights its mean loss by its share of the rows, so the sum over processes is the mean over the
global batch. The gradients of the projection parameters are summed across processes
(``all_reduce``) before the optimiser step, as are the held-out losses that choose the returned
iterate; lambda is drawn from one seeded generator on every process, and the parameters start
from, and are re-synchronised at every held-out check to, process 0's. So every process takes the
same steps and ends with the same transforms, those of a one-process run on the same global
batches up to floating-point summation order. NCCL on GPUs, gloo on CPUs.
"""
import os

import torch
import torch.distributed as dist


def active():
    """True when the default process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world(enabled=None):
    """(rank, world size) to use: the default process group's when ``enabled`` (None: whenever one is
    initialised), else (0, 1). ValueError for ``enabled=True`` without an initialised group."""
    if enabled is False:
        return 0, 1
    on = dist.is_available() and dist.is_initialized()
    if enabled and not on:
        raise ValueError("distributed=True needs an initialised process group: run under torchrun, or call "
                         "torch.distributed.init_process_group first")
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def launched():
    """True when started by torchrun (or another launcher) with WORLD_SIZE > 1 in the environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device():
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(device):
    """Under a launcher (``launched``), initialise the default process group from the environment unless
    it is already: NCCL for a CUDA ``device`` (made this process's current device), gloo otherwise.
    Returns True when this call initialised it (the caller then destroys it)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def barrier():
    """Wait for every process (nothing without an initialised group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rows(batch):
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not torch.is_tensor(x) or x.dim() == 0:
        raise TypeError(f"distributed learned matching splits batches by rows: expected a tensor [B, ...] or a "
                        f"tuple (x [B, ...], y [B]), got {type(x).__name__}")
    return x.shape[0]


def shard(batch, rank, size):
    """(this process's rows of the global ``batch``, its share of the rows).

    ``batch``: a tensor [B, ...] or a tuple / list whose tensors share the first dimension B; rank
    ``rank`` of ``size`` gets the rank-th of ``torch.tensor_split``'s near-equal contiguous slices.
    Its mean loss times the share sums, over processes, to the mean over the global batch (every
    example of a batch gives the same number of predictions). ValueError if B < size.
    """
    if size == 1:
        return batch, 1.0
    rows = _rows(batch)
    if rows < size:
        raise ValueError(f"a batch of {rows} rows cannot be split across {size} processes: give batches of at least "
                         f"{size} rows")

    def part(t):
        return torch.tensor_split(t, size)[rank] if torch.is_tensor(t) and t.dim() and t.shape[0] == rows else t
    local = type(batch)(part(t) for t in batch) if isinstance(batch, (tuple, list)) else part(batch)
    return local, _rows(local) / rows


def sum_grads(params):
    """Sum each parameter's gradient across processes, in place (a zero gradient where there is none)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_values(values, device):
    """A list of floats summed element-wise across processes (float64; the same result on every process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def broadcast_module(module, src=0):
    """Overwrite every parameter and buffer of ``module`` with process ``src``'s, in place."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)
