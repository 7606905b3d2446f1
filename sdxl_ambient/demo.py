"""`sdxl-ambient demo`: the whole job on an embedded default, on a CPU with no network.

1. build a tiny SDXL-shaped pipeline with random weights (sdxl_ambient.tiny);
2. corrupt the 8 bundled real images to t_n = 100 once (the noisy-latent cache) and train a LoRA
   with the ambient objectives (configs/demo.yaml, through the same `train` entry point);
3. reload the LoRA into a plain diffusers pipeline and write a grid: base model above, LoRA below;
4. write the memorisation report (base vs ambient LoRA) with a tiny random DINOv2 embedder. With
   random weights everywhere its figures only show the report's form, not a finding.

A training stopped by Ctrl-C or SIGTERM (it saves a checkpoint) stops the demo with the same exit
status (130, 143) and one line saying how to resume; a failed training is the demo's error (2).
"""

from __future__ import annotations

import signal
import sys
import time
from importlib import resources
from pathlib import Path

import torch


def demo_config() -> Path:
    return Path(str(resources.files("sdxl_ambient") / "configs" / "demo.yaml"))


def demo_images() -> Path:
    return Path(str(resources.files("sdxl_ambient") / "assets" / "demo_images"))


STOPPED = {128 + signal.SIGINT: "Ctrl-C (SIGINT)", 128 + signal.SIGTERM: "SIGTERM"}  # training's exit status then
WRITES = ("tiny-sdxl", "tiny-dinov2", "lora", "demo_grid.png", "memorization")


def add_arguments(parser) -> None:
    from sdxl_ambient.config import add_max_train_steps_argument, add_output_folder_arguments

    add_output_folder_arguments(parser, default="demo_output", help="where the model, LoRA and grid go")
    add_max_train_steps_argument(parser, help="override the demo's step count")


def compare_grid(pipeline_dir: Path, lora_dir: Path, prompts: list[str], out: Path, resolution: int, seed: int = 0) -> Path:
    """Sample each prompt with the base pipeline and with the LoRA loaded, same noise; base row above."""
    from sdxl_ambient.images import image_grid
    from sdxl_ambient.pipelines import load_lora, load_pipeline, read_lora

    lora = read_lora(lora_dir, flag="the demo's LoRA")
    pipe = load_pipeline(str(pipeline_dir), device="cpu", dtype="float32")

    def row():
        g = torch.Generator().manual_seed(seed)
        return [pipe(p, num_inference_steps=10, height=resolution, width=resolution, generator=g).images[0] for p in prompts]

    base = row()
    load_lora(pipe, *lora, model=str(pipeline_dir), flag="the demo's LoRA")
    tuned = row()
    grid = image_grid(base + tuned, cols=len(prompts))
    grid.save(out)
    return out


def run(args) -> int:
    from sdxl_ambient.outputs import OutputFolder

    folder = OutputFolder(args.output_dir, command="demo", writes=WRITES)
    with folder.checked_and_locked([("the demo's images", demo_images())], args.overwrite_output_dir):
        folder.start(clear=folder.own())
        return run_demo(Path(args.output_dir), args.max_train_steps)


def run_demo(out: Path, max_train_steps: int | None) -> int:
    import yaml

    from sdxl_ambient.errors import UserError
    from sdxl_ambient.evaluation.memorization import evaluate_models, read_training_set
    from sdxl_ambient.files import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
    from sdxl_ambient.tiny import save_tiny_dinov2, save_tiny_pipeline
    from sdxl_ambient.train import main as train_main

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    start = time.time()
    pipeline_dir = save_tiny_pipeline(out / "tiny-sdxl")
    lora_dir = out / "lora"
    argv = ["--config", str(demo_config()), "--pretrained_model_name_or_path", str(pipeline_dir),
            "--train_data_dir", str(demo_images()), "--output_dir", str(lora_dir)]
    if max_train_steps:
        argv += ["--max_train_steps", str(max_train_steps)]
    status = train_main(argv)
    resume = f"sdxl-ambient train {' '.join(argv)} --resume_from_checkpoint latest"
    if status in STOPPED:  # Ctrl-C or SIGTERM: the training saved a checkpoint; the demo stops with the same status
        sys.stdout.flush()
        print(f"stopped: the demo's training was stopped by {STOPPED[status]} and saved a checkpoint; resume it with "
              f"{resume}, or run the demo again with --overwrite_output_dir", file=sys.stderr, flush=True)
        return status
    if status != 0:
        raise UserError(f"the demo's training stopped early (exit status {status}); run the same command again "
                        f"with --overwrite_output_dir, or resume it with {resume}")
    config = yaml.safe_load(demo_config().read_text())
    prompts = [record.caption for record in read_training_set(demo_images())[:4]]
    grid = compare_grid(pipeline_dir, lora_dir, prompts, out / "demo_grid.png", config["resolution"])
    report = evaluate_models(
        [("base", str(pipeline_dir), None), ("ambient", str(pipeline_dir), str(lora_dir))], demo_images(),
        out / "memorization", embedder=str(save_tiny_dinov2(out / "tiny-dinov2")),
        truncation={"ambient": config["ambient_timestep"]}, num_images=8, num_attack_images=4, attack_steps=5,
        resolution=config["resolution"], device="cpu", sample_kwargs={"num_inference_steps": 10})
    print(f"demo finished in {time.time() - start:.0f} s")
    print(f"  LoRA (diffusers format): {lora_dir / LORA_WEIGHT_NAME}")
    print(f"  LoRA (kohya/ComfyUI):    {lora_dir / KOHYA_WEIGHT_NAME}")
    print(f"  base vs LoRA samples:    {grid}")
    print(f"  memorisation report:     {report['markdown']}")
    return 0
