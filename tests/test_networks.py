"""The default denoiser (scripts.lmidiffusion.networks) and starting a campaign from trained weights."""

from __future__ import annotations

import pytest
import torch

from scripts.lmidiffusion.networks import SpaceToDepthDiffusionUNet, deepen_state_dict
from scripts.training import load_weights, warm_start

UNET = {"channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 8}


def denoiser(refine_channels: int = 0, seed: int = 0) -> SpaceToDepthDiffusionUNet:
    torch.manual_seed(seed)
    return SpaceToDepthDiffusionUNet(3, 1, factor=2, refine_channels=refine_channels, **UNET).eval()


def test_output_keeps_the_full_grid_with_and_without_the_head():
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([10, 900])
    for width in (0, 4):
        assert denoiser(width)(x, t).shape == (2, 1, 16, 16)


def test_a_fresh_head_leaves_the_trained_output_unchanged_and_then_learns():
    plain, refined = denoiser(0), denoiser(4, seed=1)
    refined.unet.load_state_dict(plain.unet.state_dict())
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(refined(x, t), plain(x, t))
    refined.train()
    loss = (refined(x, t) - x[:, :1]).pow(2).mean()
    loss.backward()
    assert refined.refine[-1].weight.grad.abs().sum() > 0


def test_warm_start_loads_a_trained_network_into_one_with_a_new_head(tmp_path):
    plain = denoiser(0)
    path = tmp_path / "model.pt"
    torch.save(plain.state_dict(), path)
    refined = warm_start(denoiser(4, seed=1), path, tmp_path / "checkpoints")
    for name, value in plain.state_dict().items():
        assert torch.equal(refined.state_dict()[name], value)
    x, t = torch.rand(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(refined(x, t), plain(x, t))


def test_warm_start_gives_way_to_a_campaign_that_resumes(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(denoiser(0).state_dict(), path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "checkpoint_epoch_3.pt")
    fresh = denoiser(4, seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    warm_start(fresh, path, tmp_path / "checkpoints")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert warm_start(fresh, None, tmp_path / "nothing") is fresh


def test_only_the_named_new_modules_may_be_missing(tmp_path):
    path = tmp_path / "model.pt"
    state = denoiser(0).state_dict()
    torch.save({k: v for k, v in state.items() if "out" not in k}, path)  # the UNet's last block is gone
    with pytest.raises(ValueError, match="does not match the network in the config: missing"):
        warm_start(denoiser(4), path, tmp_path / "checkpoints")
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing"):  # inference loads strictly: a head without weights is refused
        load_weights(denoiser(4), path)
    with pytest.raises(ValueError, match="refine_channels must be >= 0"):
        denoiser(-1)


def deep_denoiser(num_res_blocks, attention_levels=(False, True), seed: int = 1) -> SpaceToDepthDiffusionUNet:
    torch.manual_seed(seed)
    unet = {
        **UNET,
        "num_res_blocks": num_res_blocks,
        "attention_levels": list(attention_levels),
        "num_head_channels": 8,
    }
    return SpaceToDepthDiffusionUNet(3, 1, factor=2, **unet).eval()


def trained_like(network: SpaceToDepthDiffusionUNet) -> SpaceToDepthDiffusionUNet:
    """Every parameter moved off its initial value, so a zero-initialised last layer is no longer zero."""
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return network


@pytest.mark.parametrize("deeper", [2, [3, 1], [1, 2]])
def test_a_deepened_denoiser_computes_exactly_what_the_trained_one_did_and_then_learns(deeper):
    shallow = trained_like(deep_denoiser(1, seed=0))
    deep = deep_denoiser(deeper)
    deep.load_state_dict(deepen_state_dict(shallow.state_dict(), deep, 1))
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t), shallow(x, t), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in shallow.parameters())
    deep.train()
    (deep(x, t) - x[:, :1]).pow(2).mean().backward()
    last = len(deep.unet.down_blocks[0].resnets) - 1
    if last:  # an added block gets a gradient on its zeroed layer, so training can use it
        assert deep.unet.down_blocks[0].resnets[last].conv2.conv.weight.grad.abs().sum() > 0


def test_warm_start_deepens_a_trained_file_and_refuses_what_does_not_fit(tmp_path):
    shallow = trained_like(deep_denoiser(1, seed=0))
    path = tmp_path / "model.pt"
    torch.save(shallow.state_dict(), path)
    deep = warm_start(deep_denoiser(2), path, tmp_path / "checkpoints", source_num_res_blocks=1)
    x, t = torch.rand(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t), shallow(x, t), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot deepen"):  # fewer blocks than the file is not deepening
        warm_start(deep_denoiser(1), path, tmp_path / "checkpoints", source_num_res_blocks=2)
    with pytest.raises(ValueError, match="has no place"):  # other channels: not the same network made deeper
        wide = {**UNET, "channels": [16, 16], "norm_num_groups": 8, "num_res_blocks": 2}
        warm_start(SpaceToDepthDiffusionUNet(3, 1, **wide), path, tmp_path / "checkpoints", source_num_res_blocks=1)
