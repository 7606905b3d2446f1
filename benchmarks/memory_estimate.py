"""The memory plan of a LoRA step on a GPU: weights, optimizer and activations, from the model's shapes.

Builds SDXL-base's UNet (``sdxl_base_config.json``) on the meta device (shapes only: no memory, a few
seconds), adds the trainer's LoRA (rank 4 on to_q/to_k/to_v/to_out.0) and runs one forward pass of the
project's step input (latents at the given size, 77 text tokens, micro-conditioning), recording every
tensor autograd keeps for the backward pass once per storage. Each is attributed to the unit that
``--gradient_checkpointing`` recomputes (``ResnetBlock2D``, ``BasicTransformerBlock``) running when it
was saved, or to none.

    without checkpointing   activations = everything saved
    with checkpointing      activations = saved outside the units + the units' inputs (kept by the
                            checkpoints) + the largest unit's own saved tensors (recomputed one at a
                            time in the backward pass)

The trace runs in bf16 throughout. Under bf16 autocast (what accelerate runs) layer and group norms
compute in fp32: their inputs are saved as fp32 copies and a norm's fp32 output feeds the SiLU
after it, so the "autocast" figures count those tensors at 4 bytes an element. Not counted: the
backward pass's transient gradients (a few activation-sized tensors at a time), the allocator's
fragmentation, and the CUDA context (about 0.5 GiB, outside ``max_memory_allocated``).

    python benchmarks/memory_estimate.py --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdxl_ambient.models import add_unet_lora

GIB = 2**30
UNITS = ("ResnetBlock2D", "BasicTransformerBlock")
NORMS = {"native_group_norm", "native_layer_norm"}


def _sid(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class _NormTensors(TorchDispatchMode):
    """Storages of norm inputs and outputs (fp32 under autocast)."""

    def __init__(self):
        super().__init__()
        self.fp32_under_autocast: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name.split("::")[-1] in NORMS:
            self.fp32_under_autocast.add(_sid(args[0]))
            self.fp32_under_autocast.add(_sid(out[0]))
        return out


class _FlashAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention as a GPU runs it (flash / memory-efficient kernels):
    it saves q, k, v, the output and a float32 log-sum-exp per query, never the T x T attention matrix
    (which the meta device's math path would save)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if attn_mask is not None:
        raise ValueError("the estimate assumes SDXL's unmasked attention")
    return _FlashAttention.apply(query, key, value)


def trace(unet, batch: int, height: int, width: int) -> dict:
    """Saved tensors of one forward pass, deduplicated by storage and attributed to checkpoint units;
    the model's own weights (saved for the backward pass too) are counted as weights, not here."""
    stack: list[int] = []
    weights = {_sid(t) for t in [*unet.parameters(), *unet.buffers()]}
    saved: dict[int, tuple[int, int | None, torch.dtype]] = {}  # storage -> (bytes, unit, dtype)
    unit_inputs: dict[int, int] = {}
    keep = []

    def pre(module, args, kwargs):
        stack.append(id(module))
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor):
                unit_inputs.setdefault(_sid(t), _nbytes(t))

    def post(module, args, output):
        stack.pop()

    handles = []
    for m in unet.modules():
        if type(m).__name__ in UNITS:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))

    def pack(t):
        keep.append(t)
        if _sid(t) not in weights:
            saved.setdefault(_sid(t), (_nbytes(t), stack[-1] if stack else None, t.dtype))
        return t

    dt = torch.bfloat16
    x = torch.zeros(batch, 4, height // 8, width // 8, device="meta", dtype=dt)
    cond = {"text_embeds": torch.zeros(batch, 1280, device="meta", dtype=dt),
            "time_ids": torch.zeros(batch, 6, device="meta", dtype=dt)}
    norms = _NormTensors()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), norms:
            unet(x, torch.zeros(batch, dtype=torch.long, device="meta"),
                 encoder_hidden_states=torch.zeros(batch, 77, 2048, device="meta", dtype=dt),
                 added_cond_kwargs=cond, return_dict=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()

    def total(autocast: bool, where=lambda unit: True) -> int:
        n = 0
        for sid, (nbytes, unit, dtype) in saved.items():
            if where(unit):
                n += 2 * nbytes if autocast and dtype == torch.bfloat16 and sid in norms.fp32_under_autocast else nbytes
        return n

    out = {}
    for autocast in (False, True):
        per_unit: dict[int, int] = {}
        for sid, (nbytes, unit, dtype) in saved.items():
            if unit is not None:
                factor = 2 if autocast and dtype == torch.bfloat16 and sid in norms.fp32_under_autocast else 1
                per_unit[unit] = per_unit.get(unit, 0) + factor * nbytes
        outside = total(autocast, lambda unit: unit is None)
        inputs = sum(b for sid, b in unit_inputs.items()
                     if sid not in weights and (sid not in saved or saved[sid][1] is not None))
        key = "autocast" if autocast else "bf16"
        out[key] = {"no_checkpointing": total(autocast), "outside_units": outside, "unit_inputs": inputs,
                    "largest_unit": max(per_unit.values()), "checkpointing": outside + inputs + max(per_unit.values())}
    out["units"] = len({u for _, u, _ in saved.values() if u is not None})
    return out


def lora_unet(config_path: str, rank: int):
    """SDXL-base's UNet on the meta device in bf16 with the trainer's LoRA (its weights bf16 too, as
    autocast casts the LoRA path's inputs: bf16 saved tensors)."""
    from diffusers import UNet2DConditionModel

    config = json.loads(Path(config_path).read_text())["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).to(torch.bfloat16)
    unet.requires_grad_(False)
    for p in add_unet_lora(unet, rank=rank):
        p.data = p.data.to(torch.bfloat16)
    return unet


def estimate(config_path: str, resolution: int, batch: int, rank: int, unet=None) -> dict:
    unet = unet if unet is not None else lora_unet(config_path, rank)
    n_unet = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    n_lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    activations = trace(unet, batch, resolution, resolution)
    vae_params = 83_653_863
    fixed = {
        "unet_weights_bf16": 2 * n_unet,
        "vae_fp32": 4 * vae_params,  # the trainer keeps the VAE on the device (validation)
        "lora_fp32_weights_grads_adam": 16 * n_lora,
        "cached_batch": batch * (4 * 4 * (resolution // 8) ** 2 + 2 * 77 * 2048 + 2 * 1280 + 4 * 6),
    }
    return {"resolution": resolution, "batch": batch, "rank": rank, "unet_parameters": n_unet, "lora_parameters": n_lora,
            "fixed_bytes": fixed, "activations_bytes": activations}


def table(result: dict) -> str:
    fixed = sum(result["fixed_bytes"].values())
    lines = ["| part | GiB |", "| --- | ---: |"]
    for k, v in result["fixed_bytes"].items():
        lines.append(f"| {k} | {v / GIB:.3f} |")
    for key in ("bf16", "autocast"):
        a = result["activations_bytes"][key]
        for mode in ("no_checkpointing", "checkpointing"):
            lines.append(f"| activations, {mode.replace('_', ' ')} ({key}) | {a[mode] / GIB:.2f} |")
    a = result["activations_bytes"]["autocast"]
    lines.append(f"| **total, autocast, without checkpointing** | **{(fixed + a['no_checkpointing']) / GIB:.2f}** |")
    lines.append(f"| **total, autocast, with checkpointing** | **{(fixed + a['checkpointing']) / GIB:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parent / "sdxl_base_config.json"))
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    result = estimate(args.config, args.resolution, args.batch, args.rank)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"SDXL-base UNet, LoRA rank {args.rank}, batch {args.batch}, {args.resolution} px "
          f"({result['lora_parameters']:,} LoRA parameters, {result['activations_bytes']['units']} checkpoint units)\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
