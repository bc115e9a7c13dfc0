"""States from the student's own sampling (``--train_states student_trajectories``): where the
student actually goes at ``w``, labelled by the teacher, mixed into batches of the teacher's buffer.

Every ``--trajectory_refresh_steps`` updates the current student walks a fresh pool of trajectories
(each rank its share, then gathered, so every rank holds the same pool) and the teacher labels
every state it visits: the training step itself still runs the student alone. The pool is part of
every checkpoint (accelerate's custom state), so a resumed run trains on exactly the pool an
uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ..guidance import GuidanceScales
from .states import StoredStates, TrainingStates
from .trajectories import StudentPredict

logger = logging.getLogger(__name__)

# (prompt indices, noise seeds, w [K]) -> walk output (states/targets [K*S, ...], t [K*S]), student-driven
StudentWalk = Callable[[list[int], list[int], torch.Tensor], dict[str, torch.Tensor]]
_POOL_KEYS = ("states", "targets", "t", "w", "prompt")


class StudentStates(StoredStates):
    """A batch of the teacher's buffer whose rows are each replaced, with probability
    ``fraction``, by a state of the student pool (drawn with the step's generator: resumable)."""

    def __init__(
        self,
        prompt_embeddings: torch.Tensor,
        weight_dtype: torch.dtype,
        fraction: float,
        refresh_steps: int,
        pool_trajectories: int,
        scales: GuidanceScales,
        seed: int,
    ) -> None:
        super().__init__(prompt_embeddings, weight_dtype)
        self.fraction, self.refresh_steps, self.pool_trajectories = fraction, refresh_steps, pool_trajectories
        self.scales, self.seed = scales, seed
        self.pool: dict[str, torch.Tensor] | None = None
        self.generated_at = -1  # the optimizer step whose student walked the pool
        self.walker: StudentWalk | None = None
        self.accelerator: Any = None

    # -- accelerate's custom checkpoint state ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pool = None if self.pool is None else {k: v.cpu() for k, v in self.pool.items()}
        return {"pool": pool, "generated_at": self.generated_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.prompt_embeddings.device
        pool = state["pool"]
        self.pool = None if pool is None else {k: v.to(device) for k, v in pool.items()}
        self.generated_at = int(state["generated_at"])

    # -- the pool ---------------------------------------------------------------------------------
    def attach(self, walker: StudentWalk, accelerator: Any) -> None:
        self.walker, self.accelerator = walker, accelerator

    def after_update(self, step: int) -> None:
        """Called after every optimizer step (and once at the start): a new pool when one is due."""
        if self.pool is not None and (step % self.refresh_steps != 0 or step == self.generated_at):
            return
        self.refresh(step)

    def refresh(self, step: int) -> None:
        assert self.walker is not None, "attach() the student walk first"
        acc = self.accelerator
        start = time.perf_counter()
        prompts, seeds, w = self._draws(step, acc.process_index, -(-self.pool_trajectories // acc.num_processes))
        out = self.walker(prompts, seeds, w)
        steps = len(out["t"]) // len(prompts)
        local = {
            "states": out["states"],
            "targets": out["targets"],
            "t": out["t"],
            "w": w.repeat_interleave(steps),
            "prompt": torch.tensor(prompts, dtype=torch.int32).repeat_interleave(steps),
        }
        device = self.prompt_embeddings.device
        self.pool = {k: acc.gather(v.to(acc.device)).to(device) for k, v in local.items()}  # the same on every rank
        self.generated_at = step
        logger.info(
            "step %d: the student walked %d trajectories (%d states) in %.1f s",
            step,
            len(self.pool["t"]) // steps,
            len(self.pool["t"]),
            time.perf_counter() - start,
        )

    def _draws(self, step: int, rank: int, count: int) -> tuple[list[int], list[int], torch.Tensor]:
        """Prompts, noise seeds and ``w`` of this rank's share of the pool walked at ``step``."""
        value = ((self.seed * 1_000_003 + step) * 4099 + rank) % (2**63)
        gen = torch.Generator().manual_seed(value ^ 0x0B0B)
        prompts = torch.randint(0, len(self.prompt_embeddings), (count,), generator=gen).tolist()
        seeds = torch.randint(0, 2**62, (count,), generator=gen).tolist()
        w = self.scales.draw(count, gen, "cpu")
        w = torch.full((count,), w) if isinstance(w, float) else w
        return prompts, seeds, w.float()

    # -- a batch ----------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> TrainingStates:
        if self.pool is None or self.fraction <= 0:
            return super().__call__(batch, generator)
        size, device = len(batch["t"]), self.prompt_embeddings.device
        take = (torch.rand(size, generator=generator, device=generator.device) < self.fraction).to(device)
        rows = torch.randint(0, len(self.pool["t"]), (size,), generator=generator, device=generator.device)
        pooled = {k: self.pool[k][rows.to(device)] for k in _POOL_KEYS}
        mixed = {}
        for k in _POOL_KEYS:
            own = batch[k].to(device)
            mask = take.view(-1, *([1] * (own.dim() - 1)))
            mixed[k] = torch.where(mask, pooled[k].to(own.dtype), own)
        return super().__call__(mixed, generator)


def one_pass(student: Any, inputs: Callable[[TrainingStates], dict[str, Any]]) -> StudentPredict:
    """The student's single pass as the driver of a walk, told what ``inputs`` gives for the states
    (``w`` when it is w-conditioned). It samples in eval mode (no LoRA dropout), then gets its mode back."""

    @torch.no_grad()
    def predict(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        extra = inputs(TrainingStates(x_t=x, t=t, cond=cond, w=w))
        training = student.training
        student.eval()
        try:
            return student(x, t, encoder_hidden_states=cond, return_dict=False, **extra)[0]
        finally:
            student.train(training)

    return predict


def student_walker(
    components: Any,
    teacher: Any,
    predict: StudentPredict,
    prompt_embeddings: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    latent_shape: tuple[int, int, int],
    batch: int,
) -> StudentWalk:
    """The walk of :mod:`.trajectories` driven by ``predict``, in batches of ``batch`` trajectories."""
    from .trajectories import walk

    def run(prompts: list[int], seeds: list[int], w: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = []
        for i in range(0, len(prompts), batch):
            cond = prompt_embeddings[torch.tensor(prompts[i : i + batch], device=prompt_embeddings.device)]
            parts.append(
                walk(
                    components,
                    teacher,
                    cond,
                    uncond,
                    w[i : i + batch],
                    seeds[i : i + batch],
                    steps,
                    latent_shape,
                    predict,
                )
            )
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    return run
