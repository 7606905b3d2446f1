"""Settings without tokens, the model card, upload file lists and pushes through a recording fake HfApi;
--push_to_hub checked at the start of a run, a failed final push that keeps the weights, `sdxl-ambient push`."""

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.utils import filter_repo_objects

from helpers import assert_one_line_error
from helpers.training import LORA_FILE, lora_weights, run_inprocess, tiny_args
from sdxl_ambient import hub
from sdxl_ambient.cli import main
from sdxl_ambient.errors import UserError

SECRET = "hf_SeCrEtToKeN1234567890"


class FakeApi:
    """Records create_repo / create_branch / upload_folder; upload_folder resolves allow_patterns the way
    huggingface_hub does and keeps the uploaded files' bytes."""

    def __init__(self, fail_with: str | None = None, create_error: Exception | None = None,
                 upload_error: Exception | None = None, namespace: str | None = None):
        self.calls, self.uploaded = [], []
        self.fail_with, self.create_error, self.upload_error, self.namespace = fail_with, create_error, upload_error, namespace
        self.gate = threading.Event()
        self.gate.set()

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.create_error:
            raise self.create_error
        repo_id = kwargs["repo_id"]
        return SimpleNamespace(repo_id=f"{self.namespace}/{repo_id}" if self.namespace and "/" not in repo_id else repo_id)

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.gate.wait(5)
        self.calls.append(("upload_folder", kwargs))
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        if self.upload_error:
            raise self.upload_error
        root = Path(kwargs["folder_path"])
        every = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        files = sorted(filter_repo_objects(every, allow_patterns=kwargs["allow_patterns"]))
        self.uploaded.append({f: (root / f).read_bytes() for f in files})
        return "commit"


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())


def _lora_output(root: Path) -> Path:
    _touch(root, *hub.LORA_FILES, "README.md", "training_settings.json", "samples/0 [a].png", "final.jpg",
           "checkpoint-10/pytorch_lora_weights.safetensors", "checkpoint-10/optimizer.bin", "checkpoint-10/s.png",
           "logs/events.out.tfevents.1", "latent_cache/shard-0.safetensors", "latent_cache/preview.png",
           "optimizer.bin", "random_states_0.pkl")
    return root


SETTINGS = {
    "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0", "ambient_timestep": 200,
    "consistency_weight": 0.5, "consistency_steps": 4, "loss_weighting": "snr", "rank": 16, "hub_token": SECRET,
    "output_dir": Path("out"), "resolution": (1024, 1024), "finetune": "lora",
}


