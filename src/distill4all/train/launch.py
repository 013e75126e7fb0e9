"""Training in other processes: `accelerate launch` of train/worker.py with a shipped or user
accelerate config (DDP, FSDP, DeepSpeed ZeRO-2/3), watched until it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from distill4all.config import ACCELERATE_CONFIGS, TrainConfig
from distill4all.errors import ConfigError, WorkerCrashed
from distill4all.layout import TrainLayout


def accelerate_config(cfg: TrainConfig) -> Path:
    """A shipped accelerate config by name, or the user's own file."""
    if cfg.accelerate_config in ACCELERATE_CONFIGS:
        name = cfg.accelerate_config
        return Path(str(resources.files("distill4all.train").joinpath("accelerate", f"{name}.yaml")))
    path = Path(cfg.accelerate_config).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"train.accelerate_config: {cfg.accelerate_config!r} is neither {', '.join(ACCELERATE_CONFIGS)} nor a file"
        )
    return path


def launch_command(cfg: TrainConfig, job_file: Path) -> list[str]:
    with socket.socket() as s:  # a free port, so that two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(cfg)),
        "--num_processes", str(cfg.num_processes), "--main_process_port", str(port),
        "-m", "distill4all.train.worker", str(job_file),
    ]  # fmt: skip


def launch(
    cfg: TrainConfig, job_file: Path, files: TrainLayout, console: Console, on_log: Callable[[dict[str, Any]], None]
) -> None:
    """Run the job in `accelerate launch`; pass the workers' latest metrics row to `on_log` as
    they train. A worker that dies is a WorkerCrashed (not the user's doing)."""
    import torch

    from distill4all.train.loop import total_steps
    from distill4all.train.metrics import read_metrics
    from distill4all.train.worker import die_with_parent

    env = dict(os.environ)
    if not torch.cuda.is_available():
        # torchrun starts the processes either way; this makes accelerate join them over gloo on
        # the CPU (its own CPU launcher would want mpirun).
        env["ACCELERATE_USE_CPU"] = "true"
    # torch would give every process all cores; share them out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.num_processes)))
    cmd = launch_command(cfg, job_file)
    console.print(f"[dim]train: {' '.join(cmd[1:])}[/dim]")
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    steps = total_steps(cfg, json.loads(files.data_meta.read_text())["train_examples"])
    try:
        while (code := proc.poll()) is None:  # the workers write metrics; show the latest in `status`
            time.sleep(2)
            if rows := read_metrics(files.metrics, tail_bytes=4096):
                on_log({**rows[-1], "total_steps": steps})
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if code != 0:
        raise WorkerCrashed(f"the training processes failed (exit code {code}); their output is above")
