"""The shape-dependent pieces that benchmarks/real_size.py runs at SDXL-base's size, checked in seconds
on meta-device models built from benchmarks/sdxl_base_config.json (shapes only, no memory)."""

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdxl_ambient import compile as fast
from sdxl_ambient import models
from sdxl_ambient.cache import model_signature
from sdxl_ambient.data import bucket_resolutions, time_ids
from sdxl_ambient.lora_formats import diffusers_to_kohya, text_encoder_module_path
from sdxl_ambient.text import text_embeddings

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def real_size():
    spec = importlib.util.spec_from_file_location("real_size", BENCHMARKS / "real_size.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_size"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("real_size", None)


@pytest.fixture(scope="module")
def config(real_size):
    return real_size.load_config(BENCHMARKS / "sdxl_base_config.json")


@pytest.fixture(scope="module")
def sdxl(real_size, config):
    """SDXL-base's five parts on the meta device, as real_size.py builds them."""
    return real_size.build_components(config, device="meta")


@pytest.fixture(scope="module")
def lora_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
    unet.requires_grad_(False)
    models.add_unet_lora(unet, rank=4)
    return unet


def test_parameter_counts_are_sdxl_base(sdxl):
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in sdxl.items() if k != "scheduler"}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert sdxl["unet"].dtype == torch.bfloat16 and sdxl["vae"].dtype == torch.float32  # built without an fp32 UNet


def test_micro_conditioning_dims(sdxl):
    """6 time ids x addition_time_embed_dim 256 + the pooled text embedding 1280 = the add embedding's 2816 inputs."""
    from diffusers import StableDiffusionXLPipeline

    unet, te2 = sdxl["unet"], sdxl["text_encoder_2"]
    ids = time_ids((1024, 1024), (0, 0), (1024, 1024))
    assert ids.shape == (6,)
    assert 6 * unet.config.addition_time_embed_dim + te2.config.projection_dim == unet.add_embedding.linear_1.in_features == 2816
    pipe = StableDiffusionXLPipeline(vae=sdxl["vae"], text_encoder=sdxl["text_encoder"], text_encoder_2=te2, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=sdxl["scheduler"])
    add = pipe._get_add_time_ids((1024, 1024), (0, 0), (1024, 1024), torch.float32,
                                 text_encoder_projection_dim=te2.config.projection_dim)  # raises on a mismatch
    assert add.shape == (1, 6) and pipe.vae_scale_factor == 8 and pipe.default_sample_size == 128


def test_text_encoders_give_the_unet_its_conditioning(sdxl):
    """Penultimate hidden states 768 + 1280 = cross_attention_dim 2048; the pooled output is
    text_encoder_2's 1280-d projection, taken at the end token (id 49407 of the real vocabulary)."""
    ids = torch.full((2, 77), 49407, dtype=torch.long, device="meta")
    prompt_embeds, pooled = text_embeddings(sdxl["text_encoder"], sdxl["text_encoder_2"], ids, ids)
    assert prompt_embeds.shape == (2, 77, sdxl["unet"].config.cross_attention_dim) == (2, 77, 2048)
    assert pooled.shape == (2, 1280)
    assert sdxl["text_encoder"].config.eos_token_id == sdxl["text_encoder_2"].config.eos_token_id == 49407


@pytest.mark.parametrize("size", [(1024, 1024), (512, 512), (768, 1344), (1536, 640)])
def test_unet_takes_the_latents_of_each_size(sdxl, size):
    """1024 px -> 128x128 latents; the UNet (two downsamplings) maps any bucket's latents to their own shape."""
    h, w = size[0] // 8, size[1] // 8
    x = torch.zeros(2, 4, h, w, device="meta", dtype=torch.bfloat16)
    cond = {"text_embeds": torch.zeros(2, 1280, device="meta", dtype=torch.bfloat16),
            "time_ids": torch.zeros(2, 6, device="meta", dtype=torch.bfloat16)}
    out = sdxl["unet"](x, torch.zeros(2, dtype=torch.long, device="meta"),
                       encoder_hidden_states=torch.zeros(2, 77, 2048, device="meta", dtype=torch.bfloat16),
                       added_cond_kwargs=cond, return_dict=False)[0]
    assert out.shape == x.shape