def test_public_settings_drop_tokens(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    args = dict(**SETTINGS, hub_model_id="me/model", report_to_token_x="y", wandb_url=f"https://x?t={SECRET}")
    public = hub.public_settings(args)
    assert "hub_token" not in public and "report_to_token_x" not in public and "wandb_url" not in public
    assert public["ambient_timestep"] == 200 and public["output_dir"] == "out" and public["resolution"] == [1024, 1024]
    path = hub.write_settings(tmp_path, args)
    assert SECRET not in path.read_text() and json.loads(path.read_text())["hub_model_id"] == "me/model"


def test_resolve_token_order(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "stored")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hub.resolve_token(None) == "stored"
    monkeypatch.setenv("HF_TOKEN", "env")
    assert hub.resolve_token(None) == "env" and hub.resolve_token("flag") == "flag"


def test_model_card_lora(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "out", "samples/0.png", "samples/1.png")
    card = hub.model_card(repo_id="me/ambient-lora", base_model=SETTINGS["pretrained_model_name_or_path"],
                          settings=SETTINGS, finetune="lora", validation_prompt="a cat", output_dir="out",
                          image_paths=[Path("out/samples/0.png"), tmp_path / "out/samples/1.png"])
    front = card.split("---")[1]
    for line in ("license: openrail++", 'base_model: "stabilityai/stable-diffusion-xl-base-1.0"', "- lora",
                 "- stable-diffusion-xl", "- stable-diffusion-xl-diffusers", "- text-to-image", "- diffusers",
                 "- ambient-diffusion", "- template:sd-lora", 'url: "samples/0.png"', 'text: "a cat"'):
        assert line in front, line
    assert "t_n = 200" in card and "| `consistency_weight` | `0.5` |" in card and "| `loss_weighting` | `snr` |" in card
    assert "pipe.load_lora_weights('me/ambient-lora')" in card and "pytorch_lora_weights_kohya.safetensors" in card
    assert "![sample 0](samples/0.png)" in card and "![sample 1](samples/1.png)" in card
    assert SECRET not in card and "hub_token" not in card
    for image_paths, output_dir in (([tmp_path / "x.png"], None), (["elsewhere.png"], "out")):
        with pytest.raises(ValueError, match="output folder"):
            hub.model_card(repo_id="r", base_model="b", settings={}, finetune="lora", image_paths=image_paths,
                           validation_prompt=None, output_dir=output_dir)


def test_model_card_full():
    card = hub.model_card(repo_id="me/full", base_model="base/sdxl", settings={"ambient_timestep": 0},
                          finetune="full", image_paths=[], validation_prompt=None)
    assert "- lora" not in card and "from_pretrained('me/full'" in card and "ordinary denoising fine-tune" in card


def test_final_upload_files_lora(tmp_path):
    root = _lora_output(tmp_path / "out")
    assert hub.final_upload_files(root) == [
        "README.md", "final.jpg", *hub.LORA_FILES, "samples/0 [a].png", "training_settings.json"]


def test_final_upload_files_full_pipeline(tmp_path):
    root = tmp_path / "out"
    _touch(root, "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
           "unet/diffusion_pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
           "README.md", "checkpoint-5/unet/diffusion_pytorch_model.safetensors", "val.png", "unet/weird.png")
    assert hub.final_upload_files(root) == [
        "README.md", "model_index.json", "scheduler/scheduler_config.json", "tokenizer/merges.txt",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/weird.png",
        "val.png"]


def test_checkpoint_upload_files(tmp_path):
    lora = tmp_path / "checkpoint-10"
    _touch(lora, *hub.LORA_FILES, "optimizer.bin", "scheduler.bin", "random_states_0.pkl")
    assert hub.checkpoint_upload_files(lora) == list(hub.LORA_FILES)
    assert hub.checkpoint_upload_files(lora, include_training_state=True) == sorted(
        [*hub.LORA_FILES, "optimizer.bin", "random_states_0.pkl", "scheduler.bin"])
    full = tmp_path / "checkpoint-20"
    _touch(full, "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet_ema/ema_state.json",
           "optimizer.bin")
    assert hub.checkpoint_upload_files(full) == [
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet_ema/ema_state.json"]


def test_push_final_uploads_exactly_the_final_files(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    root = _lora_output(tmp_path / "out")
    card = hub.model_card(repo_id="me/m", base_model="base/sdxl", settings=SETTINGS, finetune="lora",
                          image_paths=["samples/0 [a].png"], validation_prompt="p")
    (root / "README.md").write_text(card)
    api = FakeApi()
    with caplog.at_level(logging.DEBUG):
        hub.push_final(root, "me/m", private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/m", "private": True, "exist_ok": True, "token": SECRET}
    assert sorted(api.uploaded[0]) == hub.final_upload_files(root)
    assert api.uploaded[0]["README.md"].decode() == card
    assert SECRET not in caplog.text


def test_checkpoint_pusher_subfolder_survives_checkpoint_deletion(tmp_path):
    api = FakeApi()
    api.gate.clear()  # hold the upload until the checkpoint folder is gone
    pusher = hub.CheckpointPusher("me/m", token="tok", api=api)
    ckpt = tmp_path / "checkpoint-10"
    _touch(ckpt, *hub.LORA_FILES, "optimizer.bin")
    pusher.push(ckpt, 10)
    for p in ckpt.iterdir():
        p.unlink()
    ckpt.rmdir()
    api.gate.set()
    assert pusher.close() == []
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    upload = api.calls[1][1]
    assert upload["path_in_repo"] == "checkpoint-10" and upload["token"] == "tok" and "revision" not in upload
    assert api.uploaded == [{name: name.encode() for name in hub.LORA_FILES}]


def test_checkpoint_pusher_branch_mode_and_errors(tmp_path, caplog):
    ckpt = tmp_path / "checkpoint-3"
    _touch(ckpt, "unet/diffusion_pytorch_model.safetensors", "optimizer.bin")
    api = FakeApi()
    pusher = hub.CheckpointPusher("me/m", token="tok", api=api, mode="branch", include_training_state=True)
    pusher.push(ckpt, 3)
    assert pusher.close() == []
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1]["branch"] == "checkpoint-3" and api.calls[2][1]["revision"] == "checkpoint-3"
    assert sorted(api.uploaded[0]) == ["optimizer.bin", "unet/diffusion_pytorch_model.safetensors"]

    failing = hub.CheckpointPusher("me/m", token=SECRET, api=FakeApi(fail_with=f"401 bad token {SECRET}"))
    failing.push(ckpt, 4)
    with caplog.at_level(logging.WARNING):
        errors = failing.close()
    assert len(errors) == 1 and "checkpoint-4" in errors[0] and "401" in errors[0]
    assert SECRET not in errors[0] and SECRET not in caplog.text
    with pytest.raises(ValueError, match="mode"):
        hub.CheckpointPusher("me/m", api=api, mode="tags")


# ----------------------------------------------------------------------------- --push_to_hub in a training run


def _use_api(monkeypatch, api: FakeApi) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None, **kwargs: api)


def _record_model_loading(monkeypatch, events: list) -> None:
    from sdxl_ambient import models

    real = models.load_components
    monkeypatch.setattr(models, "load_components", lambda *a, **k: events.append("model loaded") or real(*a, **k))


@pytest.mark.parametrize("case, fragment", [
    ("offline", "OfflineModeIsEnabled"),
    ("no_token", "needs a Hub token with write access: set HF_TOKEN"),
    ("no_rights", "403 Forbidden"),
])
def test_push_to_hub_is_checked_before_any_model_loads(case, fragment, monkeypatch, tmp_path, tiny_pipeline_dir, image_folder):
    """Offline, without a token, or without the right to create the repo: the run stops at the start with one
    line naming --push_to_hub (no model loaded, nothing written, the token nowhere in the message)."""
    import huggingface_hub
    from huggingface_hub import constants


    monkeypatch.setenv("HF_TOKEN", SECRET)
    if case == "offline":  # the real client, as a user offline has it
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif case == "no_token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    else:  # the Hub answers 403 (an HfHubHTTPError, which is an OSError)
        _use_api(monkeypatch, FakeApi(create_error=PermissionError(f"403 Forbidden: no rights to namespace 'other' ({SECRET})")))
    events = []
    _record_model_loading(monkeypatch, events)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--push_to_hub", "--hub_model_id", "other/repo"))
    message = str(err.value)
    assert message.startswith("--push_to_hub") and fragment in message and "\n" not in message
    assert SECRET not in message
    assert events == [] and not out.exists()


def test_a_failed_final_push_keeps_the_weights_and_says_how_to_push_them(monkeypatch, capsys, tmp_path, tiny_pipeline_dir,
                                                                          image_folder):
    """The repo is created before any model loads; when the final upload fails the weights, card and settings stay,
    the run ends with one line naming `sdxl-ambient push`, and that command uploads what the run would have."""

    monkeypatch.setenv("HF_TOKEN", SECRET)
    offline = FakeApi(upload_error=ConnectionError("Connection reset by peer"), namespace="me")
    _use_api(monkeypatch, offline)
    events = []
    _record_model_loading(monkeypatch, events)
    real_create = offline.create_repo
    monkeypatch.setattr(offline, "create_repo", lambda **kw: events.append("repo created") or real_create(**kw))
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        run_inprocess(tiny_args(tiny_pipeline_dir, image_folder, out, "--push_to_hub", steps=2))
    assert events[:2] == ["repo created", "model loaded"]
    assert f"`sdxl-ambient push --output_dir {out} --hub_model_id me/out`" in str(err.value)
    assert "Connection reset by peer" in str(err.value) and "\n" not in str(err.value)
    weights = lora_weights(out)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())  # trained and kept
    assert "pipe.load_lora_weights('me/out')" in (out / "README.md").read_text()

    online = FakeApi(namespace="me")
    _use_api(monkeypatch, online)
    assert main(["push", "--output_dir", str(out)]) == 0
    assert "pushed" in capsys.readouterr().out
    (upload,) = online.uploaded
    assert online.calls[-1][1]["repo_id"] == "me/out"
    assert sorted(upload) == hub.final_upload_files(out) and LORA_FILE in upload
    assert all(upload[name] == (out / name).read_bytes() for name in upload)

    (tmp_path / "empty").mkdir()
    assert_one_line_error(capsys, main(["push", "--output_dir", str(tmp_path / "empty")]), "--output_dir", "no finished weights")
