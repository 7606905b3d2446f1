"""Entry point for `accelerate launch train_sdxl_ambient.py --config configs/NAME.yaml [--flag value ...]`."""

import sys

from sdxl_ambient.train import main

if __name__ == "__main__":
    sys.exit(main())
