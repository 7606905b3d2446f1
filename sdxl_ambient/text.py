"""SDXL's prompt encoding from token ids (both CLIP text encoders), shared by the latent cache,
the trainer (when the text encoders train) and validation."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for SDXL)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def text_embeddings(text_encoder, text_encoder_2, ids_one, ids_two) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_embeds = concat of both encoders' penultimate hidden states (B, 77, D1 + D2);
    pooled = text_encoder_2's projected output (B, P)."""
    device = next(text_encoder.parameters()).device  # also for a DDP-wrapped encoder, which has no .device
    out_one = text_encoder(ids_one.to(device), output_hidden_states=True)
    out_two = text_encoder_2(ids_two.to(device), output_hidden_states=True)
    return torch.cat([out_one.hidden_states[-2], out_two.hidden_states[-2]], dim=-1), out_two[0]
