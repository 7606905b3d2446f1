"""The whole job at SDXL-base's real size, with random weights, driven from the outside.

Builds a diffusers SDXL folder from SDXL-base's public component configs (``sdxl_base_config.json``:
UNet 2,567,463,684 parameters, VAE, CLIP-L and OpenCLIP-G text encoders, scheduler) with random
weights, two CLIP tokenizers of the real vocabulary size (49,408 tokens) and a few images at SDXL
sizes, then runs the project's commands on it as a user would, each in a subprocess:

    load-*        models.load_components three ways: the UNet made float32 (what --finetune full trains),
                  frozen parts in bf16 (the LoRA trainer's call), no UNet (corrupt's call)
    corrupt       sdxl-ambient corrupt at 1024 px (aspect-ratio buckets) on a few images
    train-512     accelerate launch train_sdxl_ambient.py: LoRA, bf16, 512 px, a few steps
    train-1024    the same, one step at 1024 px on the corrupt dataset (gradient checkpointing)
    train-te      --train_text_encoder, 512 px
    train-cons    --consistency_weight > 0 on the whole batch (every step), 512 px
    train-full    --finetune full, one step, only where the memory arithmetic says it fits
    lora-load     both saved LoRA files (diffusers, kohya) through pipe.load_lora_weights, compared
    generate      sdxl-ambient generate, truncated at t_n, 1024 px
    memorization  sdxl-ambient memorization, one generated image

Each phase prints its wall time and peak RSS (the largest resident set of any process of the phase,
from wait4, and the largest totals of its process tree, resident and anonymous, sampled), and the
load average; a watchdog stops a phase whose process tree holds more anonymous memory than
``--max_rss_gib``. At the end a Markdown table and a JSON report (``WORKDIR/real_size.json``).

Tokenizer: SDXL's real BPE vocabulary ships in open_clip_torch's wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz``; ``--bpe`` takes that file or the wheel itself (not a
dependency of the project). Without it a synthetic byte-level vocabulary padded to 49,408 tokens
is written; the report says which one ran.

    python benchmarks/real_size.py run --workdir /tmp/sdxl-real --bpe open_clip_torch-3.3.0-py3-none-any.whl
    python benchmarks/real_size.py build --workdir /tmp/sdxl-real           # the folder only
    python benchmarks/real_size.py check-lora --pipeline P --lora DIR       # one phase by hand
    python benchmarks/real_size.py run --workdir /tmp/sdxl-tiny --config tiny   # rehearsal, minutes
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CONFIG = Path(__file__).resolve().parent / "sdxl_base_config.json"
TRAIN_SCRIPT = ROOT / "train_sdxl_ambient.py"
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
GIB = 2**30
# Images the benchmark trains on: (height, width), one per SDXL aspect-ratio bucket family.
IMAGE_SIZES = ((1024, 1024), (768, 1344), (1152, 896), (1024, 1024))
CAPTIONS = ("an astronaut in a white suit with a flag", "a red motorcycle parked on a street",
            "a rocket on its launch pad at dusk", "a cup of coffee on a saucer")
NUM_IMAGES = 3
PHASES = ("load-fp32", "load-bf16", "load-encoders", "corrupt", "train-512", "train-1024", "train-te", "train-cons", "train-full",
          "lora-load", "generate", "memorization")


# ----------------------------------------------------------------------------- tokenizer


def _bpe_bytes(bpe: str | os.PathLike) -> bytes:
    """The gzipped BPE merge list, from the .txt.gz itself or from inside an open_clip_torch wheel."""
    path = Path(bpe)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return gzip.decompress(wheel.read(f"open_clip/{BPE_NAME}"))
    return gzip.decompress(path.read_bytes())


def find_bpe(given: str | None) -> Path | None:
    """``--bpe``, else the installed open_clip's file, else ``~/.cache/sdxl-ambient``'s; None when absent."""
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--bpe {given}: no such file")
        return Path(given)
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec and spec.origin and (Path(spec.origin).parent / BPE_NAME).is_file():
            return Path(spec.origin).parent / BPE_NAME
    except (ImportError, ValueError):
        pass
    cached = Path.home() / ".cache" / "sdxl-ambient" / BPE_NAME
    return cached if cached.is_file() else None


def clip_vocabulary(bpe: str | os.PathLike | None) -> tuple[dict[str, int], list[str], str]:
    """(vocab, merges, kind): CLIP's 49,408-token vocabulary built as open_clip's SimpleTokenizer builds
    it (256 byte tokens, the same word-final, 48,894 merges, the two special tokens last), or, without
    the BPE file, the byte tokens, no merges and unused filler tokens up to the same size, with the
    special tokens at the same ids (49406, 49407)."""
    from sdxl_ambient.tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    if bpe is not None:
        lines = _bpe_bytes(bpe).decode("utf-8").split("\n")
        merges = lines[1:49152 - 256 - 2 + 1]
        tokens += ["".join(m.split()) for m in merges]
        kind = f"open_clip BPE ({BPE_NAME})"
    else:
        merges = []
        tokens += [f"<|unused_{i}|>" for i in range(VOCAB_SIZE - 2 - len(tokens))]
        kind = "synthetic byte-level, padded"
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"the CLIP vocabulary has {len(vocab)} tokens, not {VOCAB_SIZE}")
    return vocab, merges, kind


def write_clip_tokenizer(directory: str | os.PathLike, vocab: dict, merges: list[str], pad_token: str = EOS) -> Path:
    """vocab.json, merges.txt and configs that ``CLIPTokenizer.from_pretrained(directory)`` reads
    (77 tokens; SDXL's tokenizer pads with the end token, its tokenizer_2 with ``!``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}))
    return directory


# ----------------------------------------------------------------------------- the random pipeline


def tiny_config() -> dict:
    """SDXL's layout at the tiny model's widths (``sdxl_ambient.tiny``) with the real vocabulary size: every
    phase in minutes, to rehearse the commands (``run --tiny``), not to measure them."""
    from sdxl_ambient.tiny import SDXL_SCHEDULER_CONFIG, tiny_unet_config

    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                vocab_size=VOCAB_SIZE, hidden_act="gelu", projection_dim=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16, 16], layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8,
               sample_size=64, scaling_factor=0.13025)
    return {"unet": tiny_unet_config(), "vae": vae, "text_encoder": text, "text_encoder_2": dict(text),
            "scheduler": dict(SDXL_SCHEDULER_CONFIG)}


