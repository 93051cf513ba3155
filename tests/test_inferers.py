"""The translation machinery on a tiny random network: interfaces, determinism, projection, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BUNDLE_ROOT
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from phantoms import phantom

from scripts.configs import check_method
from scripts.lmidiffusion.diffusion import (
    LMIConditioner,
    LMIDiffusionPrepareBatch,
    StaticConditiond,
    model_output_from_x0,
    x0_from_model_output,
)
from scripts.lmidiffusion.inferers import (
    LMIGuidedInferer,
    SamplingInferer,
    SDEditInferer,
    SliceWiseInferer,
)
from scripts.lmidiffusion.projection import LocalConditionalMean
from scripts.tensors import from_model_space, validate_source
from scripts.transforms import head_mask


@pytest.fixture(scope="module")
def network() -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=4,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    ).eval()


@pytest.fixture
def conditioner() -> LMIConditioner:
    return LMIConditioner(num_bins=8)


def make_inferer(conditioner, **kwargs) -> LMIGuidedInferer:
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    return LMIGuidedInferer(scheduler, conditioner, num_inference_steps=kwargs.pop("steps", 3), **kwargs)


def test_prediction_type_conversions_round_trip():
    torch.manual_seed(0)
    sample, x0 = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 2 - 1
    t = torch.tensor([10, 900])
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        output = model_output_from_x0(scheduler, x0, sample, t)
        assert torch.allclose(x0_from_model_output(scheduler, output, sample, t), x0, atol=1e-4)


def test_training_target_matches_the_scheduler(conditioner, network):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    images = phantom().repeat(2, 1, 1, 1)
    head = torch.from_numpy(head_mask(images[0, 0].numpy())).float()[None, None].repeat(2, 1, 1, 1)
    inputs, target, args, kwargs = LMIDiffusionPrepareBatch(scheduler)({"image": images, "head": head})
    assert set(kwargs) == {"noise", "timesteps", "head"} and args == ()
    expected = scheduler.get_velocity(images * 2 - 1, kwargs["noise"], kwargs["timesteps"])
    assert torch.allclose(target, expected)
    prediction = LMIGuidedInferer(scheduler, conditioner)(inputs, network, **kwargs)
    assert prediction.shape == images.shape


def test_translation_is_deterministic_in_range_and_keeps_meta(conditioner, network):
    source = MetaTensor(phantom(), meta={"filename_or_obj": "case.nii.gz"})
    inferer = make_inferer(conditioner, projection=LocalConditionalMean(spatial_sigma=4), seed=3)
    first, second = inferer.sample(source, network), inferer.sample(source, network)
    assert isinstance(first, MetaTensor) and first.meta["filename_or_obj"] == "case.nii.gz"
    assert first.shape == source.shape and 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, second)
    other_seed = make_inferer(conditioner, projection=LocalConditionalMean(spatial_sigma=4), seed=4)
    other_seed = other_seed.sample(source, network)
    assert not torch.equal(first, other_seed)
    head = torch.from_numpy(head_mask(source[0, 0].numpy()))
    assert float(first[0, 0][head == 0].abs().max()) == 0.0, "outside the head the translation must be 0"


def test_output_gamma_is_a_power_of_each_sample_and_refuses_nonpositive_values(conditioner, network):
    source = phantom()
    uncalibrated = make_inferer(conditioner, mask_background=False, num_samples=1).sample(source, network)
    calibrated = make_inferer(conditioner, mask_background=False, num_samples=1, output_gamma=1.1).sample(
        source, network
    )
    assert torch.allclose(calibrated, uncalibrated**1.1, atol=1e-6)
    scaled = uncalibrated / torch.quantile(uncalibrated.flatten(), 0.995)  # a power survives the per-image scaling
    assert torch.allclose(calibrated / torch.quantile(calibrated.flatten(), 0.995), scaled**1.1, atol=1e-4)
    with pytest.raises(ValueError, match="output_gamma must be > 0"):
        make_inferer(conditioner, output_gamma=0.0)


def test_model_grid_differs_from_image_grid(conditioner, network):
    source = phantom(48)
    out = make_inferer(conditioner, model_size=(32, 32), projection=LocalConditionalMean(spatial_sigma=4)).sample(
        source, network
    )
    assert out.shape == source.shape


def test_projection_keeps_functions_of_the_source_and_maps_to_them():
    source = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (1, 1, 24, 24)) / 3.0).float()
    remapped = torch.tensor([0.2, 0.9, 0.1, 0.5])[(source * 3).round().long()]
    projection = LocalConditionalMean(num_bins=4, bin_sigma=0.05, spatial_sigma=6)
    assert torch.allclose(projection(remapped, source), remapped, atol=1e-5)
    noisy = remapped + 0.2 * torch.randn_like(remapped)
    assert (projection(noisy, source) - remapped).abs().mean() < 0.5 * (noisy - remapped).abs().mean()


def test_sdedit_walks_only_the_steps_below_its_start(conditioner, network):
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    inferer = SDEditInferer(scheduler, conditioner, num_inference_steps=10, start_timestep=300)
    generator = torch.Generator().manual_seed(0)
    inferer.scheduler.set_timesteps(10)
    start, steps = inferer.start(phantom(), inferer.scheduler.timesteps, generator)
    assert int(steps.max()) <= 300 and len(steps) == 3
    with pytest.raises(ValueError, match="start_timestep"):
        SDEditInferer(scheduler, conditioner, start_timestep=1000)


def test_call_is_the_training_pass_and_the_sampling_adapter_translates(conditioner, network):
    inferer = make_inferer(conditioner, seed=3)
    source = phantom()
    with pytest.raises(ValueError, match="training forward pass.*sample"):
        inferer(source, network)
    assert torch.equal(SamplingInferer(inferer)(source, network), inferer.sample(source, network))
    with pytest.raises(TypeError, match="sample"):
        SamplingInferer(torch.nn.Identity())


@pytest.mark.parametrize("method", ["lmi", "sdedit"])
def test_inferers_work_inside_a_supervised_evaluator(conditioner, network, method):
    inferers = {
        "lmi": make_inferer(conditioner, projection=LocalConditionalMean(spatial_sigma=4)),
        "sdedit": SDEditInferer(
            DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
            conditioner,
            num_inference_steps=6,
            start_timestep=400,
        ),
    }
    data = [{"image": phantom(seed=i)[0], "label": phantom(seed=i)[0]} for i in range(2)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=network,
        inferer=SliceWiseInferer(inferers[method], image_size=(32, 32), progress=False),
    )
    evaluator.run()
    preds = evaluator.state.output
    assert len(preds) == 2 and all(p["pred"].shape == (1, 32, 32) for p in preds)
    implemented = "lmi_projection" if method == "lmi" else method  # this "lmi" inferer projects its x0 estimates
    check_method(implemented, inferers[method], BUNDLE_ROOT)  # each inferer implements the method it is composed for
    other = "sdedit" if method == "lmi" else "lmi"
    with pytest.raises(ValueError, match=f"adding configs/methods/{other}.json to --config_file"):
        check_method(other, inferers[method], BUNDLE_ROOT)
    with pytest.raises(ValueError, match="unknown method 'pix2pix'"):
        check_method("pix2pix", inferers[method], BUNDLE_ROOT)


def test_volumes_are_translated_slice_by_slice(conditioner, network):
    volume = torch.cat([phantom(24, seed=i)[..., None] for i in range(3)] + [torch.zeros(1, 1, 24, 24, 1)], dim=-1)
    volume = MetaTensor(volume, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = SliceWiseInferer(make_inferer(conditioner), image_size=(32, 32), progress=False)(volume, network)
    assert out.shape == volume.shape and torch.equal(out.affine, volume.affine)
    assert float(out[..., 3].abs().max()) == 0.0, "an empty slice stays empty"
    assert float(out[..., 0].max()) > 0


class _Recorder:
    """A translator that returns its input and keeps what it was given."""

    def sample(self, inputs, network):
        self.seen = inputs.clone()
        return inputs


@pytest.mark.parametrize("shape, spacing", [((48, 32), (1.0, 1.0)), ((40, 40), (1.0, 1.5))])
def test_a_non_square_slice_keeps_its_aspect_ratio(shape, spacing):
    """A disc of radius 12 mm must reach the model as a disc, not squashed to the square grid, and come back."""
    y, x = torch.meshgrid(
        *[(torch.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
    )
    disc = ((x**2 + y**2) <= 12.0**2).float()[None, None]
    source = MetaTensor(disc, affine=torch.diag(torch.tensor([*spacing, 1.0, 1.0])))
    recorder = _Recorder()
    out = SliceWiseInferer(recorder, image_size=(32, 32), progress=False)(source, None)
    seen = recorder.seen[0, 0] > 0.5
    rows, cols = seen.any(1).sum().item(), seen.any(0).sum().item()
    assert abs(rows - cols) <= 1, f"the disc reached the model as {rows} x {cols} pixels"
    assert out.shape == source.shape and float((out - disc).abs().mean()) < 0.05


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(1, 32, 32), "batch of 2D images"),
        (torch.rand(1, 2, 32, 32), "one channel"),
        (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
        (torch.zeros(2, 1, 8, 8), "all zero"),
    ],
)
def test_bad_sources_give_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_source(bad)


def test_high_noise_fraction_biases_the_timesteps():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.zeros(4000, 1, 1, 1)
    uniform = LMIDiffusionPrepareBatch(scheduler).get_timesteps(images)
    biased = LMIDiffusionPrepareBatch(scheduler, high_noise_fraction=0.5, high_noise_start=600).get_timesteps(images)
    assert 0.35 < (uniform >= 600).float().mean() < 0.45
    assert 0.65 < (biased >= 600).float().mean() < 0.75  # 0.5 + 0.5 * 0.4
    assert int(biased.min()) >= 0 and int(biased.max()) < 1000
    with pytest.raises(ValueError, match="high_noise_fraction"):
        LMIDiffusionPrepareBatch(scheduler, high_noise_fraction=1.5)


def test_cached_static_maps_give_the_same_training_forward(conditioner, network):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    image = phantom(32, seed=5)[0]
    head = torch.from_numpy(head_mask(image[0].numpy())).float()[None]
    cached = StaticConditiond("image", conditioner)({"image": image, "head": head})
    assert cached["static"].shape == (conditioner.num_channels - 1, 32, 32)
    batch = {k: v[None] for k, v in cached.items()}
    inputs, _, _, kwargs = LMIDiffusionPrepareBatch(scheduler)(batch)
    assert "static" in kwargs
    inferer = LMIGuidedInferer(scheduler, conditioner)
    with_cache = inferer(inputs, network, **kwargs)
    kwargs.pop("static")
    assert torch.allclose(with_cache, inferer(inputs, network, **kwargs), atol=1e-6)


def test_ddpm_ancestral_sampling_is_seeded(conditioner, network):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    inferer = LMIGuidedInferer(scheduler, conditioner, num_inference_steps=3, seed=1)
    first, second = inferer.sample(phantom(), network), inferer.sample(phantom(), network)
    assert torch.equal(first, second) and first.shape == (1, 1, 32, 32)


def test_lmi_guidance_raises_the_lmi_with_the_source(conditioner, network):
    source = phantom(32, seed=2)
    plain = make_inferer(conditioner, mask_background=False).sample(source, network)
    guided = make_inferer(conditioner, mask_background=False, guidance_scale=0.05).sample(source, network)
    assert not torch.equal(plain, guided)
    lmi = conditioner.lmi
    assert float(lmi(source, guided)[0].mean()) > float(lmi(source, plain)[0].mean())


def test_guidance_every_skips_the_gradient_on_the_other_steps(conditioner, network, monkeypatch):
    source = phantom(32, seed=2)
    calls = []
    original = LMIGuidedInferer._guide

    def spy(self, *args, **kwargs):
        calls.append(args[-1] if len(args) > 5 else kwargs.get("guide", True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LMIGuidedInferer, "_guide", spy)
    every_other = make_inferer(conditioner, mask_background=False, guidance_scale=0.05, guidance_every=2)
    result = every_other.sample(source, network)
    assert calls == [i % 2 == 0 for i in range(every_other.num_inference_steps)]
    every_step = make_inferer(conditioner, mask_background=False, guidance_scale=0.05).sample(source, network)
    assert not torch.equal(result, every_step)
    with pytest.raises(ValueError, match="guidance_every"):
        make_inferer(conditioner, guidance_every=0)


def test_stop_timestep_walks_the_steps_at_or_above_it_and_returns_the_last_estimate(conditioner, network, monkeypatch):
    source = phantom(32, seed=2)
    seen, estimates = [], []

    class Recording(torch.nn.Module):
        def forward(self, x, timesteps):
            seen.append(int(timesteps[0]))
            return network(x, timesteps=timesteps)

    original = LMIGuidedInferer._guide

    def keep(self, *args, **kwargs):
        estimates.append(original(self, *args, **kwargs))
        return estimates[-1]

    monkeypatch.setattr(LMIGuidedInferer, "_guide", keep)
    make_inferer(conditioner, steps=8, mask_background=False).sample(source, Recording())
    walked_all, x0_all = list(seen), list(estimates)
    assert walked_all == sorted(walked_all, reverse=True) and walked_all[-1] == 0 and len(walked_all) == 8
    stop = walked_all[-2]  # the last step before t = 0
    seen.clear()
    stopped = make_inferer(conditioner, steps=8, mask_background=False, stop_timestep=stop).sample(source, Recording())
    assert seen == walked_all[:-1], "the steps below the stop are skipped, the ones above walked as before"
    expected = from_model_space(x0_all[-2]).clamp(0.0, 1.0)
    assert torch.allclose(stopped, expected, atol=1e-6), "the output is the x0 estimate of the last step walked"
    seen.clear()
    make_inferer(conditioner, steps=8, mask_background=False, stop_timestep=999).sample(source, Recording())
    assert seen == walked_all[:1], "a stop above the first step still walks that one"
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="stop_timestep must be in"):
            make_inferer(conditioner, stop_timestep=bad)


def test_several_samples_per_image_are_averaged_and_their_spread_kept(conditioner, network):
    source = torch.cat([phantom(32, seed=1), phantom(32, seed=2)])
    single = make_inferer(conditioner, eta=1.0)
    several = make_inferer(conditioner, eta=1.0, num_samples=3)
    mean = several.sample(source, network)
    assert mean.shape == source.shape and several.last_std.shape == source.shape
    assert float(several.last_std.mean()) > 0, "the samples differ"
    assert single.last_std is None and single.sample(source, network).shape == source.shape
    stacked = several._sample_once(source.repeat_interleave(3, 0), network).view(2, 3, 1, 32, 32)
    assert torch.allclose(stacked.mean(1), mean, atol=1e-6), "the mean of one batch of 3 noise draws per image"
    assert torch.allclose(several.sample(source, network), mean), "reproducible for a seed"
    with pytest.raises(ValueError, match="num_samples"):
        make_inferer(conditioner, num_samples=0)


def test_mirrored_samples_translate_the_mirrored_source_and_are_mirrored_back(conditioner, network):
    source = torch.cat([phantom(32, seed=1), phantom(32, seed=2)])
    mirrored = make_inferer(conditioner, eta=1.0, num_samples=2, mirror_samples=True)
    mean = mirrored.sample(source, network)
    # sample 0 of each image: the source; sample 1: the source mirrored along spatial axis 0 (tensor dim 2), its
    # translation mirrored back
    batch = torch.stack([source, source.flip(2)], 1).view(4, 1, 32, 32)
    draws = mirrored._sample_once(batch, network).view(2, 2, 1, 32, 32)
    expected = torch.stack([draws[:, 0], draws[:, 1].flip(2)], 1)
    torch.testing.assert_close(mean, expected.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(mirrored.last_std, expected.std(1), rtol=0, atol=1e-6)
    plain = make_inferer(conditioner, eta=1.0, num_samples=2).sample(source, network)
    assert not torch.allclose(plain, mean), "the mirrored draw differs from an unmirrored one"
    with pytest.raises(ValueError, match="mirror_axis must be a spatial axis"):
        make_inferer(conditioner, num_samples=2, mirror_samples=True, mirror_axis=2)
