"""Several noise levels in one run: clean examples get exactly the plain loss, the consistency term reaches
below each noisy example's own level, a mixed run trains end to end; and the held-out validation loss."""

import json
import logging
import shutil

import pytest
import torch
import yaml

from helpers import DEMO_IMAGES
from helpers.training import run_inprocess, tiny_args
from sdxl_ambient.objectives import (
    _tweedie_lambda,
    epsilon_matched_weight,
)
from sdxl_ambient.step import AmbientObjective, ObjectiveSettings


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    from sdxl_ambient.tiny import SDXL_SCHEDULER_CONFIG

    return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def test_a_clean_example_in_a_mixed_batch_gets_exactly_the_plain_loss(scheduler):
    """In a batch mixing t_n = 0 with t_n = 500, with the consistency term on, the clean example's loss and its
    gradient are diffusers' epsilon loss on the same draws; the noisy one's consistency term is not zero."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    net = lambda x, t: conv(x)  # noqa: E731  (per sample, so the clean sample's loss depends on it alone)
    objective = ObjectiveSettings(consistency_weight=1.0, consistency_fraction=1.0).build([0, 500], scheduler)
    assert objective.consistency_max_delta == 500
    y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t_n = torch.tensor([0, 500])
    losses = objective(net, y, t_n, generator=torch.Generator().manual_seed(2))
    grad = torch.autograd.grad(losses["loss"][0], conv.weight, retain_graph=True)[0]

    replay = torch.Generator().manual_seed(2)  # the objective's first draws: t, then the renoising noise
    from sdxl_ambient.objectives import draw_timesteps

    t = draw_timesteps(t_n, 1000, generator=replay)
    noise = torch.randn(y.shape, generator=replay)
    x_t = scheduler.add_noise(y[:1], noise[:1], t[:1])
    plain = torch.nn.functional.mse_loss(conv(x_t), noise[:1])
    torch.testing.assert_close(losses["loss"][0], plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, conv.weight)[0], rtol=1e-4, atol=1e-7)
    assert losses["consistency"][0] == 0 and losses["consistency"][1] != 0


def test_the_consistency_chains_reach_below_each_examples_own_level(scheduler):
    """Levels differ: by default each example's chains start in [t_n, 2 t_n) and go down by up to its own t_n,
    so an example at 500 reaches far below 400 while one at 100 never goes below 0 or starts above 199."""
    objective = ObjectiveSettings(consistency_weight=1.0, consistency_fraction=1.0).build([100, 500], scheduler)
    assert objective.consistency_max_delta is None
    assert ObjectiveSettings().resolved([0, 100, 500])["consistency_max_delta"] == "t_n of each example"
    assert ObjectiveSettings().resolved([0, 300])["consistency_max_delta"] == 300
    calls = []

    def net(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    t_n = torch.tensor([100, 500] * 64)
    y = torch.zeros(128, 4, 2, 2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        calls.clear()
        objective.consistency(net, y, t_n, objective.alphas_cumprod, gen)
        anchor, final = calls[0], calls[-1][:128]
        assert ((anchor >= t_n) & (anchor < 2 * t_n)).all()
        assert ((anchor - final >= 1) & (anchor - final <= t_n)).all()
    assert (final[1::2] < 300).any()  # the level-500 examples' chains go well below 400


def _mixed_data(tmp_path):
    """The 8 demo images in two folders: 3 clean ones, 5 to be noised to t_n 300."""
    rows = [json.loads(line) for line in (DEMO_IMAGES / "metadata.jsonl").read_text().splitlines()]
    folders = {}
    for name, part in (("clean", rows[:3]), ("noisy", rows[3:])):
        folder = tmp_path / name
        folder.mkdir()
        for row in part:
            shutil.copy(DEMO_IMAGES / row["file_name"], folder / row["file_name"])
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n")
        folders[name] = folder
    return folders


def _without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def test_a_mixed_run_trains_with_each_examples_level(monkeypatch, caplog, tmp_path, tiny_pipeline_dir):
    """A config listing a clean source (repeats 2) and a noisy one: the objective gets both levels in its
    batches, the run finishes, each source's count and t_n are logged, resolved and in the model card."""
    folders = _mixed_data(tmp_path)
    config = tmp_path / "mixed.yaml"
    config.write_text(yaml.safe_dump({"data_sources": [
        {"name": "clean", "train_data_dir": str(folders["clean"]), "ambient_timestep": 0, "repeats": 2},
        {"name": "noisy", "train_data_dir": str(folders["noisy"]), "ambient_timestep": 300}]}))
    seen = []
    original = AmbientObjective.__call__
    monkeypatch.setattr(AmbientObjective, "__call__", lambda self, net, y, t_n, **kw: seen.append(t_n.tolist()) or original(
        self, net, y, t_n, **kw))
    out = tmp_path / "out"
    args = _without(_without(tiny_args(tiny_pipeline_dir, folders["clean"], out, "--consistency_weight", "1", steps=8),
                             "--train_data_dir"), "--ambient_timestep")
    with caplog.at_level(logging.INFO, logger="sdxl_ambient"):
        assert run_inprocess(["--config", str(config), *args]) == 0
    levels = {level for batch in seen for level in batch}
    assert levels == {0, 300}
    assert "data source clean: 3 examples, repeats 2, t_n 0" in caplog.text
    assert "data source noisy: 5 examples, repeats 1, t_n 300" in caplog.text
    resolved = json.loads((out / "training_settings.json").read_text())["resolved"]
    assert resolved["data_sources"] == [{"name": "clean", "examples": 3, "repeats": 2, "ambient_timestep": 0},
                                        {"name": "noisy", "examples": 5, "repeats": 1, "ambient_timestep": 300}]
    assert resolved["ambient_timestep"] == 0 and resolved["consistency_max_delta"] == 300
    card = (out / "README.md").read_text()
    assert "| clean | 3 | 2 | 0 |" in card and "| noisy | 5 | 1 | 300 |" in card and "mixed noise levels" in card