def load_config(path: str | os.PathLike = DEFAULT_CONFIG) -> dict:
    """SDXL-base's component configs; keys starting with ``_`` are comments; ``"tiny"``: ``tiny_config()``."""
    if str(path) == "tiny":
        return tiny_config()
    data = json.loads(Path(path).read_text())
    missing = [k for k in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing component config(s) {', '.join(missing)}")
    return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in data.items() if not k.startswith("_")}


@contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_components(config: dict, seed: int = 0, dtype=None, device="cpu") -> dict:
    """The five models of SDXL-base with random weights, made directly in ``dtype`` (default bf16:
    the UNet takes 5.1 GB instead of a 10.3 GB fp32 peak); the VAE in fp32, as SDXL's VAE runs.
    ``device="meta"`` builds shapes only (no memory, no time)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    with torch.device(device):
        with default_dtype(dtype):
            unet = UNet2DConditionModel(**config["unet"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
        vae = AutoencoderKL(**config["vae"])
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "scheduler": EulerDiscreteScheduler(**config["scheduler"])}


def build_pipeline(out_dir: str | os.PathLike, config: dict, bpe: Path | None, seed: int = 0, device: str = "cpu") -> dict:
    """Save the random real-size pipeline as a diffusers folder (safetensors); returns what was built."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    vocab, merges, kind = clip_vocabulary(bpe)
    tok_dir = out_dir.parent / f"{out_dir.name}-tokenizers"
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_dir / "tokenizer", vocab, merges), model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_dir / "tokenizer_2", vocab, merges, pad_token="!"),
                                                model_max_length=77)
    parts = build_components(config, seed, device=device)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if name != "scheduler"}
    pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, **parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    del pipe, parts
    info = {"tokenizer": kind, "vocab_size": len(tokenizer), "parameters": counts, "weights_dtype": "bfloat16 (VAE float32)",
            "seed": seed}
    (out_dir / "real_size_build.json").write_text(json.dumps(info, indent=2))
    assert len(tokenizer) == VOCAB_SIZE and torch.is_tensor(tokenizer("a cat", return_tensors="pt").input_ids)
    return info


