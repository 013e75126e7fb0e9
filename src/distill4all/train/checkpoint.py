"""Resumable checkpoints, written whole or not at all.

A checkpoint is accelerate's `save_state` (weights, optimizer, every process's Python/NumPy/torch
RNG states; sharded the FSDP/DeepSpeed way when those are used; all loaded back with
`weights_only=True`) plus `trainer_state.json` (the step, which with the seed fixes the data order,
and the LR scheduler's state, as JSON: nothing in a run directory is unpickled). All processes write into
`step-NNNNNNNN.tmp-`, and the main process renames it to `step-NNNNNNNN` once everything is on
disk, so a SIGKILL at any moment leaves either a complete checkpoint or a temp folder that the next
run sweeps away.

For LoRA only the trainable tensors are kept (the frozen base is reloaded from its checkpoint), so
a checkpoint of a 7B LoRA run is megabytes, not 28 GB.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.errors import StageError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def latest(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save(accelerator: Any, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    final = root / f"step-{step:08d}"
    tmp = atomic.temp_path(final, tag="ranks")  # every rank must name the same folder
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # A tied lm_head is saved once, as its embedding; accelerate warns each time that it dropped
    # the shared copy, and the load puts it back.
    shared = logging.getLogger("accelerate.utils.other")
    level = shared.level
    shared.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp))
    finally:
        shared.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        older = sorted(p for p in root.iterdir() if _NAME.match(p.name) and p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, path: Path) -> dict[str, Any]:
    # No custom objects are registered: accelerate would unpickle their files with
    # weights_only=False (code in a file of the run directory would run), and refuses a folder that
    # holds any. Older checkpoints kept the LR scheduler there; its state follows from the step.
    if accelerator.is_local_main_process:
        for planted in path.glob("custom_checkpoint_*.pkl"):
            planted.unlink()
    accelerator.wait_for_everyone()
    accelerator.load_state(str(path))
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    return state


def keep_trainable_only(accelerator: Any) -> None:
    """Make save_state/load_state keep only tensors that train (LoRA), via accelerate's state hooks."""
    from safetensors.torch import load_file

    def trainable(model: Any) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def on_save(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for i, model in enumerate(models[: len(weights)]):
            names = trainable(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def on_load(models: list[Any], input_dir: str) -> None:
        state = load_file(str(Path(input_dir) / "model.safetensors"))
        for model in list(models):
            missing, unexpected = model.load_state_dict(state, strict=False)
            lacking = trainable(model) & set(missing)
            if unexpected or lacking:
                raise StageError(
                    f"checkpoint {input_dir} does not fit this model "
                    f"({len(lacking)} trainable tensors missing, {len(unexpected)} unknown); "
                    "rerun with --force to start over"
                )
            models.remove(model)  # loaded here; accelerate would insist on every frozen tensor too

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)
