"""Training on guided trajectories from prompts alone: no image is read, a training step makes no
teacher call, the student's own pool is walked by the current adapter, and resume is bit-exact."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from helpers import run_training
from sd_distill.constants import LORA_WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small red square"]


def _args(model: Path, out: Path, source: list[str], *extra: str, steps: int = 4) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), *source, "--output_dir", str(out), "--resolution", "32",
        "--train_batch_size", "4", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
        "--report_to", "none", "--default_prompt", "", "--learning_rate", "1e-2",
        "--trajectory_steps", "3", "--trajectory_shard_size", "2", *extra,
    ]  # fmt: skip


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# shapes\n" + "\n".join(PROMPTS) + "\n\n")
    return path


class CountingTeacher:
    """The run's teacher, counting how often it is entered."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    @contextmanager
    def __call__(self):
        self.calls += 1
        with self.real() as unet:
            yield unet


def test_a_prompts_file_alone_trains_a_lora_that_stock_diffusers_loads(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    counting: list[CountingTeacher] = []

    def count_teacher(training) -> None:
        counting.append(CountingTeacher(training.teacher))
        training.teacher = counting[0]

    argv = _args(tiny_model_dir, out, ["--prompts_file", str(prompts_file), "--train_states", "teacher_trajectories"])
    stats, training = run_training(argv, count_teacher)
    assert stats.global_step == 4 and len(training.dataset) == len(PROMPTS) * 3  # every visited state a row
    assert counting[0].calls == 0  # the targets come from the buffer: no teacher pass in a step
    lora = load_file(str(out / LORA_WEIGHTS_NAME))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # it learnt something
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(out))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(training.model(x, 500, emb).sample, pipe.unet(x, 500, emb).sample, atol=1e-5)


def test_a_caption_only_parquet_is_a_prompt_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": PROMPTS + ["", None]}).to_parquet(data)  # two bad rows of six: skipped, counted
    argv = _args(
        tiny_model_dir, tmp_path / "out", ["--dataset_name", str(data), "--train_states", "teacher_trajectories"],
        "--max_bad_fraction", "0.5",
    )  # fmt: skip
    _, training = run_training(argv)
    assert training.source.prompt_embeddings.shape[0] == len(PROMPTS)


def _pool_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)


def test_the_student_pool_is_walked_by_the_current_adapter(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from sd_distill.models import encode_prompts, load_components
    from sd_distill.train.trajectories import walk

    out = tmp_path / "out"
    argv = _args(
        tiny_model_dir, out, ["--prompts_file", str(prompts_file), "--train_states", "student_trajectories"],
        "--trajectory_refresh_steps", "2", "--student_pool_trajectories", "2", "--student_state_fraction", "1",
    )  # fmt: skip
    _, training = run_training(argv)
    saved = _pool_of(out / "checkpoint-2")
    assert saved["generated_at"] == 2
    # walk the same draws again, driven by the LoRA of checkpoint-2 loaded with stock diffusers
    prompts, seeds, w = training.source._draws(2, 0, 2)
    components = load_components(str(tiny_model_dir))
    cond = encode_prompts(components.tokenizer, components.text_encoder, [PROMPTS[p] for p in prompts])
    uncond = encode_prompts(components.tokenizer, components.text_encoder, [""])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(out / "checkpoint-2"))

    @contextmanager
    def teacher():
        yield components.unet

    def student(x, t, c, w_):
        return pipe.unet(x, t, encoder_hidden_states=c).sample

    again = walk(components, teacher, cond, uncond, w, seeds, 3, (4, 16, 16), student)
    base = walk(components, teacher, cond, uncond, w, seeds, 3, (4, 16, 16), student=lambda x, t, c, w_: teacher_eps(
        components.unet, x, t, c))  # fmt: skip
    pool = saved["pool"]
    assert torch.allclose(pool["states"].float(), again["states"].float(), atol=2e-3)
    assert torch.allclose(pool["targets"].float(), again["targets"].float(), atol=2e-3)
    assert not torch.allclose(pool["states"].float(), base["states"].float(), atol=2e-3)  # not the step-0 student


