"""Peak memory as the allocator saw it: torch profiler's allocation events (every allocation and free, any
device), summed in time order. Independent of the plan's tracer, which counts tensors, not allocations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def peak_bytes(fn: Callable[[], T], device: str = "cpu") -> tuple[T, int]:
    """``fn()`` and the most bytes it had allocated on ``device`` at once beyond what was live when it started."""
    result, events, _ = _profiled(fn, device, None)
    return result, _peak(events)[1]


def window_peak_bytes(fn: Callable[[], T], window: str, device: str = "cpu") -> tuple[T, int]:
    """``fn()`` and the most bytes live on ``device`` while its ``record_function(window)`` ran, counting every
    allocation ``fn`` made before it that was still live (e.g. a model built, then one step of it measured)."""
    result, events, (start, end) = _profiled(fn, device, window)
    before, _ = _peak([event for event in events if event[0] < start])
    _, during = _peak([event for event in events if start <= event[0] <= end], before)
    return result, during


def _peak(events: list[tuple[int, int]], live: int = 0) -> tuple[int, int]:
    """Bytes live after ``events`` (time, size: negative for a free) and the most live on the way."""
    peak = live
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return live, peak


def _profiled(fn: Callable[[], T], device: str, window: str | None) -> tuple[T, list[tuple[int, int]],
                                                                            tuple[int, int]]:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events: list[tuple[int, int]] = []
    span = (0, 0)
    stack: list[Any] = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and str(event.extra_fields.device).startswith(device):
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        elif window is not None and event.name == window:
            span = (event.start_time_ns, event.end_time_ns)
        stack.extend(event.children)
    return result, events, span
