"""Sampling: the Tweedie jump, truncated sampling's timesteps, DDIM reconstruction, the generate command."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from helpers import assert_one_line_error
from helpers.diffusion import gaussian_epsilon, gaussian_flow_solution, reference_ddim
from sdxl_ambient import sampling
from sdxl_ambient.cli import main
from sdxl_ambient.tiny import SDXL_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    p = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, use_safetensors=True)
    p.set_progress_bar_config(disable=True)
    return p


def record_unet(pipe, monkeypatch):
    """Wrap unet.forward to record (input, timestep, output) of every call."""
    calls = []
    forward = pipe.unet.forward

    def recording(sample, timestep, *args, **kwargs):
        out = forward(sample, timestep, *args, **kwargs)
        calls.append((sample.clone(), float(timestep), out[0].clone()))
        return out

    monkeypatch.setattr(pipe.unet, "forward", recording)
    return calls


def test_truncated_timesteps_keep_those_at_or_above_tn_plus_margin():
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    kept = sampling.truncated_timesteps(scheduler, 20, stop_timestep=500, jump_margin=40)
    assert kept.tolist() == [951, 901, 851, 801, 751, 701, 651, 601, 551]
    assert sampling.truncated_timesteps(scheduler, 20, 500, jump_margin=0).tolist()[-1] == 501
    assert sampling.truncated_timesteps(scheduler, 20, 461, jump_margin=40).tolist()[-1] == 501  # t_n + margin itself is kept
    with pytest.raises(ValueError, match="jump_margin"):
        sampling.truncated_timesteps(scheduler, 20, 950, jump_margin=40)
    with pytest.raises(ValueError, match="stop_timestep > 0"):
        sampling.truncated_timesteps(scheduler, 20, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_tweedie_jump_recovers_x0_from_exact_model_output(prediction_type):
    from sdxl_ambient.objectives import model_output_from_x0

    abar = DDPMScheduler(**SDXL_SCHEDULER_CONFIG).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900])
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = model_output_from_x0(x0, x_t, t, abar, prediction_type)
    torch.testing.assert_close(sampling.tweedie_jump(out, x_t, t, abar, prediction_type), x0, atol=1e-4, rtol=1e-4)


def test_fractional_timesteps_interpolate_log_sigma():
    abar = DDPMScheduler(**SDXL_SCHEDULER_CONFIG).alphas_cumprod
    at = sampling.abar_at_timestep(abar, torch.tensor([300.0, 300.5, 301.0]))
    torch.testing.assert_close(at[[0, 2]].float(), abar[[300, 301]])
    sigma = ((1 - at) / at).sqrt()
    assert abs(float(sigma[1].log() - (sigma[0].log() + sigma[2].log()) / 2)) < 1e-9


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_truncated_sampling_calls_unet_at_documented_timesteps_and_jumps_from_the_last(pipe, monkeypatch, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    calls = record_unet(pipe, monkeypatch)
    guidance = 3.0
    images = sampling.sample(pipe, ["a red cube", "a blue ball"], ambient_timestep=300, jump_margin=50,
                             num_inference_steps=10, guidance_scale=guidance, height=64, width=64,
                             generator=torch.Generator().manual_seed(0))
    expected = sampling.truncated_timesteps(scheduler_cls.from_config(pipe.scheduler.config), 10, 300, 50)
    assert [t for _, t, _ in calls] == expected.float().tolist()
    assert min(t for _, t, _ in calls) >= 350
    # The decoded image is E[x0 | x_t] from the guided output of the last call, at its timestep.
    x_in, t, out = calls[-1]
    assert x_in.shape[0] == 4  # unconditional and conditional halves
    uncond, text = out.chunk(2)
    guided = uncond + guidance * (text - uncond)
    a = pipe.scheduler.alphas_cumprod[int(t)]
    x0 = (x_in.chunk(2)[0] - (1 - a).sqrt() * guided) / a.sqrt()
    manual = sampling.decode_latents(pipe, x0)
    for got, want in zip(images, manual):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def test_plain_sampling_runs_every_step(pipe, monkeypatch):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    calls = record_unet(pipe, monkeypatch)
    images = sampling.sample(pipe, ["a cat"], num_inference_steps=5, guidance_scale=1.0, height=64, width=64)
    assert len(calls) == 5 and calls[-1][1] < 300
    assert images[0].size == (64, 64)


class GaussianUNet(torch.nn.Module):
    """The exact epsilon-predictor of Gaussian data x0 ~ N(mu, diag(std^2)) whose mean is set by the prompt:
    mu = 0 for the unconditional half (prompt embeddings 0), ``mean`` for the conditional one (embeddings 1).
    Its answer differs at every timestep, so a wrong DDIM step or guidance shows in the result."""

    def __init__(self, mean, std, alphas_cumprod):
        super().__init__()
        self.mean, self.std, self.abar, self.dtype = mean.double(), std.double(), alphas_cumprod.double(), torch.float32
        self.timesteps = []

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        self.timesteps.append(int(t))
        which = encoder_hidden_states[:, 0, 0].double().view(-1, 1, 1, 1)  # 0: unconditional, 1: conditional
        eps = gaussian_epsilon(which * self.mean, self.std, x.double(), self.abar[int(t)])
        return (eps.float(),)


def _gaussian_case(std_scale: float):
    scheduler = DDPMScheduler(**SDXL_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    std = std_scale * (0.2 + torch.rand(1, 4, 8, 8, generator=g, dtype=torch.float64))  # a different scale per element
    cond = sampling.Conditioning(torch.cat([torch.zeros(2, 77, 8), torch.ones(2, 77, 8)]), torch.zeros(4, 8),
                                 torch.zeros(4, 6), guidance_scale=2.0)
    x0 = mean + std * torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x_t = sampling.noise_to(x0.float(), 900, torch.randn(x0.shape, generator=g), scheduler.alphas_cumprod)
    return scheduler, mean, std, cond, x_t


@pytest.mark.parametrize("num_steps, timesteps", [(1, [900]), (3, [900, 600, 300]), (7, [900, 771, 643, 514, 386, 257, 129])])
def test_ddim_reconstruction_is_exact_ddim_on_gaussian_data(num_steps, timesteps):
    """The exact Gaussian denoiser under guidance w: eps_u + w (eps_c - eps_u) is the denoiser of mean w * mu, so
    ddim_reconstruct must equal DDIM computed here from its formula with that denoiser, at the documented timesteps."""
    scheduler, mean, std, cond, x_t = _gaussian_case(1.0)
    unet = GaussianUNet(mean, std, scheduler.alphas_cumprod)
    got = sampling.ddim_reconstruct(SimpleNamespace(unet=unet, scheduler=scheduler), cond, x_t, 900, num_steps)
    assert unet.timesteps == timesteps == sampling.ddim_timesteps(900, num_steps).tolist()
    guided_mean = cond.guidance_scale * mean
    expected = reference_ddim(lambda x, t: gaussian_epsilon(guided_mean, std, x, scheduler.alphas_cumprod[t].double()),
                              x_t, timesteps, scheduler.alphas_cumprod)
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-4)
    unguided = reference_ddim(lambda x, t: gaussian_epsilon(mean, std, x, scheduler.alphas_cumprod[t].double()),
                              x_t, timesteps, scheduler.alphas_cumprod)
    assert (got.double() - unguided).abs().max() > 0.1  # the guidance changes the answer: the comparison has teeth


def test_ddim_reconstruction_converges_to_the_exact_flow_and_recovers_memorised_data():
    """Many DDIM steps follow the probability-flow ODE, whose solution is known in closed form for Gaussian
    data; data of tiny variance (a memorised point) is recovered from t = 900."""
    scheduler, mean, std, cond, x_t = _gaussian_case(1.0)
    abar = scheduler.alphas_cumprod.double()
    unet = GaussianUNet(mean, std, scheduler.alphas_cumprod)
    fine = sampling.ddim_reconstruct(SimpleNamespace(unet=unet, scheduler=scheduler), cond, x_t, 900, 300)
    exact = gaussian_flow_solution(2.0 * mean, std, x_t, abar[900], abar[unet.timesteps[-1]])
    coarse = sampling.ddim_reconstruct(SimpleNamespace(unet=unet, scheduler=scheduler), cond, x_t, 900, 3)
    assert (fine.double() - exact).abs().max() < 0.02 < (coarse.double() - exact).abs().max()

    scheduler, mean, std, cond, x_t = _gaussian_case(1e-3)
    point = sampling.ddim_reconstruct(SimpleNamespace(unet=GaussianUNet(mean, std, scheduler.alphas_cumprod),
                                                      scheduler=scheduler), cond, x_t, 900, 7)
    torch.testing.assert_close(point.double(), (2.0 * mean).expand_as(point), atol=2e-2, rtol=0)


def test_encode_then_decode_keeps_image_size(pipe):
    image = Image.new("RGB", (96, 80), (200, 30, 30))
    z = sampling.encode_images(pipe, [image], 64)
    assert z.shape == (1, 4, 8, 8)
    assert sampling.decode_latents(pipe, z)[0].size == (64, 64)


def _write_lora(pipe_dir, out_dir):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    p = StableDiffusionXLPipeline.from_pretrained(pipe_dir, use_safetensors=True)
    p.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in p.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(p.unet), safe_serialization=True)
    return out_dir


def test_generate_command_writes_images_grid_and_settings(tiny_pipeline_dir, tmp_path):
    common = ["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--prompt", "a red cube", "--prompt", "a ball",
              "--num_images_per_prompt", "2", "--resolution", "64", "--num_inference_steps", "6", "--seed", "3"]
    assert main(common + ["--ambient_timestep", "400", "--scheduler", "DDIMScheduler", "--output_dir", str(tmp_path / "a")]) == 0
    out = tmp_path / "a"
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert Image.open(out / "grid.png").size == (128, 128)
    settings = json.loads((out / "generate.json").read_text())
    assert settings["ambient_timestep"] == 400 and settings["scheduler_class"] == "DDIMScheduler"
    assert [json.loads(line)["text"] for line in (out / "metadata.jsonl").read_text().splitlines()] == ["a red cube"] * 2 + ["a ball"] * 2

    lora = _write_lora(tiny_pipeline_dir, tmp_path / "lora")
    assert main(common + ["--lora_path", str(lora), "--output_dir", str(tmp_path / "lora_out")]) == 0
    assert main(common + ["--output_dir", str(tmp_path / "base_out")]) == 0
    with_lora = np.asarray(Image.open(tmp_path / "lora_out" / "00000.png"), dtype=int)
    without = np.asarray(Image.open(tmp_path / "base_out" / "00000.png"), dtype=int)
    assert np.abs(with_lora - without).max() > 0


def test_generate_rejects_bad_flags(tiny_pipeline_dir, tmp_path, capsys):
    base = ["generate", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--prompt", "x", "--resolution", "64",
            "--output_dir", str(tmp_path / "out")]
    assert_one_line_error(capsys, main(base + ["--scheduler", "NoSuchScheduler"]), "--scheduler 'NoSuchScheduler'")
    (tmp_path / "weights.bin").write_bytes(b"")
    assert_one_line_error(capsys, main(base + ["--lora_path", str(tmp_path / "weights.bin")]), "--lora_path", "only .safetensors")
    assert_one_line_error(capsys, main(base[:3] + ["--prompts_file", str(tmp_path / "missing.txt"), "--output_dir",
                                                   str(tmp_path / "out")]), "--prompts_file", "no such file")
    assert_one_line_error(capsys, main(base + ["--num_inference_steps", "3.5"]), "--num_inference_steps", "3.5")


@pytest.fixture
def no_pipelines(monkeypatch):
    """Fail the test if a command loads a pipeline: its flags must be checked first."""
    from sdxl_ambient import generate, pipelines

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the flags were checked")

    monkeypatch.setattr(pipelines, "load_pipeline", refuse)
    monkeypatch.setattr(generate, "load_pipeline", refuse)


SAMPLING_FLAG_ERRORS = [
    (["--batch_size", "0"], "--batch_size 0 must be >= 1"),
    (["--num_inference_steps", "0"], "--num_inference_steps 0 must be >= 1"),
    (["--resolution", "100"], "--resolution 100 must be a positive multiple of 8"),
    (["--jump_margin", "-1"], "--jump_margin -1 must be >= 0"),
]


@pytest.mark.parametrize("extra, fragment", [
    (["--ambient_timestep", "1000"], "--ambient_timestep 1000 must be in [0, 1000)"),
    (["--ambient_timestep", "-1"], "--ambient_timestep -1 must be in [0, 1000)"),
    *SAMPLING_FLAG_ERRORS,
])
def test_generate_refuses_bad_sampling_flags_in_one_line_before_loading(no_pipelines, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    assert_one_line_error(capsys, main(["generate", "--pretrained_model_name_or_path", str(tmp_path / "model"),
                                        "--prompt", "x", "--output_dir", str(out), *extra]), fragment)
    assert not out.exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--ambient_timestep", "a=1000"], "--ambient_timestep 'a=1000': t_n 1000 must be in [0, 1000)"),
    (["--ambient_timestep", "a=-1"], "--ambient_timestep 'a=-1': expected NAME=T_N"),
    *SAMPLING_FLAG_ERRORS,
])
def test_memorization_refuses_bad_sampling_flags_in_one_line_before_loading(no_pipelines, tmp_path, capsys, image_folder,
                                                                             extra, fragment):
    out = tmp_path / "out"
    assert_one_line_error(capsys, main(["memorization", "--model", f"a={tmp_path / 'model'}", "--train_data_dir",
                                        str(image_folder), "--output_dir", str(out), *extra]), fragment)
    assert not out.exists()


def test_sampling_timesteps_include_both_ends():
    assert sampling.sampling_timesteps(4, stop=199).tolist() == [999, 799, 599, 399, 199]
    assert sampling.sampling_timesteps(10, stop=995).tolist() == [999, 998, 997, 996, 995]
    assert sampling.sampling_timesteps(2).tolist() == [999, 500, 0]
    with pytest.raises(ValueError, match="stop"):
        sampling.sampling_timesteps(3, stop=1000)


def test_ddim_denoise_returns_the_denoiser_at_the_last_timestep_and_lands_on_a_point_mass():
    """Exact denoiser of a single point: DDIM reaches it from pure noise, and the value returned is
    the denoiser's output at the last timestep (the Tweedie jump when that is t_n + margin)."""
    abar = DDPMScheduler(**SDXL_SCHEDULER_CONFIG).alphas_cumprod
    x0 = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def point(x, t):
        seen.append(t.clone())
        return x0.expand_as(x)

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sampling.ddim_denoise(point, noise, sampling.sampling_timesteps(5, stop=300), abar)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1))
    assert [int(t[0]) for t in seen] == [999, 859, 719, 580, 440, 300] and all(t.shape == (3,) for t in seen)

    def shrunk(x, t):  # E[x0 | x_t] of x0 ~ N(0, I): sqrt(abar) x_t
        return abar[t].sqrt().view(-1, 1, 1, 1) * x

    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    once = sampling.ddim_denoise(shrunk, x_t, torch.tensor([600]), abar)
    torch.testing.assert_close(once, abar[600].sqrt() * x_t)


