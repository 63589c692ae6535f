"""Timers that mean the same on a CPU and a GPU: a GPU runs kernels asynchronously, so a clock read there
waits for the device first, or it would time the launches and not the work."""

from __future__ import annotations

import time
from typing import Callable

import torch


def wall_clock(device: torch.device) -> Callable[[], float]:
    """Seconds of wall time, read after the device has finished the work queued so far."""
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]
    return time.perf_counter


def step_clock(device: torch.device) -> Callable[[], float]:
    """For timing short steps: this process's CPU time on a CPU (robust to other processes sharing the
    cores), wall time after synchronising on an accelerator."""
    return wall_clock(device) if device.type == "cuda" else time.process_time
