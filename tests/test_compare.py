"""The comparison loop on the tiny pipeline: columns equal stock diffusers, UNet passes are counted,
outputs are complete and safe, 2 processes give the grid of 1, and the CLI fails cleanly."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import subprocess_env
from sd_distill.eval.compare import CompareConfig, run
from sd_distill.eval.grid import grid_size
from sd_distill.eval.prompts import read_prompts_file, slugify

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "inf_txt2img_loop.py"
STEPS = 2
SEED = 7
TOL = 3  # uint8 levels: fused vs unfused LoRA, batched vs not, 2 processes vs 1 (float error only)
LONG = "x" * 300
PROMPTS = ["a cat", "a dog/../../etc 'quoted' \"double\" \\ back", LONG]
REPORT_KEYS = {
    "prompts",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "ft_guidance_scale",
    "models",
    "device",
    "dtype",
    "scheduler",
    "height",
    "width",
    "columns",
    "speed_ratio_distilled_over_base",
    "fidelity",
    "clip_score",
    "grid",
    "images",
    "num_processes",
}
COLUMN_KEYS = {"key", "guidance_scale", "seconds_per_image_median", "unet_evals_per_image", "peak_memory_mb"}


def _env() -> dict[str, str]:
    return subprocess_env(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def _img(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def stock(tiny_model_dir: Path, tiny_lora_dir: Path):
    """``stock(prompt, guidance, lora)``: what stock diffusers pipelines render with the loop's arguments."""
    from diffusers import StableDiffusionPipeline

    pipes = {}
    for lora in (False, True):
        pipes[lora] = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
        pipes[lora].set_progress_bar_config(disable=True)
    pipes[True].load_lora_weights(tiny_lora_dir)  # unfused, the way users load it

    def render(prompt: str, guidance: float, lora: bool = False) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(SEED)
        out = pipes[lora](prompt, num_inference_steps=STEPS, guidance_scale=guidance, generator=generator)
        return np.asarray(out.images[0].convert("RGB")).astype(np.int16)

    return render


