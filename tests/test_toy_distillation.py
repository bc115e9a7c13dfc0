"""A short distillation of the shipped toy teacher moves the student towards the guided teacher.

The demo's claim in small: after a minute of training, the student's images without guidance are
closer (MSE, same seeds) to the teacher's images with guidance than the teacher's own images
without guidance are.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_distill.eval.compare import CompareConfig
from sd_distill.eval.compare import run as compare
from sd_distill.lora import RESNET_AND_ATTENTION_TARGET_MODULES
from sd_distill.toy.synthetic import held_out_prompts, write_imagefolder
from sd_distill.train import parse_args, run

TOY_SD = Path(__file__).resolve().parents[1] / "models" / "toy-sd"
STEPS = 120


@pytest.mark.usefixtures("one_thread")
def test_short_distillation_beats_the_unguided_teacher(tmp_path: Path) -> None:

    data = write_imagefolder(tmp_path / "data", n=512, seed=0)
    lora = tmp_path / "lora"
    stats = run(
        parse_args(
            [
                "--pretrained_model_name_or_path",
                str(TOY_SD),
                "--train_data_dir",
                str(data),
                "--output_dir",
                str(lora),
                "--resolution",
                "32",
                "--train_batch_size",
                "16",
                "--max_train_steps",
                str(STEPS),
                "--learning_rate",
                "1e-3",
                "--lora_rank",
                "16",
                "--guidance_scale",
                "7.5",
                "--cache_latents",
                "--cache_text_embeddings",
                "--checkpointing_steps",
                str(STEPS),
                "--report_to",
                "none",
                "--default_prompt",
                "",
                "--seed",
                "0",
                "--lora_target_modules",
                *RESNET_AND_ATTENTION_TARGET_MODULES,
            ]
        )
    )
    assert stats.global_step == STEPS

    prompts = held_out_prompts()[::6]  # 6 unseen attribute combinations
    report = compare(
        CompareConfig(
            ft_model=str(lora),
            out_dir=str(tmp_path / "compare"),
            prompts=prompts,
            num_inference_steps=20,
            seed=0,
            also_base_without_cfg=True,
        )
    )
    fidelity = report["fidelity"]
    distilled = fidelity["distilled_vs_base_cfg"]["mse"]
    unguided = fidelity["base_nocfg_vs_base_cfg"]["mse"]
    assert distilled < unguided, fidelity
