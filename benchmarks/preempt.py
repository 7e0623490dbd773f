"""What the processes' agreement on a preemption signal costs: one `spinlm.preempt.agreed()` per
optimizer step (an all-reduce of one number), timed alone.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m benchmarks.preempt [--calls 2000]

Prints the mean time per call on rank 0 (gloo on CPU, NCCL on GPUs: the group spinlm's training
uses). docs/preemption.md compares it with a training step.
"""

from __future__ import annotations

import argparse
import time

from spinlm import dist, preempt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    calls = parser.parse_args().calls
    for _ in range(50):  # the group's first collectives set up its connections
        preempt.agreed()
    start = time.perf_counter()
    for _ in range(calls):
        preempt.agreed()
    seconds = (time.perf_counter() - start) / calls
    if dist.is_main():
        print(f"preempt.agreed(): {seconds * 1e6:.0f} us per call ({calls} calls, {dist.world()} processes, "
              f"{dist.state().device})")


if __name__ == "__main__":
    main()
