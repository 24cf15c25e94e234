"""A function of CUDA tensors recorded once as a CUDA graph and replayed: for a loop that calls the
same model on same-shaped inputs many times, such as the sampler's 40 guided UNet calls.

Why: a UNet forward issues ~2,000 kernels. At the sample grid's batch (12 latents with
guidance) the host takes longer to launch them from Python than the GPU takes to run them,
so an eager DDIM loop waits on the host (doc/PERFORMANCE.md). A replay launches the whole
recorded forward at once.

    call 1     fn(*args) eagerly: the warm-up recording needs (cuDNN's per-shape plans,
               workspaces, lazy inits), and its result is returned as usual
    call 2     args copied into inputs of its own, fn recorded on a side stream, then replayed
    call 3...  args copied into those inputs, replayed

The result of a replay is the recorded output tensor itself: the next call overwrites it.
Everything else fn reads (weights, a fixed context) is read where it was at recording, so it
must stay alive and in place until the last call; only `args` may change between calls, and
only in value, not in shape, dtype or device.

Memory: each recording allocates from the memory pool of the one before it (the previous
graph is kept for that, and only for that) and on the same side stream, so the graphs of later sample grids reuse the first
one's memory instead of adding a pool each time. The pool holds about one UNet forward's working
set for the rest of the run, which training cannot use: the 6 and 12 GiB presets turn the graphs
off.

Recording uses capture mode "thread_local": the loader's pin-memory thread and the checkpoint
writer may call into CUDA (pinned host allocations) while the sampler records, which the
default "global" mode counts as an error. If recording fails anyway, the error is reported as a
warning and calls run eagerly from then on, in this process: a failed capture can leave
torch's allocator unable to record again.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

_previous: torch.cuda.CUDAGraph | None = None  # the last graph recorded: the next one records into its pool
_stream: torch.cuda.Stream | None = None  # the side stream every graph records on (the allocator reuses
#                                            a pool's free blocks only on the stream they were made on)
_failure: str | None = None  # why recording failed, once it has


class GraphedCall:
    def __init__(self, fn: Callable[..., torch.Tensor], name: str = "call"):
        self.fn = fn
        self.name = name
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1 or _failure is not None:
            return self.fn(*args)
        if self.graph is None:
            self._record(args)
            if self.graph is None:
                return self.fn(*args)
        for static, new in zip(self.inputs, args):
            static.copy_(new)
        self.graph.replay()
        return self.output

    def _record(self, args: Sequence[torch.Tensor]) -> None:
        global _previous, _failure, _stream
        inputs = [a.clone() for a in args]
        graph = torch.cuda.CUDAGraph()
        pool = () if _previous is None else (_previous.pool(),)
        stream = _stream = _stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(*pool, capture_error_mode="thread_local")
                try:
                    output = self.fn(*inputs)
                finally:
                    graph.capture_end()
        except RuntimeError as e:
            _failure = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"{self.name}: recording a CUDA graph failed, running without one from now on ({_failure})",
                          stacklevel=3)
            return
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        self.graph, self.inputs, self.output = graph, inputs, output
        _previous = graph
