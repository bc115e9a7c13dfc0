"""Small builders shared by the training tests: datasets on disk and CLI argument lists."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def write_image_folder(folder: Path, n: int = 8, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """An image folder with ``metadata.jsonl`` (file_name, text): what ``--train_data_dir`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow"]
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {colours[i % 4]} circle number {i}"}) + "\n")
    return folder


def train_args(model: Path, data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "2",
        "--report_to",
        "none",
        "--default_prompt",
        "",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process under test: hub offline, one OpenMP thread (on a busy
    2-core machine spinning OpenMP threads made a tiny training step 25x slower)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; each in-process training run needs a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def lora_output_change(model_dir: Path, lora_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction for a fixed input before and after stock diffusers loads the LoRA."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 500, emb).sample
        pipe.load_lora_weights(lora_dir)
        after = pipe.unet(x, 500, emb).sample
    return before, after


def run_training(argv: list[str], edit: Any = None) -> tuple[Any, Any]:
    """Run the recipe's three phases in-process; ``edit(training)`` may swap parts (a test double
    of the target or the state source) between setup and the loop. Returns (stats, training)."""
    from sd_distill.train import finish, parse_args, setup, train_loop

    training = setup(parse_args(argv))
    if edit is not None:
        edit(training)
    stats = train_loop(training)
    finish(training, stats)
    return stats, training


class NanTarget:
    """A target double: the real target, made NaN on the given call numbers (every call when None)."""

    def __init__(self, real: Any, calls: set[int] | None) -> None:
        self.real, self.calls, self.n = real, calls, 0

    def teacher_prediction(self, states: Any, teacher: Any) -> torch.Tensor:
        self.n += 1
        out = self.real.teacher_prediction(states, teacher)
        return out * float("nan") if self.calls is None or self.n in self.calls else out

    def student_inputs(self, states: Any) -> dict[str, Any]:
        return self.real.student_inputs(states)


def fake_checkpoint(folder: Path, step: int, config: dict[str, Any]) -> Path:
    """A complete-looking ``checkpoint-<step>`` of a 1-process plain-accelerate run (tiny stand-in
    tensors): what the pre-load checks accept; enough to test resume decisions without training."""
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "training_state.json").write_text(json.dumps({"global_step": step, "num_processes": 1, "deepspeed": False}))
    (path / "sd_distill_config.json").write_text(json.dumps(config))
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, str(path / "pytorch_lora_weights.safetensors"))
    if config.get("guidance_scale_range") is not None:  # a student told w checkpoints its cond_proj
        save_file({"time_embedding.cond_proj.weight": torch.zeros(8, 4)}, str(path / "guidance_cond_proj.safetensors"))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        torch.save({"state": torch.zeros(64)}, path / name)
    return path
