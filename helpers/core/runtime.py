"""Runtime policy: where a run computes and how it feeds the device. The device, DataLoader
workers, the embedding batch, mixed precision and the allocator are decided here and nowhere
else, from the config's runtime fields (``None``/``auto`` = decide for this machine). None of
them changes a result on a given device: they are machine settings, not part of the recipe.
"""

from __future__ import annotations

import os
import sys

import torch

from helpers.core.config import Config
from helpers.core.errors import InputError

# CPU batch 16: chosen when glibc's default allocator made larger batches slower per image
# (page faults grow with the batch). With the tuned allocator batch 64 measured ~16 % faster on
# the 2-core CPU (benchmarks/results/embed/allocator_2026-11-30.txt); 16 is kept so that val
# passes, and so the committed study's early-stopping decisions, stay identical to the digit.
# A GPU wants large batches.
CPU_EMBED_BATCH = 16
GPU_EMBED_BATCH = 256


# Headless Chromium (Debian's package), which prints the report's PDFs, takes the live demo's
# screenshot and drives the browser test. Without these flags it tries to reach Google's services
# at start and stalls on a closed network; a root user needs --no-sandbox.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; other names pass through."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_embed_batch(cfg: Config, device: str) -> int:
    if cfg.embed_batch:
        return cfg.embed_batch
    return GPU_EMBED_BATCH if str(device).startswith("cuda") else CPU_EMBED_BATCH


def resolve_num_workers(cfg: Config, device: str) -> int:
    """``num_workers`` as configured; ``None`` (auto): on the CPU no workers on a machine of
    2 cores or fewer, where decoding costs about 4 % of a step and workers only compete with
    torch's threads (benchmarks/results/train/store_allocator_2026-11-30.txt), else one per core beyond the first; on a GPU one
    per core (the model no longer needs them); at most 8."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if str(device).startswith("cuda"):
        return min(8, cores)
    return 0 if cores <= 2 else min(8, cores - 1)


def amp_dtype(cfg: Config, device: str) -> torch.dtype | None:
    """bf16 on a GPU that has it natively, else fp16 on a GPU; None (fp32) on the CPU or with amp off."""
    if cfg.amp == "off" or not str(device).startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_allocator() -> bool:
    """Make glibc keep freed memory instead of returning it to the kernel after each batch.

    Measured on the 2-core CPU (benchmarks/results/train/ and embed/, allocator runs of
    2026-11-30): with glibc's defaults every step
    re-faults hundreds of thousands of zeroed pages, about half of inference's CPU time. Two
    settings (the same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``) remove
    that: no trimming of the heap, and no blocks of their own for large requests. A training
    step's largest activations (Lite0's expanded 80x80 maps at batch 32: ~79 MB) are above the
    largest mmap threshold glibc accepts (32 MiB), so they would otherwise be mapped and unmapped
    on every step, ~40,000 page faults and up to 250 ms of system time per step. Freed memory
    stays with the process for its next batch (a demo fit's peak RSS measured no higher than
    with a 32 MiB mmap threshold, benchmarks/results/train/allocator_rss_2026-11-30.txt). Process-wide and idempotent; returns whether it
    applied. ``C2S_MALLOPT=0`` turns it off; other C libraries are left alone.
    """
    if os.environ.get("C2S_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False


def budget_bytes(variable: str, default_mb: float) -> int:
    """A memory budget given in MiB by the environment variable ``variable`` (``default_mb`` when
    unset; 0 or less turns the feature off), in bytes; not a number is a one-line error."""
    value = os.environ.get(variable, str(default_mb))
    try:
        megabytes = float(value)
    except ValueError:
        raise InputError(f"{variable} must be a number of MiB, got {value!r}") from None
    return max(0, int(megabytes * 2**20))