def test_handoff_denoiser_switches_to_the_base_below_the_threshold():
    def model(x, t):
        return torch.ones_like(x)

    def base(x, t):
        return -torch.ones_like(x)

    h = sampling.handoff_denoiser(model, base, below=300)
    x = torch.zeros(4, 2)
    assert h(x, torch.full((4,), 300)).eq(1).all() and h(x, torch.full((4,), 299)).eq(-1).all()
    assert h(x, torch.tensor([100, 299, 300, 900]))[:, 0].tolist() == [-1, -1, 1, 1]


class _OneProcess:
    """The part of accelerate that validation sampling uses."""

    device = torch.device("cpu")
    is_main_process = True
    trackers = []

    def unwrap_model(self, model):
        return model

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_validation_images_of_an_ambient_run_are_the_truncated_samples_generate_makes(tiny_pipeline_dir, monkeypatch):
    """For data at t_n > 0 the validation images are the Tweedie-jump samples that `generate` makes of
    the same model (the sampler that won on real images); for clean data the pipeline's full sampling."""
    from sdxl_ambient import models, validation
    from sdxl_ambient.pipelines import load_pipeline

    components = models.load_components(str(tiny_pipeline_dir))
    settings = validation.ValidationSettings(prompt="a ginger cat", num_images=1, inference_steps=4, resolution=64)
    prompts = validation.encode_prompts(components, settings)
    jumps, real = [], sampling.truncated_denoise
    monkeypatch.setattr(sampling, "truncated_denoise", lambda pipe, cond, latents, ts, g=None: jumps.append(ts) or real(
        pipe, cond, latents, ts, g))
    truncated = validation.sample_images(components, settings, prompts, _OneProcess(), torch.float32, seed=3,
                                         ambient_timestep=300)
    assert len(jumps) == 1 and float(jumps[0].min()) >= 300 + sampling.DEFAULT_JUMP_MARGIN
    full = validation.sample_images(components, settings, prompts, _OneProcess(), torch.float32, seed=3)
    assert len(jumps) == 1  # clean data: the pipeline's own full sampling
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="float32", scheduler="EulerDiscreteScheduler")
    expected = sampling.sample(pipe, ["a ginger cat"], ambient_timestep=300, num_inference_steps=4, height=64, width=64,
                               generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(np.asarray(truncated[0], dtype=float), np.asarray(expected[0], dtype=float), atol=1)
    assert np.abs(np.asarray(full[0], dtype=float) - np.asarray(truncated[0], dtype=float)).max() > 0


def test_generate_and_memorization_sample_a_model_at_its_trained_level_by_default(tiny_pipeline_dir, tmp_path, capsys):
    """A model folder whose training_settings.json records t_n = 300 is sampled truncated there unless
    --ambient_timestep says otherwise; a model without one is sampled to t = 0."""
    import shutil

    from sdxl_ambient.evaluation.memorization import model_timesteps

    model = tmp_path / "finetuned"
    shutil.copytree(tiny_pipeline_dir, model)
    (model / "training_settings.json").write_text(json.dumps({"ambient_timestep": None, "resolved": {"ambient_timestep": 300}}))

    def generate(name, *extra):
        out = tmp_path / name
        assert main(["generate", "--pretrained_model_name_or_path", str(model), "--prompt", "a cat", "--resolution", "64",
                     "--num_inference_steps", "4", "--output_dir", str(out), *extra]) == 0
        return json.loads((out / "generate.json").read_text())["ambient_timestep"], np.asarray(Image.open(out / "00000.png"))

    default, given, full = generate("default"), generate("given", "--ambient_timestep", "300"), generate("full", "--ambient_timestep", "0")
    assert (default[0], given[0], full[0]) == (300, 300, 0)
    assert np.array_equal(default[1], given[1]) and not np.array_equal(default[1], full[1])
    assert "truncated at the trained t_n = 300" in capsys.readouterr().out
    specs = [("tuned", str(model), None), ("base", str(tiny_pipeline_dir), None), ("forced", str(model), None)]
    assert model_timesteps(specs, {"forced": 0}) == {"tuned": 300, "base": 0, "forced": 0}
