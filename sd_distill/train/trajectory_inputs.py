"""A run on guided trajectories: the prompts, their embeddings, and the teacher's trajectory buffer
(generated here by all ranks, or found on disk), as the rows the loader serves.

Nothing here decodes an image: ``--prompts_file`` or a caption column is all it reads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora import adapter_disabled
from ..models import Components, encode_prompts
from .cache import cache_folder
from .config import TrainConfig
from .data import TrainData
from .prompts import load_prompts, prompts_fingerprint
from .trajectories import TrajectoryDataset, TrajectorySpec, build_buffer, load_buffer

logger = logging.getLogger(__name__)
_ENCODE_BATCH = 64


@dataclass
class TrajectoryInputs:
    """What a trajectory run trains on: every prompt's embedding ``[P, L, D]`` (the buffer stores
    prompt indices) and the teacher's buffer as a dataset."""

    prompts: list[str]
    prompt_embeddings: torch.Tensor
    spec: TrajectorySpec
    dataset: TrajectoryDataset


def state_count(config: TrainConfig, num_prompts: int) -> int:
    """Rows of the teacher's buffer: one per visited state."""
    return num_prompts * config.trajectories_per_prompt * config.trajectory_steps


def latent_shape(components: Components, resolution: int) -> tuple[int, int, int]:
    scale = 2 ** (len(components.vae.config.block_out_channels) - 1)  # 8 for SD's VAE
    return int(components.unet.config.in_channels), resolution // scale, resolution // scale


def buffer_spec(config: TrainConfig, prompts: list[str], components: Components, driver: str) -> TrajectorySpec:
    low, high, sampling = config.guidance_scales.low, config.guidance_scales.high, config.guidance_scales.sampling
    return TrajectorySpec(
        model=f"{config.pretrained_model_name_or_path}@{config.revision or ''}:{config.variant or ''}",
        scheduler=dict(components.noise_scheduler.config),
        prompts_sha1=prompts_fingerprint(prompts),
        num_prompts=len(prompts),
        trajectories_per_prompt=config.trajectories_per_prompt,
        steps=config.trajectory_steps,
        scales=(low, high, sampling),
        seed=config.seed if config.seed is not None else 0,
        latent_shape=latent_shape(components, config.resolution),
        shard_size=config.trajectory_shard_size,
        driver=driver,
    )


def buffer_folder(config: TrainConfig, spec: TrajectorySpec) -> Path:
    """``--trajectory_dir``, else a folder named by the spec's hash in the cache: other settings, another folder."""
    if config.trajectory_dir:
        return Path(config.trajectory_dir)
    return cache_folder(config) / "trajectories" / spec.key


@torch.no_grad()
def embed_prompts(components: Components, prompts: list[str], dtype: torch.dtype) -> torch.Tensor:
    """``[P, L, D]`` on the text encoder's device, encoded in batches."""
    chunks = [prompts[i : i + _ENCODE_BATCH] for i in range(0, len(prompts), _ENCODE_BATCH)]
    return torch.cat([encode_prompts(components.tokenizer, components.text_encoder, c).to(dtype) for c in chunks])


def frozen_teacher(unet: torch.nn.Module) -> Any:
    """The teacher before ``accelerator.prepare``: the UNet itself with its adapter off."""

    @contextmanager
    def teacher() -> Iterator[torch.nn.Module]:
        with adapter_disabled(unet):
            yield unet

    return teacher


def prepare_trajectories(
    config: TrainConfig,
    prompts: list[str],
    components: Components,
    uncond_emb: torch.Tensor,
    accelerator: Any,
    walk_dtype: torch.dtype,
) -> TrajectoryInputs:
    """Embed the prompts and build (or reuse) the teacher's buffer with the raw UNet, before
    DeepSpeed partitions it; every rank calls this and gets the whole buffer."""
    embeddings = embed_prompts(components, prompts, walk_dtype)  # [P, L, D]
    spec = buffer_spec(config, prompts, components, driver="teacher")
    folder = buffer_folder(config, spec)
    components.unet.eval()  # no LoRA dropout while the teacher samples
    build_buffer(
        spec,
        folder,
        lambda indices: embeddings[torch.tensor(indices, device=embeddings.device)],
        components,
        frozen_teacher(components.unet),
        uncond_emb.to(walk_dtype),
        accelerator,
    )
    components.unet.train()
    return TrajectoryInputs(prompts, embeddings, spec, TrajectoryDataset(load_buffer(folder, spec)))


def read_inputs(
    config: TrainConfig, accelerator: Any, weight_dtype: torch.dtype
) -> tuple[TrainConfig, TrainData, Any, torch.Tensor | None, list[str] | None]:
    """The resolved config, the data, the VAE and latents when cached, and (a trajectory run) its prompts."""
    if not config.trajectory_states:
        from .inputs import read_data

        return (*read_data(config, accelerator, weight_dtype), None)
    prompts = read_prompt_set(config)  # no image is read: the rows are the buffer's states
    rows = state_count(config, len(prompts))
    data = TrainData(dataset=None, spec=None, scan=None, num_rows=rows)  # type: ignore[arg-type]
    workers = config.dataloader_num_workers or 0  # the rows are tensors in memory already
    return dataclasses.replace(config, dataloader_num_workers=workers), data, None, None, prompts


def read_prompt_set(config: TrainConfig) -> list[str]:
    """The run's prompts (file or caption column), logged."""
    prompts = load_prompts(config)
    logger.info(
        "%d prompts, %d trajectories of %d steps: %d training states",
        len(prompts),
        len(prompts) * config.trajectories_per_prompt,
        config.trajectory_steps,
        state_count(config, len(prompts)),
    )
    return prompts


def collate_states(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack buffer rows; ``index`` first (accelerate reads the batch size from the first entry)."""
    batch: dict[str, Any] = {"index": torch.tensor([e["index"] for e in examples])}
    for key in TrajectoryDataset.KEYS:
        batch[key] = torch.stack([e[key] for e in examples])
    return batch


def attach_student_walk(
    source: Any,
    trajectories: TrajectoryInputs,
    components: Components,
    student: Any,
    teacher: Any,
    student_inputs: Any,
    uncond_emb: torch.Tensor,
    accelerator: Any,
    dtype: torch.dtype,
) -> None:
    """Give an on-policy source its walk: the prepared student drives (told ``w`` when it is
    w-conditioned), the teacher labels; registered so every checkpoint holds the pool. ``dtype``:
    what the prepared UNet takes (a DeepSpeed engine casts its weights to the mixed precision)."""
    from .on_policy import one_pass, student_walker

    spec = trajectories.spec
    walker = student_walker(
        components,
        teacher,
        one_pass(student, student_inputs),
        trajectories.prompt_embeddings.to(dtype),
        uncond_emb.to(dtype),
        spec.steps,
        spec.latent_shape,
        spec.shard_size,
    )
    source.attach(walker, accelerator)
    accelerator.register_for_checkpointing(source)
