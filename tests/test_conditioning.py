"""The guidance-conditioned student's mechanism: the UNet's own time_cond_proj_dim, as stock
StableDiffusionPipeline drives it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_distill.conditioning import (
    add_guidance_conditioning,
    guidance_embedding,
    guidance_projection,
    load_student,
    save_guidance_projection,
    student_timestep_cond,
)
from sd_distill.lora import adapter_metadata, attach_lora, lora_state_dict, save_lora

pytestmark = pytest.mark.usefixtures("one_thread")
DIM = 32


def _pipe(model: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 16, generator=g)


def test_the_embedding_is_the_pipelines() -> None:
    from diffusers import StableDiffusionPipeline

    w = torch.rand(16) * 14
    expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=DIM)
    assert torch.equal(guidance_embedding(w, DIM), expected)


def test_the_smooth_features_are_those_that_turn_at_most_a_radian_per_unit_of_w() -> None:
    from sd_distill.conditioning import smooth_features

    w = torch.linspace(0.5, 9.0, 200)
    step = (guidance_embedding(w + 0.01, 256) - guidance_embedding(w, 256)).abs().amax(0)  # [256] per feature
    smooth = smooth_features(256).bool()
    assert smooth.sum() == 64  # a quarter: 32 sin/cos pairs
    assert step[smooth].max() <= 0.0101  # |d/dw| <= 1 rad per unit of w
    assert step[~smooth].min() > 0.0101


def test_training_conditions_on_what_the_stock_pipeline_passes_at_each_scale(tiny_model_dir: Path) -> None:
    pipe = _pipe(tiny_model_dir)
    add_guidance_conditioning(pipe.unet, DIM)
    seen: list[torch.Tensor] = []
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep_cond"]), with_kwargs=True)
    for g in (2.0, 7.5):
        seen.clear()
        pipe("a red circle", num_inference_steps=2, guidance_scale=g, output_type="latent")
        like = torch.zeros(1, 4, 16, 16)
        assert len(seen) == 2  # one UNet call per step: no CFG batch
        assert torch.equal(seen[0], student_timestep_cond(g, DIM, like))


def test_a_zero_initialised_student_equals_the_teacher_with_timestep_cond_given(tiny_model_dir: Path) -> None:
    unet = _pipe(tiny_model_dir).unet
    x, t, emb = _inputs()
    with torch.no_grad():
        before = unet(x, t, emb).sample
        add_guidance_conditioning(unet, DIM)
        attach_lora(unet, rank=4)
        after = unet(x, t, emb, timestep_cond=student_timestep_cond(torch.tensor([2.0, 9.0]), DIM, x)).sample
    assert torch.equal(before, after)
    assert unet.config.time_cond_proj_dim == DIM


def _trained_student(model: Path, folder: Path):
    """A student with a perturbed LoRA and cond_proj, saved as training saves it."""
    unet = _pipe(model).unet
    proj = add_guidance_conditioning(unet, DIM)
    params = attach_lora(unet, rank=4, alpha=8)  # alpha != rank: the adapter metadata must carry it
    torch.manual_seed(3)
    with torch.no_grad():
        for p in [*params, proj.weight]:
            p.add_(torch.randn_like(p) * 0.2)
    save_lora(lora_state_dict(unet), folder, adapter_metadata(unet))
    save_guidance_projection(proj.weight, folder)
    return unet


def test_load_student_gives_the_trained_unets_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    trained = _trained_student(tiny_model_dir, tmp_path / "student")
    pipe = load_student(_pipe(tiny_model_dir), tmp_path / "student")
    x, t, emb = _inputs()
    cond = student_timestep_cond(4.0, DIM, x)
    with torch.no_grad():
        expected = trained(x, t, emb, timestep_cond=cond).sample
        got = pipe.unet(x, t, emb, timestep_cond=cond).sample
    assert torch.allclose(got, expected, atol=1e-5)
    assert guidance_projection(pipe.unet) is not None


def test_a_fused_student_samples_any_scale_in_one_pass_in_stock_diffusers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    _trained_student(tiny_model_dir, tmp_path / "student")
    pipe = load_student(_pipe(tiny_model_dir), tmp_path / "student")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")  # no sd-distill code from here on
    stock.set_progress_bar_config(disable=True)
    calls: list[int] = []
    stock.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))

    def image(g: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.from_numpy(
            stock("a red circle", num_inference_steps=3, guidance_scale=g, generator=gen, output_type="np").images[0]
        )

    low, high, again, near, nearer = image(2.0), image(10.0), image(2.0), image(7.5), image(7.6)
    assert calls == [1] * 5 * 3  # 5 images x 3 steps, each one UNet call of batch 1
    assert (low - high).abs().max() > 1e-3 and torch.equal(low, again)  # the scale reaches the student
    assert (low - high).abs().mean() > (near - nearer).abs().mean()  # and smoothly: far scales differ more


def test_the_comparison_at_several_scales_writes_a_section_per_scale_and_the_curve(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import json

    from sd_distill.eval.compare import CompareConfig, run

    student = tmp_path / "student"
    _trained_student(tiny_model_dir, student)
    (student / "sd_distill_config.json").write_text(
        json.dumps({"pretrained_model_name_or_path": str(tiny_model_dir), "guidance_scale": 7.5})
    )
    out = tmp_path / "compare"
    report = run(
        CompareConfig(
            ft_model=str(student),
            out_dir=str(out),
            prompts=["a red circle", "a blue square"],
            num_inference_steps=2,
            seed=0,
            guidance_scales=[2.0, 7.5],
            also_base_without_cfg=True,
        )
    )
    cols = {c["key"]: c for c in report["columns"]}
    assert cols["distilled_g2"]["unet_evals_per_image"] == 2 and cols["base_cfg_g2"]["unet_evals_per_image"] == 4
    assert [s["guidance_scale"] for s in report["per_scale"]] == [2.0, 7.5] and report["student_conditioned"]
    assert all("distilled_vs_base_cfg" in s["fidelity"] for s in report["per_scale"])
    assert report["fidelity_guidance_scale"] == 2.0 and report["fidelity"] == report["per_scale"][0]["fidelity"]
    assert "## Fidelity of distilled to base with CFG at g = 2\n" in (out / "report.md").read_text()
    assert report["speed_ratio_guidance_scale"] == 2.0 and "- speed ratio at g = 2 " in (out / "report.md").read_text()
    assert (out / "guidance_curve.png").stat().st_size > 0 and json.loads((out / "report.json").read_text())[
        "per_scale"
    ]
    low, high = (out / "distilled_g2").glob("*.png"), (out / "distilled_g7.5").glob("*.png")
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(sorted(low), sorted(high), strict=True))


def _base_output(pipe) -> torch.Tensor:
    x, t, emb = _inputs()
    with torch.no_grad():
        return pipe.unet(x, t, emb).sample


def test_unload_student_gives_the_base_back_with_cfg(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill import unload_student

    _trained_student(tiny_model_dir, tmp_path / "student")
    pipe = _pipe(tiny_model_dir)
    before = _base_output(pipe)
    load_student(pipe, tmp_path / "student")
    assert pipe.unet.config.time_cond_proj_dim == DIM
    unload_student(pipe)
    assert pipe.unet.config.time_cond_proj_dim is None and guidance_projection(pipe.unet) is None
    assert torch.allclose(_base_output(pipe), before, atol=1e-6)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    pipe("a red circle", num_inference_steps=1, guidance_scale=7.5, output_type="latent")
    assert calls == [2]  # CFG again: the unconditional and conditional batch in one call
    load_student(pipe, tmp_path / "student")  # and a student loads again
    assert pipe.unet.config.time_cond_proj_dim == DIM


def test_a_second_student_is_refused_until_the_first_is_unloaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.conditioning import StudentFolderError

    _trained_student(tiny_model_dir, tmp_path / "student")
    pipe = load_student(_pipe(tiny_model_dir), tmp_path / "student")
    with pytest.raises(StudentFolderError, match="unload_student"):
        load_student(pipe, tmp_path / "student", adapter_name="second")


def test_a_failed_load_leaves_the_pipeline_as_it_was(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.constants import LORA_WEIGHTS_NAME

    _trained_student(tiny_model_dir, tmp_path / "student")
    (tmp_path / "student" / LORA_WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    pipe = _pipe(tiny_model_dir)
    before = _base_output(pipe)
    with pytest.raises(Exception):  # whatever diffusers raises for the broken LoRA
        load_student(pipe, tmp_path / "student")
    assert pipe.unet.config.time_cond_proj_dim is None and guidance_projection(pipe.unet) is None
    assert torch.equal(_base_output(pipe), before)


def test_a_range_folder_without_its_projection_is_refused_not_loaded_as_fixed_w(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import json

    from sd_distill.conditioning import StudentFolderError
    from sd_distill.constants import CONFIG_FILE_NAME, GUIDANCE_PROJ_WEIGHTS_NAME

    folder = tmp_path / "student"
    _trained_student(tiny_model_dir, folder)
    (folder / CONFIG_FILE_NAME).write_text(json.dumps({"guidance_scale_range": [2.0, 8.0]}))
    (folder / GUIDANCE_PROJ_WEIGHTS_NAME).unlink()
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(StudentFolderError, match=f"not its {GUIDANCE_PROJ_WEIGHTS_NAME}"):
        load_student(pipe, folder)
    assert pipe.get_list_adapters() == {} or not any(pipe.get_list_adapters().values())


@pytest.mark.parametrize("damage", ["truncated", "another key", "another base"])
def test_a_broken_projection_file_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path, damage: str) -> None:
    from safetensors.torch import save_file

    from sd_distill.conditioning import StudentFolderError
    from sd_distill.constants import GUIDANCE_PROJ_KEY, GUIDANCE_PROJ_WEIGHTS_NAME

    folder = tmp_path / "student"
    _trained_student(tiny_model_dir, folder)
    path = folder / GUIDANCE_PROJ_WEIGHTS_NAME
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "another key":
        save_file({"weight": torch.zeros(8, DIM)}, str(path))
    else:  # a time embedding of another width
        save_file({GUIDANCE_PROJ_KEY: torch.zeros(7, DIM)}, str(path))
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(StudentFolderError, match="cannot read|not an sd-distill|another base model"):
        load_student(pipe, folder)
    assert guidance_projection(pipe.unet) is None


def test_a_unet_already_told_w_takes_no_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.conditioning import StudentFolderError

    _trained_student(tiny_model_dir, tmp_path / "student")
    pipe = _pipe(tiny_model_dir)
    add_guidance_conditioning(pipe.unet, DIM)  # as an LCM UNet comes
    with pytest.raises(StudentFolderError, match="already takes timestep_cond"):
        load_student(pipe, tmp_path / "student")


def test_a_student_folder_that_is_not_there_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.conditioning import StudentFolderError

    with pytest.raises(StudentFolderError, match="student folder not found"):
        load_student(_pipe(tiny_model_dir), tmp_path / "no-such-student")


def test_a_hub_student_whose_projection_the_hub_lacks_is_fixed_w_and_an_unreachable_one_raises(monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    from sd_distill.conditioning import read_guidance_projection

    def missing(repo: str, name: str) -> str:
        from types import SimpleNamespace

        response = SimpleNamespace(status_code=404, headers={}, request=None)  # what the error reads of a 404
        raise RemoteEntryNotFoundError(f"{name} not in {repo}", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    assert read_guidance_projection("someone/fixed-w-student") is None

    def offline(repo: str, name: str) -> str:
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(LocalEntryNotFoundError):  # not knowing is not 'a fixed-w student'
        read_guidance_projection("someone/any-w-student")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: huggingface_hub._CACHED_NO_EXIST)
    assert read_guidance_projection("someone/fixed-w-student") is None  # the cache learnt it has none


def test_unload_student_after_unload_lora_weights_takes_cond_proj_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill import unload_student

    _trained_student(tiny_model_dir, tmp_path / "student")
    pipe = _pipe(tiny_model_dir)
    before = _base_output(pipe)
    load_student(pipe, tmp_path / "student")
    pipe.unload_lora_weights()  # diffusers' own: the LoRA goes, cond_proj stays
    assert pipe.unet.config.time_cond_proj_dim == DIM
    unload_student(pipe)
    assert pipe.unet.config.time_cond_proj_dim is None
    assert torch.allclose(_base_output(pipe), before, atol=1e-6)


def test_a_fused_student_is_not_unloaded_into_a_wrong_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill import unload_student
    from sd_distill.conditioning import StudentFolderError

    _trained_student(tiny_model_dir, tmp_path / "student")
    for unload_too in (False, True):
        pipe = load_student(_pipe(tiny_model_dir), tmp_path / "student")
        pipe.fuse_lora()
        if unload_too:
            pipe.unload_lora_weights()
        with pytest.raises(StudentFolderError, match="was fused into this pipeline's weights"):
            unload_student(pipe)
        assert pipe.unet.config.time_cond_proj_dim == DIM  # left as it was: still the whole student