@pytest.fixture(scope="module")
def main_run(tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compare") / "out"
    config = CompareConfig(
        ft_model=str(tiny_lora_dir),
        out_dir=str(out),
        prompts=PROMPTS,
        seed=SEED,
        num_inference_steps=STEPS,
        also_base_without_cfg=True,
    )
    return run(config), out


def _files(report: dict, out: Path, column: str) -> list[Path]:
    return [out / entry["files"][column] for entry in report["images"]]


def test_columns_equal_stock_diffusers(main_run, stock, tiny_model_dir: Path) -> None:
    report, out = main_run
    assert report["models"]["b_model"] == str(tiny_model_dir)  # the base recorded in the LoRA folder
    assert report["guidance_scale"] == 7.5 and report["guidance_scale_source"] == "recorded"
    base, distilled, nocfg = (_files(report, out, k) for k in ("base_cfg", "distilled", "base_nocfg"))
    for i, prompt in enumerate(PROMPTS[:2]):
        assert np.array_equal(_img(base[i]), stock(prompt, 7.5))
        assert np.array_equal(_img(nocfg[i]), stock(prompt, 1.0))
        # Fused LoRA vs stock unfused: float error only (a few levels at most) ...
        stock_lora = stock(prompt, 1.0, lora=True)
        assert np.abs(_img(distilled[i]) - stock_lora).max() <= TOL
        # ... while a missing LoRA would be far off.
        assert np.abs(_img(nocfg[i]) - stock_lora).max() > 4 * TOL


def test_unet_evaluations_are_counted(main_run) -> None:
    report, _ = main_run
    cols = {c["key"]: c for c in report["columns"]}
    assert cols["base_cfg"]["unet_evals_per_image"] == 2 * STEPS
    assert cols["distilled"]["unet_evals_per_image"] == STEPS
    assert cols["base_nocfg"]["unet_evals_per_image"] == STEPS
    assert cols["distilled"]["unet_evals_per_step"] == 1.0 and cols["base_cfg"]["unet_evals_per_step"] == 2.0


def test_grid_has_a_row_per_prompt_and_a_column_per_sampler(main_run) -> None:
    _, out = main_run
    grid = Image.open(out / "grid.png")
    assert grid.size == grid_size(len(PROMPTS), 3, 32, 32)
    assert grid.size[0] == 3 * 192  # 32 px images are shown 6x larger


def test_every_image_is_saved_once_inside_out_dir_under_a_safe_name(main_run) -> None:
    _, out = main_run
    saved = {p.resolve() for p in out.rglob("*.png")} - {(out / "grid.png").resolve()}
    assert len(saved) == 3 * len(PROMPTS)
    for path in saved:
        assert out.resolve() in path.parents
        assert re.fullmatch(r"\d{3}_[a-z0-9-]{1,60}\.png", path.name), path.name


def test_report_json_is_the_returned_report(main_run) -> None:
    report, out = main_run
    on_disk = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(on_disk) and on_disk == json.loads(json.dumps(report))
    assert all(COLUMN_KEYS <= set(c) for c in on_disk["columns"])


def test_report_records_the_settings_it_ran_with(main_run) -> None:
    report, _ = main_run
    assert report["prompts"] == PROMPTS and report["seed"] == SEED and report["num_inference_steps"] == STEPS
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["num_processes"] == 1
    assert report["speed_ratio_distilled_over_base"] > 0


def test_fidelity_is_scored_and_unavailable_metrics_say_why(main_run) -> None:
    report, _ = main_run
    fid = report["fidelity"]["distilled_vs_base_cfg"]
    assert fid["psnr"] > 0 and 0 < fid["ssim"] <= 1
    assert "lpips" in fid and (fid["lpips"] is not None or fid["lpips_reason"])
    assert report["clip_score"]["value"] is None and report["clip_score"]["reason"]


def test_report_md_has_the_column_table(main_run) -> None:
    _, out = main_run
    text = (out / "report.md").read_text()
    assert text.count("|") > 10 and "| distilled |" in text


def test_unfused_lora_and_batching_keep_images(main_run, stock, tiny_lora_dir: Path, tmp_path: Path) -> None:
    report, out = main_run
    config = CompareConfig(
        ft_model=str(tiny_lora_dir),
        out_dir=str(tmp_path),
        prompts=PROMPTS[:2],
        seed=SEED,
        num_inference_steps=STEPS,
        fuse_lora=False,
        batch_size=2,
    )
    batched = run(config)
    assert batched["models"]["lora_fused"] is False
    first = _img(tmp_path / batched["images"][0]["files"]["distilled"])
    assert np.abs(first - stock(PROMPTS[0], 1.0, lora=True)).max() <= 1
    for column in ("base_cfg", "distilled"):
        for new, old in zip(_files(batched, tmp_path, column), _files(report, out, column)):
            assert np.abs(_img(new) - _img(old)).max() <= TOL  # batch of 2 vs 1: float error only


def test_fused_pipeline_folder(main_run, tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(tiny_lora_dir)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    report = run(
        CompareConfig(
            ft_model=str(tmp_path / "fused"),
            b_model=str(tiny_model_dir),
            out_dir=str(tmp_path / "out"),
            prompts=PROMPTS[:1],
            seed=SEED,
            num_inference_steps=STEPS,
        )
    )
    assert report["models"]["ft_kind"] == "pipeline"
    got = _img(tmp_path / "out" / report["images"][0]["files"]["distilled"])
    report1, out1 = main_run  # the LoRA folder's distilled image of the same prompt and seed
    assert np.abs(got - _img(out1 / report1["images"][0]["files"]["distilled"])).max() <= TOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The comparison CLI under ``accelerate launch`` with 2 processes on the CPU."""
    # `accelerate launch --cpu` spawns one process unless MPI is set up; --multi_gpu launches
    # 2 torchrun workers, and with no CUDA the loop's PartialState(cpu=True) uses gloo on the CPU.
    cmd = [
        str(REPO / ".venv/bin/accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(CLI),
        *args,
    ]
    if not Path(cmd[0]).exists():
        cmd[0:1] = [sys.executable, "-m", "accelerate.commands.launch"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=300)


def test_two_processes_give_the_same_grid(main_run, tiny_lora_dir: Path, tmp_path: Path) -> None:
    report, out = main_run
    proc = _two_processes(
        "--ft_model",
        str(tiny_lora_dir),
        "--out_dir",
        str(tmp_path),
        "--seed",
        str(SEED),
        "--num_inference_steps",
        str(STEPS),
        "--also_base_without_cfg",
        "--prompts",
        *PROMPTS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "report.json").read_text())
    assert two["num_processes"] == 2
    assert two["images"] == report["images"]  # same names, same order
    assert np.abs(_img(tmp_path / "grid.png") - _img(out / "grid.png")).max() <= TOL


def test_two_processes_stop_together_when_the_main_one_fails_to_write(tiny_lora_dir: Path, tmp_path: Path) -> None:
    """The main process writes alone; the other waits for its report, so it must learn of a failure too."""
    (tmp_path / "broken_scorer.py").write_text("def score(images, prompts):\n    raise RuntimeError('scorer broke')\n")
    env = {**_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    args = ["--ft_model", str(tiny_lora_dir), "--out_dir", str(tmp_path / "o"), "--num_inference_steps", "1"]
    proc = _two_processes(*args, "--adherence_scorer", "broken_scorer:score", "--prompts", *PROMPTS[:2], env=env)
    assert proc.returncode != 0 and "scorer broke" in proc.stderr
    assert "the main process failed: RuntimeError: scorer broke" in proc.stderr  # the other rank says why


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )


def test_cli_errors_are_one_clean_message(tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> None:
    missing = _cli("--ft_model", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o"))
    empty_file = tmp_path / "prompts.txt"
    empty_file.write_text("# only a comment\n\n   \n")
    empty = _cli("--ft_model", str(tiny_lora_dir), "--prompts_file", str(empty_file), "--out_dir", str(tmp_path / "o"))
    orphan = tmp_path / "orphan-lora"  # LoRA weights, but no recorded base and no --b_model
    orphan.mkdir()
    (orphan / "pytorch_lora_weights.safetensors").write_bytes(
        (tiny_lora_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
    (orphan / "sd_distill_config.json").write_text(json.dumps({"guidance_scale": 7.5, "lora_rank": 4}))
    unknown = _cli("--ft_model", str(orphan), "--out_dir", str(tmp_path / "o"))
    for proc, words in ((missing, "not found"), (empty, "empty"), (unknown, "--b_model")):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert words in stderr, stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "o").exists()  # failed before writing anything


def test_prompt_helpers(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# header\nA cat\n\n  a dog  \n#x\n")
    assert read_prompts_file(f) == ["A cat", "a dog"]
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("'\"/\\..") == "prompt"
    assert len(slugify(LONG)) == 60
    assert slugify("Ünïcödé café") == "unicode-cafe"


def test_synthetic_captions_get_an_adherence_score_per_column(tiny_lora_dir: Path, tmp_path: Path) -> None:
    from sd_distill.toy.checker import parse_caption

    prompts = [
        "a large red circle in the center on a black background",
        "a small blue square in the top left on a white background",
    ]
    [parse_caption(p) for p in prompts]  # the grammar the toy teacher learnt
    report = run(
        CompareConfig(
            ft_model=str(tiny_lora_dir),
            out_dir=str(tmp_path / "o"),
            prompts=prompts,
            num_inference_steps=STEPS,
            seed=SEED,
            also_base_without_cfg=True,
        )
    )
    assert set(report["adherence"]) == {"base_cfg", "distilled", "base_nocfg"}
    assert all(0.0 <= v <= 1.0 for v in report["adherence"].values())
    assert report["fidelity"]["distilled_vs_base_cfg"]["mse"] >= 0.0


def test_ordinary_prompts_get_no_adherence_score(main_run: tuple[dict, Path]) -> None:
    report, _ = main_run
    assert report["adherence"] is None


def test_deepspeed_inference_is_gone() -> None:
    from sd_distill.eval.config import parse_args

    with pytest.raises(SystemExit):  # argparse: unrecognised argument
        parse_args(["--ft_model", "x", "--deepspeed_inference"])


def test_a_lora_of_another_base_is_one_line_printed_by_rank_0_only(
    tiny_model_dir: Path, wide_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from diffusers import UNet2DConditionModel

    from sd_distill.lora import adapter_metadata, attach_lora, lora_state_dict, save_lora

    sys.path.insert(0, str(REPO))
    from inf_txt2img_loop import main

    unet = UNet2DConditionModel.from_pretrained(wide_model_dir, subfolder="unet")
    attach_lora(unet, rank=4)
    lora = save_lora(lora_state_dict(unet), tmp_path / "wide-lora", adapter_metadata(unet)).parent
    (lora / "sd_distill_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(wide_model_dir)}))
    argv = [
        "--ft_model",
        str(lora),
        "--b_model",
        str(tiny_model_dir),
        "--out_dir",
        str(tmp_path / "o"),
        "--prompts",
        "a",
    ]
    for rank, expected in (("1", 0), ("0", 1)):  # every rank fails alike; only rank 0 says so
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == expected, err
    assert "does not fit base" in errors[0] and f"--b_model {wide_model_dir}" in errors[0]
    assert "size mismatch" not in errors[0] and len(errors[0]) < 400  # found before diffusers' per-layer list
