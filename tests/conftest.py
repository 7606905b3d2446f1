"""Shared fixtures: one torch thread per process, a tiny SDXL-shaped pipeline, a folder of real images.
Helpers that are not fixtures live in the ``helpers`` package beside this file."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers import DEMO_IMAGES

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved diffusers folder of the tiny random SDXL-shaped pipeline (built once per session)."""
    from sdxl_ambient.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="session")
def other_pipeline_dir(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """Another tiny pipeline (other random weights, the same configs and file sizes) in a folder of the
    same name as ``tiny_pipeline_dir``'s."""
    from sdxl_ambient.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("other") / tiny_pipeline_dir.name, seed=1)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An imagefolder of the 8 bundled real images with a metadata.jsonl of captions (a fresh copy per test)."""
    dest = tmp_path / "images"
    shutil.copytree(DEMO_IMAGES, dest, ignore=shutil.ignore_patterns("*.txt"))
    return dest
