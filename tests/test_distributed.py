"""Real ``accelerate launch`` runs: 2 processes on the CPU (gloo) under DeepSpeed ZeRO-2 and ZeRO-3.

Each run has a time limit, so a hang in save, validation or resume fails the test instead of
stalling CI (the seed recipe's main-process-only save hangs exactly there).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import lora_output_change, subprocess_env, train_args, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 420  # generous: the first DeepSpeed launch on a machine compiles a small op


def _launch(config: str, argv: list[str], log: Path) -> None:
    proc = _launched(config, argv, log)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _launched(config: str, argv: list[str], log: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the training CLI; its stdout and stderr go to ``log``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = subprocess_env()
    with open(log, "w") as handle:
        return subprocess.run(
            [
                str(accelerate),
                "launch",
                "--config_file",
                str(ROOT / "accelerate_configs" / config),
                "--main_process_port",
                "0",
                str(ROOT / "train_sd_distil_lora.py"),
                *argv,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=TIME_LIMIT_S,
            env=env,
            cwd=ROOT,
        )


@pytest.mark.parametrize("config", ["cpu_2proc_zero2.yaml", "cpu_2proc_zero3.yaml"])
def test_two_process_deepspeed_trains_checkpoints_resumes_and_exports(
    config: str, wide_model_dir: Path, tmp_path: Path
) -> None:
    data = write_image_folder(tmp_path / "data", n=8)
    out = tmp_path / "out"
    common = (
        "--validation_steps",
        "2",
        "--num_validation_inference_steps",
        "2",
        "--default_prompt",
        "a red circle",
        "--checkpoints_total_limit",
        "2",
    )
    _launch(config, train_args(wide_model_dir, data, out, *common, steps=2), tmp_path / "first.log")
    assert (out / "checkpoint-2").is_dir() and (out / "validation" / "step-2").is_dir()
    _launch(
        config,
        train_args(wide_model_dir, data, out, *common, "--resume_from_checkpoint", "latest", steps=4),
        tmp_path / "second.log",
    )
    assert "resumed from" in (tmp_path / "second.log").read_text()
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["global_step"] == 4
    assert len(list(out.glob("checkpoint-*"))) == 2 and not list(out.glob(".checkpoint-*"))

    # The checkpoint holds the adapter and its optimizer state, never the frozen base.
    unet_bytes = (wide_model_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    ckpt_bytes = sum(f.stat().st_size for f in (out / "checkpoint-4").rglob("*") if f.is_file() and f.suffix != ".py")
    assert ckpt_bytes < 0.25 * unet_bytes, (ckpt_bytes, unet_bytes)
    model_state_files = list((out / "checkpoint-4" / "pytorch_model").glob("*model_states.pt"))
    assert model_state_files
    for path in model_state_files:  # ZeRO-2 writes one, ZeRO-3 one per rank
        saved_keys = list(torch.load(path, weights_only=False).get("module") or {})
        assert all("lora_" in k for k in saved_keys), [k for k in saved_keys if "lora_" not in k][:5]

    # The exported adapter loads in stock diffusers and changes what the UNet predicts.
    before, after = lora_output_change(wide_model_dir, out)
    assert not torch.allclose(before, after, atol=1e-5)
    print(f"{config}: checkpoint {ckpt_bytes / 1024:.0f} KiB, UNet {unet_bytes / 1024:.0f} KiB")


def test_two_ranks_split_the_cache_and_assemble_what_one_process_writes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from helpers import run_training

    data = write_image_folder(tmp_path / "data", n=20, size=(36, 36))  # chunks of 16 rows: 16 + 4
    cached = ("--cache_latents", "--cache_text_embeddings", "--checkpointing_steps", "100")
    log = tmp_path / "two.log"
    _launch("cpu_2proc_zero2.yaml", train_args(tiny_model_dir, data, tmp_path / "two", *cached, steps=1), log)
    text = log.read_text()
    assert "rows looked at per rank: [16, 4]" in text and "rows per rank: [16, 4]" in text  # each its share
    assert text.count("done: 1 steps") == 1  # printed by rank 0 only

    run_training(train_args(tiny_model_dir, data, tmp_path / "one", *cached, steps=1))
    for kind in ("latents", "text"):
        [two] = (tmp_path / "two" / "cache").glob(f"{kind}-*.safetensors")
        [one] = (tmp_path / "one" / "cache").glob(f"{kind}-*.safetensors")
        assert two.name == one.name
        a, b = load_file(str(two)), load_file(str(one))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    assert not list((tmp_path / "two" / "cache").glob(".*part*"))  # the ranks' parts are removed


def test_two_ranks_stop_together_on_a_stream_of_unreadable_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"image": [b"not an image"] * 6, "text": ["x"] * 6}).to_parquet(
        str(tmp_path / "s.parquet")
    )
    argv = train_args(tiny_model_dir, tmp_path, tmp_path / "out", "--streaming", steps=2)
    argv[argv.index("--train_data_dir") : argv.index("--train_data_dir") + 2] = [
        "--dataset_name",
        str(tmp_path / "s.parquet"),
    ]
    proc = _launched("cpu_2proc_zero2.yaml", argv, tmp_path / "stream.log")
    text = (tmp_path / "stream.log").read_text()
    assert proc.returncode != 0  # and no hang: _launched has a time limit
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 6 of the last 6 rows read cannot be"), text[-3000:]
