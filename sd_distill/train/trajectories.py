"""Guided trajectories as training states: sample, record every visited state with the teacher's
guided prediction there, and keep them in fp16 shards on disk.

One trajectory: a prompt, a seeded initial noise and a guidance scale ``w``. DDIM (the run's noise
schedule) walks it in lockstep for a shard of trajectories; at each step the state the UNet sees is
recorded with ``u + w (c - u)`` of the teacher (the adapter-disabled UNet, one ``[∅; c]`` pass).
The walk is driven by the teacher's guided prediction (``teacher`` trajectories, what guided
sampling visits) or by the student's one-pass prediction (``student``: where the student actually
goes, labelled by the teacher). Training on a buffer then runs no teacher pass at all.

The teacher walk is what a stock ``StableDiffusionPipeline`` with a DDIM scheduler does at
``guidance_scale=w`` with ``torch.Generator().manual_seed(seed)``: the buffer reproduces its image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import remove_stale_temps, write_error
from ..guidance import GuidanceScales, teacher_cfg_prediction
from ..models import Components
from .collective import main_process_writes
from .loader import epoch_and_index
from .shards import agree_on_error, every_rank, nbytes, space_error, world_and_rank, write_atomic
from .targets import Teacher

logger = logging.getLogger(__name__)
_FLAGS = "--trajectory_dir (or --cache_dir)"  # the folders a buffer is written in, for messages

FORMAT_VERSION = 1
SPEC_FILE = "buffer.json"
# (x_in [K, C, h, w], t [K], cond [K, L, D], w [K]) -> the student's prediction, for student-driven walks
StudentPredict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrajectorySpec:
    """Everything a buffer's content depends on (its folder name is a hash of it)."""

    model: str
    scheduler: dict[str, Any]
    prompts_sha1: str
    num_prompts: int
    trajectories_per_prompt: int
    steps: int
    scales: tuple[float, float, str]  # low, high, sampling
    seed: int
    latent_shape: tuple[int, int, int]  # C, h, w
    shard_size: int  # trajectories per shard, also the generation batch
    driver: str  # "teacher" | "student"
    version: int = FORMAT_VERSION

    @property
    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def num_trajectories(self) -> int:
        return self.num_prompts * self.trajectories_per_prompt

    @property
    def num_shards(self) -> int:
        return -(-self.num_trajectories // self.shard_size)

    def bytes_per_state(self) -> int:
        c, h, w = self.latent_shape
        return 2 * 2 * c * h * w + 4 + 4 + 4 + 8  # fp16 state + target, t, w, prompt index, trajectory id

    def trajectory_seed(self, trajectory: int) -> int:
        return (self.seed * 1_000_003 + trajectory) % (2**63)


def trajectory_scales(spec: TrajectorySpec, trajectories: range) -> torch.Tensor:
    """``w`` of each trajectory, drawn from its own seed (the same on every rank and every resume)."""
    low, high, sampling = spec.scales
    scales = GuidanceScales(low, high, sampling)
    out = []
    for j in trajectories:
        gen = torch.Generator().manual_seed(spec.trajectory_seed(j) ^ 0x5EED)
        w = scales.draw(1, gen, "cpu")
        out.append(float(w) if isinstance(w, float) else float(w[0]))
    return torch.tensor(out, dtype=torch.float32)


@torch.no_grad()
def walk(
    components: Components,
    teacher: Teacher,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    w: torch.Tensor,
    seeds: list[int],
    steps: int,
    latent_shape: tuple[int, int, int],
    student: StudentPredict | None = None,
) -> dict[str, torch.Tensor]:
    """One lockstep batch of ``K`` trajectories; returns ``states``/``targets`` ``[K * steps, C, h, w]``
    (fp16, trajectory-major) and ``t`` ``[K * steps]``. ``student`` drives the walk when given."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    device, dtype = cond.device, cond.dtype
    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    k = len(seeds)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    x = randn_tensor((k, *latent_shape), generator=generators, device=device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    states, targets, times = [], [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        t_batch = t.expand(k)
        with teacher() as unet:
            target = teacher_cfg_prediction(unet, x_in.to(dtype), t_batch, cond, uncond, w.to(device))
        states.append(x_in.half().cpu()), targets.append(target.half().cpu()), times.append(t_batch.cpu())
        drive = target if student is None else student(x_in.to(dtype), t_batch, cond, w.to(device)).float()
        x = scheduler.step(drive.to(x.dtype), t, x, eta=0.0, return_dict=False)[0]
    # [steps, K, ...] -> trajectory-major [K * steps, ...]
    return {
        "states": torch.stack(states, 1).flatten(0, 1).contiguous(),
        "targets": torch.stack(targets, 1).flatten(0, 1).contiguous(),
        "t": torch.stack(times, 1).flatten().to(torch.int32),
    }


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def build_buffer(
    spec: TrajectorySpec,
    folder: Path,
    prompt_embeddings: Callable[[list[int]], torch.Tensor],
    components: Components,
    teacher: Teacher,
    uncond: torch.Tensor,
    accelerator: Any,
    student: StudentPredict | None = None,
) -> Path:
    """Generate the shards this rank owns (shard ``k`` belongs to rank ``k mod world``) that are not on
    disk yet, then wait for every rank. A killed run keeps its finished shards."""

    folder.mkdir(parents=True, exist_ok=True)
    _check_spec(folder, spec, accelerator)
    world, rank = world_and_rank(accelerator)
    mine = [k for k in range(spec.num_shards) if k % world == rank]
    todo = [k for k in mine if not shard_path(folder, k).is_file()]
    # half shards of a killed run; before the collective space check, so no rank of this run writes one yet
    remove_stale_temps(folder, "shard-*")
    _check_space(folder, spec, len(todo), accelerator)
    error = None
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="trajectories", unit="shard", disable=not accelerator.is_local_main_process)
    for shard in bar:
        first = shard * spec.shard_size
        trajectories = range(first, min(first + spec.shard_size, spec.num_trajectories))
        prompts = [j % spec.num_prompts for j in trajectories]
        w = trajectory_scales(spec, trajectories)
        seeds = [spec.trajectory_seed(j) for j in trajectories]
        out = walk(
            components, teacher, prompt_embeddings(prompts), uncond, w, seeds, spec.steps, spec.latent_shape, student
        )
        out["w"] = w.repeat_interleave(spec.steps)
        out["prompt"] = torch.tensor(prompts, dtype=torch.int32).repeat_interleave(spec.steps)
        out["trajectory"] = torch.tensor(list(trajectories), dtype=torch.int64).repeat_interleave(spec.steps)
        error = _save_shard(shard_path(folder, shard), out, {"key": spec.key, "shard": str(shard)})
        if error:  # a disk that filled after the space check: stop, and stop every rank with this line
            error += " The shards written so far are kept; a rerun goes on from them."
            break
    agree_on_error(accelerator, error)
    seconds = time.perf_counter() - start
    if todo:
        logger.info(
            "rank %d generated %d trajectory shard(s) in %.1f s (%.3f s per state)",
            rank,
            len(todo),
            seconds,
            seconds / max(1, len(todo) * spec.shard_size * spec.steps),
        )
    accelerator.wait_for_everyone()
    _check_all_visible(folder, spec, accelerator)
    return folder


def _check_all_visible(folder: Path, spec: TrajectorySpec, accelerator: Any) -> None:
    """Every rank reads every shard: on machines without a shared ``--trajectory_dir`` each sees only
    its own machine's, so all stop with one message (no rank waits for another that crashed)."""
    from .rundir import SHARED_WAIT_S

    wait = float(os.environ.get("SD_DISTILL_SHARED_WAIT_S", SHARED_WAIT_S))
    deadline = time.monotonic() + wait
    missing = [k for k in range(spec.num_shards) if not shard_path(folder, k).is_file()]
    while missing and time.monotonic() < deadline:  # a network filesystem may show them late
        time.sleep(0.2)
        missing = [k for k in missing if not shard_path(folder, k).is_file()]
    if not every_rank(accelerator, not missing):
        from .config import ConfigError

        raise ConfigError(
            f"the trajectory buffer {folder} is not on a disk that every machine shares: each rank generates "
            "its share of the shards and every rank reads all of them. Put --trajectory_dir (or --cache_dir) on "
            "a shared filesystem, at the same path on every machine."
        )


def _check_spec(folder: Path, spec: TrajectorySpec, accelerator: Any) -> None:
    """The folder holds this spec's buffer or nothing (its name is the spec's hash; the file says why)."""
    path = folder / SPEC_FILE

    def write_spec() -> None:
        if path.exists():
            return
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": spec.key, **asdict(spec)}, indent=2))
            os.replace(tmp, path)
        except OSError as err:  # a full or read-only disk: every rank's line, none left waiting
            raise write_error(err, path) from None

    main_process_writes(accelerator, write_spec)  # also the barrier: every rank reads it next
    recorded = json.loads(path.read_text()).get("key")
    if recorded != spec.key:
        from .config import ConfigError

        raise ConfigError(
            f"{folder} holds a trajectory buffer of other settings (key {recorded}, this run {spec.key}); "
            "give another --trajectory_dir or remove that folder."
        )


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
    """Write one shard atomically; a failure (a full disk) as one line."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), nbytes(tensors), _FLAGS)


def _check_space(folder: Path, spec: TrajectorySpec, shards: int, accelerator: Any) -> None:
    """Room for this rank's missing shards; a rank short of it stops every rank (none waits alone)."""
    need = shards * spec.shard_size * spec.steps * spec.bytes_per_state()
    agree_on_error(accelerator, space_error(folder, need, "trajectory buffer", _FLAGS))


def load_buffer(folder: Path, spec: TrajectorySpec) -> dict[str, torch.Tensor]:
    """All shards, concatenated in shard order (the same on every rank)."""
    from safetensors.torch import load_file

    shards = [load_file(str(shard_path(folder, k))) for k in range(spec.num_shards)]
    buffer = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    logger.info(
        "trajectory buffer %s: %d states, %.1f MB",
        folder,
        len(buffer["t"]),
        sum(v.numel() * v.element_size() for v in buffer.values()) / 1e6,
    )
    return buffer


class TrajectoryDataset(torch.utils.data.Dataset):
    """The buffer's states as rows: ``{"states", "targets", "t", "w", "prompt"}`` per example."""

    KEYS = ("states", "targets", "t", "w", "prompt")

    def __init__(self, buffer: dict[str, torch.Tensor]) -> None:
        self.buffer = buffer

    def __len__(self) -> int:
        return len(self.buffer["t"])

    def __getitem__(self, key: Any) -> dict[str, Any]:
        _, i = epoch_and_index(key, 0)  # the sampler hands out (epoch, i); the rows do not depend on it
        return {"index": i, **{name: self.buffer[name][i] for name in self.KEYS}}
