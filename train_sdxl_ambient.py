"""Fine-tune SDXL on noisy data: `accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml`.

The flags are diffusers' (`--help` lists them all); the loop is in sdxl_ambient/train.py."""

import sys

from sdxl_ambient.train import cli

if __name__ == "__main__":
    sys.exit(cli())
