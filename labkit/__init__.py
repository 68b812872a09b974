"""labkit: what the notebooks of *LLM Architectures from Scratch* share.

- :mod:`labkit.data`     the Shakespeare corpus, a character tokenizer, splits and batches;
- :mod:`labkit.train`    a small training loop with a progress bar and a loss history;
- :mod:`labkit.checks`   the check functions that the labs' check cells call;
- :mod:`labkit.make_labs` generates the student labs from the solution notebooks;
- :mod:`labkit.grade`    grades submitted labs with nbval;
- :mod:`labkit.bench`    runs the solution notebooks and tabulates their key figures.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

__all__ = ["check", "pick_device", "seed_everything", "report"]


def check(check_id: str, *student) -> None:
    """Run the check ``check_id`` on the student's code and print its verdict (see :mod:`labkit.checks`).

    Under the grader (``LABKIT_GRADING_DIR`` set) it does nothing: the grader runs every check from its own
    copy of the check cell, and the verify side is not in the kernel's reach."""
    if os.environ.get("LABKIT_GRADING_DIR"):
        print(f"{check_id}: checked by the grader's own check cell")
        return
    from labkit.checks.core import check as run_check

    run_check(check_id, *student)


def pick_device() -> torch.device:
    """The device every notebook uses: CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def report(name: str, value: float | int | str, unit: str = "") -> None:
    """Print a key figure of a notebook, and record it for `make bench`.

    When the environment variable ``LABKIT_REPORT`` names a file, the figure is
    appended to it as one JSON line; the benchmark collects those lines.
    """
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{name}: {shown}{(' ' + unit) if unit else ''}")
    path = os.environ.get("LABKIT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit}) + "\n")
