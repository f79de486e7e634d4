"""Peak memory as the allocator saw it: torch profiler's allocation events (every allocation and free, any
device), summed in time order. Independent of the plan's tracer, which counts tensors, not allocations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def peak_bytes(fn: Callable[[], T], device: str = "cpu") -> tuple[T, int]:
    """``fn()`` and the most bytes it had allocated on ``device`` at once beyond what was live when it started."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events: list[tuple[int, int]] = []
    stack: list[Any] = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and str(event.extra_fields.device).startswith(device):
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return result, peak
