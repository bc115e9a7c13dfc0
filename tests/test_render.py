"""The comparison's timed sampling: what it calls each pipeline with."""

from types import SimpleNamespace

import torch
from PIL import Image

from sd_distill.eval.render import Column, sample


class RecordingPipe:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, prompts: list[str], **_: object) -> SimpleNamespace:
        self.calls.append(len(prompts))
        return SimpleNamespace(images=[Image.new("RGB", (4, 4)) for _ in prompts])


def test_warm_up_runs_at_the_batch_size_and_is_not_counted() -> None:
    pipe = RecordingPipe()
    column = Column("student", "student", pipe, 1.0, SimpleNamespace(rows=0))
    config = SimpleNamespace(seed=0, num_inference_steps=2, height=4, width=4, batch_size=3)
    prompts = [f"p{i}" for i in range(5)]

    records = sample([column], prompts, list(range(5)), config, torch.device("cpu"), show_progress=False)

    assert pipe.calls == [3, 3, 2]  # the warm-up at the first batch's size, then the two timed batches
    assert sorted(r["index"] for r in records) == list(range(5))
