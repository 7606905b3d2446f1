"""Helpers the tests share: where things are, and how to run the trainer (``helpers.training``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "sdxl_ambient" / "assets" / "demo_images"


def assert_one_line_error(capsys, status: int, *fragments: str) -> str:
    """A command's expected user error: exit status 2 and one line on stderr holding each fragment, no traceback."""
    err = capsys.readouterr().err.strip()
    assert status == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
