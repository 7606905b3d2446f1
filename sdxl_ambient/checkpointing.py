"""Checkpoints that survive a crash: written to a temporary folder and renamed into place.

    OUTPUT_DIR/checkpoint-STEP/      accelerate's save_state (weights through the model hooks,
                                     optimizer, scheduler, RNG) + trainer_state.json
                                     + rng-RANK.safetensors (the step generator of each process)
    OUTPUT_DIR/.tmp-checkpoint-STEP/ a save in progress (or a checkpoint being deleted, ...-old);
                                     never read, removed on the next save

A folder named checkpoint-STEP is complete by construction (the rename is the last thing a save
does), so ``latest`` is the complete checkpoint with the highest step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdxl_ambient.durable import fsync_dir, fsync_file
from sdxl_ambient.errors import UserError

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir) -> Path | None:
    """The folder to resume from: ``latest``, a path, or a name inside OUTPUT_DIR (as diffusers' scripts accept)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", output_dir)
            return None
        return found[-1]
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / resume_from_checkpoint):
        if candidate.is_dir():
            if not (candidate / STATE_FILE).is_file():
                raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: {candidate} is not a complete checkpoint "
                                 f"(no {STATE_FILE})")
            return candidate
    raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder (or use `latest`)")


def save_checkpoint(accelerator, output_dir, step: int, state: dict, generator: torch.Generator,
                    total_limit: int | None = None) -> Path:
    """Save everything needed to continue exactly, atomically. Call on every process."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file({"state": generator.get_state()}, str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # a second save of the same step (e.g. a stop right after a checkpoint)
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)  # the rename itself reaches the disk
        _prune(root, total_limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, generator: torch.Generator) -> dict:
    """Restore a checkpoint written by ``save_checkpoint``; returns its trainer state."""
    accelerator.load_state(str(path))
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if not rng_file.is_file():
        raise UserError(f"{path} was written by a run with fewer processes: {rng_file.name} is missing")
    generator.set_state(load_file(str(rng_file))["state"])
    return json.loads((path / STATE_FILE).read_text())


def _prune(root: Path, total_limit: int | None) -> None:
    if not total_limit:
        return
    found = list_checkpoints(root)
    for old in found[: max(len(found) - total_limit, 0)]:
        _remove(old)
        logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", old, total_limit)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint without ever leaving a partial ``checkpoint-N``: rename it to a
    ``.tmp-checkpoint-N-old`` (atomic) first, then delete that (a stale one goes with the next save)."""
    doomed = checkpoint.with_name(f".tmp-{checkpoint.name}-old")
    os.replace(checkpoint, doomed)
    fsync_dir(checkpoint.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the files and folders of a finished save to disk before it is renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)
    for path in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        fsync_dir(path)
