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


def test_a_base_whose_unet_is_already_told_w_is_refused(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An LCM UNet (or a fused export) samples without CFG in stock diffusers: it cannot be the teacher."""
    import json
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "lcm-like"))
    unet_config = model / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "time_cond_proj_dim": 32}))
    code, err = _main(train_args(model, data, tmp_path / "out"), capsys)
    assert code == 2 and "already told the guidance scale (time_cond_proj_dim=32" in err
    assert not (tmp_path / "out").exists()


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


def test_a_checkpoint_older_than_a_setting_is_compared_as_it_ran(tmp_path: Path, data: Path) -> None:
    """A checkpoint that predates --guidance_embedding_features trained on the full embedding; turning
    the new setting on at resume would change the objective unseen, so it is refused."""
    from sd_distill.train.config import parse_args
    from sd_distill.train.resume import compatibility_errors

    fake_checkpoint(tmp_path / "out", 2, {"guidance_scale_range": [2.0, 8.0]})
    range_flags = ["--guidance_scale_range", "2", "8"]
    config = parse_args(train_args(tmp_path, data, tmp_path / "out", *range_flags))
    assert compatibility_errors(tmp_path / "out" / "checkpoint-2", config, ("guidance_embedding_features",)) == []
    smooth = parse_args(
        train_args(tmp_path, data, tmp_path / "out", *range_flags, "--guidance_embedding_features", "smooth")
    )
    errors = compatibility_errors(tmp_path / "out" / "checkpoint-2", smooth, ("guidance_embedding_features",))
    assert errors and "checkpoint has 'full', this run has 'smooth'" in errors[0]


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


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--adam_beta1", "2"], "--adam_beta1 2.0 must be in [0, 1)"),
        (["--adam_beta2", "-0.1"], "--adam_beta2 -0.1 must be in [0, 1)"),
        (["--adam_epsilon=-1e-8"], "--adam_epsilon -1e-08 must be positive"),
        (["--adam_weight_decay", "-0.01"], "--adam_weight_decay -0.01 must be 0 or more"),
        (["--seed", "-1"], "--seed -1 must be in [0, 2**32)"),
        (["--num_validation_inference_steps", "0"], "--num_validation_inference_steps 0 must be at least 1"),
        (["--max_grad_norm", "-1"], "--max_grad_norm -1.0 must be 0 (off) or more"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps -1 must be 0 or more"),
        (["--huber_c", "0"], "--huber_c 0.0 must be positive"),
        (["--lora_alpha", "-4"], "--lora_alpha -4.0 must be positive"),
        (["--max_consecutive_nonfinite", "0"], "--max_consecutive_nonfinite 0 must be at least 1"),
        (["--learning_rate", "inf"], "--learning_rate inf is not a finite number"),
        (["--guidance_scale", "nan"], "--guidance_scale nan is not a finite number"),
        (["--guidance_scale_range", "2", "inf"], "--guidance_scale_range 2.0 inf holds a value that is not a finite"),
        (["--guidance_loss_weighting", "inverse_square"], "add --guidance_scale_range"),
        (["--guidance_embedding_features", "smooth"], "add --guidance_scale_range"),
        (["--guidance_scale_sampling", "log"], "add --guidance_scale_range"),
        (["--guidance_embedding_dim", "32"], "add --guidance_scale_range"),
        (["--guidance_scale_range", "2", "8", "--guidance_embedding_dim", "3"], "--guidance_embedding_dim 3 must be"),
        (["--guidance_scale_range", "1.5", "4"], "--guidance_scale 7.5 (the scale of the validation images"),
        (["--guidance_scale_range", "2", "8", "--guidance_scale", "9"], "is outside --guidance_scale_range 2 8"),
        (["--export_dtype", "fp16"], "--export_dtype fp16 applies to --export_fused_pipeline only"),
        (["--lr_decay_fraction", "0.2"], "--lr_decay_fraction applies to --lr_scheduler warmup_stable_decay only"),
        (["--lr_scheduler", "warmup_stable_decay", "--lr_decay_fraction", "0"], "must be in (0, 1]"),
        (
            ["--lr_scheduler", "warmup_stable_decay", "--max_train_steps", "10", "--lr_warmup_steps", "9"],
            "the decay (2 steps, --lr_decay_fraction 0.2) do not fit in the run's 10 steps",
        ),
    ],
)
def test_every_numeric_flag_has_a_range(tmp_path: Path, data: Path, flags: list[str], words: str) -> None:
    from sd_distill.train.checks import config_errors
    from sd_distill.train.config import parse_args

    errors = config_errors(parse_args(train_args(tmp_path, data, tmp_path / "out") + flags))
    assert any(words in e for e in errors), errors


def test_range_only_checks_hold_for_a_fresh_run_not_a_resumed_one(tmp_path: Path, data: Path) -> None:
    """A run that began before a check goes on as it began (resume compares its settings); 'latest'
    with no checkpoint yet is a fresh run."""
    from sd_distill.train.checks import config_errors
    from sd_distill.train.config import parse_args

    out = tmp_path / "out"
    flags = ["--guidance_scale_range", "1.5", "4", "--resume_from_checkpoint", "latest"]
    assert any(
        "is outside --guidance_scale_range" in e
        for e in config_errors(parse_args(train_args(tmp_path, data, out) + flags))
    )
    fake_checkpoint(out, 2, {"guidance_scale_range": [1.5, 4.0]})
    about_guidance = [e for e in config_errors(parse_args(train_args(tmp_path, data, out) + flags)) if "guidance" in e]
    assert about_guidance == []
    sampling = ["--guidance_scale_sampling", "log", "--resume_from_checkpoint", "latest"]
    assert not [e for e in config_errors(parse_args(train_args(tmp_path, data, out) + sampling)) if "guidance" in e]


@pytest.mark.parametrize("flag", ["--average_last_fraction", "--lr_decay_fraction", "--guidance_scale"])
def test_a_flag_that_is_not_a_number_is_said_once(tmp_path: Path, data: Path, flag: str) -> None:
    from sd_distill.train.checks import config_errors
    from sd_distill.train.config import parse_args

    flags = [flag, "nan", "--lr_scheduler", "warmup_stable_decay", "--lora_rank", "0"]
    errors = config_errors(parse_args(train_args(tmp_path, data, tmp_path / "out") + flags))
    about = [e for e in errors if e.startswith(f"{flag} ")]
    assert about == [f"{flag} nan is not a finite number."], errors
    assert any(e.startswith("--lora_rank") for e in errors), errors  # the other problems are still all said


def test_output_folders_that_are_files(tmp_path: Path, data: Path) -> None:
    from sd_distill.train.checks import config_errors
    from sd_distill.train.config import parse_args

    (tmp_path / "a-file").write_text("x")
    for flag in ("--cache_dir", "--export_fused_pipeline"):
        errors = config_errors(parse_args(train_args(tmp_path, data, tmp_path / "out", flag, str(tmp_path / "a-file"))))
        assert any(f"{flag} {str(tmp_path / 'a-file')!r} is a file" in e for e in errors), errors
    errors = config_errors(parse_args(train_args(tmp_path, data, tmp_path / "a-file")))
    assert any("--output_dir" in e and "is a file" in e for e in errors), errors
    same = train_args(tmp_path, data, tmp_path / "out", "--export_fused_pipeline", str(tmp_path / "out"))
    assert any("another folder than --output_dir" in e for e in config_errors(parse_args(same)))


def test_lora_target_modules_that_match_nothing(
    tiny_model_dir: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(tiny_model_dir, data, tmp_path / "out", "--lora_target_modules", "to_q", "to_qq", "attn9")
    code, err = _main(argv, capsys)
    assert code == 2 and "--lora_target_modules to_qq attn9: no UNet module has that name" in err
    assert "e.g. " in err and "to_k" in err and "Traceback" not in err


@pytest.mark.parametrize("script", ["train_sd_distil_lora.py", "inf_txt2img_loop.py", "export_fused_pipeline.py"])
def test_help_lists_the_flags(script: str) -> None:
    """A new user's first command: argparse %-formats every help text, so a bare "15 %" broke it."""
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout and "Traceback" not in done.stderr, done.stderr[-2000:]
