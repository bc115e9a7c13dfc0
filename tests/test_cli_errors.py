"""Bad input: one clear message, exit status 2, no traceback, before any model is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fake_checkpoint, subprocess_env, train_args, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    sys.path.insert(0, str(ROOT))
    from train_sd_distil_lora import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", n=4)


def test_missing_model_folder_cli_exits_cleanly(tmp_path: Path, data: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_sd_distil_lora.py"),
            *train_args(tmp_path / "no-such-model", data, tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_folder_that_is_not_a_pipeline(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-model").mkdir()
    code, err = _main(train_args(tmp_path / "empty-model", data, tmp_path / "out"), capsys)
    assert code == 2 and "model_index.json" in err


def test_all_bad_flags_are_reported_together(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(tiny_model_dir, data, tmp_path / "out") + [
        "--resolution",
        "100",
        "--lora_rank",
        "0",
        "--caption_dropout",
        "2",
    ]
    code, err = _main(argv, capsys)
    assert code == 2
    assert (
        "--resolution 100" in err and "multiple of 8" in err and "--lora_rank 0" in err and "--caption_dropout 2" in err
    )


def test_unknown_caption_column_lists_the_columns(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main(train_args(tiny_model_dir, data, tmp_path / "out", "--caption_column", "nope"), capsys)
    assert code == 2 and "'nope'" in err and "'text'" in err and "--caption_column" in err


def test_empty_dataset(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "empty.jsonl"
    table.write_text("")
    code, err = _main(
        train_args(tiny_model_dir, tmp_path, tmp_path / "out")[:2]
        + ["--dataset_name", str(table)]
        + train_args(tiny_model_dir, tmp_path, tmp_path / "out")[4:],
        capsys,
    )
    assert code == 2 and "empty" in err


def test_dataset_path_that_does_not_exist(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(tiny_model_dir, tmp_path / "no-data", tmp_path / "out")
    code, err = _main(argv, capsys)
    assert code == 2 and "no-data" in err and "not a folder" in err


def test_finished_output_dir_is_not_overwritten(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sd_distill.train.config import TrainConfig

    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    (out / "sd_distill_config.json").write_text(TrainConfig().to_json())  # an sd-distill run's folder
    code, err = _main(train_args(tiny_model_dir, data, out), capsys)
    assert code == 2 and "--overwrite_output_dir" in err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"precious"


def test_resume_from_nothing_and_from_an_incompatible_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main(
        train_args(tiny_model_dir, data, tmp_path / "out", "--resume_from_checkpoint", str(tmp_path / "nothing")),
        capsys,
    )
    assert code == 2 and "not a folder" in err
    saved = {
        "pretrained_model_name_or_path": "other/model",
        "lora_rank": 16,
        "lora_target_modules": ["to_q"],
        "teacher": "shared",
    }
    fake_checkpoint(tmp_path / "out", 2, saved)
    code, err = _main(train_args(tiny_model_dir, data, tmp_path / "out", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "lora_rank" in err and "other/model" in err


def test_fp16_on_a_cpu_is_refused(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is valid here")
    code, err = _main(train_args(tiny_model_dir, data, tmp_path / "out", "--mixed_precision", "fp16"), capsys)
    assert code == 2 and "fp16" in err and "bf16" in err


def test_wandb_without_the_package(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code, err = _main(train_args(tiny_model_dir, data, tmp_path / "out") + ["--report_to", "wandb"], capsys)
    assert code == 2 and "pip install wandb" in err


def test_a_zero_stage_deepspeed_does_not_have(tiny_model_dir: Path, tmp_path: Path, data: Path) -> None:
    config = tmp_path / "zero4.yaml"
    config.write_text(
        (ROOT / "accelerate_configs" / "cpu_2proc_zero2.yaml").read_text().replace("zero_stage: 2", "zero_stage: 4")
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(config),
            "--main_process_port",
            "0",
            str(ROOT / "train_sd_distil_lora.py"),
            *train_args(tiny_model_dir, data, tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    assert proc.returncode != 0
    assert "ZeRO stage 4" in proc.stderr and "stages 0, 1, 2 and 3" in proc.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
