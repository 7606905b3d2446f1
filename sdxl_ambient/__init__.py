"""sdxl-ambient: fine-tune SDXL on noisy data with the exact ambient objectives (README.md)."""

import logging


class _DropNotice(logging.Filter):
    """Drops a library's notice about an optional backend this project runs without on purpose."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# torchvision is not a dependency (README): transformers then uses its PIL image processors, and says so on
# stderr at every start. bitsandbytes (8-bit Adam) on a CPU says it lacks a 4-bit kernel the project never uses.
logging.getLogger("transformers.utils.import_utils").addFilter(_DropNotice("requires torchvision (not installed); falling back"))
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNotice("Failed to load CPU gemm_4bit_forward"))
