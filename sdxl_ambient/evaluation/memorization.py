"""``sdxl-ambient memorization``: how much fine-tuned models copy their training images.

Generation test: sample from the training captions, embed the samples and the training images
(DINOv2 CLS, L2-normalised; optionally CLIP) and report each sample's top-1 cosine similarity to
the training set: mean, percentiles, the fractions above 0.9 / 0.95 / 0.99, the closest pairs side
by side and a histogram, several models in one report.

Noise attack: noise training latents to a high timestep t (default 900),
x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, reconstruct them in one Tweedie step and by full
DDIM sampling from t, and score each reconstruction's similarity to its original. A model that
memorised its data recovers it from extreme noise.

SSCD is not offered: its weights are only distributed as TorchScript / pickle archives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from sdxl_ambient.data import DataSource, ImageRecord
from sdxl_ambient.errors import UserError
from sdxl_ambient.evaluation.similarity import paired_similarity, similarity_stats, top1_similarity
from sdxl_ambient.images import image_grid, open_image
from sdxl_ambient.objectives import check_ambient_timestep
from sdxl_ambient.sampling import DEFAULT_GUIDANCE_SCALE

# ----------------------------------------------------------------------------- data


def read_training_set(source: DataSource | str | Path) -> list[ImageRecord]:
    """The training images and captions, read as training reads them (:func:`data.collect_records`:
    ``metadata.jsonl`` / ``.csv``, kohya ``.txt`` captions, a ``save_to_disk`` folder or a Hub
    dataset; every image decoded once, broken ones an error or skipped, captions checked). A folder
    is read with the default columns. A noisy-latent dataset holds no images and is refused."""
    from sdxl_ambient.cache import is_latent_dataset
    from sdxl_ambient.data import check_captions, check_images, collect_records

    if not isinstance(source, DataSource):
        source = DataSource(train_data_dir=str(source))
    if source.train_data_dir and is_latent_dataset(source.train_data_dir):
        raise UserError(f"--train_data_dir {source.train_data_dir} is a noisy-latent dataset: the memorisation report "
                        "compares samples with the clean training images, so give the image folder it was made from")
    records, _ = check_images(collect_records(source), source.skip_broken_images)
    check_captions(records, source.allow_empty_captions)
    return records


# ----------------------------------------------------------------------------- measures


def embed_all(embedders: Mapping, images) -> dict[str, torch.Tensor]:
    return {name: embedder(images) for name, embedder in embedders.items()}


# ----------------------------------------------------------------------------- tests


def generation_test(pipe, captions: Sequence[str], train_embeddings: Mapping[str, torch.Tensor], embedders: Mapping, *,
                    num_images: int, batch_size: int = 4, seed: int = 0, resolution: int | None = None, **sample_kwargs) -> dict:
    """Sample ``num_images`` images from the training captions (cycled in order) and score each
    one's top-1 similarity to the training set with every embedder.

    Returns {"captions", "images", "by_embedder": {name: {"top1", "match_index", "stats"}}}."""
    from sdxl_ambient.sampling import generate_images

    if num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {num_images}")
    prompts = [captions[i % len(captions)] for i in range(num_images)]
    images, _ = generate_images(pipe, prompts, batch_size=batch_size, seed=seed, resolution=resolution, **sample_kwargs)
    return {"captions": prompts, "images": images, "by_embedder": score_top1(images, train_embeddings, embedders)}


def score_top1(images, train_embeddings: Mapping[str, torch.Tensor], embedders: Mapping) -> dict:
    """Top-1 similarity of ``images`` to the training embeddings, per embedder."""
    out = {}
    for name, emb in embed_all(embedders, images).items():
        values, indices = top1_similarity(emb, train_embeddings[name])
        out[name] = {"top1": values.tolist(), "match_index": indices.tolist(), "stats": similarity_stats(values)}
    return out


@torch.no_grad()
def noise_attack(pipe, images_or_latents, prompts: Sequence[str], embedders: Mapping, *, timestep: int = 900,
                 num_steps: int = 50, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, resolution: int | None = None) -> dict:
    """Noise training images (PIL images or paths, read by :func:`images.open_image`) or scaled latents to ``timestep``, reconstruct them in one
    Tweedie step and by ``num_steps`` DDIM steps (``sampling.ddim_reconstruct``), and score each
    reconstruction's cosine similarity to its original, per embedder.

    Returns {"originals", "one_step", "full": images, "scores": {method: {embedder: {"similarity", "stats"}}}}."""
    from sdxl_ambient.sampling import ddim_reconstruct, decode_latents, encode_conditioning, encode_images, noise_to

    if isinstance(images_or_latents, torch.Tensor):
        latents = images_or_latents.to(pipe.unet.device, pipe.unet.dtype)
        originals = decode_latents(pipe, latents)
    else:
        originals = [open_image(im) for im in images_or_latents]  # as training reads them
        resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        latents = encode_images(pipe, originals, resolution)
    if len(prompts) != latents.shape[0]:
        raise ValueError(f"noise_attack: {latents.shape[0]} images but {len(prompts)} prompts")
    height, width = (n * pipe.vae_scale_factor for n in latents.shape[-2:])
    cond = encode_conditioning(pipe, prompts, guidance_scale=guidance_scale, height=height, width=width)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    x_t = noise_to(latents.float(), timestep, noise, pipe.scheduler.alphas_cumprod)
    recon = {
        "one_step": decode_latents(pipe, ddim_reconstruct(pipe, cond, x_t, timestep, 1)),
        "full": decode_latents(pipe, ddim_reconstruct(pipe, cond, x_t, timestep, num_steps)),
    }
    reference = embed_all(embedders, originals)
    scores = {}
    for method, images in recon.items():
        scores[method] = {}
        for name, emb in embed_all(embedders, images).items():
            sim = paired_similarity(emb, reference[name])
            scores[method][name] = {"similarity": sim.tolist(), "stats": similarity_stats(sim)}
    return {"originals": originals, **recon, "scores": scores}


# ----------------------------------------------------------------------------- report


def _json_ready(result: dict) -> dict:
    """A model's results without the images (the PNGs hold those)."""
    out = {}
    if result.get("generation"):
        gen = result["generation"]
        out["generation"] = {"captions": gen["captions"], "by_embedder": gen["by_embedder"]}
    if result.get("noise_attack"):
        out["noise_attack"] = {"scores": result["noise_attack"]["scores"]}
    return out


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def summary_markdown(results_by_model: Mapping[str, dict], settings: Mapping) -> str:
    lines = ["# Memorisation report", ""]
    embedders = sorted({e for r in results_by_model.values() if r.get("generation") for e in r["generation"]["by_embedder"]})
    for emb in embedders:
        lines += [f"## Generation test ({emb}): top-1 cosine similarity to the training set", "",
                  "| model | n | mean | p50 | p95 | p99 | > 0.9 | > 0.95 | > 0.99 |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in results_by_model.items():
            s = r["generation"]["by_embedder"][emb]["stats"]
            lines.append(f"| {name} | {s['count']} | {_fmt(s['mean'])} | {_fmt(s['p50'])} | {_fmt(s['p95'])} | {_fmt(s['p99'])} | "
                         f"{_fmt(s['frac_above_0.9'])} | {_fmt(s['frac_above_0.95'])} | {_fmt(s['frac_above_0.99'])} |")
        lines.append("")
    attacked = {n: r["noise_attack"] for n, r in results_by_model.items() if r.get("noise_attack")}
    if attacked:
        t = settings.get("attack_timestep", "?")
        lines += [f"## Noise attack from t = {t}: similarity of the reconstruction to its original", "",
                  "| model | embedder | one step: mean | one step: > 0.9 | full: mean | full: > 0.9 |", "|---|---|---|---|---|---|"]
        for name, a in attacked.items():
            for emb in a["scores"]["one_step"]:
                one, full = a["scores"]["one_step"][emb]["stats"], a["scores"]["full"][emb]["stats"]
                lines.append(f"| {name} | {emb} | {_fmt(one['mean'])} | {_fmt(one['frac_above_0.9'])} | "
                             f"{_fmt(full['mean'])} | {_fmt(full['frac_above_0.9'])} |")
        lines.append("")
    lines += ["Figures: `histogram.png` (top-1 similarities), `top_matches.png` (closest generated / training pairs)"
              + (", `noise_attack.png` (original, one step, full sampling)" if attacked else "") + ".",
              "All numbers and settings: `memorization.json`.", ""]
    return "\n".join(lines)


def _top_matches_png(results_by_model, train_images, embedder: str, top_k: int) -> Image.Image:
    from sdxl_ambient.evaluation.report import match_pairs

    sheets = []
    for name, r in results_by_model.items():
        scores = r["generation"]["by_embedder"][embedder]
        order = sorted(range(len(scores["top1"])), key=lambda i: -scores["top1"][i])[:top_k]
        rows = [(r["generation"]["images"][i], train_images[scores["match_index"][i]],
                 f"{name}: {scores['top1'][i]:.3f} (train #{scores['match_index'][i]})") for i in order]
        sheets.append(match_pairs(rows, cell=160))
    width, height = sum(s.width for s in sheets) + 16 * (len(sheets) - 1), max(s.height for s in sheets)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for s in sheets:
        canvas.paste(s, (x, 0))
        x += s.width + 16
    return canvas


def _attack_png(results_by_model) -> Image.Image:
    rows = []
    for r in results_by_model.values():
        a = r.get("noise_attack")
        if a:
            rows += [a["originals"], a["one_step"], a["full"]]
    cols = max(len(row) for row in rows)
    cells = [im for row in rows for im in row + [Image.new("RGB", (8, 8), (255, 255, 255))] * (cols - len(row))]
    return image_grid(cells, cols=cols, cell=128)


def write_report(out_dir: str | Path, results_by_model: Mapping[str, dict], settings: Mapping,
                 train_images: Sequence[Image.Image] | None = None, top_k: int = 8) -> dict[str, Path]:
    """``memorization.json`` (every figure and the settings), ``memorization.md``, ``histogram.png``
    and, given the training images, ``top_matches.png``; ``noise_attack.png`` when an attack ran."""
    from sdxl_ambient.evaluation.report import histogram

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "memorization.json", "markdown": out / "memorization.md", "histogram": out / "histogram.png"}
    payload = {"settings": dict(settings), "models": {n: _json_ready(r) for n, r in results_by_model.items()}}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    paths["markdown"].write_text(summary_markdown(results_by_model, settings))
    with_gen = {n: r for n, r in results_by_model.items() if r.get("generation")}
    primary = next(iter(next(iter(with_gen.values()))["generation"]["by_embedder"])) if with_gen else None
    if primary:
        histogram({n: r["generation"]["by_embedder"][primary]["top1"] for n, r in with_gen.items()},
                  xlabel=f"top-1 cosine similarity to the training set ({primary})").save(paths["histogram"])
        if train_images is not None:
            paths["top_matches"] = out / "top_matches.png"
            _top_matches_png(with_gen, train_images, primary, top_k).save(paths["top_matches"])
    else:
        paths.pop("histogram")
    if any(r.get("noise_attack") for r in results_by_model.values()):
        paths["noise_attack"] = out / "noise_attack.png"
        _attack_png(results_by_model).save(paths["noise_attack"])
    return paths


