"""The options users bring from diffusers, kohya and SimpleTuner, each run on the tiny pipeline: the
optimizers (AdamW, Prodigy, Adafactor, 8-bit AdamW) and how each meets the non-finite guard, a
separate text-encoder learning rate, gradient checkpointing and caption dropout."""

import json
import logging
import shutil
import types

import pytest
import torch

from helpers.training import LORA_FILE, lora_weights, run_inprocess, tiny_args
from sdxl_ambient import checkpointing


def _optimizer_state(checkpoint) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)


def _lora_changed(weights: dict, prefix: str = "unet.") -> bool:
    return any(torch.count_nonzero(v) > 0 for k, v in weights.items() if k.startswith(prefix) and "lora_B" in k)


# ----------------------------------------------------------------------------- optimizers

OPTIMIZER_ARGS = {
    "prodigy": ["--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_safeguard_warmup", "false"],
    "adafactor": ["--optimizer", "adafactor"],
}


def _is_the_optimizer(name: str, state: dict) -> bool:
    """What only that optimizer leaves in its saved state."""
    group, states = state["param_groups"][0], list(state["state"].values())
    if name == "prodigy":
        return group["k"] == 4 and group["d_numerator"] > 0 and group["safeguard_warmup"] is False and "s" in states[0]
    return group["relative_step"] is False and any("exp_avg_sq_row" in s for s in states) and not any("exp_avg" in s for s in states)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_ARGS))
def test_each_optimizer_trains_and_resumes_exactly(tmp_path, tiny_pipeline_dir, image_folder, name):
    """The optimizer named is the one that trains (its own state is in the checkpoint), and its state
    survives a checkpoint: resuming from step 2 ends bit-identical to the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = [*OPTIMIZER_ARGS[name], "--checkpointing_steps", "2"]
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, full, *extra, steps=4)) == 0
    assert _is_the_optimizer(name, _optimizer_state(full / "checkpoint-4"))
    assert _lora_changed(lora_weights(full))
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-4")
    (cut / LORA_FILE).unlink()
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, cut, *extra, "--resume_from_checkpoint", "latest",
                                   steps=4)) == 0
    expected, resumed = lora_weights(full), lora_weights(cut)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def _plant_nan_at(monkeypatch, call: int) -> None:
    from sdxl_ambient.step import AmbientObjective

    original, calls = AmbientObjective.__call__, []

    def planted(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls.append(1)
        return {**losses, "loss": losses["loss"] * float("nan")} if len(calls) == call else losses

    monkeypatch.setattr(AmbientObjective, "__call__", planted)


def _count_steps(monkeypatch, cls) -> list:
    steps, real = [], cls.step
    monkeypatch.setattr(cls, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    return steps


def _eight_bit_adam():
    """bitsandbytes' AdamW8bit if it runs on this machine's CPU, else skip with the reason."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'sdxl-ambient[bnb]')")
    try:
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones(4096)
        opt.step()
    except Exception as exc:  # no CPU build of its kernels here
        pytest.skip(f"bitsandbytes has no working CPU build here: {type(exc).__name__}: {exc}")
    return bnb.optim.AdamW8bit


@pytest.mark.parametrize("name", ["prodigy", "adafactor", "8bit"])
def test_optimizers_without_a_device_skip_are_guarded_on_the_host(monkeypatch, caplog, tmp_path, tiny_pipeline_dir,
                                                                 image_folder, name):
    """Prodigy, Adafactor and 8-bit AdamW cannot skip an update on the device: a NaN loss at step 2 is
    caught on the host, their step is not called (5 of 6), and the weights stay finite (a NaN step
    would have poisoned Prodigy's step size and every weight)."""
    if name == "8bit":
        cls, extra = _eight_bit_adam(), ["--use_8bit_adam", "--finetune", "full"]
    elif name == "prodigy":
        from prodigyopt import Prodigy as cls

        extra = OPTIMIZER_ARGS[name]
    else:
        from transformers.optimization import Adafactor as cls

        extra = OPTIMIZER_ARGS[name]
    _plant_nan_at(monkeypatch, 2)
    steps = _count_steps(monkeypatch, cls)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="sdxl_ambient"):
        assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, *extra, steps=6)) == 0
    assert "non-finite loss or gradients at step 2 (1 in a row): update skipped" in caplog.text
    assert len(steps) == 5
    saved = checkpointing.resolve_checkpoint("latest", out)
    from safetensors.torch import load_file

    weights = load_file(str(saved / "unet" / "diffusion_pytorch_model.safetensors")) if name == "8bit" else lora_weights(out)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_8bit_adam_keeps_8_bit_moments_and_trains(tmp_path, tiny_pipeline_dir, image_folder):
    """--use_8bit_adam is bitsandbytes' AdamW8bit: its moments are 8-bit in the checkpoint (a full fine-tune,
    since bitsandbytes keeps tensors under 4096 elements, such as small LoRA matrices, in 32 bits)."""
    from diffusers import UNet2DConditionModel

    _eight_bit_adam()
    out = tmp_path / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--use_8bit_adam", "--finetune", "full",
                                   "--checkpointing_steps", "2", steps=2)) == 0
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in _optimizer_state(out / "checkpoint-2")["state"].values()]
    assert any(torch.is_tensor(s.get("state1")) and s["state1"].dtype == torch.uint8 for s in states)
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    tuned = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), tuned.state_dict().values()))


