"""torch.distributed helpers: calibration statistics are reduced across ranks so that every rank ends
with identical quantizer ranges (a single-rank calibration silently diverges under DDP)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _on_backend_device(t: torch.Tensor) -> torch.Tensor:
    # gloo works on CPU tensors, nccl on CUDA tensors.
    if dist.get_backend() == "nccl" and not t.is_cuda:
        return t.cuda()
    if dist.get_backend() == "gloo" and t.is_cuda:
        return t.cpu()
    return t


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``min``) that is a no-op without a process group."""
    if not is_distributed():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    work = _on_backend_device(t.detach().clone())
    dist.all_reduce(work, op=ops[op])
    t.copy_(work.to(t.device))
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        all_reduce_(t, "sum")
        t.div_(world_size())
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of possibly different lengths from every rank (same order on all ranks)."""
    if not is_distributed():
        return t
    work = _on_backend_device(t.detach().reshape(-1).float())
    n = torch.tensor([work.numel()], device=work.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, device=work.device)
    padded[: work.numel()] = work
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(t.device)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Make ``t`` identical on all ranks (rank ``src`` wins): removes any float non-determinism."""
    if not is_distributed():
        return t
    work = _on_backend_device(t.detach().clone())
    dist.broadcast(work, src)
    t.copy_(work.to(t.device))
    return t