def test_vae_makes_128x128_latents_at_1024_px(sdxl):
    vae = sdxl["vae"]
    latents = vae.encode(torch.zeros(1, 3, 1024, 1024, device="meta")).latent_dist.mean
    assert latents.shape == (1, 4, 128, 128)
    assert vae.decode(latents).sample.shape == (1, 3, 1024, 1024)
    assert vae.config.scaling_factor == 0.13025


def test_every_bucket_fits_the_unet():
    """kohya's buckets at 1024 px: sides multiples of 64, so latents are multiples of 8 and survive the
    UNet's two halvings; area at most 1024^2."""
    buckets = bucket_resolutions(1024, 512, 2048, 64)
    assert (1024, 1024) in buckets and (768, 1344) in buckets and (1344, 768) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024
        assert (h // 8) % 4 == 0 and (w // 8) % 4 == 0


def test_model_signature_of_sdxl_base(sdxl):
    components = SimpleNamespace(vae=sdxl["vae"], text_encoder=sdxl["text_encoder"], text_encoder_2=sdxl["text_encoder_2"],
                                 noise_scheduler=sdxl["scheduler"])
    signature = model_signature(components)
    unet = sdxl["unet"].config
    assert signature["latent_channels"] == unet.in_channels == 4
    assert signature["scaling_factor"] == 0.13025
    assert signature["prompt_embeds_dim"] == unet.cross_attention_dim == 2048
    assert signature["pooled_dim"] == unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim == 1280
    assert signature["scheduler"]["num_train_timesteps"] == 1000


def _ldm_block(name: str) -> str:
    return re.match(r"lora_unet_(input_blocks_\d+|middle_block_\d+|output_blocks_\d+)_", name)[1]


def test_every_real_lora_key_converts_to_kohya_ldm_names(lora_unet):
    """560 adapted projections (70 transformer blocks x 2 attentions x q, k, v, out); each gets an LDM name
    in the block SDXL's original UNet has it in, and diffusers' own kohya loader maps every name back."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(lora_unet)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    assert len(modules) == 560 and len(state) == 1120
    kohya = diffusers_to_kohya({f"unet.{k}": torch.zeros(1) for k in state}, 4.0, unet_config=lora_unet.config)
    names = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    assert len(names) == 560 and len(kohya) == 3 * 560
    per_block = {}
    for name in names:
        per_block[_ldm_block(name)] = per_block.get(_ldm_block(name), 0) + 1
    # transformer depth (1, 2, 10): 2 blocks in input 4-5 and output 3-5, 10 in input 7-8, middle 1, output 0-2
    assert per_block == {"input_blocks_4": 16, "input_blocks_5": 16, "input_blocks_7": 80, "input_blocks_8": 80,
                         "middle_block_1": 80, "output_blocks_0": 80, "output_blocks_1": 80, "output_blocks_2": 80,
                         "output_blocks_3": 16, "output_blocks_4": 16, "output_blocks_5": 16}
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0" in names
    back, _ = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=lora_unet.config)
    assert len(back) == 1120 and all(k.startswith("unet.") for k in back)
    back_modules = sorted({_attention_module(k.removeprefix("unet.")) for k in back})
    assert back_modules == modules


def _attention_module(key: str) -> str:
    """diffusers' attention-processor LoRA spelling -> the module path: ``...attn1.processor.to_out_lora.up.weight``
    -> ``...attn1.to_out.0``."""
    attention, projection = re.match(r"^(.*)\.processor\.(to_[qkv]|to_out)_lora\.(?:down|up)\.weight$", key).groups()
    return f"{attention}.{projection}" + (".0" if projection == "to_out" else "")


def test_text_encoder_lora_keys_at_real_depth(sdxl):
    import copy

    from peft.utils import get_peft_model_state_dict

    counts = {}
    for part, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        te = copy.deepcopy(sdxl[part])
        models.add_text_encoder_lora(te, rank=4)
        state = {f"{part}.{text_encoder_module_path(k)}": torch.zeros(1)
                 for k in get_peft_model_state_dict(te)}
        kohya = diffusers_to_kohya(state, 4.0)
        assert all(k.startswith(prefix + "text_model_encoder_layers_") for k in kohya)
        counts[part] = len(kohya) // 3
    assert counts == {"text_encoder": 12 * 4, "text_encoder_2": 32 * 4}


def test_regional_compilation_of_the_real_unet(sdxl):
    """70 transformer blocks of two widths (640 and 1280 channels): two graphs per input shape."""
    assert len(fast.repeated_blocks(sdxl["unet"])) == 70
    assert fast.block_kinds(sdxl["unet"]) == 2


def test_tokenizers_have_the_real_vocabulary_size(real_size, tmp_path):
    """The synthetic fallback keeps CLIP's size and its special tokens' ids (the text encoders' bos/eos)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab, merges, kind = real_size.clip_vocabulary(None)
    tokenizer = CLIPTokenizer.from_pretrained(real_size.write_clip_tokenizer(tmp_path / "tok", vocab, merges, pad_token="!"),
                                              model_max_length=77)
    config = CLIPTextConfig()
    assert len(tokenizer) == real_size.VOCAB_SIZE == config.vocab_size == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id) == (49406, 49407)
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids and ids[-1] == tokenizer.convert_tokens_to_ids("!")
    assert kind.startswith("synthetic")


def test_real_bpe_vocabulary_when_present(real_size, tmp_path):
    bpe = real_size.find_bpe(None)
    if bpe is None:
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz is not on this machine")
    from transformers import CLIPTokenizer

    vocab, merges, kind = real_size.clip_vocabulary(bpe)
    assert len(merges) == 48894 and kind.startswith("open_clip")
    tokenizer = CLIPTokenizer.from_pretrained(real_size.write_clip_tokenizer(tmp_path / "tok", vocab, merges), model_max_length=77)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids


def test_full_finetune_arithmetic(real_size):
    """fp32 weights + fp32 grads + two fp32 Adam moments: 16 bytes a parameter, 38.3 GiB for the UNet."""
    estimate = real_size.full_finetune_estimate(2_567_463_684, activations_gib=0.0)
    assert estimate["weights_fp32"] == estimate["grads_fp32"] == pytest.approx(9.56, abs=0.01)
    assert estimate["total_gib"] == pytest.approx(38.3, abs=0.05)


def test_load_components_in_the_training_precision(tiny_pipeline_dir):
    """Frozen parts loaded directly in bf16; corrupt's encoders without the UNet."""
    c = models.load_components(str(tiny_pipeline_dir), unet_dtype=torch.bfloat16, text_encoder_dtype=torch.bfloat16)
    assert c.unet.dtype == c.text_encoder.dtype == c.text_encoder_2.dtype == torch.bfloat16
    assert c.vae.dtype == torch.float32
    default = models.load_components(str(tiny_pipeline_dir))
    assert default.unet.dtype == default.text_encoder_2.dtype == torch.float32
    encoders = models.load_components(str(tiny_pipeline_dir), load_unet=False)
    assert encoders.unet is None and not any(p.requires_grad for p in encoders.vae.parameters())


@pytest.mark.slow
def test_memory_estimate_counts_activations_not_weights():
    """The meta-device trace behind BENCHMARKS.md's memory plan: frozen weights are not activations, the
    attention is flash-like (activations grow with the pixel count, not its square), checkpointing keeps
    a small part, and the LoRA is 5.8 M parameters."""
    spec = importlib.util.spec_from_file_location("memory_estimate", BENCHMARKS / "memory_estimate.py")
    estimate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(estimate)
    config = str(BENCHMARKS / "sdxl_base_config.json")
    unet = estimate.lora_unet(config, rank=4)
    small, large = (estimate.estimate(config, r, 1, 4, unet=unet) for r in (256, 512))
    assert small["lora_parameters"] == 5_806_080 and small["unet_parameters"] == 2_567_463_684
    a_small, a_large = small["activations_bytes"], large["activations_bytes"]
    assert 3.6 < a_large["bf16"]["no_checkpointing"] / a_small["bf16"]["no_checkpointing"] < 4.1
    assert a_large["bf16"]["no_checkpointing"] < a_large["autocast"]["no_checkpointing"]
    assert a_large["autocast"]["checkpointing"] < a_large["autocast"]["no_checkpointing"] / 5
    assert a_large["bf16"]["no_checkpointing"] < 2**31  # 1.4 GiB at 512 px: no weights, no T x T matrices
