"""Where the GPU time goes, for the benches: the top kernels of a profiled call, and how busy the GPU was."""

from __future__ import annotations

import time


def profile_summary(fn, title: str, rows: int = 15) -> str:
    """Run ``fn`` once under the PyTorch profiler (CUDA) and return a text report: wall time, the sum of the GPU
    kernels' time (busy fraction: well under 100 % means the GPU waits for the host), and the top kernels."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), record_shapes=True) as prof:
        started = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - started
    averages = prof.key_averages()

    def device_time(event) -> float:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0

    kernels_us = sum(device_time(e) for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA)
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total", "cuda_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    head = (f"{title}\nwall {wall * 1e3:.1f} ms (under the profiler); GPU kernels {kernels_us / 1e3:.1f} ms "
            f"= {100 * kernels_us / 1e6 / wall:.0f} % busy\n")
    return head + (table or averages.table(row_limit=rows)) + "\n" + copies_by_shape(prof, device_time, rows) + "\n"


COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to")


def copies_by_shape(prof, device_time, rows: int) -> str:
    """Which tensors the copy operations move (dtype casts, memory-format changes), by input shape, with the
    device time under each: names the layer behind a copy that the kernel table only calls "copy"."""
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in COPY_OPS]

    def total(event) -> float:  # the copy kernels run under the op, so its own device time is in its children
        value = 0.0
        for name in ("device_time_total", "cuda_time_total", "self_device_time_total"):
            if hasattr(event, name):
                value = max(value, float(getattr(event, name)))
        return value or device_time(event)

    events.sort(key=total, reverse=True)
    lines = [f"copies by input shape (top {rows}; device time under the op):"]
    for e in events[:rows]:
        lines.append(f"  {total(e) / 1e3:8.2f} ms  x{e.count:<4d} {e.key:<16} {str(e.input_shapes)[:110]}")
    return "\n".join(lines) + "\n"
