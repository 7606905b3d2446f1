"""``train_sdxl_ambient.py`` with a report from every process: run under ``accelerate launch`` in its place,
it writes into ``$RANK_REPORT_DIR`` what each process trained (its trainable parameters after the last step)
and the examples of each batch it saw, so a test can check that the processes agree and share the data."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from sdxl_ambient import train

real_forward_backward, real_finish = train.forward_backward, train.finish
batches: list[list[int]] = []


def forward_backward(run, batch, step):
    batches.append([int(i) for i in batch["index"]])
    return real_forward_backward(run, batch, step)


def finish(run, step):
    report = Path(os.environ["RANK_REPORT_DIR"])
    rank = run.accelerator.process_index
    tensors = {f"{i}.{name}": p.detach().float().cpu().contiguous()
               for i, model in enumerate(run.trained) for name, p in run.accelerator.unwrap_model(model).named_parameters()
               if p.requires_grad}
    save_file(tensors, str(report / f"rank-{rank}.safetensors"))
    (report / f"rank-{rank}.json").write_text(json.dumps({"step": step, "batches": batches}))
    real_finish(run, step)


train.forward_backward, train.finish = forward_backward, finish

if __name__ == "__main__":
    sys.exit(train.cli())