# ----------------------------------------------------------------------------- the held-out validation loss


def test_the_held_out_examples_depend_only_on_the_data():
    """The same examples are held out in every run (a hash of their keys, not a seed), only noisy ones while
    any exist, as many as the fraction or count says; holding out everything is refused."""
    from sdxl_ambient.heldout import choose, split_size

    examples = [(0, i, f"clean/{i}.png", 0) for i in range(4)] + [(1, i, f"noisy/{i}.png", 500) for i in range(20)]
    held = choose(examples, 0.25)
    assert len(held) == 5 and all(part == 1 for part, _ in held)
    assert choose(list(reversed(examples)), 0.25) == held and choose(examples, 5) == held
    assert len(choose(examples[:4], 1)) == 1  # all clean: an ordinary validation split
    with pytest.raises(ValueError, match="--validation_split 24 would hold out 24 of the 20 noisy examples"):
        choose(examples, 20 + 4)
    assert split_size("0.1") == 0.1 and split_size("12") == 12 and type(split_size("12")) is int
    for bad in ("0", "1.5", "-2", "x"):
        with pytest.raises(ValueError):
            split_size(bad)


@pytest.mark.parametrize("weighting", ["observation", "epsilon"])
def test_the_held_out_loss_measures_the_clean_denoising_error_up_to_a_constant(scheduler, weighting):
    """Gaussian data, where E[x0 | x_t] is exact: over noisy observations only, the difference of the held-out
    loss of two denoisers is w(t) abar_n (1 - lam)^2 times the difference of their clean denoising errors
    E||h(x_t) - E[x0 | x_t]||^2, at fixed t and fixed renoising noise."""
    from sdxl_ambient.objectives import renoise

    abar = scheduler.alphas_cumprod.double()
    objective = AmbientObjective(alphas_cumprod=abar, prediction_type="sample", weighting=weighting)
    n, t_n_level, t_level, var0 = 4096, 300, 500, 0.5
    gen = torch.Generator().manual_seed(0)
    x0 = var0 ** 0.5 * torch.randn(n, 256, dtype=torch.float64, generator=gen)
    t_n, t = torch.full((n,), t_n_level), torch.full((n,), t_level)
    a_n, a_t = abar[t_n_level], abar[t_level]
    y = a_n.sqrt() * x0 + (1 - a_n).sqrt() * torch.randn(n, 256, dtype=torch.float64, generator=gen)
    noise = torch.randn(n, 256, dtype=torch.float64, generator=gen)
    k_star = a_t.sqrt() * var0 / (a_t * var0 + 1 - a_t)  # E[x0 | x_t] = k* x_t
    x_t = renoise(y, t_n, t, noise, abar)

    def held_out(c):
        return objective.ambient_loss(lambda x, tt: c * x, y, t_n, t, noise).mean()

    def clean_error(c):
        return ((c - k_star) ** 2 * x_t.pow(2)).mean()

    lam, _, _ = _tweedie_lambda(abar, t[:1], t_n[:1])
    w = 1.0 if weighting == "observation" else epsilon_matched_weight(t[:1], t_n[:1], abar).double()
    scale = w * a_n * (1 - lam) ** 2
    for c1, c2 in ((0.0, float(k_star)), (0.9, 0.4)):  # the cross term's zero-mean noise is ~1% here
        measured = held_out(c1) - held_out(c2)
        expected = scale * (clean_error(c1) - clean_error(c2))
        assert float(measured) == pytest.approx(float(expected), rel=0.05), (c1, c2)


def test_the_validation_loss_is_logged_deterministic_and_held_out(monkeypatch, tmp_path, tiny_pipeline_dir, image_folder):
    """--validation_split 2: two examples never reach a training batch; validation_loss goes to the trackers at
    step 0 (the base model), every --validation_steps and at the end; two runs with other seeds log the same
    step-0 value (fixed timesteps and noise), and training lowers neither to NaN."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdxl_ambient import heldout, train

    trained_keys, held_keys = set(), set()
    real_conditioning, real_sums = train.prompt_conditioning, heldout.HeldOutLoss.sums

    def conditioning(run, batch):
        trained_keys.update(batch["key"])
        return real_conditioning(run, batch)

    def sums(self, objective, net_for, *args, **kwargs):
        for batch_items in self.batches:
            held_keys.update(cache[i]["key"] for cache, i in batch_items)
        return real_sums(self, objective, net_for, *args, **kwargs)

    monkeypatch.setattr(train, "prompt_conditioning", conditioning)
    monkeypatch.setattr(heldout.HeldOutLoss, "sums", sums)

    def run(seed, out):
        args = tiny_args(tiny_pipeline_dir, image_folder, out, "--validation_split", "2", "--validation_steps", "2",
                         "--report_to", "tensorboard", steps=5)
        args[args.index("--seed") + 1] = str(seed)
        assert run_inprocess(args) == 0
        events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
        events.Reload()
        return {e.step: e.value for e in events.Scalars("validation_loss")}

    first = run(0, tmp_path / "a")
    assert sorted(first) == [0, 2, 4, 5] and all(v == v for v in first.values())
    assert len(held_keys) == 2 and not held_keys & trained_keys and len(trained_keys) == 6
    second = run(1, tmp_path / "b")
    assert second[0] == first[0] and second[4] != first[4]  # same base model, same x_t; other training
    resolved = json.loads((tmp_path / "a" / "training_settings.json").read_text())["resolved"]
    assert resolved["held_out_examples"] == 2 and resolved["data_sources"][0]["examples"] == 6
