"""Checkpoints that survive a crash: written to a temporary folder and renamed into place.

    OUTPUT_DIR/checkpoint-STEP/      accelerate's save_state (weights through the model hooks,
                                     optimizer, scheduler, RNG) + trainer_state.json
                                     + rng-RANK.safetensors (the step generator of each process)
    OUTPUT_DIR/.tmp-checkpoint-STEP/ a save in progress (or a checkpoint being deleted, ...-old);
                                     never read, removed on the next save

A folder named checkpoint-STEP is complete by construction (the rename is the last thing a save
does), so ``latest`` is the complete checkpoint with the highest step. A save the disk refuses
(full, over quota) removes its temporary folder and is one :class:`UserError`.

trainer_state.json holds the step, the seed, the size of every file of the checkpoint (a truncated
file is named before anything is loaded) and the run's fingerprint: what makes its weights (data,
t_n, model, what trains, batch, processes, ...). A resume compares the fingerprint and refuses a
checkpoint of another run, naming each setting that differs (:func:`check_resumable`).
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

from sdxl_ambient.durable import fsync_dir, fsync_tree
from sdxl_ambient.errors import UserError
from sdxl_ambient.outputs import disk_errors

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
    """Save everything needed to continue exactly, atomically. Call on every process. A save the
    disk refuses leaves no folder behind and raises a :class:`UserError` naming the folder."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    found = list_checkpoints(root)
    last = f"the last complete checkpoint is {found[-1].name}" if found else "no checkpoint is saved yet"
    try:
        with disk_errors(final, then=f"resume with --resume_from_checkpoint latest ({last})"):
            _write(accelerator, tmp, state, generator)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # a second save of the same step (e.g. a stop right after a checkpoint)
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)  # the rename itself reaches the disk
        _prune(root, total_limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _write(accelerator, tmp: Path, state: dict, generator: torch.Generator) -> None:
    """The checkpoint's files into ``tmp``, the trainer state (with every file's size) last, all flushed."""
    accelerator.save_state(str(tmp))
    save_file({"state": generator.get_state()}, str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "files": sizes}, indent=2))
        fsync_tree(tmp)


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state; a damaged one is an error naming it."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file} is damaged ({type(exc).__name__}): {_earlier(path)}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise UserError(f"{file} is not an sdxl-ambient trainer state: {_earlier(path)}")
    return state


def _earlier(path: Path) -> str:
    """What to do about a damaged checkpoint: resume from the one before it."""
    before = [p for p in list_checkpoints(Path(path).parent) if p.name != Path(path).name and _step(p) < _step(path)]
    if before:
        return f"resume from an earlier one, e.g. --resume_from_checkpoint {before[-1].name}"
    return "resume from an earlier checkpoint, or start again"


def _step(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else -1


def check_files(path: Path) -> None:
    """Every file the trainer state lists is there, whole: a truncated or missing one is named."""
    for rel, size in read_state(path).get("files", {}).items():
        file = Path(path) / rel
        if not file.is_file():
            raise UserError(f"{file} is missing from the checkpoint: {_earlier(path)}")
        if file.stat().st_size != size:
            raise UserError(f"{file} is truncated or damaged ({file.stat().st_size} bytes, {size} were written): "
                            f"{_earlier(path)}")


def _shown(value) -> str:
    """A value in one line: a long one cut in the middle, so that both ends (a name, a digest) show."""
    text = json.dumps(value)
    return text if len(text) <= 48 else text[:24] + "..." + text[-21:]


def check_resumable(path: Path, fingerprint: dict) -> None:
    """Refuse to resume from a checkpoint whose run fingerprint differs from this run's, naming each
    setting that differs; a checkpoint that records none (an older version) is resumed with a warning."""
    saved = read_state(path).get("fingerprint")
    if saved is None:
        # Only a checkpoint of an older version can lack it: this one writes the fingerprint into
        # every trainer_state.json (train.save), and that file is the last a save writes. Such a
        # checkpoint is resumed as far as it can be checked (its files; weights of another shape are
        # one line in load_checkpoint).
        logger.warning("%s records no run fingerprint (written by an older sdxl-ambient): its settings cannot "
                       "be compared with this run's", path)
        return
    differ = [f"{key} {_shown(saved.get(key))} there, {_shown(fingerprint.get(key))} now"
              for key in sorted(set(saved) | set(fingerprint)) if saved.get(key) != fingerprint.get(key)]
    if differ:
        raise UserError(f"--resume_from_checkpoint {path} belongs to another run: {'; '.join(differ)}. Resume with the "
                        "run's settings (README: Resuming lists those that may change), or start a new run in "
                        "another --output_dir")


def load_checkpoint(accelerator, path: Path, generator: torch.Generator) -> dict:
    """Restore a checkpoint written by ``save_checkpoint``; returns its trainer state. A file that
    cannot be read, or weights that do not fit this run's models, are an error naming the folder."""
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if not rng_file.is_file():
        raise UserError(f"{path} was written by a run with fewer processes: {rng_file.name} is missing")
    try:
        accelerator.load_state(str(path))
        generator.set_state(load_file(str(rng_file))["state"])
    except UserError:
        raise
    except Exception as exc:  # a damaged file (same size), or weights of another model
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(f"{path} cannot be loaded into this run ({type(exc).__name__}: {first}): {_earlier(path)}") from None
    return read_state(path)


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

