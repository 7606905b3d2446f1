"""sdxl_ambient.compile: regional compilation gives eager's losses and weights, one graph per static
shape, and the step reads nothing back to the host."""

import copy
import os

import pytest
import torch

from sdxl_ambient import compile as fast
from sdxl_ambient import models
from sdxl_ambient.step import AmbientObjective, conditioned_unet
from sdxl_ambient.tiny import (
    SDXL_SCHEDULER_CONFIG,
    TINY_POOLED_DIM,
    TINY_TEXT_DIM,
    tiny_unet_config,
)


@pytest.fixture(scope="module")
def lora_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    unet.requires_grad_(False)
    models.add_unet_lora(unet, rank=4)
    for name, p in unet.named_parameters():  # B != 0, so the adapter changes the output from the first step
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return unet


@pytest.fixture(scope="module")
def abar():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG).alphas_cumprod


def batch(b=2, size=8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "observed": torch.randn(b, 4, size, size, generator=g).to(device),
        "observed_timestep": torch.full((b,), 100, dtype=torch.long).to(device),
        "prompt_embeds": torch.randn(b, 77, 2 * TINY_TEXT_DIM, generator=g).to(device),
        "pooled_prompt_embeds": torch.randn(b, TINY_POOLED_DIM, generator=g).to(device),
        "time_ids": torch.tensor([8.0 * size, 8 * size, 0, 0, 8 * size, 8 * size]).repeat(b, 1).to(device),
    }


def train(unet, objective, batches, steps, seed=0):
    """The trainer's step: conditioned UNet, objective, backward, clip, fused AdamW; losses per step."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        data = batches[i % len(batches)]
        net = conditioned_unet(unet, data["prompt_embeds"], data["pooled_prompt_embeds"], data["time_ids"])
        losses = objective(net, data["observed"], data["observed_timestep"], generator=generator)
        loss = losses["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(torch.stack([losses["loss"].detach(), losses["ambient"].detach(), losses["consistency"].detach()]))
    return torch.stack(out), {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_compiled_step_matches_eager(lora_unet, abar):
    """Inductor-compiled blocks: the same per-sample losses at every step and the same LoRA weights
    after three optimizer steps of AmbientObjective (with the consistency term) as eager."""
    torch._dynamo.reset()
    objective = AmbientObjective(alphas_cumprod=abar, consistency_weight=0.5, consistency_max_delta=100,
                                 consistency_fraction=1.0)
    batches = [batch(seed=0), batch(seed=1)]
    eager_losses, eager_weights = train(copy.deepcopy(lora_unet), objective, batches, steps=3)
    compiled = copy.deepcopy(lora_unet)
    assert fast.compile_unet(compiled) == len(fast.repeated_blocks(compiled)) == 4  # down, mid, 2 up
    compiled_losses, compiled_weights = train(compiled, objective, batches, steps=3)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-6)
    for name, weight in eager_weights.items():
        # Adam divides by sqrt(v): float reordering in the fused kernels moves a weight by up to ~1e-4 of lr 1e-2
        torch.testing.assert_close(compiled_weights[name], weight, rtol=0, atol=2e-4, msg=name)
    start = {n: p for n, p in lora_unet.named_parameters() if p.requires_grad}
    assert any(not torch.equal(start[n], w) for n, w in compiled_weights.items())  # the steps did train


def test_static_shapes_compile_once_per_shape(lora_unet, abar):
    """dynamic=False: one graph per (block kind, input shape), none again when a shape comes back."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward

    unet = copy.deepcopy(lora_unet)
    fast.compile_unet(unet, backend=counting_backend)
    kinds = fast.block_kinds(unet)
    assert kinds == 1  # the tiny UNet's four blocks share one width (64 channels)
    shapes = fast.step_shapes([(8, 8), (8, 8), (8, 12), (8, 12)], batch_size=2)
    assert shapes == [(2, 8, 8), (2, 8, 12)]
    fast.configure_static_shapes(len(shapes), kinds)
    objective = AmbientObjective(alphas_cumprod=abar)
    with torch.no_grad():
        for size in ((8, 8), (8, 12), (8, 8), (8, 12)):
            data = batch()
            data["observed"] = torch.randn(2, 4, *size)
            objective(conditioned_unet(unet, data["prompt_embeds"], data["pooled_prompt_embeds"], data["time_ids"]),
                      data["observed"], data["observed_timestep"])
    assert len(graphs) == len(shapes) * kinds == 2


def test_step_shapes_count_chains_and_short_batches():
    latents = [(128, 128)] * 5 + [(96, 168)] * 2 + [(112, 144)]
    assert fast.step_shapes(latents, 2) == [(2, 96, 168), (2, 128, 128)]  # (112, 144) has no full batch
    assert fast.step_shapes(latents, 2, consistency=True) == [(2, 96, 168), (2, 128, 128), (4, 96, 168), (4, 128, 128)]
    assert fast.step_shapes(latents, 2, drop_last=False) == [(1, 112, 144), (1, 128, 128), (2, 96, 168), (2, 128, 128)]


def test_compile_unet_refuses_a_model_without_repeated_blocks():
    with pytest.raises(ValueError, match="none of the repeated blocks"):
        fast.compile_unet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        fast.compile_unet(torch.nn.Linear(2, 2), mode="fast")


