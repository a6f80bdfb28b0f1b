"""Reproducibility: one seeding function, a deterministic switch, seeded loader generators,
and the environment facts recorded with every result."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys

import numpy as np


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels.

    Deterministic mode makes same-seed reruns identical on CPU (and on GPU where every op has
    a deterministic kernel); it costs speed on GPU, so it is a switch, not the default there.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)


def torch_generator(seed: int):
    """A CPU ``torch.Generator`` seeded for one DataLoader or sampler."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def worker_init_fn(worker_id: int) -> None:
    """Seed NumPy and ``random`` in each DataLoader worker from torch's per-worker seed."""
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def env_info() -> dict:
    """Versions and device facts, stored in every run's ``config.json``."""
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
    }
    for module in ("torchvision", "timm", "pandas", "PIL", "faiss"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # a missing optional library is recorded, not fatal
            info[module] = None
    from helpers import __version__

    info["helpers"] = __version__
    info["commit"] = git_commit()
    return info


# What the project writes, not code: changes here do not make a commit stamp read +changes.
GENERATED = ("results", "report", "*.ipynb")


def git_commit() -> str | None:
    """The repository's HEAD commit, with ``+changes`` when tracked files differ from it, apart
    from what the project writes: ``results/``, ``report/`` and the notebooks (re-executed in
    place, their outputs change under the very run that stamps them); None outside a git
    checkout (an installed copy, an archive)."""
    from helpers.core.files import REPO_ROOT

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in GENERATED)
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")
