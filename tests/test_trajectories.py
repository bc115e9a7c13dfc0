"""Guided trajectories as training states: the buffer is what stock diffusers samples, it resumes
after a kill, and ranks split it without overlap."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sd_distill.models import encode_prompts, load_components
from sd_distill.train.trajectories import TrajectorySpec, build_buffer, load_buffer, shard_path, walk

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _teacher(unet):
    @contextmanager
    def teacher():
        yield unet

    return teacher


def _spec(components, steps: int = 4, shard_size: int = 2) -> TrajectorySpec:
    return TrajectorySpec(
        model="tiny",
        scheduler=dict(components.noise_scheduler.config),
        prompts_sha1="x",
        num_prompts=len(PROMPTS),
        trajectories_per_prompt=1,
        steps=steps,
        scales=(2.0, 9.0, "uniform"),
        seed=0,
        latent_shape=(4, 16, 16),
        shard_size=shard_size,
        driver="teacher",
    )


class _Ranks:
    """The parts of an accelerator that buffer generation uses, for rank ``index`` of ``world``."""

    def __init__(self, index: int = 0, world: int = 1) -> None:
        self.process_index, self.num_processes = index, world
        self.is_main_process, self.device = index == 0, torch.device("cpu")
        self.is_local_main_process = self.is_main_process
        self.distributed_type = "MULTI_CPU" if world > 1 else "NO"

    def wait_for_everyone(self) -> None:
        pass


def test_a_teacher_trajectory_is_the_stock_ddim_cfg_run(tiny_model_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    components = load_components(str(tiny_model_dir))
    cond = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS[:1])
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    out = walk(components, _teacher(components.unet), cond, uncond, torch.tensor([7.5]), [11], 4, (4, 16, 16))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0][1:].clone()))  # the cond half of [u; c]
    final = pipe(
        PROMPTS[0],
        guidance_scale=7.5,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
    ).images
    assert torch.equal(out["states"].float(), torch.cat(seen).half().float())  # every visited state
    # and the teacher's image comes back from the buffer: one more DDIM step from the last state
    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    scheduler.set_timesteps(4)
    last = scheduler.step(out["targets"][-1:].float(), scheduler.timesteps[-1], out["states"][-1:].float()).prev_sample
    assert (last - final).abs().max() < 1e-3 * final.abs().max()  # fp16 storage of the last state and target


def _build(folder: Path, model: Path, ranks: _Ranks):
    components = load_components(str(model))
    spec = _spec(components)
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])

    def embed(indices: list[int]) -> torch.Tensor:
        return encode_prompts(components.tokenizer, components.text_encoder, [PROMPTS[i] for i in indices])

    build_buffer(spec, folder, embed, components, _teacher(components.unet), uncond, ranks)
    return spec


def test_a_killed_generation_keeps_its_finished_shards_and_gives_the_same_buffer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _build(tmp_path / "full", tiny_model_dir, _Ranks())
    full = load_buffer(tmp_path / "full", spec)
    _build(tmp_path / "part", tiny_model_dir, _Ranks())
    shard_path(tmp_path / "part", 1).unlink()  # as if killed before the last shard was written
    kept = shard_path(tmp_path / "part", 0).stat().st_mtime_ns
    _build(tmp_path / "part", tiny_model_dir, _Ranks())
    assert shard_path(tmp_path / "part", 0).stat().st_mtime_ns == kept  # not generated again
    resumed = load_buffer(tmp_path / "part", spec)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert len(full["t"]) == len(PROMPTS) * spec.steps and sorted(set(full["prompt"].tolist())) == [0, 1, 2]


def test_two_ranks_split_the_shards_without_overlap_or_loss(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from sd_distill.train.config import ConfigError

    monkeypatch.setenv("SD_DISTILL_SHARED_WAIT_S", "0")
    spec = _build(tmp_path / "one", tiny_model_dir, _Ranks())
    shared = tmp_path / "two"
    # rank 0 (main) writes the spec and its shards only; alone, it cannot see rank 1's: as on a
    # machine whose --trajectory_dir is not shared, it stops with one message instead of crashing
    with pytest.raises(ConfigError, match="not on a disk that every machine shares"):
        _build(shared, tiny_model_dir, _Ranks(0, 2))
    assert sorted(p.name for p in shared.glob("shard-*")) == ["shard-00000.safetensors"]
    _build(shared, tiny_model_dir, _Ranks(1, 2))
    assert sorted(p.name for p in shared.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    merged, single = load_buffer(shared, spec), load_buffer(tmp_path / "one", spec)
    assert all(torch.equal(merged[k], single[k]) for k in single)


def test_a_disk_without_room_for_the_buffer_is_refused_before_generating(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import sd_distill.train.shards as shards
    from sd_distill.train.config import ConfigError

    monkeypatch.setattr(shards, "free_bytes", lambda folder: 1000)  # a nearly full disk
    with pytest.raises(ConfigError, match="not enough disk space for the trajectory buffer"):
        _build(tmp_path / "full", tiny_model_dir, _Ranks())
    assert not list((tmp_path / "full").glob("shard-*"))


def test_a_disk_that_fills_mid_buffer_is_one_line_and_keeps_the_written_shards(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from sd_distill.train.config import ConfigError

    real, calls = safetensors.torch.save_file, []

    def fills_up(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        calls.append(filename)
        if len(calls) == 1:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"half a shard")  # what safetensors raises, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    monkeypatch.setattr("sd_distill.files.free_bytes", lambda path: 0)
    folder = tmp_path / "buffer"
    with pytest.raises(ConfigError) as err:
        _build(folder, tiny_model_dir, _Ranks())
    message = str(err.value)
    assert message.startswith("disk full writing ") and "shard-00001" in message and "--trajectory_dir" in message
    assert sorted(p.name for p in folder.iterdir()) == ["buffer.json", "shard-00000.safetensors"]  # no half shard


def test_the_half_shard_of_a_killed_run_is_removed(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "buffer"
    folder.mkdir()
    (folder / ".shard-00001.safetensors.tmp-999999999").write_bytes(b"half a shard")  # its writer is dead
    _build(folder, tiny_model_dir, _Ranks())
    assert sorted(p.name for p in folder.iterdir()) == [
        "buffer.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
