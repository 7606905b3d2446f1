"""LoRA key formats: diffusers (``pipe.load_lora_weights``) -> kohya sd-scripts / ComfyUI / A1111.

A kohya LoRA file holds, per adapted layer ``NAME``::

    NAME.lora_down.weight  (r, in)      = peft lora_A
    NAME.lora_up.weight    (out, r)     = peft lora_B
    NAME.alpha             scalar       so that  W' = W + (alpha / r) * up @ down

``NAME`` is ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` followed by the module path with every
``.`` replaced by ``_``.

Which UNet module names: kohya sd-scripts trains SDXL on the original (LDM/"sgm") UNet, so its SDXL
files use LDM names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). ComfyUI's
``comfy/lora.py`` (``model_lora_keys_unet``) maps both those LDM names and diffusers-style names
(``lora_unet_down_blocks_1_attentions_0_...``, through ``comfy.utils.unet_to_diffusers``) onto its LDM
model, but A1111/Forge and kohya's own tools (merge, resize, block weights) work on LDM names. So we
write LDM names: the one spelling that every SDXL LoRA consumer reads, diffusers included
(``_maybe_map_sgm_blocks_to_diffusers``). The text encoders keep their transformers paths
(``text_model.encoder.layers.N.self_attn.q_proj``), the spelling kohya and ComfyUI (``LORA_CLIP_MAP``) use.

The LDM index arithmetic for a UNet with ``L = layers_per_block``:

    down_blocks.b.{resnets,attentions}.j  -> input_blocks.(1 + b(L+1) + j).{0,1}
    down_blocks.b.downsamplers.0.conv     -> input_blocks.((b+1)(L+1)).0.op
    mid_block.resnets.{0,1}, attentions.0 -> middle_block.{0,2}, middle_block.1
    up_blocks.b.{resnets,attentions}.j    -> output_blocks.(b(L+1) + j).{0,1}
    up_blocks.b.upsamplers.0.conv         -> output_blocks.(b(L+1) + L).{1 or 2 with attention}.conv
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

# SDXL-base UNet layout (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_UNET_LAYOUT = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
# A diffusers-format LoRA weight key: "<component>.<module path>.<lora part>.weight".
_DIFFUSERS_KEY = re.compile(
    r"^(?P<component>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
    r"(?P<part>lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight$"
)
_DOWN_PARTS = ("lora.down", "lora_linear_layer.down", "lora_A")


def _layout(unet_config) -> tuple[int, tuple[str, ...]]:
    config = SDXL_UNET_LAYOUT if unet_config is None else unet_config
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k)
    layers = get("layers_per_block")
    if not isinstance(layers, int):
        raise ValueError("kohya conversion needs one integer layers_per_block for the whole UNet")
    return layers, tuple(get("up_block_types"))


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    if head not in _RESNET:
        raise ValueError(f"no LDM name for resnet sub-module {tail!r}")
    return _RESNET[head] + (f".{rest}" if rest else "")


def unet_module_to_ldm(module: str, unet_config=None) -> str:
    """Diffusers UNet module path -> original SDXL (LDM) module path (see the module docstring)."""
    layers, up_types = _layout(unet_config)
    for name, ldm in _TOP_LEVEL.items():
        if module == name:
            return ldm
    parts = module.split(".")
    if parts[0] == "down_blocks" and len(parts) >= 4:
        block, kind, j, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op"
        index = 1 + block * (layers + 1) + j
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet_tail(tail)}"
        if kind == "attentions":
            return f"input_blocks.{index}.1.{tail}"
    if parts[0] == "mid_block" and len(parts) >= 4:
        kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet_tail(tail)}"
        if kind == "attentions":
            return f"middle_block.1.{tail}"
    if parts[0] == "up_blocks" and len(parts) >= 4:
        block, kind, j, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            has_attention = "CrossAttn" in up_types[block]
            return f"output_blocks.{block * (layers + 1) + layers}.{2 if has_attention else 1}.conv"
        index = block * (layers + 1) + j
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet_tail(tail)}"
        if kind == "attentions":
            return f"output_blocks.{index}.1.{tail}"
    raise ValueError(f"no LDM (kohya) name for UNet module {module!r}")


def text_encoder_module_path(module: str) -> str:
    """Transformers CLIP path as kohya/ComfyUI spell it: always under ``text_model.``.

    transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.N...``) while
    ``CLIPTextModelWithProjection`` keeps ``text_model.``; LoRA files use the latter for both."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def _alpha_for(alpha: float | Mapping[str, float], component: str) -> float:
    if isinstance(alpha, Mapping):
        if component not in alpha:
            raise ValueError(f"no LoRA alpha given for {component}")
        return float(alpha[component])
    return float(alpha)


def diffusers_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    unet_config=None,
) -> dict[str, torch.Tensor]:
    """Convert a diffusers-format SDXL LoRA state dict to kohya/ComfyUI keys with LDM UNet names.

    ``state_dict`` has ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` keys as written by
    ``StableDiffusionXLPipeline.save_lora_weights``; ``alpha`` is the peft ``lora_alpha`` (one number,
    or one per component name). ``unet_config`` gives the block layout (SDXL-base when None).
    The weights are the same tensors: kohya's ``alpha / r`` equals peft's ``lora_alpha / r``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise ValueError(f"not a diffusers-format SDXL LoRA key: {key!r}")
        component, module, part = match["component"], match["module"], match["part"]
        if component == "unet":
            path = unet_module_to_ldm(module, unet_config)
        else:
            path = text_encoder_module_path(module)
        name = KOHYA_PREFIXES[component] + path.replace(".", "_")
        suffix = "lora_down" if part in _DOWN_PARTS else "lora_up"
        if f"{name}.{suffix}.weight" in out:
            raise ValueError(f"two LoRA tensors map to {name}.{suffix}.weight")
        out[f"{name}.{suffix}.weight"] = tensor.detach().contiguous()
        out[f"{name}.alpha"] = torch.tensor(_alpha_for(alpha, component), dtype=torch.float32)
    return out
