"""``sdxl-ambient quality``: FID and KID of generated images against reference images, CLIP score.

Both distances are torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with a
feature extractor chosen by ``--features``:

- ``dinov2`` (default): the DINOv2 CLS token, unnormalised (FD-DINOv2), weights from ``--embedder``
  (a local folder or a Hub name);
- ``clip``: CLIP's projected image embedding from ``--clip_model``;
- ``inception``: torchmetrics' InceptionV3 (the classic FID); it downloads its weights on first use,
  so it is used only when asked for.

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)); KID is the unbiased MMD^2 with the cubic
polynomial kernel, averaged over random subsets. CLIP score = 100 * mean(max(cos(image, caption), 0))
with the captions from the generated folder's ``metadata.jsonl`` (as ``sdxl-ambient generate`` writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl_ambient.errors import UserError
from sdxl_ambient.evaluation.features import pil_to_tensor
from sdxl_ambient.images import is_image_file, load_images

FEATURES = ("dinov2", "clip", "inception")


class EmbedderFeatures(torch.nn.Module):
    """An embedder as a torchmetrics feature extractor: (N, 3, H, W) images in [0, 1] (or uint8)
    -> (N, D) float features."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder
        self.num_features = embedder.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed_tensor(images)


def image_files(folder: str | Path, flag: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if is_image_file(p) and p.name != "grid.png")
    if len(files) < 2:
        raise UserError(f"{flag} {folder}: need at least 2 images, found {len(files)}")
    return files


def image_batches(files: list[Path], size: int, batch_size: int):
    """(N, 3, size, size) float batches in [0, 1], center-cropped."""
    for i in range(0, len(files), batch_size):
        yield pil_to_tensor(load_images(files[i:i + batch_size]), size)


def feature_extractor(kind: str, embedder: str | None, clip_model: str | None, device) -> torch.nn.Module | int:
    """The ``feature`` argument of the torchmetrics metrics for ``--features kind``."""
    from sdxl_ambient.evaluation.features import ClipImageEmbedder, DinoV2Embedder

    if kind == "dinov2":
        return EmbedderFeatures(DinoV2Embedder(embedder, device=device, normalize=False))
    if kind == "clip":
        if not clip_model:
            raise UserError("--features clip needs --clip_model")
        return EmbedderFeatures(ClipImageEmbedder(clip_model, device=device, normalize=False))
    if kind == "inception":
        return 2048
    raise ValueError(f"--features must be one of {FEATURES}, got {kind!r}")


@torch.no_grad()
def fid_kid(generated: list[Path], reference: list[Path], feature, *, size: int = 299, batch_size: int = 32,
            kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID and KID (mean, std) of two image sets with one feature extractor (a module or an
    Inception feature size). KID's subset size is capped at the smaller set's size."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(kid_subset_size, len(generated), len(reference))
    torch.manual_seed(seed)
    fid = FrechetInceptionDistance(feature=feature, normalize=True)
    kid = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=subset, normalize=True)
    for files, real in ((reference, True), (generated, False)):
        for batch in image_batches(files, size, batch_size):
            fid.update(batch, real=real)
            kid.update(batch, real=real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std), "kid_subset_size": subset,
            "num_generated": len(generated), "num_reference": len(reference)}


@torch.no_grad()
def clip_score(images, captions: list[str], clip_embedder) -> dict:
    """100 * max(cos(image, caption), 0) per image: its mean and std."""
    if len(images) != len(captions):
        raise ValueError(f"clip_score: {len(images)} images but {len(captions)} captions")
    img = torch.nn.functional.normalize(clip_embedder(images), dim=-1)
    txt = torch.nn.functional.normalize(clip_embedder.embed_text(captions), dim=-1)
    scores = 100 * (img * txt).sum(-1).clamp(min=0)
    return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std()) if len(scores) > 1 else 0.0}


def generated_captions(folder: Path, files: list[Path]) -> list[str]:
    """Each generated file's caption from the folder's metadata.jsonl."""
    from sdxl_ambient.data import read_metadata

    by_name = {Path(r["file_name"]).name: str(r["text"]) for r in read_metadata(folder) or []}
    missing = [f.name for f in files if f.name not in by_name]
    if missing:
        raise UserError(f"--generated {folder}: metadata.jsonl has no caption for {missing[:3]}")
    return [by_name[f.name] for f in files]


REPORT_FILES = ("quality.json", "quality.md")


def add_arguments(parser) -> None:
    from sdxl_ambient.config import add_device_argument, add_embedder_arguments, add_output_folder_arguments

    parser.add_argument("--generated", required=True, help="folder of generated images")
    parser.add_argument("--reference", required=True, help="folder of reference images")
    parser.add_argument("--features", choices=FEATURES, default="dinov2",
                        help="feature extractor for FID/KID (inception downloads torchmetrics' weights)")
    add_embedder_arguments(parser)
    parser.add_argument("--kid_subsets", type=int, default=100)
    parser.add_argument("--kid_subset_size", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    add_output_folder_arguments(parser)
    add_device_argument(parser)


def run(args) -> int:
    from sdxl_ambient.outputs import OutputFolder

    inputs = [("--generated", args.generated), ("--reference", args.reference), ("--embedder", args.embedder),
              ("--clip_model", args.clip_model)]
    folder = OutputFolder(args.output_dir, command="quality", writes=REPORT_FILES)
    with folder.checked_and_locked(inputs, args.overwrite_output_dir):
        results = measure(args)
        folder.start(clear=folder.own())
        write_report(Path(args.output_dir), args, results)
    print(json.dumps(results, indent=2))
    return 0


def write_report(out: Path, args, results: dict) -> None:
    """``quality.json`` (settings and results) and ``quality.md`` (a table)."""
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "quality.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2, default=str))
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    feats = args.features if args.features != "dinov2" else f"dinov2 ({args.embedder})"
    (out / "quality.md").write_text("\n".join([f"# Quality: {args.generated} vs {args.reference}", "",
                                               f"Features: {feats}.", "", "| metric | value |", "|---|---|", *rows, ""]))


def measure(args) -> dict:
    """FID and KID of --generated against --reference, and the CLIP score with --clip_model."""
    from sdxl_ambient.evaluation.features import ClipImageEmbedder
    from sdxl_ambient.models import resolve_device

    device = resolve_device(args.device)
    generated, reference = image_files(args.generated, "--generated"), image_files(args.reference, "--reference")
    feature = feature_extractor(args.features, args.embedder, args.clip_model, device)
    size = 299 if isinstance(feature, int) else feature.embedder.size
    results = fid_kid(generated, reference, feature, size=size, batch_size=args.batch_size, kid_subsets=args.kid_subsets,
                      kid_subset_size=args.kid_subset_size, seed=args.seed)
    if args.clip_model:
        clip = feature.embedder if args.features == "clip" else ClipImageEmbedder(args.clip_model, device=device)
        results.update(clip_score(load_images(generated), generated_captions(Path(args.generated), generated), clip))
    return results