def write_images(folder: str | os.PathLike, sizes=IMAGE_SIZES[:NUM_IMAGES], captions=CAPTIONS) -> Path:
    """The bundled demo photographs, resized to SDXL sizes, with a metadata.jsonl of captions."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    demo = ROOT / "sdxl_ambient" / "assets" / "demo_images"
    sources = [demo / n for n in ("astronaut.jpg", "motorcycle_left.jpg", "rocket.jpg", "coffee.jpg")]
    rows = []
    for i, ((h, w), caption) in enumerate(zip(sizes, captions)):
        with Image.open(sources[i % len(sources)]) as im:
            name = f"image_{i}_{h}x{w}.png"
            im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(folder / name)
        rows.append({"file_name": name, "text": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def build_workdir(workdir: Path, config_path, bpe_arg, seed: int = 0, device: str = "cpu", num_images: int = NUM_IMAGES) -> dict:
    """pipeline/, images/, dinov2/ (the tiny random embedder memorization reads) in ``workdir``; the
    random weights are drawn on ``device`` (a GPU draws them in seconds)."""
    from sdxl_ambient.tiny import save_tiny_dinov2

    workdir.mkdir(parents=True, exist_ok=True)
    bpe = find_bpe(bpe_arg)
    pipeline = workdir / "pipeline"
    if (pipeline / "real_size_build.json").is_file():
        info = json.loads((pipeline / "real_size_build.json").read_text())
    else:
        info = build_pipeline(pipeline, load_config(config_path), bpe, seed, device)
    write_images(workdir / "images", IMAGE_SIZES[:num_images])
    save_tiny_dinov2(workdir / "dinov2")
    return info


# ----------------------------------------------------------------------------- measuring a subprocess


def _status_bytes(pid: int, keys=("RssAnon", "RssShmem")) -> int:
    """Bytes of the given /proc/PID/status fields (kB); anonymous + shared memory is what a process
    holds in RAM, while its file-backed pages (RssFile: mapped safetensors files) can be dropped and
    read again."""
    total = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                total += int(value.split()[0]) * 1024
    return total


def _tree_memory(root_pid: int) -> tuple[int, int]:
    """(resident bytes, anonymous + shared bytes) of ``root_pid`` and all its descendants (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    rss = anon = 0
    for pid in tree:
        try:
            rss += _status_bytes(pid, ("VmRSS",))
            anon += _status_bytes(pid)
        except (OSError, ValueError):
            continue
    return rss, anon


def run_measured(name: str, cmd: list[str], log_path: Path, env: dict, max_rss_gib: float, timeout_s: float) -> dict:
    """Run ``cmd`` (output to ``log_path``) and measure it: wall time, peak RSS of its largest process
    (wait4's ru_maxrss covers the process and the descendants it waited for), peak RSS and peak
    anonymous memory of the whole tree (sampled every 0.5 s) and the load average. The tree is
    stopped when its anonymous memory passes ``max_rss_gib`` (mapped weight files are not counted
    there: the kernel can drop those pages) or after ``timeout_s``."""
    load_before = os.getloadavg()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        state = {"peak_tree": 0, "peak_anon": 0, "killed": None, "loads": []}
        done = threading.Event()

        def watch():
            while not done.wait(0.5):
                rss, anon = _tree_memory(proc.pid)
                state["peak_tree"], state["peak_anon"] = max(state["peak_tree"], rss), max(state["peak_anon"], anon)
                state["loads"].append(os.getloadavg()[0])
                over_rss = anon > max_rss_gib * GIB
                over_time = time.perf_counter() - start > timeout_s
                if (over_rss or over_time) and state["killed"] is None:
                    state["killed"] = f"anonymous memory over {max_rss_gib} GiB" if over_rss else f"over {timeout_s:.0f} s"
                    os.killpg(proc.pid, signal.SIGKILL)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    loads = state["loads"] or [os.getloadavg()[0]]
    return {
        "phase": name, "returncode": proc.returncode, "wall_s": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
        "peak_tree_rss_gib": round(state["peak_tree"] / GIB, 2), "peak_tree_anon_gib": round(state["peak_anon"] / GIB, 2),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "load_mean_1min": round(sum(loads) / len(loads), 2), "stopped": state["killed"], "log": str(log_path),
    }


# ----------------------------------------------------------------------------- the phases


def subprocess_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "sdxl_ambient.cli", *map(str, args)]