# ----------------------------------------------------------------------------- command


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def parse_model_spec(spec: str) -> tuple[str, str, str | None]:
    """``NAME=BASE[:LORA]`` -> (name, base, lora or None). A Windows drive letter in BASE is kept."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise UserError(f"--model {spec!r}: expected NAME=BASE or NAME=BASE:LORA")
    skip = 2 if _DRIVE.match(rest) else 0
    cut = rest.find(":", skip)
    base, lora = (rest, None) if cut < 0 else (rest[:cut], rest[cut + 1:] or None)
    return name, base, lora


def parse_truncation(specs: Sequence[str] | None, names: Sequence[str]) -> dict[str, int]:
    """``NAME=T_N`` pairs -> {name: t_n}; every name must be one of the --model names."""
    out = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if not sep or name not in names or not value.isdigit():
            raise UserError(f"--ambient_timestep {spec!r}: expected NAME=T_N with NAME one of {list(names)}")
        check_ambient_timestep(int(value), where=f"--ambient_timestep {spec!r}: t_n")
        out[name] = int(value)
    return out


def model_timesteps(specs: Sequence[tuple[str, str, str | None]], given: dict[str, int]) -> dict[str, int]:
    """Each model's sampling t_n: given (``--ambient_timestep NAME=T_N``), else the level it was trained
    at (``pipelines.trained_timestep``), else 0 (full sampling)."""
    from sdxl_ambient.pipelines import trained_timestep

    return {name: given[name] if name in given else (trained_timestep(base, lora) or 0) for name, base, lora in specs}


REPORT_FILES = ("memorization.json", "memorization.md", "histogram.png", "top_matches.png", "noise_attack.png")


def add_arguments(parser) -> None:
    from sdxl_ambient.config import (
        add_data_source_arguments,
        add_embedder_arguments,
        add_model_arguments,
        add_output_folder_arguments,
        add_sampling_arguments,
    )

    add_data_source_arguments(parser)  # the fine-tuning set, read as training reads it
    parser.add_argument("--model", action="append", required=True, metavar="NAME=BASE[:LORA]",
                        help="a model to test (repeat for several): base model or full fine-tune, optional LoRA")
    parser.add_argument("--ambient_timestep", action="append", metavar="NAME=T_N",
                        help="sample model NAME truncated at t_n (0: full sampling). Default: the t_n in the "
                             "training_settings.json beside its LoRA (or in its fine-tune's folder), else 0")
    add_embedder_arguments(parser)
    parser.add_argument("--num_images", type=int, default=100, help="images generated per model")
    parser.add_argument("--num_attack_images", type=int, default=8, help="training images in the noise attack (0: skip it)")
    parser.add_argument("--attack_timestep", type=int, default=900)
    parser.add_argument("--attack_steps", type=int, default=50, help="DDIM steps of the full reconstruction")
    parser.add_argument("--top_k", type=int, default=8, help="closest pairs shown per model in top_matches.png")
    add_output_folder_arguments(parser)
    add_model_arguments(parser, base=False)
    add_sampling_arguments(parser)


def check_models(specs: Sequence[tuple[str, str, str | None]], pipeline_kwargs: Mapping | None = None) -> None:
    """Every model and LoRA of the report, checked before anything loads (not each in its turn, after the
    models before it were measured): the pipeline's files as training checks them
    (``models.check_pipeline_files``), the LoRA file, a local VAE folder."""
    from sdxl_ambient.models import check_pipeline_files, lora_file, vae_source

    kwargs = dict(pipeline_kwargs or {})
    for _, base, lora in specs:
        check_pipeline_files(base, kwargs.get("revision"), kwargs.get("variant"), flag="--model")
        if lora:
            lora_file(lora, flag="--model")
    if kwargs.get("vae_path"):
        vae_source(kwargs["vae_path"])


def evaluate_models(specs: Sequence[tuple[str, str, str | None]], source: DataSource | str | Path, output_dir, *,
                    embedder: str, clip_model: str | None = None, truncation: Mapping[str, int] | None = None,
                    num_images: int = 100, num_attack_images: int = 8, attack_timestep: int = 900, attack_steps: int = 50,
                    top_k: int = 8, seed: int = 0, resolution: int = 1024, batch_size: int = 4, device=None,
                    pipeline_kwargs: Mapping | None = None, sample_kwargs: Mapping | None = None,
                    settings: Mapping | None = None, before_writing=None) -> dict[str, Path]:
    """The generation test and the noise attack for each (name, base, lora) model against the
    training set ``source`` (:func:`read_training_set`); writes the report (:func:`write_report`) and returns its paths.
    ``before_writing()``, if given, is called once everything is measured, right before the report is written."""
    from sdxl_ambient.data import load_image
    from sdxl_ambient.evaluation.features import ClipImageEmbedder, DinoV2Embedder
    from sdxl_ambient.models import resolve_device
    from sdxl_ambient.pipelines import load_pipeline, read_lora

    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--model names must be distinct, got {names}")
    check_models(specs, pipeline_kwargs)
    for name, _, lora in specs:  # a damaged LoRA file is named before any work
        if lora:
            read_lora(lora, flag=f"--model {name}")
    truncation = dict(truncation or {})
    train = read_training_set(source)  # every image decoded and caption checked, still before anything loads
    train_images = [load_image(r) for r in train]
    captions = [r.caption for r in train]
    device = resolve_device(device)
    embedders = {"dinov2": DinoV2Embedder(embedder, device=device)}
    if clip_model:
        embedders["clip"] = ClipImageEmbedder(clip_model, device=device)
    train_embeddings = embed_all(embedders, train_images)
    n_attack = min(num_attack_images, len(train))
    guidance = dict(sample_kwargs or {}).get("guidance_scale", DEFAULT_GUIDANCE_SCALE)

    results = {}
    for name, base, lora in specs:
        pipe = load_pipeline(base, lora_path=lora, device=str(device), lora_flag=f"--model {name}",
                             **dict(pipeline_kwargs or {}))
        generation = generation_test(pipe, captions, train_embeddings, embedders, num_images=num_images,
                                     batch_size=batch_size, seed=seed, resolution=resolution,
                                     ambient_timestep=truncation.get(name, 0), **dict(sample_kwargs or {}))
        attack = noise_attack(pipe, train_images[:n_attack], captions[:n_attack], embedders, timestep=attack_timestep,
                              num_steps=attack_steps, guidance_scale=guidance, seed=seed,
                              resolution=resolution) if n_attack else None
        results[name] = {"generation": generation, "noise_attack": attack}
        print(f"{name}: mean top-1 {generation['by_embedder']['dinov2']['stats']['mean']:.3f}")
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

    record = dict(settings or {})
    record.update(models={n: {"base": b, "lora": lora, "ambient_timestep": truncation.get(n, 0)} for n, b, lora in specs},
                  attack_timestep=attack_timestep, training_images=[r.key for r in train],
                  sscd="not available (weights only as TorchScript/pickle)")
    if before_writing is not None:
        before_writing()
    return write_report(output_dir, results, record, train_images=train_images, top_k=top_k)


def run(args) -> int:
    from sdxl_ambient.config import check_sampling_flags, data_source, data_source_paths, model_paths
    from sdxl_ambient.outputs import OutputFolder

    check_sampling_flags(args)
    specs = [parse_model_spec(s) for s in args.model]
    inputs = [*model_paths(args, base=False), *data_source_paths(args), ("--embedder", args.embedder), ("--clip_model", args.clip_model),
              *[("--model", path) for _, base, lora in specs for path in (base, lora)]]
    folder = OutputFolder(args.output_dir, command="memorization", writes=REPORT_FILES)
    with folder.checked_and_locked(inputs, args.overwrite_output_dir):
        paths = evaluate_models(
            specs, data_source(args), args.output_dir, embedder=args.embedder, clip_model=args.clip_model,
            truncation=model_timesteps(specs, parse_truncation(args.ambient_timestep, [s[0] for s in specs])),
            num_images=args.num_images, num_attack_images=args.num_attack_images, attack_timestep=args.attack_timestep,
            attack_steps=args.attack_steps, top_k=args.top_k, seed=args.seed, resolution=args.resolution,
            batch_size=args.batch_size, device=args.device,
            pipeline_kwargs=dict(vae_path=args.pretrained_vae_model_name_or_path, revision=args.revision,
                                 variant=args.variant, scheduler=args.scheduler, dtype=args.dtype),
            sample_kwargs=dict(jump_margin=args.jump_margin, num_inference_steps=args.num_inference_steps,
                               guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt),
            settings=vars(args), before_writing=lambda: folder.start(clear=folder.own()))
    print(f"report: {paths['markdown']}")
    return 0
