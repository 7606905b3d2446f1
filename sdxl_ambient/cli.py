"""The ``sdxl-ambient`` command: one subcommand per job.

Each subcommand lives in the module that does the work; the module exposes
``add_arguments(parser)`` and ``run(args)``. ``train`` takes the training script's own
flags (see ``sdxl_ambient.config``) and is what ``train_sdxl_ambient.py`` runs.
"""

from __future__ import annotations

import importlib
import sys

from sdxl_ambient.errors import exit_code_of

COMMANDS = {
    "demo": ("sdxl_ambient.demo", "corrupt, train a LoRA and sample on the embedded tiny model (CPU, no network)"),
    "corrupt": ("sdxl_ambient.corrupt", "write a noisy-latent dataset (the cache training reads) from images"),
    "generate": ("sdxl_ambient.generate", "sample images from a base model with a LoRA or from a full fine-tune"),
    "memorization": ("sdxl_ambient.evaluation.memorization", "measure how much models copy their fine-tuning set"),
    "quality": ("sdxl_ambient.evaluation.quality", "FID / KID (and CLIP score) against reference images"),
    "push": ("sdxl_ambient.push", "upload a finished training run's weights, model card and samples to the Hub"),
    "make-tiny": ("sdxl_ambient.tiny", "save the tiny random SDXL-shaped pipeline used by the demo and tests"),
}


def run(argv: list[str]) -> int:
    """Parse and run one subcommand; expected user errors propagate as ``UserError``."""
    from sdxl_ambient.config import FlagParser

    if argv and argv[0] == "train":
        from sdxl_ambient.train import main as train_main

        return train_main(argv[1:])
    parser = FlagParser(prog="sdxl-ambient", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="fine-tune SDXL with the ambient objectives (flags: sdxl-ambient train --help)")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0


def main(argv: list[str] | None = None) -> int:
    """``sdxl-ambient COMMAND ...``: a user error is one line on stderr and exit status 2."""
    return exit_code_of(lambda: run(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