def _step(unet, objective, data, generator=None):
    params = [p for p in unet.parameters() if p.requires_grad]
    net = conditioned_unet(unet, data["prompt_embeds"], data["pooled_prompt_embeds"], data["time_ids"])
    losses = objective(net, data["observed"], data["observed_timestep"], generator=generator)
    losses["loss"].mean().backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    return losses


@pytest.mark.parametrize("consistency_weight", [0.0, 0.5])
def test_step_on_a_stand_in_accelerator_reads_nothing_back(lora_unet, abar, consistency_weight):
    """The step (draws, conditioned UNet, losses, backward, clipping) with everything on the meta device:
    no value read on the host, no data-dependent shape, no tensor copied in from the CPU."""
    unet = copy.deepcopy(lora_unet).to("meta")
    objective = AmbientObjective(alphas_cumprod=abar.to("meta"), consistency_weight=consistency_weight,
                                 consistency_max_delta=100, consistency_fraction=1.0)
    data = batch(device="meta")
    with fast.HostSyncCheck() as check:
        _step(unet, objective, data)
    assert check.events == []


def test_step_on_the_cpu_reads_nothing_back(lora_unet, abar):
    """The same step with real numbers (CPU, seeded generator): no host read either."""
    objective = AmbientObjective(alphas_cumprod=abar, consistency_weight=0.5, consistency_max_delta=100, consistency_fraction=1.0)
    unet, data = copy.deepcopy(lora_unet), batch()
    with fast.HostSyncCheck() as check:
        _step(unet, objective, data, generator=torch.Generator().manual_seed(0))
    assert check.events == []


def test_host_sync_check_sees_what_it_must():
    x = torch.randn(4)
    with fast.HostSyncCheck() as check:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        torch.nonzero(x)
        x.to("meta")
        torch.tensor(1.0).to("meta")
        x * torch.tensor(2.0)  # a CPU number in an op: read as a scalar, no copy
    kinds = [(e.kind, e.op) for e in check.events]
    assert kinds.count(("reads a value", "_local_scalar_dense")) == 2
    assert ("data-dependent shape", "index with a boolean mask") in kinds and ("data-dependent shape", "nonzero") in kinds
    assert [e.detail for e in check.events if e.kind == "copy between devices"] == ["['cpu'] -> ['meta']"] * 2


def test_a_cpu_table_entering_the_step_is_seen(lora_unet, abar):
    """The noise schedule left on the CPU while the batch is on the accelerator: a copy every step."""
    unet = copy.deepcopy(lora_unet).to("meta")
    data = batch(device="meta")
    with fast.HostSyncCheck() as check:
        _step(unet, AmbientObjective(alphas_cumprod=abar), data)
    assert {(e.kind, e.detail) for e in check.events} == {("copy between devices", "['cpu'] -> ['meta']")}
    assert all(f"sdxl_ambient{os.sep}step.py:" in e.where for e in check.events), check.events  # named where it happens


@pytest.mark.slow
def test_compiled_blocks_under_gradient_checkpointing(lora_unet, abar):
    """--gradient_checkpointing recomputes the compiled blocks in the backward pass: still eager's numbers
    (aot_eager: the same graph as inductor's input, without code generation)."""
    torch._dynamo.reset()
    objective = AmbientObjective(alphas_cumprod=abar, consistency_weight=0.5, consistency_max_delta=100, consistency_fraction=1.0)
    runs = []
    for compiled in (False, True):
        unet = copy.deepcopy(lora_unet)
        unet.enable_gradient_checkpointing()
        if compiled:
            fast.compile_unet(unet, backend="aot_eager")
        runs.append(train(unet, objective, [batch()], steps=2))
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-7)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # inductor compiles each block's graphs on the CPU
def test_the_trainer_with_torch_compile_trains_as_eager(tmp_path, tiny_pipeline_dir, image_folder, caplog, monkeypatch):
    """`--torch_compile` compiles the UNet's repeated blocks in the trainer and leaves the training
    unchanged: the same batches (a partial last batch included) and, within float tolerance, the same
    losses at every step and LoRA as the eager run, with the consistency term on part of each batch."""
    import logging

    from helpers.training import lora_weights, run_inprocess, tiny_args
    from sdxl_ambient import train

    losses, forward_backward = [], train.forward_backward

    def recording(run, batch, step):
        terms = forward_backward(run, batch, step)
        losses[-1].append(terms.detach().clone())  # (loss, ambient, consistency) of each micro-batch
        return terms

    monkeypatch.setattr(train, "forward_backward", recording)

    torch._dynamo.reset()  # no graphs of the other tests' UNets on the blocks' shared code object
    lines = (image_folder / "metadata.jsonl").read_text().splitlines()[:5]  # 5 images, batch 2: a partial batch
    (image_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    common = ("--consistency_weight", "1", "--consistency_fraction", "0.5")
    losses.append([])
    assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "eager", *common, steps=3)) == 0
    losses.append([])
    with caplog.at_level(logging.INFO, logger="sdxl_ambient"):
        assert run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, tmp_path / "compiled", *common, "--torch_compile",
                                       steps=3)) == 0
    assert "--torch_compile: compiled 4 repeated blocks" in caplog.text
    assert len(losses[0]) == len(losses[1]) == 3 and bool(torch.stack(losses[0])[:, 2].ne(0).any())
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=1e-4, atol=1e-5)
    eager, compiled = lora_weights(tmp_path / "eager"), lora_weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    assert all(torch.count_nonzero(v) > 0 for k, v in compiled.items() if "lora_B" in k)  # trained off its zero start