def teacher_eps(unet, x, t, c):
    return unet(x, t, encoder_hidden_states=c).sample


def test_an_on_policy_run_resumes_bit_exactly(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    from helpers import reset_accelerate_state

    source = ["--prompts_file", str(prompts_file), "--train_states", "student_trajectories"]
    extra = ("--trajectory_refresh_steps", "2", "--student_pool_trajectories", "2", "--checkpointing_steps", "3")
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_training(_args(tiny_model_dir, whole, source, *extra, steps=5))
    reset_accelerate_state()
    run_training(_args(tiny_model_dir, part, source, *extra, steps=3))
    reset_accelerate_state()
    run_training(_args(tiny_model_dir, part, source, *extra, "--resume_from_checkpoint", "latest", steps=5))
    a, b = load_file(str(whole / LORA_WEIGHTS_NAME)), load_file(str(part / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompts_file", "{p}"], "--prompts_file trains on guided trajectories"),
        (["--prompts_file", "{p}", "--train_states", "teacher_trajectories", "--caption_dropout", "0.1"],
         "--caption_dropout has no effect"),
        (["--prompts_file", "{p}", "--train_states", "teacher_trajectories", "--trajectory_steps", "0"],
         "--trajectory_steps 0 must be at least 1"),
        (["--prompts_file", "{p}", "--train_states", "student_trajectories", "--student_state_fraction", "1.5"],
         "--student_state_fraction 1.5 must be between 0 and 1"),
        (["--prompts_file", "{p}", "--train_data_dir", "{d}", "--train_states", "teacher_trajectories"],
         "not several"),
        (["--prompts_file", "{p}", "--train_states", "teacher_trajectories", "--trajectory_dir", "{d}"],
         "holds files that are not a trajectory buffer"),  # {d} holds prompts.txt: the user's folder
    ],
)  # fmt: skip
def test_bad_trajectory_flags_are_one_error_line(
    flags: list[str], message: str, tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    from sd_distill.train import parse_args
    from sd_distill.train.checks import config_errors

    flags = [f.format(p=prompts_file, d=tmp_path) for f in flags]
    config = parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), *flags])
    assert any(message in e for e in config_errors(config)), config_errors(config)


@pytest.mark.parametrize(
    "content, message",
    [(b"a red circle\n\xff\xfe broken\n", "is not UTF-8 text"), (b"# only a comment\n\n", "has no prompts")],
)
def test_a_bad_prompts_file_is_one_error_before_any_model_loads(
    content: bytes, message: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import sd_distill.train.recipe as recipe
    from sd_distill.train.config import ConfigError

    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    monkeypatch.setattr(recipe, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=message):
        run_training(_args(tiny_model_dir, tmp_path / "out", ["--prompts_file", str(path), "--train_states",
                                                               "teacher_trajectories"]))  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
def test_the_student_samples_without_dropout_and_gets_its_mode_back(training: bool) -> None:
    from sd_distill.train.on_policy import one_pass

    class Student(torch.nn.Module):  # the UNet's call convention, with dropout on its output
        def __init__(self) -> None:
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t, encoder_hidden_states, return_dict, scale=1.0):  # noqa: ANN001
            return (self.drop(x * scale),)

    student = Student().train(training)
    seen = []

    def inputs(states):  # noqa: ANN001
        seen.append(states.w)
        return {"scale": 2.0}

    x, w = torch.ones(64, 4), torch.tensor([3.0])
    out = one_pass(student, inputs)(x, torch.zeros(64), torch.zeros(64, 1, 2), w)
    assert torch.equal(out, 2 * x)  # told what inputs says, and no unit dropped
    assert seen == [w]
    assert student.training is training
