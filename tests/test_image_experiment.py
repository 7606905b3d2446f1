"""The image experiment's quick mode (``benchmarks/image_experiment.py --quick``) on real data:
scikit-learn's 8x8 digit scans noised once to t_n = 200, a small UNet trained with the project's
``AmbientObjective`` and sampled with the project's samplers. The ambient model's samples (Tweedie
jump from t_n + 25) must be much closer to held-out clean digits than those of a naive model trained
on the same noisy images as if they were clean (docs/image_results.md has the full experiment)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import image_experiment  # noqa: E402

# At most half the naive model's Frechet distance (the "clear margin").
AMBIENT_OVER_NAIVE_MAX = 0.5


@pytest.mark.slow
def test_quick_image_experiment_ambient_samples_are_much_cleaner_than_naive(tmp_path):
    assert image_experiment.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    aggregate = json.loads((tmp_path / "results.json").read_text())["aggregate"]
    naive = aggregate["clean|naive|200|full"]["fd"][0]
    ambient = aggregate["clean|ambient|200|jump25"]["fd"][0]
    assert ambient <= AMBIENT_OVER_NAIVE_MAX * naive, (ambient, naive)
    assert (tmp_path / "part1_samples_tn200.png").is_file() and (tmp_path / "tables.md").is_file()
