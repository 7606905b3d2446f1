"""Helpers the tests share: where things are, and how to run the trainer (``helpers.training``)."""

import re
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "sdxl_ambient" / "assets" / "demo_images"


# A progress bar as tqdm draws it ("steps:  50%|█████     | 3/6 [00:01<00:01, 2.9it/s, loss=1.07]"), redrawn after
# each carriage return: what a command shows while it works, not a message.
PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|[^|]*\| *[\d.]+[kMG]?/[\d.?]+[kMG]? \[[^\]]*\]\s*$")


def message_lines(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr`` that are not progress bars."""
    drawn = stderr.replace("\x1b[A", "\n")  # a nested bar moves the cursor up a line
    return [line for line in drawn.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]


def assert_one_line_error(capsys, status: int, *fragments: str) -> str:
    """A command's expected user error: exit status 2 and stderr, progress bars aside, exactly one non-empty
    line, ``error: ...``, holding each fragment (no traceback, no library's messages around it, no message
    over several lines)."""
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def fake_hf_api(on_upload):
    """A stand-in for ``huggingface_hub.HfApi`` that sends nothing: ``create_repo`` returns the id it was
    given and ``upload_folder(**kwargs)`` calls ``on_upload(**kwargs)``."""

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            self.token = token

        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, **kwargs):
            on_upload(**kwargs)

    return FakeHfApi