def launch(*args, mixed_precision: str = "bf16", num_processes: int = 1, config_file: str | None = None) -> list[str]:
    """``accelerate launch train_sdxl_ambient.py ARGS`` (one process, bf16)."""
    head = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        head += ["--config_file", config_file]
    else:
        head += ["--num_machines", "1", "--num_processes", str(num_processes), "--dynamo_backend", "no"]
    return head + ["--mixed_precision", mixed_precision, str(TRAIN_SCRIPT), *map(str, args)]


def train_args(work: Path, name: str, steps: int, *extra) -> list:
    return ["--pretrained_model_name_or_path", work / "pipeline", "--output_dir", work / name, "--overwrite_output_dir",
            "--report_to", "none", "--seed", 0, "--learning_rate", 1e-4, "--lr_warmup_steps", 0, "--rank", 4,
            "--checkpointing_steps", 10_000, "--logging_steps", 1, "--train_batch_size", 1, "--max_train_steps", steps,
            "--mixed_precision", "bf16", "--ambient_timestep", 100, *extra]


def full_finetune_estimate(unet_parameters: int, activations_gib: float = 6.0) -> dict:
    """Host memory of one --finetune full step as the trainer sets it up: fp32 master weights, fp32
    gradients, AdamW's two fp32 moments, plus activations (bf16 autocast, gradient checkpointing)."""
    n = unet_parameters
    parts = {"weights_fp32": 4 * n, "grads_fp32": 4 * n, "adam_moments_fp32": 8 * n}
    total = sum(parts.values()) / GIB + activations_gib
    return {**{k: round(v / GIB, 2) for k, v in parts.items()}, "activations": activations_gib, "total_gib": round(total, 1)}


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def plan(work: Path, args, unet_parameters: int) -> list[tuple[str, str, list[str] | None, str | None]]:
    """(phase, what it does, command or None, why skipped)."""
    images, corrupted, cache512 = work / "images", work / "corrupt-1024", work / "cache-512"
    t512 = ["--train_data_dir", images, "--resolution", 512, "--center_crop", "--cache_dir", cache512]
    n = args.steps_512
    full = full_finetune_estimate(unet_parameters)
    available = mem_available_gib()
    full_skip = None if full["total_gib"] < min(available, args.max_rss_gib) else (
        f"needs about {full['total_gib']} GiB (fp32 weights {full['weights_fp32']} + grads {full['grads_fp32']} + "
        f"Adam moments {full['adam_moments_fp32']} + activations ~{full['activations']}), over the "
        f"{min(available, args.max_rss_gib):.1f} GiB allowed here")
    load = [sys.executable, str(Path(__file__).resolve()), "load", "--pipeline", str(work / "pipeline")]
    return [
        ("load-fp32", "models.load_components with the UNet made float32 (as --finetune full loads it)", load, None),
        ("load-bf16", "models.load_components(unet_dtype=bf16, text_encoder_dtype=bf16): the LoRA trainer's call",
         [*load, "--dtype", "bf16"], None),
        ("load-encoders", "models.load_components(load_unet=False): corrupt's call", [*load, "--no_unet"], None),
        ("corrupt", f"sdxl-ambient corrupt, {NUM_IMAGES} images, 1024 px buckets, t_n=100",
         cli("corrupt", "--pretrained_model_name_or_path", work / "pipeline", "--train_data_dir", images,
             "--output_dir", corrupted, "--ambient_timestep", 100, "--resolution", 1024, "--enable_bucket",
             "--noise_seed", 0, "--device", "cpu"), None),
        ("train-512", f"LoRA r4, bf16, 512 px, {n} steps (cache built in the trainer)",
         launch(*train_args(work, "lora-512", n, *t512)), None),
        ("train-1024", "LoRA r4, bf16, 1024-px bucket, 1 step, --gradient_checkpointing, on the corrupt dataset",
         launch(*train_args(work, "lora-1024", 1, "--train_data_dir", corrupted, "--gradient_checkpointing")), None),
        ("train-te", f"LoRA r4 + --train_text_encoder, bf16, 512 px, {args.steps_other} steps",
         launch(*train_args(work, "lora-te-512", args.steps_other, *t512, "--train_text_encoder")), None),
        ("train-cons", f"LoRA r4 + --consistency_weight 0.1 on the whole batch, bf16, 512 px, {args.steps_other} steps",
         launch(*train_args(work, "lora-cons-512", args.steps_other, *t512, "--consistency_weight", 0.1,
                            "--consistency_fraction", 1)), None),  # batch 1 at 0.25 would run it one step in four
        ("train-full", "--finetune full, bf16 autocast, 512 px, 1 step, --gradient_checkpointing",
         launch(*train_args(work, "full-512", 1, *t512, "--finetune", "full", "--gradient_checkpointing")), full_skip),
        ("lora-load", "pipe.load_lora_weights: diffusers and kohya files of train-te (UNet + both text encoders)",
         [sys.executable, str(Path(__file__).resolve()), "check-lora", "--pipeline", str(work / "pipeline"),
          "--lora", str(work / "lora-te-512")], None),
        ("generate", "sdxl-ambient generate, LoRA of train-te, truncated at t_n=100, 3 steps, CFG 5, 1024 px, bf16",
         cli("generate", "--pretrained_model_name_or_path", work / "pipeline", "--lora_path", work / "lora-te-512",
             "--prompt", CAPTIONS[0], "--ambient_timestep", 100, "--num_inference_steps", 3, "--resolution", 1024,
             "--dtype", "bfloat16", "--device", "cpu", "--batch_size", 1, "--output_dir", work / "generate"), None),
        ("memorization", "sdxl-ambient memorization, 1 image, truncated at t_n=100, 2 steps, 1024 px, bf16, no attack",
         cli("memorization", "--train_data_dir", images, "--model", f"lora={work / 'pipeline'}:{work / 'lora-512'}",
             "--ambient_timestep", "lora=100", "--embedder", work / "dinov2", "--num_images", 1, "--num_attack_images", 0,
             "--num_inference_steps", 2, "--resolution", 1024, "--dtype", "bfloat16", "--device", "cpu",
             "--output_dir", work / "memorization"), None),
    ]


