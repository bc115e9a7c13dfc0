from pathlib import Path

import pytest
import torch

from sd_distill.guidance import cfg_target, distillation_loss, teacher_cfg_prediction


def test_cfg_target_matches_hand_computed_values() -> None:
    u = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    c = torch.tensor([[3.0, 2.0], [1.0, 1.0]])
    # u + 7.5 (c - u): [1 + 7.5*2, 2 + 0], [0 + 7.5*1, -1 + 7.5*2]
    expected = torch.tensor([[16.0, 2.0], [7.5, 14.0]])
    assert torch.equal(cfg_target(u, c, 7.5), expected)


def test_cfg_target_accepts_a_per_sample_scale() -> None:
    u = torch.zeros(2, 4, 3, 3)
    c = torch.ones(2, 4, 3, 3)
    out = cfg_target(u, c, torch.tensor([1.0, 3.0]))
    assert torch.equal(out[0], torch.ones(4, 3, 3))
    assert torch.equal(out[1], torch.full((4, 3, 3), 3.0))


def test_guidance_one_is_the_conditional_prediction() -> None:
    u, c = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.allclose(cfg_target(u, c, 1.0), c)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_vpred_model_dir"])
def test_batched_teacher_pass_equals_two_separate_passes(fixture: str, request: pytest.FixtureRequest) -> None:
    from diffusers import UNet2DConditionModel

    folder: Path = request.getfixturevalue(fixture)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 900])
    cond = torch.randn(2, 77, 16, generator=g)
    uncond = torch.randn(1, 77, 16, generator=g)
    batched = teacher_cfg_prediction(unet, x, t, cond, uncond, 7.5)
    with torch.no_grad():
        u = unet(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        c = unet(x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(batched, u + 7.5 * (c - u), atol=1e-5)


def test_huber_and_mse_losses_are_zero_only_at_equality() -> None:
    a = torch.randn(2, 4, 3, 3)
    for kind in ("mse", "huber"):
        assert distillation_loss(a, a, kind).abs().max().item() == pytest.approx(0.0, abs=1e-9)
        assert distillation_loss(a, a + 1, kind).shape == (2,)
        assert distillation_loss(a, a + 1, kind).min().item() > 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_stay_finite_on_a_zero_terminal_snr_schedule(prediction_type: str) -> None:
    from diffusers import DDPMScheduler

    from sd_distill.guidance import min_snr_weights

    sched = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type=prediction_type)
    t = torch.tensor([0, 500, 999])
    w = min_snr_weights(sched, t, 5.0)
    assert torch.isfinite(w).all()
    # Low noise (huge SNR) is down-weighted below the high-noise end.
    assert w[0] < w[1]


@pytest.mark.parametrize("sampling", ["uniform", "log"])
def test_balanced_loss_weights_fall_as_one_over_w_squared_with_mean_one_over_the_range(sampling: str) -> None:
    from sd_distill.guidance import GuidanceScales

    scales = GuidanceScales(1.5, 10.0, sampling)
    w = scales.draw(200_000, torch.Generator().manual_seed(0), "cpu")
    weights = scales.balanced_loss_weights(w)
    assert weights.mean().item() == pytest.approx(1.0, rel=0.01)  # the normaliser is E[1 / w^2] of the draw
    pair = scales.balanced_loss_weights(torch.tensor([2.0, 8.0]))
    assert (pair[0] / pair[1]).item() == pytest.approx(16.0)


def test_the_balanced_loss_weights_a_range_batch_and_leaves_a_fixed_w_batch_alone() -> None:
    from sd_distill.guidance import GuidanceScales
    from sd_distill.train.states import TrainingStates
    from sd_distill.train.step import make_loss

    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    t, cond = torch.tensor([10, 20]), torch.zeros(2, 3, 8)
    balanced = make_loss("mse", 0.001, None, None, GuidanceScales(2.0, 8.0))
    plain = make_loss("mse", 0.001, None, None)
    ranged = TrainingStates(pred, t, cond, torch.tensor([2.0, 8.0]))
    assert torch.allclose(plain(pred, target, ranged), torch.ones(2))
    assert torch.allclose(balanced(pred, target, ranged), torch.tensor([4.0, 0.25]))  # 16 / w^2
    fixed = TrainingStates(pred, t, cond, 7.5)
    assert torch.equal(balanced(pred, target, fixed), plain(pred, target, fixed))


def test_a_range_student_is_balanced_and_trains_its_time_embedding_unless_told_otherwise(tmp_path: Path) -> None:
    from sd_distill.train.config import parse_args

    base = ["--output_dir", str(tmp_path / "out")]
    fixed = parse_args(base)
    assert fixed.guidance_loss_weighting == "none"  # one w: nothing to balance
    assert not any("time_embedding" in m for m in fixed.lora_target_modules)
    ranged = [*base, "--guidance_scale_range", "2", "8"]
    assert parse_args(ranged).guidance_loss_weighting == "inverse_square"
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= set(parse_args(ranged).lora_target_modules)
    told = parse_args([*ranged, "--guidance_loss_weighting", "none", "--lora_target_modules", "to_q"])
    assert told.guidance_loss_weighting == "none" and told.lora_target_modules == ["to_q"]
