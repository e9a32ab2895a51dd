"""Multi-process runs (`accelerate launch`, torchrun): rank 0 writes and reports, every rank trains.

Under `accelerate launch` every process runs the whole `persllm train` command. Training steps are collective, but
files are written by rank 0 alone and every decision that reads files (skip a stage, resume a checkpoint) is taken
by all ranks before rank 0 changes anything, with barriers in between. Single-process runs never import
torch.distributed here: every helper is a no-op when WORLD_SIZE is 1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_size() -> int:
    """Number of training processes (1 outside a distributed launch)."""
    return _env_int(_SIZE_VARS, 1)


def is_distributed() -> bool:
    """True under a multi-process launch."""
    return world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    return _env_int(_RANK_VARS, 0)


def is_main_process() -> bool:
    """True for the process that writes outputs and reports progress."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (initialises the process group the way the Trainer will, if needed)."""
    if not is_distributed():
        return
    import torch
    from accelerate import PartialState

    # PartialState reads the launcher's environment (torchrun, mpirun, DeepSpeed) and reuses an existing group.
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def quiet_other_ranks(progress: Any) -> None:
    """On ranks other than 0: no progress bars, summaries or warnings (rank 0 reports for everyone)."""
    if is_main_process():
        return
    bars = getattr(progress, "bars", None)  # the CLI's rich display shares its console with the summary table
    console = getattr(bars, "console", None)
    if console is not None:
        console.quiet = True
    for name in ("persllm", "transformers", "trl", "peft", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


ACCELERATE_CONFIGS = ("multi_cpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp")


def accelerate_config(name: str) -> Path:
    """Path of a shipped `accelerate launch --config_file` YAML (multi_cpu, deepspeed_zero2/3, fsdp)."""
    from importlib import resources

    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {name!r}; shipped: {', '.join(ACCELERATE_CONFIGS)}")
    return Path(str(resources.files("persllm") / "configs" / "accelerate" / f"{name}.yaml"))
