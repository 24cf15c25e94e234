"""GraphedCall (ldm/models/diffusion/cuda_graph.py) against a stand-in for torch's CUDA graphs
that keeps what a real one keeps: the kernels launched while it records, replayed on the same
memory. Whether the sampler's UNet calls record and replay to the same latents on a real GPU:
bench/sample_graph.py (doc/PERFORMANCE.md)."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion import cuda_graph
from ldm.models.diffusion.cuda_graph import GraphedCall


class FakeGraph:
    made: list["FakeGraph"] = []
    recording: "FakeGraph | None" = None
    fail_with: str | None = None

    def __init__(self):
        self.kernels, self.replays, self.pool_arg, self.mode = [], 0, None, None
        FakeGraph.made.append(self)

    def capture_begin(self, pool=None, capture_error_mode="global"):
        if FakeGraph.fail_with:
            raise RuntimeError(FakeGraph.fail_with)
        self.pool_arg, self.mode = pool, capture_error_mode
        FakeGraph.recording = self

    def capture_end(self):
        FakeGraph.recording = None

    def replay(self):
        self.replays += 1
        for kernel in self.kernels:
            kernel()

    def pool(self):
        return ("pool of", id(self))


def launch(kernel):
    """Run a kernel; while a graph records, it keeps the kernel as well."""
    if FakeGraph.recording is not None:
        FakeGraph.recording.kernels.append(kernel)
    kernel()


class Stream:
    made = 0

    def __init__(self):
        Stream.made += 1

    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeGraph.made, FakeGraph.recording, FakeGraph.fail_with = [], None, None
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream.__new__(Stream))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: torch.autograd.grad_mode.no_grad())
    monkeypatch.setattr(cuda_graph, "_previous", None)
    monkeypatch.setattr(cuda_graph, "_failure", None)
    monkeypatch.setattr(cuda_graph, "_stream", None)
    Stream.made = 0
    return FakeGraph


W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


def model(x, t):
    """x @ W + t, into a new output tensor, as one kernel."""
    out = torch.empty_like(x)
    launch(lambda: torch.add(x @ W, t[:, None].float(), out=out))
    return out


def expected(x, t):
    return x @ W + t[:, None].float()


def test_records_on_the_second_call_and_replays_with_each_calls_inputs(fake_cuda):
    call = GraphedCall(model)
    inputs = [(torch.randn(3, 2), torch.tensor([s, 2 * s, 3 * s])) for s in range(5)]
    first = call(*inputs[0])
    assert fake_cuda.made == []  # the first call is the eager warm-up
    torch.testing.assert_close(first, expected(*inputs[0]))
    outputs = [call(*args).clone() for args in inputs[1:]]
    (graph,) = fake_cuda.made
    assert graph.mode == "thread_local" and graph.pool_arg is None
    assert graph.replays == 4  # recorded once, then every call is a replay
    for out, args in zip(outputs, inputs[1:]):
        torch.testing.assert_close(out, expected(*args))
    assert call(*inputs[0]) is call(*inputs[1])  # the recorded output, overwritten by each call


def test_a_later_recording_reuses_the_memory_pool_and_stream_of_the_one_before(fake_cuda):
    for _ in range(2):
        call = GraphedCall(model)
        for _ in range(3):
            call(torch.ones(1, 2), torch.zeros(1))
    first, second = fake_cuda.made
    assert first.pool_arg is None and second.pool_arg == first.pool()
    assert Stream.made == 1  # the allocator reuses a pool's free blocks only on the stream that made them


def test_a_failed_recording_warns_once_and_the_calls_run_eagerly_from_then_on(fake_cuda):
    fake_cuda.fail_with = "operation not permitted when stream is capturing"
    call = GraphedCall(model, "DDIM sampling")
    x, t = torch.randn(2, 2), torch.tensor([1, 2])
    call(x, t)
    with pytest.warns(UserWarning, match="DDIM sampling: recording a CUDA graph failed.*not permitted"):
        out = call(x, t)
    torch.testing.assert_close(out, expected(x, t))
    made = len(fake_cuda.made)
    later = GraphedCall(model)
    for _ in range(3):
        torch.testing.assert_close(later(x, t), expected(x, t))
    assert len(fake_cuda.made) == made  # no further attempt in this process
