"""Several processes (torchrun / accelerate launch): who writes, who waits, how rows are gathered.

Every process runs the same loop. Work is split by rank (generation batches, scoring chunks,
training micro-batches); rank 0 alone writes outputs, markers, the config and the lock, and
the others wait at barriers. The run directory must be on a filesystem every process sees.
In one process all of this reduces to plain calls.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

from spinlm.errors import UserError

_TIMEOUT_MIN = [360.0]  # run.dist_timeout_min; read when the process group starts


def configure(run_cfg) -> None:
    """Take run.dist_timeout_min; call before the first collective (the group starts then)."""
    _TIMEOUT_MIN[0] = float(run_cfg.dist_timeout_min)


def state():
    """accelerate's process state; on a machine without CUDA it must be told so (cpu=True) to
    join the gloo group torchrun sets up, otherwise every process believes it is alone.

    The group's timeout is run.dist_timeout_min, not torch's 30 minutes (NCCL: 10): while rank 0
    alone feeds a generation server, or runs the one vLLM engine that spans the devices, the other
    processes wait in a collective for as long as generation takes."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(minutes=_TIMEOUT_MIN[0]))


def rank() -> int:
    return state().process_index


def world() -> int:
    return state().num_processes


def is_main() -> bool:
    return state().is_main_process


def barrier() -> None:
    if world() > 1:
        state().wait_for_everyone()


def partial_name() -> str:
    """This process's row-log suffix: `partial`, or `partial-rank{r}` with several processes."""
    return "partial" if world() == 1 else f"partial-rank{rank()}"


def gather(items: list) -> list:
    """Concatenate every process's list (in rank order)."""
    if world() == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every process gets its result, or raises the UserError it raised
    (so a refused lock or config stops all ranks together instead of leaving them waiting)."""
    if world() == 1:
        return fn()
    import torch.distributed as torch_dist

    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", (type(e), str(e)))
    torch_dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value[0](value[1])
    return value
