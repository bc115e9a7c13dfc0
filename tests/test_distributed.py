"""Real ``accelerate launch`` runs: 2 processes on the CPU (gloo) under DeepSpeed ZeRO-2 and ZeRO-3.

Each run has a time limit, so a hang in save, validation or resume fails the test instead of
stalling CI (the seed recipe's main-process-only save hangs exactly there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import lora_output_change, subprocess_env, train_args, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 420  # generous: the first DeepSpeed launch on a machine compiles a small op


def _launch(config: str | Path, argv: list[str], log: Path) -> None:
    proc = _launched(config, argv, log)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _launched(
    config: str | Path, argv: list[str], log: Path, script: Path = ROOT / "train_sd_distil_lora.py", **env_extra: str
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the training CLI (or ``script``); its stdout and stderr go to ``log``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = subprocess_env(**env_extra)
    with open(log, "w") as handle:
        return subprocess.run(
            [
                str(accelerate),
                "launch",
                "--config_file",
                str(ROOT / "accelerate_configs" / config),  # an absolute path stays as it is
                "--main_process_port",
                "0",
                str(script),
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


@pytest.mark.parametrize(
    "config, rank, file, kind, says",
    [
        ("cpu_2proc_zero2.yaml", "1", "zero_pp_rank_1", "enospc", "no space left on the device writing"),
        ("cpu_2proc_zero2.yaml", "0", "mp_rank_00_model_states", "enospc", "no space left on the device writing"),
        ("cpu_2proc_zero2.yaml", "1", "zero_pp_rank_1", "other", "writing '"),  # not the disk: one line, no hang
        ("cpu_2proc_zero3.yaml", "1", "zero_pp_rank_1", "enospc", "no space left on the device writing"),
    ],
    ids=["rank1-shard", "rank0-model", "rank1-other-error", "zero3-rank1-shard"],
)
def test_a_failed_write_on_one_rank_mid_checkpoint_stops_both_at_once(
    config: str, rank: str, file: str, kind: str, says: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """DeepSpeed runs collectives between and after the ranks' checkpoint writes (a barrier; under ZeRO-3
    an all_gather too): one rank's failed write (a full disk) must not leave the others waiting in them
    until --ddp_timeout (attack finding F7)."""
    data = write_image_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    argv = train_args(tiny_model_dir, data, out, "--ddp_timeout", "300", steps=4)  # a hang waits this long
    started = time.monotonic()
    proc = _launched(
        config, argv, tmp_path / "log", ROOT / "tests" / "faulty_train.py",
        SD_FAULT_RANK=rank, SD_FAULT_FILE=file, SD_FAULT_KIND=kind,
    )  # fmt: skip
    text = (tmp_path / "log").read_text()
    assert proc.returncode != 0 and time.monotonic() - started < 300, text[-3000:]  # not the collective's timeout
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {says}"), text[-3000:]
    assert "checkpoint-2 was not written" in errors[0]
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".checkpoint-*"))  # nothing half-written


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


def test_bf16_deepspeed_saves_the_fp32_master_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Under bf16 the engine's module holds a rounded copy; the LoRA files must hold what the optimizer
    trained (ZeRO-2 keeps it as sharded fp32 partitions, reassembled here with DeepSpeed's own tool)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    config = tmp_path / "bf16.yaml"
    config.write_text((ROOT / "accelerate_configs" / "cpu_2proc_zero2.yaml").read_text().replace("'no'", "bf16"))
    data = write_image_folder(tmp_path / "data", n=8)
    out = tmp_path / "out"
    _launch(config, train_args(tiny_model_dir, data, out, steps=2), tmp_path / "bf16.log")
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["mixed_precision"] == "bf16" and state["num_processes"] == 2 and state["zero_stage"] == 2

    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-2" / "pytorch_model"), tag=".")
    for folder in (out, out / "checkpoint-2"):
        saved = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        for key, value in saved.items():
            assert value.dtype == torch.float32, key
            master = masters[key.removeprefix("unet.").replace(".weight", ".default.weight")]
            assert torch.equal(value, master), key
        assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values()), "a bf16-rounded copy"

    # the same DeepSpeed checkpoint resumed without DeepSpeed: one line before any model loads
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_sd_distil_lora.py")]
        + train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=4),
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "written with DeepSpeed and this run is not under DeepSpeed" in proc.stderr


def test_two_machines_without_a_shared_output_dir_both_stop_with_one_message(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two "machines" on one host, each in its own folder with a relative --output_dir: neither can
    see the other's files, so both must stop at once (not hang in the first save or the cache)."""
    import socket

    config = tmp_path / "two_machines.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 2\n"
        "mixed_precision: 'no'\nuse_cpu: true\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = write_image_folder(tmp_path / "data", n=4)
    accelerate = Path(sys.executable).with_name("accelerate")
    procs, logs = [], []
    for rank in (0, 1):
        node = tmp_path / f"machine{rank}"
        node.mkdir()
        logs.append(node / "log.txt")
        cmd = [str(accelerate), "launch", "--config_file", str(config), "--machine_rank", str(rank)]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_machines", "2"]
        cmd += ["--num_processes", "2", str(ROOT / "train_sd_distil_lora.py")]
        cmd += train_args(tiny_model_dir, data, Path("out"))
        with open(logs[-1], "w") as log:
            # the multi-GPU launcher (torchrun, one per machine) leaves use_cpu to the process: without
            # ACCELERATE_USE_CPU each process would run alone (distributed type NO) instead of over gloo
            env = subprocess_env(ACCELERATE_USE_CPU="true", SD_DISTILL_SHARED_WAIT_S="1")
            procs.append(subprocess.Popen(cmd, cwd=node, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for code, log in zip(codes, logs):
        text = log.read_text()
        assert code != 0, text[-3000:]
        assert "error: --output_dir 'out' is not on a disk that every machine shares" in text, text[-3000:]
    assert not (tmp_path / "machine1" / "out").exists()  # the other machine wrote nothing


def test_zero3_refuses_a_range_students_weight_averaging_before_any_model_loads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data, out, log = write_image_folder(tmp_path / "data", n=4), tmp_path / "out", tmp_path / "log.txt"
    argv = train_args(tiny_model_dir, data, out, "--guidance_scale_range", "2", "8", steps=2)
    proc = _launched("cpu_2proc_zero3.yaml", argv, log)
    text = log.read_text()
    errors = {line for line in text.splitlines() if line.startswith("error:")}
    assert proc.returncode != 0 and len(errors) == 1, text[-4000:]
    assert "ZeRO-3" in errors.pop() and "loaded" not in text and not (out / "pytorch_lora_weights.safetensors").exists()
