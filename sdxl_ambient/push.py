"""``sdxl-ambient push``: upload a finished training run to the Hub, e.g. after the push at the end
of training failed (offline, the Hub unreachable). It uploads what the end of training would have
(:func:`hub.final_upload_files`: weights, model card, settings, sample images; never checkpoints,
caches or logs, nor files beside them that the run did not write), to ``--hub_model_id``, else the repo
the run recorded, else the folder's name. It holds the folder's lock while it uploads, so no
training run can write there meanwhile (and it waits for none: a folder in use is refused)."""

from __future__ import annotations

from pathlib import Path

from sdxl_ambient.errors import UserError
from sdxl_ambient.files import LORA_WEIGHT_NAME, MODEL_INDEX
from sdxl_ambient.outputs import OutputFolder


def add_arguments(parser) -> None:
    from sdxl_ambient.config import add_hub_arguments

    parser.add_argument("--output_dir", required=True, help="the finished training run's output folder")
    add_hub_arguments(parser)


def run(args) -> int:
    from sdxl_ambient import hub

    out = Path(args.output_dir)
    if not ((out / LORA_WEIGHT_NAME).is_file() or (out / MODEL_INDEX).is_file()):
        raise UserError(f"--output_dir {out} holds no finished weights ({LORA_WEIGHT_NAME} or a pipeline's {MODEL_INDEX})")
    folder = OutputFolder(out, command="train", writes=())
    with folder.locked():  # no training run writes there while its files are uploaded
        settings = hub.read_settings(out)
        repo_id = hub.default_repo_id(args.hub_model_id or settings.get("hub_model_id"), out)
        private = args.hub_private_repo or bool(settings.get("hub_private_repo"))
        repo_id = hub.prepare_repo(repo_id, private=private, flag="sdxl-ambient push")
        hub.push_final(out, repo_id, private=private, exclude=folder.foreign() if folder.record() else ())  # only the run's files
    print(f"pushed {out} to https://huggingface.co/{repo_id}")
    return 0
