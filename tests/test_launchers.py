"""Every shipped accelerate config loads; the seed's launcher and the ds-json path really train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import subprocess_env, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return subprocess_env(PATH=bin_dir + os.pathsep + os.environ["PATH"])


def _launch(config: Path, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file config train_sd_distil_lora.py args`` on a free port."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(config), "--main_process_port", "0"]
    return subprocess.run(
        [*cmd, str(ROOT / "train_sd_distil_lora.py"), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_accelerate_config_loads(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    raw = yaml.safe_load(path.read_text())
    ds = raw.get("deepspeed_config") or {}
    if "deepspeed_config_file" in ds:
        assert json.loads((ROOT / ds["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"] in (
            0,
            1,
            2,
            3,
        )
    elif raw["distributed_type"] == "DEEPSPEED":
        assert ds["zero_stage"] in (0, 1, 2, 3)


def test_mytrainbash_honours_env_overrides_and_passes_extra_args(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    env = {
        **_env(),
        "MODEL_NAME": str(tiny_model_dir),
        "OUTPUT_DIR": str(out),
        "DATASET_NAME": str(data),
        "ACCELERATE_CONFIG": str(ROOT / "accelerate_configs" / "cpu_demo.yaml"),
        "RESOLUTION": "32",
        "LEARNING_RATE": "2e-4",
    }
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "mytrainbash.sh"),
            "--max_train_steps",
            "2",
            "--report_to",
            "none",
            "--default_prompt",
            "",
            "--lora_rank",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "sd_distill_config.json").read_text())
    assert saved["pretrained_model_name_or_path"] == str(tiny_model_dir)
    assert saved["learning_rate"] == 2e-4 and saved["lora_rank"] == 2 and saved["resolution"] == 32
    assert saved["lr_scheduler"] == "constant"  # a fixed-w student's default
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_mytrainbash_trains_from_a_prompts_file_at_a_range_of_scales(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\na blue square\n")
    env = {
        **_env(),
        "MODEL_NAME": str(tiny_model_dir),
        "OUTPUT_DIR": str(out),
        "PROMPTS_FILE": str(prompts),  # no DATASET_NAME: the launcher must not pass its hub default
        "GUIDANCE_SCALE_RANGE": "2 8",
        "ACCELERATE_CONFIG": str(ROOT / "accelerate_configs" / "cpu_demo.yaml"),
        "RESOLUTION": "32",
    }
    argv = ["--max_train_steps", "2", "--report_to", "none", "--default_prompt", "", "--trajectory_steps", "2"]
    proc = subprocess.run(
        ["bash", str(ROOT / "mytrainbash.sh"), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "sd_distill_config.json").read_text())
    assert saved["train_states"] == "teacher_trajectories" and saved["dataset_name"] is None
    assert saved["prompts_file"] == str(prompts) and saved["guidance_scale_range"] == [2.0, 8.0]
    assert saved["lr_scheduler"] == "warmup_stable_decay"  # the CLI's default for a range, not the launcher's


def test_mytrainbash_resolves_your_paths_where_you_run_it_and_takes_the_data_from_your_args(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    write_image_folder(tmp_path / "data", n=4)
    env = {
        **_env(),
        "MODEL_NAME": str(tiny_model_dir),
        "OUTPUT_DIR": "out",  # relative: to the folder it is run from, not the repository
        "ACCELERATE_CONFIG": "accelerate_configs/cpu_demo.yaml",  # the repository's, found from anywhere
        "RESOLUTION": "32",
    }
    argv = ["--train_data_dir", "data", "--max_train_steps", "1", "--report_to", "none", "--default_prompt", ""]
    proc = subprocess.run(
        ["bash", str(ROOT / "mytrainbash.sh"), *argv],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "sd_distill_config.json").read_text())
    assert saved["train_data_dir"] == "data" and saved["dataset_name"] is None  # no hub default beside it
    assert not (ROOT / "out").exists()


def test_mytrainbash_on_one_process_ends_with_our_error_line_not_the_launchers_traceback(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Attack finding F2: accelerate's launcher printed its own CalledProcessError traceback after our line."""
    env = {**_env(), "MODEL_NAME": str(tiny_model_dir), "ACCELERATE_CONFIG": "accelerate_configs/cpu_demo.yaml"}
    argv = ["--train_data_dir", str(tmp_path), "--resolution", "100"]  # refused: not a multiple of 8
    proc = subprocess.run(
        ["bash", str(ROOT / "mytrainbash.sh"), *argv],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "--resolution" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]


def test_mytrainbash_refuses_two_data_sources_in_the_environment(tmp_path: Path) -> None:
    env = {**_env(), "PROMPTS_FILE": "p.txt", "DATASET_NAME": "some/dataset", "ACCELERATE": "false"}
    proc = subprocess.run(["bash", str(ROOT / "mytrainbash.sh")], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: PROMPTS_FILE and DATASET_NAME are both set")


def test_deepspeed_json_config_with_auto_values_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The shipped ds json ("auto" batch size, accumulation, clipping, precision) on 2 CPU processes."""
    raw = yaml.safe_load((ROOT / "accelerate_configs" / "deepspeed_json.yaml").read_text())
    raw["deepspeed_config"]["deepspeed_config_file"] = str(ROOT / raw["deepspeed_config"]["deepspeed_config_file"])
    raw.update(num_processes=2, use_cpu=True)  # precision stays "auto" in the json
    config = tmp_path / "ds_json_cpu.yaml"
    config.write_text(yaml.safe_dump(raw))
    data = write_image_folder(tmp_path / "data", n=8)
    out = tmp_path / "out"
    args = [
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--report_to",
        "none",
        "--default_prompt",
        "",
        "--max_grad_norm",
        "0.5",
    ]
    proc = _launch(config, args, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2
    # What DeepSpeed really used (its checkpoint records it): the flags, not accelerate's constants.
    used = deepspeed_checkpoint_record(out / "checkpoint-2")
    assert used["ds_config"]["gradient_accumulation_steps"] == 2 and used["ds_config"]["gradient_clipping"] == 0.5
    assert used["global_samples"] == 2 * 2 * 1 * 2  # steps x accumulation x batch x processes


def deepspeed_checkpoint_record(checkpoint: Path) -> dict:
    import torch

    (states,) = (checkpoint / "pytorch_model").glob("mp_rank_00_model_states.pt")
    return torch.load(states, weights_only=False, map_location="cpu")


def test_shipped_deepspeed_yamls_leave_accumulation_and_clipping_to_the_flags() -> None:
    for path in CONFIGS:
        ds = yaml.safe_load(path.read_text()).get("deepspeed_config") or {}
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds, path.name


def test_a_yaml_accumulation_that_contradicts_the_flag_stops_before_loading(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    text = (ROOT / "accelerate_configs" / "cpu_2proc_zero2.yaml").read_text()
    config = tmp_path / "ga1.yaml"
    config.write_text(text.replace("  zero_stage: 2\n", "  zero_stage: 2\n  gradient_accumulation_steps: 1\n"))
    data = write_image_folder(tmp_path / "data", n=4)
    args = [
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--gradient_accumulation_steps",
        "2",
        "--report_to",
        "none",
    ]
    proc = _launch(config, args, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]  # the launcher reports a child's exit 2 as 1
    assert (
        "--gradient_accumulation_steps 2" in proc.stderr
        and "deepspeed_config.gradient_accumulation_steps says 1" in proc.stderr
    )
    # one message from rank 0 (the launcher adds its own traceback when a child fails)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --gradient_accumulation_steps 2 conflicts")
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
