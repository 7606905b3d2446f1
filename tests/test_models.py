"""Loading, LoRA set-up, diffusers + kohya saving, full pipeline saving and accelerate checkpoint hooks."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from sdxl_ambient import models
from sdxl_ambient.lora_formats import diffusers_to_kohya, unet_module_to_ldm

GEN_KW = dict(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="pt", guidance_scale=5.0)


def _randomize_lora_b(*modules, seed=0):
    """peft initialises B = 0 (LoRA starts as the identity); give it values so it changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    for module in modules:
        for name, param in module.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def _images(pipe):
    return pipe(**GEN_KW, generator=torch.Generator().manual_seed(0)).images


def _images_from_files(pipe, folder):
    """Images with the diffusers-format file, then with the kohya file, both through ``load_lora_weights``."""
    out = []
    for weight_name in (models.LORA_WEIGHT_NAME, models.KOHYA_WEIGHT_NAME):
        pipe.load_lora_weights(folder, weight_name=weight_name)
        out.append(_images(pipe))
        pipe.unload_lora_weights()
    return out


def _pipeline_from(components, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet, scheduler=scheduler,
    )


@pytest.fixture(scope="module")
def base_pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture
def components(tiny_pipeline_dir):
    return models.load_components(str(tiny_pipeline_dir))


def test_load_components_frozen_with_ddpm_scheduler(components, tiny_pipeline_dir):
    from diffusers import DDPMScheduler

    assert isinstance(components.noise_scheduler, DDPMScheduler)
    assert components.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert components.model_id == str(tiny_pipeline_dir) and components.vae_id is None
    for part in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        assert not any(p.requires_grad for p in part.parameters())


def test_separate_vae_path(tiny_pipeline_dir):
    c = models.load_components(str(tiny_pipeline_dir), pretrained_vae_model_name_or_path=str(tiny_pipeline_dir / "vae"))
    assert c.vae_id == str(tiny_pipeline_dir / "vae") and c.vae.config.scaling_factor == pytest.approx(0.13025)