# ----------------------------------------------------------------------------- check-lora


def lora_factors(module) -> dict:
    """Per adapted layer of a peft-wrapped model (one adapter): (A, B, alpha / r), copied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and getattr(layer, "lora_A", None):
            (adapter,) = layer.lora_A.keys()
            out[name] = (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone(),
                         float(layer.scaling[adapter]))
    return out


def _update(factors):
    a, b, scale = factors
    return (b.float() @ a.float()) * scale


def check_lora(pipeline: str, lora: str) -> dict:
    """Load both saved LoRA files into the real-size pipeline with ``load_lora_weights`` and check that
    they adapt the same layers with the same updates (alpha / r) B A, and every layer the file holds.
    Only the low-rank factors are kept; each layer's full update is formed one at a time."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from sdxl_ambient.models import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, torch_dtype=torch.bfloat16, use_safetensors=True)
    parts = ("unet", "text_encoder", "text_encoder_2")
    result, loaded = {}, {}
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        with safe_open(str(Path(lora) / weight_name), framework="pt") as f:
            keys = list(f.keys())
        start = time.perf_counter()
        pipe.load_lora_weights(lora, weight_name=weight_name, use_safetensors=True)
        factors = {p: lora_factors(getattr(pipe, p)) for p in parts}
        result[weight_name] = {"tensors_in_file": len(keys), "load_s": round(time.perf_counter() - start, 1),
                               "adapted_layers": {p: len(d) for p, d in factors.items()}}
        loaded[weight_name] = factors
        pipe.unload_lora_weights()
    del pipe
    a, b = (loaded[w] for w in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME))
    worst = largest = 0.0
    for part in parts:
        if set(a[part]) != set(b[part]):
            raise AssertionError(f"{part}: the two files adapt different layers "
                                 f"({sorted(set(a[part]) ^ set(b[part]))[:3]})")
        for name in a[part]:
            update = _update(a[part][name])
            worst = max(worst, float((update - _update(b[part][name])).abs().max()))
            largest = max(largest, float(update.abs().max()))
    lora_a = result[LORA_WEIGHT_NAME]
    if 2 * sum(lora_a["adapted_layers"].values()) != lora_a["tensors_in_file"]:
        raise AssertionError(f"{lora_a['tensors_in_file']} tensors in the file, "
                             f"{sum(lora_a['adapted_layers'].values())} layers adapted")
    if worst > 1e-6 * max(largest, 1.0):
        raise AssertionError(f"the kohya file's updates differ from the diffusers file's by up to {worst}")
    result["max_abs_update_difference"] = worst
    result["max_abs_update"] = largest
    print(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- report


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def environment(argv: list[str], threads: int) -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": threads, "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
            "command": " ".join(["python", "benchmarks/real_size.py", *argv])}