def test_text_encoder_lr_is_the_text_encoders_own_rate(tmp_path, tiny_pipeline_dir, image_folder):
    """With --text_encoder_lr 1e-12 beside a UNet rate of 1e-2 the text encoders' LoRA barely moves while the
    UNet's does; the rates are the optimizer's two groups and are recorded as resolved."""
    out = tmp_path / "out"
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--train_text_encoder", "--learning_rate", "1e-2",
                                   "--text_encoder_lr", "1e-12", "--checkpointing_steps", "2", steps=2)) == 0
    groups = _optimizer_state(out / "checkpoint-2")["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-2), pytest.approx(1e-12)]
    weights = lora_weights(out)
    te = [v for k, v in weights.items() if k.startswith("text_encoder") and "lora_B" in k]
    assert te and max(v.abs().max().item() for v in te) < 1e-9
    assert max(v.abs().max().item() for k, v in weights.items() if k.startswith("unet.") and "lora_B" in k) > 1e-4
    resolved = json.loads((out / "training_settings.json").read_text())["resolved"]
    assert resolved["text_encoder_lr"] == pytest.approx(1e-12) and resolved["learning_rate"] == pytest.approx(1e-2)


# ----------------------------------------------------------------------------- gradient checkpointing


def _loss_and_gradients(tiny_pipeline_dir, checkpointing_on: bool):
    """One step's objective (ambient + consistency, UNet and text-encoder LoRA), its gradients, and how many
    tensors the text encoders' and the UNet's forward passes kept for the backward."""
    from sdxl_ambient import models
    from sdxl_ambient.step import ObjectiveSettings, conditioned_unet
    from sdxl_ambient.text import text_embeddings, tokenize
    from sdxl_ambient.train import setup_trainable

    components = models.load_components(str(tiny_pipeline_dir))
    flags = types.SimpleNamespace(finetune="lora", rank=4, lora_alpha=None, use_dora=False, train_text_encoder=True,
                                  gradient_checkpointing=checkpointing_on, enable_xformers_memory_efficient_attention=False)
    torch.manual_seed(0)
    trained, params = setup_trainable(flags, components, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    saved = {"text": 0, "unet": 0}

    def counting(part):  # tensors the forward keeps for the backward: what checkpointing cuts
        def pack(t):
            saved[part] += 1
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    for m in trained:
        m.train()
    captions = ["a ginger cat", "a red rocket"]
    with counting("text"):
        embeds, pooled = text_embeddings(components.text_encoder, components.text_encoder_2,
                                         tokenize(components.tokenizer, captions), tokenize(components.tokenizer_2, captions))
    net = conditioned_unet(components.unet, embeds, pooled, torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    objective = ObjectiveSettings(consistency_weight=1.0).build(100, components.noise_scheduler)
    y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with counting("unet"):
        loss = objective(net, y, torch.tensor([100, 100]), generator=torch.Generator().manual_seed(2))["loss"].mean()
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params], saved


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_pipeline_dir):
    """--gradient_checkpointing keeps far fewer activations for the backward pass in the UNet and in the text
    encoders (the path ran) and changes neither the loss nor any gradient of their LoRA."""
    loss, grads, saved = _loss_and_gradients(tiny_pipeline_dir, False)
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_and_gradients(tiny_pipeline_dir, True)
    assert saved_ckpt["unet"] < saved["unet"] / 2 and saved_ckpt["text"] < saved["text"] / 2, (saved, saved_ckpt)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert len(grads) == len(grads_ckpt) and any(g.abs().max() > 0 for g in grads)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- caption dropout


def _record(monkeypatch, name: str) -> list:
    """Record the first two arguments of ``sdxl_ambient.train.<name>`` at every call."""
    from sdxl_ambient import train

    seen, real = [], getattr(train, name)

    def recording(*args, **kwargs):
        seen.append(tuple(a.detach().cpu().clone() for a in args[1:3]) if name == "conditioned_unet"
                    else tuple(a.detach().cpu().clone() for a in args[2:4]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, name, recording)
    return seen


@pytest.fixture(scope="module")
def empty_prompt_by_diffusers(tiny_pipeline_dir):
    """diffusers' own encoding of the empty prompt (both encoders, pooled included), and its token ids."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return embeds[0], pooled[0], ids[0]


def _is_empty(embeds, pooled, expected) -> bool:
    return torch.allclose(embeds.float(), expected[0], atol=2e-3) and torch.allclose(pooled.float(), expected[1], atol=2e-3)


@pytest.mark.parametrize("p", ["1", "0.5", "0"])
def test_caption_dropout_uses_the_empty_prompt_as_diffusers_encodes_it(monkeypatch, tmp_path, tiny_pipeline_dir, image_folder,
                                                                      empty_prompt_by_diffusers, p):
    """--proportion_empty_prompts: the UNet gets the empty prompt's embeddings (pooled included, as diffusers
    encodes "") for that share of samples, drawn anew at every step; 0 leaves every caption."""
    seen = _record(monkeypatch, "conditioned_unet")
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "out", "--proportion_empty_prompts", p,
                                   steps=8)) == 0
    flags = [_is_empty(e, q, empty_prompt_by_diffusers) for embeds, pooled in seen for e, q in zip(embeds, pooled)]
    assert len(flags) == 16
    if p == "1":
        assert all(flags)
    elif p == "0":
        assert not any(flags)
    else:
        assert 3 <= sum(flags) <= 13  # binomial(16, 1/2): drawn, not fixed per image or per batch
        per_step = [tuple(flags[i:i + 2]) for i in range(0, 16, 2)]
        assert len(set(per_step)) > 1


def test_caption_dropout_reaches_the_text_encoders_when_they_train(monkeypatch, tmp_path, tiny_pipeline_dir, image_folder,
                                                                   empty_prompt_by_diffusers):
    """Under --train_text_encoder the dropped captions are the empty prompt's token ids, encoded by the
    text encoders being trained."""
    seen = _record(monkeypatch, "text_embeddings")
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "out", "--train_text_encoder",
                                   "--proportion_empty_prompts", "1", steps=2)) == 0
    ids = [row for ids_one, _ in seen if len(ids_one) == 2 for row in ids_one]  # the training batches (of 2)
    assert len(ids) == 4 and all(torch.equal(row, empty_prompt_by_diffusers[2]) for row in ids)


# ----------------------------------------------------------------------------- DoRA


def test_a_dora_run_saves_a_dora_that_loads_in_diffusers_and_resumes_exactly(tmp_path, tiny_pipeline_dir, image_folder):
    """--use_dora trains peft's DoRA (magnitudes in the diffusers file, ComfyUI's dora_scale in the kohya copy),
    loads with load_lora_weights and changes the images, and a resume from step 2 ends bit-identical."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ["--use_dora", "--train_text_encoder", "--checkpointing_steps", "2"]
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, full, *extra, steps=4)) == 0
    weights = lora_weights(full)
    assert any(k.startswith("unet.") and k.endswith("lora_magnitude_vector") for k in weights)
    assert any(k.startswith("text_encoder.") and "lora_magnitude_vector" in k for k in weights)
    with safe_open(str(full / "pytorch_lora_weights_kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_") and k.endswith(".dora_scale") for k in f.keys())
    assert "DoRA as ComfyUI's `dora_scale`" in (full / "README.md").read_text()  # the card says where the kohya copy loads
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a ginger cat", num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    before = images()
    pipe.load_lora_weights(full)
    assert pipe.unet.peft_config["default_0"].use_dora and np.abs(images() - before).max() > 1e-3

    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-4")
    (cut / LORA_FILE).unlink()
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, cut, *extra, "--resume_from_checkpoint", "latest",
                                   steps=4)) == 0
    resumed = lora_weights(cut)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


# ----------------------------------------------------------------------------- consistency on part of the batch


def test_the_trainer_runs_a_fractional_consistency_term_on_its_step_schedule(monkeypatch, tmp_path, tiny_pipeline_dir,
                                                                              image_folder):
    """Batch 1 at the default --consistency_fraction 0.25: the trainer gives the objective its step, so the
    term runs on steps 3 and 7 of 8 (one in four, the UNet called on 1 and 2 samples for it), not on every step."""
    from sdxl_ambient.step import AmbientObjective

    ran, consistency = [], AmbientObjective.consistency

    def counting(self, net, y, *args, **kwargs):
        ran.append(y.shape[0])
        return consistency(self, net, y, *args, **kwargs)

    monkeypatch.setattr(AmbientObjective, "consistency", counting)
    steps = []
    draw = AmbientObjective.draw

    def recording(self, *args, step=None, **kwargs):
        steps.append(step)
        return draw(self, *args, step=step, **kwargs)

    monkeypatch.setattr(AmbientObjective, "draw", recording)
    args = tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "out", "--consistency_weight", "1", "--train_batch_size", "1",
                     "--checkpointing_steps", "100", steps=8)
    assert run_inprocess(args) == 0
    assert steps == list(range(8)) and len(ran) == 2
