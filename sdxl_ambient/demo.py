"""`sdxl-ambient demo`: the whole job on an embedded default, on a CPU with no network.

1. build a tiny SDXL-shaped pipeline with random weights (sdxl_ambient.tiny);
2. corrupt the 8 bundled real images to t_n = 100 once (the noisy-latent cache) and train a LoRA
   with the ambient objectives (configs/demo.yaml, through the same `train` entry point);
3. reload the LoRA into a plain diffusers pipeline and write a grid: base model above, LoRA below;
4. write the memorisation report (base vs ambient LoRA) with a tiny random DINOv2 embedder. With
   random weights everywhere its figures only show the report's form, not a finding.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch


def demo_config() -> Path:
    return Path(str(resources.files("sdxl_ambient") / "configs" / "demo.yaml"))


def demo_images() -> Path:
    return Path(str(resources.files("sdxl_ambient") / "assets" / "demo_images"))


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", default="demo_output", help="where the model, LoRA and grid go")
    parser.add_argument("--max_train_steps", type=int, default=None, help="override the demo's step count")
    parser.add_argument("--overwrite_output_dir", action="store_true")


def compare_grid(pipeline_dir: Path, lora_dir: Path, prompts: list[str], out: Path, resolution: int, seed: int = 0) -> Path:
    """Sample each prompt with the base pipeline and with the LoRA loaded, same noise; base row above."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl_ambient.evaluation.report import image_grid

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def row():
        g = torch.Generator().manual_seed(seed)
        return [pipe(p, num_inference_steps=10, height=resolution, width=resolution, generator=g).images[0] for p in prompts]

    base = row()
    pipe.load_lora_weights(lora_dir)
    tuned = row()
    grid = image_grid(base + tuned, cols=len(prompts))
    grid.save(out)
    return out


def run(args) -> int:
    import yaml

    from sdxl_ambient.cli import main as cli_main
    from sdxl_ambient.evaluation.memorization import read_training_set
    from sdxl_ambient.tiny import save_tiny_dinov2, save_tiny_pipeline
    from sdxl_ambient.train import main as train_main

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out = Path(args.output_dir)
    start = time.time()
    pipeline_dir = save_tiny_pipeline(out / "tiny-sdxl")
    lora_dir = out / "lora"
    argv = ["--config", str(demo_config()), "--pretrained_model_name_or_path", str(pipeline_dir),
            "--train_data_dir", str(demo_images()), "--output_dir", str(lora_dir)]
    if args.max_train_steps:
        argv += ["--max_train_steps", str(args.max_train_steps)]
    if args.overwrite_output_dir:
        argv += ["--overwrite_output_dir"]
    train_main(argv)
    config = yaml.safe_load(demo_config().read_text())
    prompts = [record["caption"] for record in read_training_set(demo_images())[:4]]
    grid = compare_grid(pipeline_dir, lora_dir, prompts, out / "demo_grid.png", config["resolution"])
    report = out / "memorization"
    cli_main(["memorization", "--train_data_dir", str(demo_images()), "--model", f"base={pipeline_dir}",
              "--model", f"ambient={pipeline_dir}:{lora_dir}", "--ambient_timestep", f"ambient={config['ambient_timestep']}",
              "--embedder", str(save_tiny_dinov2(out / "tiny-dinov2")), "--num_images", "8", "--num_attack_images", "4",
              "--attack_steps", "5", "--num_inference_steps", "10", "--resolution", str(config["resolution"]),
              "--output_dir", str(report)])
    print(f"demo finished in {time.time() - start:.0f} s")
    print(f"  LoRA (diffusers format): {lora_dir / 'pytorch_lora_weights.safetensors'}")
    print(f"  LoRA (kohya/ComfyUI):    {lora_dir / 'pytorch_lora_weights_kohya.safetensors'}")
    print(f"  base vs LoRA samples:    {grid}")
    print(f"  memorisation report:     {report / 'memorization.md'}")
    return 0