def step_rate(log_path: str) -> str | None:
    """The trainer's last tqdm rate ("12.3s/it") from its log."""
    text = Path(log_path).read_text(errors="replace") if Path(log_path).is_file() else ""
    rates = re.findall(r"steps: .*?(\d+(?:\.\d+)?(?:s/it|it/s))", text)
    return rates[-1] if rates else None


def format_table(rows: list[dict]) -> str:
    lines = [("| phase | what | wall (s) | peak RSS, largest process (GiB) | peak RSS, process tree (GiB) | "
              "peak anonymous, process tree (GiB) | trainer rate | load 1-min (before / mean / after) | result |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['phase']} | {r['what']} | | | | | | | skipped: {r['skipped']} |")
            continue
        result = "ok" if r["returncode"] == 0 else f"FAILED rc={r['returncode']}" + (f" ({r['stopped']})" if r["stopped"] else "")
        lines.append(f"| {r['phase']} | {r['what']} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} | {r['peak_tree_rss_gib']:.2f} | "
                     f"{r['peak_tree_anon_gib']:.2f} | {r.get('rate') or ''} | "
                     f"{r['load_before'][0]:.2f} / {r['load_mean_1min']:.2f} / {r['load_after'][0]:.2f} | {result} |")
    return "\n".join(lines)


def run_all(args, argv: list[str]) -> int:
    work = Path(args.workdir).resolve()
    env = subprocess_env(args.threads)
    report = {"environment": environment(argv, args.threads), "phases": []}
    json_path = work / "real_size.json"

    def record(row):
        report["phases"].append(row)
        work.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        if row.get("skipped"):
            print(f"[{row['phase']}] skipped: {row['skipped']}", flush=True)
        else:
            print(f"[{row['phase']}] rc={row['returncode']} wall {row['wall_s']:.0f} s, peak RSS {row['peak_rss_gib']:.2f} GiB "
                  f"(tree {row['peak_tree_rss_gib']:.2f}, anonymous {row['peak_tree_anon_gib']:.2f}), "
                  f"load {row['load_before'][0]:.2f} -> {row['load_after'][0]:.2f}"
                  + (f", {row['rate']}" if row.get("rate") else "") + (f", STOPPED: {row['stopped']}" if row["stopped"] else ""),
                  flush=True)

    build_cmd = [sys.executable, str(Path(__file__).resolve()), "build", "--workdir", str(work), "--config", str(args.config),
                 "--seed", str(args.seed)] + (["--bpe", str(args.bpe)] if args.bpe else [])
    row = run_measured("build", build_cmd, work / "logs" / "build.log", env, args.max_rss_gib, args.phase_timeout_s)
    row["what"] = "random SDXL-base pipeline (bf16 weights) + tokenizers + images, saved"
    record(row)
    if row["returncode"] != 0:
        print(Path(row["log"]).read_text()[-3000:])
        return 1
    info = json.loads((work / "pipeline" / "real_size_build.json").read_text())
    report["build"] = info
    print(f"tokenizer: {info['tokenizer']}, {info['vocab_size']} tokens; parameters {info['parameters']}", flush=True)
    for phase, what, cmd, skipped in plan(work, args, info["parameters"]["unet"]):
        if phase not in args.phases:
            continue
        if skipped:
            record({"phase": phase, "what": what, "skipped": skipped})
            continue
        row = run_measured(phase, cmd, work / "logs" / f"{phase}.log", env, args.max_rss_gib, args.phase_timeout_s)
        row["what"] = what
        if phase.startswith("train"):
            row["rate"] = step_rate(row["log"])
        record(row)
        if row["returncode"] != 0:
            print(Path(row["log"]).read_text(errors="replace")[-2500:], flush=True)
    table = format_table(report["phases"])
    env_line = report["environment"]
    header = (f"{env_line['cpu']}, {env_line['cores']} cores, {env_line['threads']} torch threads, "
              f"{env_line['mem_total_gib']} GiB; torch {env_line['torch']}, diffusers {env_line['diffusers']}, "
              f"transformers {env_line['transformers']}, peft {env_line['peft']}, accelerate {env_line['accelerate']}; "
              f"tokenizer: {info['tokenizer']}")
    (work / "real_size.md").write_text(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table)
    return 0 if all(r.get("skipped") or r["returncode"] == 0 for r in report["phases"]) else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build, then every phase, measured")
    build = sub.add_parser("build", help="write the random real-size pipeline, tokenizers and images only")
    for q in (run, build):
        q.add_argument("--workdir", required=True, help="where the pipeline, data, outputs and logs go (about 8 GB)")
        q.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="SDXL-base component configs (JSON); 'tiny': the tiny widths, a rehearsal of the commands in minutes")
        q.add_argument("--bpe", default=None, help=f"open_clip's {BPE_NAME} or the open_clip_torch wheel holding it")
        q.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: seconds)")
    build.add_argument("--num_images", type=int, default=NUM_IMAGES, choices=range(1, len(IMAGE_SIZES) + 1))
    run.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    run.add_argument("--steps_512", type=int, default=3, help="LoRA steps of train-512")
    run.add_argument("--steps_other", type=int, default=2, help="steps of train-te and train-cons")
    run.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    run.add_argument("--max_rss_gib", type=float, default=14.0,
                     help="stop a phase whose process tree holds more anonymous memory than this (GiB)")
    run.add_argument("--phase_timeout_s", type=float, default=3600.0)
    load = sub.add_parser("load", help="models.load_components on a pipeline folder, as the commands load it")
    load.add_argument("--pipeline", required=True)
    load.add_argument("--dtype", choices=["bf16"], default=None, help="unet_dtype and text_encoder_dtype")
    load.add_argument("--no_unet", action="store_true")
    check = sub.add_parser("check-lora", help="load a run's two LoRA files with load_lora_weights and compare them")
    check.add_argument("--pipeline", required=True)
    check.add_argument("--lora", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "build":
        info = build_workdir(Path(args.workdir), args.config, args.bpe, args.seed, args.device, args.num_images)
        print(json.dumps(info, indent=2))
        return 0
    if args.command == "load":
        import torch

        from sdxl_ambient.models import load_components

        dtype = torch.bfloat16 if args.dtype else None
        c = load_components(args.pipeline, unet_dtype=dtype, text_encoder_dtype=dtype, load_unet=not args.no_unet)
        print({name: None if m is None else str(m.dtype) for name, m in
               (("unet", c.unet), ("text_encoder", c.text_encoder), ("text_encoder_2", c.text_encoder_2), ("vae", c.vae))})
        return 0
    if args.command == "check-lora":
        check_lora(args.pipeline, args.lora)
        return 0
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
