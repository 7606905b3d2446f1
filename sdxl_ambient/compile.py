"""A fast training step: regional ``torch.compile`` of the UNet, static shapes per bucket, and a
check that a step never makes the host wait for the device.

Regional compilation compiles the UNet's repeated block (``BasicTransformerBlock``, the class
``UNet2DConditionModel._repeated_blocks`` names; SDXL-base has 70 of them, in two widths) instead
of the whole model: every instance of one width shares one compiled graph, so compile time is that
of a couple of blocks, and the rest of the UNet (ResNets, up/down sampling) runs eagerly. The
step's random numbers are drawn before the model runs (``step.AmbientObjective.draw``), so the
compiled part holds no generator.

Static shapes: with ``dynamic=False`` each input shape gets its own graph, specialised to it; the
UNet sees one (batch, h, w) per aspect-ratio bucket, plus (2 x batch, h, w) when the consistency
term runs its two chains. A batch that is smaller (the last one of a bucket) is one more shape:
drop it (the sampler's ``drop_last``) to keep one shape per bucket. ``mode="reduce-overhead"``
records each shape's graph once as a CUDA graph and replays it; call ``mark_step_begin`` at the
start of each training step then.

Host synchronisation: an operation that reads a device value on the host (``.item()``,
``.tolist()``, ``bool(tensor)``, ``float(tensor)``), makes a result whose size depends on the data
(``nonzero``, boolean indexing, ``unique``, ...) or copies a CPU tensor to the device
(non-pinned) makes the host wait for everything queued before it. ``HostSyncCheck`` records them.
On a machine without an accelerator, run the step with the model and batch on the ``meta`` device,
a stand-in accelerator: every CPU tensor that enters the step then shows up as a copy.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPEATED_BLOCKS = ("BasicTransformerBlock",)  # UNet2DConditionModel._repeated_blocks (diffusers >= 0.35)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _unwrap(model):
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def repeated_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's repeated blocks, in module order (the classes its ``_repeated_blocks`` names)."""
    unet = _unwrap(unet)
    names = tuple(getattr(unet, "_repeated_blocks", None) or REPEATED_BLOCKS)
    return [m for m in unet.modules() if type(m).__name__ in names]


def compile_unet(unet, *, mode: str | None = None, backend: str = "inductor", dynamic: bool = False,
                 fullgraph: bool = True) -> int:
    """Compile each of the UNet's repeated blocks in place (regional compilation); returns how many.

    Call it after the LoRA adapters and gradient checkpointing are set up (they change the blocks'
    code) and before or after ``accelerator.prepare`` (the blocks stay the same modules). Keep
    accelerate's own ``--dynamo_backend`` at ``no``: it would compile the whole model again.
    ``dynamic=False``: static shapes, one graph per input shape (``configure_static_shapes``);
    ``fullgraph=True``: a block that cannot be captured whole is an error, not a silent slow path."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"torch.compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    blocks = repeated_blocks(unet)
    if not blocks:
        raise ValueError(f"{type(_unwrap(unet)).__name__} has none of the repeated blocks {REPEATED_BLOCKS} to compile")
    for block in blocks:
        block.compile(backend=backend, mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=fullgraph)
    return len(blocks)


def block_kinds(unet) -> int:
    """How many differently shaped repeated blocks the UNet has (SDXL-base: 2, at 640 and 1280 channels);
    each compiles one graph per input shape."""
    return len({tuple(p.shape for p in b.parameters()) for b in repeated_blocks(unet)})


def step_shapes(latent_shapes, batch_size: int, consistency: bool = False, drop_last: bool = True,
                consistency_batches=None) -> list[tuple[int, int, int]]:
    """The (batch, h, w) inputs the UNet sees in training: one per bucket (latent (h, w)); with the
    consistency term also the batches it runs (``consistency_batches(b)``, e.g. the objective's
    ``consistency_batches``; by default twice the batch); without ``drop_last`` also each bucket's
    smaller last batch."""
    if consistency and consistency_batches is None:
        def consistency_batches(b):
            return [2 * b]
    counts = Counter(tuple(s) for s in latent_shapes)
    shapes = set()
    for (h, w), n in counts.items():
        sizes = [batch_size] if n >= batch_size else []
        if not drop_last and n % batch_size:
            sizes.append(n % batch_size)
        for b in sizes:
            shapes.add((b, h, w))
            for k in (consistency_batches(b) if consistency else []):
                shapes.add((k, h, w))
    return sorted(shapes)


def configure_static_shapes(num_shapes: int, kinds: int = 2) -> int:
    """Let dynamo keep one graph per (block kind, input shape) without falling back to eager or to
    dynamic shapes; returns the cache size limit set (never lowered)."""
    import torch._dynamo

    config = torch._dynamo.config
    needed = max(1, num_shapes) * max(1, kinds)
    config.cache_size_limit = max(config.cache_size_limit, needed)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4 * needed)
    config.automatic_dynamic_shapes = False  # a new shape is a new static graph, not a dynamic one
    return config.cache_size_limit


def mark_step_begin() -> None:
    """Start of a training step for CUDA graphs (``mode="reduce-overhead"``): the previous step's
    graph outputs may be overwritten from here on."""
    torch.compiler.cudagraph_mark_step_begin()


# ----------------------------------------------------------------------------- host synchronisation


_READS_VALUE = {"_local_scalar_dense", "is_nonzero", "equal", "allclose"}
_DATA_DEPENDENT_SHAPE = {"nonzero", "nonzero_numpy", "masked_select", "_unique", "_unique2", "unique_dim",
                         "unique_consecutive", "unique_dim_consecutive", "argwhere"}


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _devices(values) -> set[torch.device]:
    found = set()
    for v in values:
        if isinstance(v, torch.Tensor):
            found.add(v.device)
        elif isinstance(v, (list, tuple)):
            found |= _devices(v)
    return found


@dataclass
class SyncEvent:
    kind: str  # "reads a value", "data-dependent shape", "copy between devices"
    op: str
    detail: str = ""
    where: str = ""  # the innermost calling line outside torch


def _caller() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack()[:-3]):
        if f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return ""


class HostSyncCheck(TorchDispatchMode):
    """Records, while active, every operation that would make the host wait for the device.

        with HostSyncCheck() as check:
            losses = objective(net, observed, observed_timesteps)
            losses["loss"].mean().backward()
        assert not check.events, check.events"""

    def __init__(self):
        super().__init__()
        self.events: list[SyncEvent] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _READS_VALUE:
            self.events.append(SyncEvent("reads a value", name, where=_caller()))
        elif name in _DATA_DEPENDENT_SHAPE or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                                and len(args) == 1):
            self.events.append(SyncEvent("data-dependent shape", name, where=_caller()))
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.events.append(SyncEvent("data-dependent shape", "index with a boolean mask", where=_caller()))
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_"):
            source = _devices(args[1:2] if name == "copy_" else args[:1])
            target = _devices([out])
            if source and target and source != target:
                self.events.append(SyncEvent("copy between devices", name,
                                             f"{sorted(map(str, source))} -> {sorted(map(str, target))}", _caller()))
        return out