def test_bad_paths_name_the_flag(tmp_path, tiny_pipeline_dir):
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path ./nope"):
        models.load_components("./nope")
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path.*model_index.json"):
        models.load_components(str(tmp_path))
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path.*StableDiffusionPipeline"):
        models.load_components(str(sd15))
    no_te2 = tmp_path / "no_te2"
    shutil.copytree(tiny_pipeline_dir, no_te2)
    index = json.loads((no_te2 / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (no_te2 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path.*text_encoder_2"):
        models.load_components(str(no_te2))
    with pytest.raises(ValueError, match="--pretrained_vae_model_name_or_path ./no-vae"):
        models.load_components(str(tiny_pipeline_dir), pretrained_vae_model_name_or_path="./no-vae")


def test_lora_files_load_in_diffusers_and_match_peft(components, base_pipe, tmp_path):
    """Both written files, read by diffusers' loader, give the images of our own peft-wrapped models."""
    models.add_unet_lora(components.unet, rank=4, alpha=8)
    models.add_text_encoder_lora(components.text_encoder, rank=4, alpha=2)
    models.add_text_encoder_lora(components.text_encoder_2, rank=2)
    _randomize_lora_b(components.unet, components.text_encoder, components.text_encoder_2)
    paths = models.save_lora(tmp_path, components.unet, components.text_encoder, components.text_encoder_2,
                             metadata={"ambient_timestep": "200"})
    assert [p.name for p in paths] == [models.LORA_WEIGHT_NAME, models.KOHYA_WEIGHT_NAME]

    base = _images(base_pipe)
    ours = _images(_pipeline_from(components, base_pipe.scheduler))
    diffusers_file, kohya_file = _images_from_files(base_pipe, tmp_path)

    assert (diffusers_file - base).abs().max() > 0.05
    torch.testing.assert_close(diffusers_file, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(kohya_file, diffusers_file, atol=1e-5, rtol=0)
    with safe_open(str(paths[1]), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
        assert f.get_tensor("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 2.0
        assert f.get_tensor("lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha").item() == 2.0
        assert f.get_tensor("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha").item() == 8.0
    assert header["ambient_timestep"] == "200" and header["ss_network_dim"] == "4"
    # tiny UNet, layers_per_block 1: down_blocks.1 -> input_blocks.3, up_blocks.0.attentions.1 -> output_blocks.1
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v.lora_down.weight" in keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)


def test_kohya_names_of_resnets_and_samplers_load_in_diffusers(components, base_pipe, tmp_path):
    """LDM names beyond attention (resnet convs, time projection, shortcut, down/up-samplers) round-trip."""
    targets = ("to_q", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv")
    models.add_unet_lora(components.unet, rank=2, target_modules=targets)
    _randomize_lora_b(components.unet, seed=1)
    models.save_lora(tmp_path, components.unet)
    diffusers_file, kohya_file = _images_from_files(base_pipe, tmp_path)
    torch.testing.assert_close(kohya_file, diffusers_file, atol=1e-5, rtol=0)
    with safe_open(str(tmp_path / models.KOHYA_WEIGHT_NAME), "pt") as f:
        keys = set(f.keys())
    for name in ("input_blocks_2_0_op", "output_blocks_1_2_conv", "middle_block_2_emb_layers_1",
                 "input_blocks_3_0_skip_connection", "output_blocks_3_0_out_layers_3", "input_blocks_1_0_in_layers_2"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name


def test_sdxl_base_ldm_names():
    """Known kohya SDXL names (sd-scripts' sdxl_original_unet) for the SDXL-base layout."""
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
        "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
        "up_blocks.1.attentions.2.proj_in": "output_blocks.5.1.proj_in",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.2.resnets.1.conv1": "input_blocks.8.0.in_layers.2",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
    }
    for diffusers_name, ldm in cases.items():
        assert unet_module_to_ldm(diffusers_name) == ldm
    with pytest.raises(ValueError, match="unet.foo.lora.down"):
        diffusers_to_kohya({"unet.foo.lora.down.bias": torch.zeros(1)}, 1.0)


def test_text_encoder_lora_trains_and_round_trips(components, tiny_pipeline_dir, tmp_path):
    """transformers 5.23 + peft 0.21.2: forward/backward through LoRA, then save -> load_lora_into exactly."""
    params = models.add_text_encoder_lora(components.text_encoder, rank=4)
    models.add_text_encoder_lora(components.text_encoder_2, rank=4)
    models.add_unet_lora(components.unet, rank=4)
    assert params and all(p.requires_grad for p in params)
    ids = components.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    components.text_encoder(ids).last_hidden_state.square().mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in components.text_encoder.named_parameters() if "lora_" not in n)

    _randomize_lora_b(components.unet, components.text_encoder, components.text_encoder_2, seed=3)
    models.save_lora(tmp_path, components.unet, components.text_encoder, components.text_encoder_2)
    fresh = models.load_components(str(tiny_pipeline_dir))
    models.add_text_encoder_lora(fresh.text_encoder, rank=4)
    models.add_text_encoder_lora(fresh.text_encoder_2, rank=4)
    models.add_unet_lora(fresh.unet, rank=4)
    models.load_lora_into(fresh.unet, fresh.text_encoder, fresh.text_encoder_2, tmp_path)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        want = {k: v for k, v in getattr(components, name).state_dict().items() if "lora_" in k}
        got = {k: v for k, v in getattr(fresh, name).state_dict().items() if "lora_" in k}
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        torch.testing.assert_close(fresh.text_encoder_2(ids).text_embeds, components.text_encoder_2(ids).text_embeds,
                                   atol=0, rtol=0)
    with pytest.raises(ValueError, match="--train_text_encoder"):
        models.load_lora_into(fresh.unet, None, None, tmp_path)


def test_cast_training_params_upcasts_only_trainable(components):
    components.unet.to(torch.float16)
    models.add_unet_lora(components.unet, rank=2)
    models.cast_training_params([components.unet, None])
    dtypes = {n: p.dtype for n, p in components.unet.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.float16 for n, d in dtypes.items() if "lora_" not in n)


def test_full_pipeline_save_loads_with_trained_unet(components, tmp_path):
    """Full UNet plus text-encoder LoRA: the saved folder is a plain pipeline giving the same images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with torch.no_grad():
        components.unet.conv_out.weight.add_(1.0)
    models.add_text_encoder_lora(components.text_encoder, rank=2)
    _randomize_lora_b(components.text_encoder)
    models.save_full_pipeline(tmp_path / "pipe", components, components.unet)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert torch.equal(pipe.unet.conv_out.weight, components.unet.conv_out.weight)
    assert not list((tmp_path / "pipe").rglob("*.bin")) and not list((tmp_path / "pipe").rglob("adapter_*"))
    assert "lora_A" in str(list(components.text_encoder.state_dict()))  # the training model keeps its adapter
    torch.testing.assert_close(_images(pipe), _images(_pipeline_from(components, pipe.scheduler)), atol=1e-5, rtol=0)


def _accelerator(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))


def _snapshot(*modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def _assert_same(modules, snapshot):
    for module, saved in zip(modules, snapshot):
        state = module.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_lora_checkpoint_hooks_restore_exactly(components, tmp_path):
    """LoRA on the UNet and text encoder 1, with an EMA of the LoRA parameters as the trainer builds it."""
    from diffusers.training_utils import EMAModel

    unet, te = components.unet, components.text_encoder
    models.add_unet_lora(unet, rank=4)
    models.add_text_encoder_lora(te, rank=4)
    _randomize_lora_b(unet, te)
    accelerator = _accelerator(tmp_path)
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=0.9)
    ema.step(params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    unet, te, optimizer = accelerator.prepare(unet, te, optimizer)
    models.register_checkpoint_hooks(accelerator, finetune="lora", unet=unet, text_encoder=te, ema_unet=ema)
    saved = _snapshot(unet, te)
    saved_ema = [p.clone() for p in ema.shadow_params]
    accelerator.save_state(str(tmp_path / "checkpoint-1"))
    files = {p.name for p in (tmp_path / "checkpoint-1").iterdir()}
    assert {models.LORA_WEIGHT_NAME, models.KOHYA_WEIGHT_NAME, "optimizer.bin"} <= files
    assert not any(name.startswith("model") for name in files)  # accelerate did not pickle the models too

    with torch.no_grad():
        for p in [*params, *ema.shadow_params]:
            p.add_(torch.randn_like(p))
    accelerator.load_state(str(tmp_path / "checkpoint-1"))
    _assert_same((unet, te), saved)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, saved_ema))


def test_full_checkpoint_hooks_restore_unet_and_ema(components, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet, te, te_lora = components.unet, components.text_encoder_2, components.text_encoder
    unet.requires_grad_(True)
    te.requires_grad_(True)
    models.add_text_encoder_lora(te_lora, rank=2)  # full UNet and text encoder 2, LoRA on text encoder 1
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)
    ema.step(unet.parameters())
    accelerator = _accelerator(tmp_path)
    optimizer = torch.optim.SGD([*unet.parameters(), *te.parameters()], lr=0.1)
    unet, te, te_lora, optimizer = accelerator.prepare(unet, te, te_lora, optimizer)
    models.register_checkpoint_hooks(accelerator, finetune="full", unet=unet, text_encoder=te_lora,
                                     text_encoder_2=te, ema_unet=ema)
    _randomize_lora_b(te_lora)
    saved = _snapshot(unet, te, te_lora)
    saved_ema = [p.clone() for p in ema.shadow_params]
    saved_step = ema.optimization_step
    accelerator.save_state(str(tmp_path / "checkpoint-2"))
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (ckpt / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert (ckpt / "text_encoder_2" / "config.json").is_file() and (ckpt / models.LORA_WEIGHT_NAME).is_file()
    assert not any(p.name.startswith("model") for p in ckpt.iterdir())
    ema_unet = UNet2DConditionModel.from_pretrained(ckpt / "unet_ema")  # the EMA folder is a loadable UNet
    assert torch.equal(ema_unet.conv_in.weight, saved_ema[list(dict(unet.named_parameters())).index("conv_in.weight")])

    with torch.no_grad():
        for p in [*unet.parameters(), *te.parameters(), *(p for n, p in te_lora.named_parameters() if "lora_" in n)]:
            p.add_(1.0)
        for p in ema.shadow_params:
            p.zero_()
    ema.optimization_step = 99
    accelerator.load_state(str(ckpt))
    _assert_same((unet, te, te_lora), saved)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, saved_ema))
    assert ema.optimization_step == saved_step
