"""Model Zoo checks run here: the network's declared input/output (``verify_net_in_out``), ``eval_metrics`` filled
from the comparison, and the Zoo's JSON formatting of every config."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BUNDLE_ROOT
from monai.bundle import ConfigParser, verify_net_in_out

CONFIGS = BUNDLE_ROOT / "configs"
METADATA = CONFIGS / "metadata.json"
# the denoiser's forward needs `timesteps`: the Zoo's CI calls verify_net_in_out without it (docs/README.md,
# "Model Zoo checks"), so it is given here as extra_forward_args
TIMESTEPS = {"timesteps": torch.tensor([500], dtype=torch.long)}


@pytest.fixture(scope="module")
def compare():
    import compare

    return compare


def _verify(config: str) -> None:
    """MONAI's verify_net_in_out on `config` with the bundle's metadata, on CPU, with `timesteps` given."""
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(METADATA),
        config_file=str(CONFIGS / config),
        device="cpu",
        extra_forward_args=TIMESTEPS,
        bundle_root=str(BUNDLE_ROOT),
    )


def test_verify_net_in_out_on_the_inference_config(monkeypatch):
    """The Zoo's shape check on configs/inference.json + metadata.json, from the bundle root, on CPU."""
    monkeypatch.chdir(BUNDLE_ROOT)
    _verify("inference.json")


def test_verify_net_in_out_from_another_directory(monkeypatch, tmp_path):
    """Every path in the configs resolves from bundle_root, so the check passes from any working directory."""
    monkeypatch.chdir(tmp_path)
    _verify("inference.json")


def test_metadata_describes_the_default_denoiser():
    """metadata's input channels are the default denoiser's: x_t plus the conditioner's channels."""
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    network = parser.get_parsed_content("network_def")
    conditioner = parser.get_parsed_content("conditioner")
    fmt = json.loads(METADATA.read_text())["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == network.in_channels == 1 + conditioner.num_channels
    assert pred["num_channels"] == network.out_channels
    assert image["spatial_shape"] == pred["spatial_shape"] == parser["model_size"]
    assert len(image["channel_def"]) == image["num_channels"]


def test_denoiser_exports_with_torch_export():
    """TorchScript is excluded (docs/README.md, "Model Zoo checks"); torch.export gives the same output."""
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    network = parser.get_parsed_content("network_def").eval()
    x = torch.rand(2, network.in_channels, *parser["model_size"])
    timesteps = torch.tensor([999, 10])
    program = torch.export.export(network, (x,), {"timesteps": timesteps})
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, timesteps=timesteps), network(x, timesteps=timesteps))


# ------------------------------------------------------------------------------------------------------ eval_metrics
def _fake_comparison(dice=0.5504, psnr=20.2117, ssim=0.7491) -> dict:
    def row(d, p, s):
        return {"dice": {"mean": d, "std": 0.1}, "psnr": {"mean": p, "std": 1.0}, "ssim": {"mean": s, "std": 0.03}}

    return {
        "methods": {"identity": row(0.1, 12.0, 0.5), "lmi": row(dice, psnr, ssim)},
        "blocks": {"t2": {"methods": {"lmi": row(0.9, 30.0, 0.9)}}},
    }


def test_eval_metrics_take_the_default_method_of_the_main_block(compare):
    assert compare.DEFAULT_METHOD == ConfigParser.load_config_file(CONFIGS / "inference.json")["method"]
    assert compare.eval_metrics(_fake_comparison()) == {"mean_dice": 0.55, "psnr": 20.21, "ssim": 0.749}
    assert compare.eval_metrics({"methods": {"identity": {}}}) is None


def test_update_metadata_writes_zoo_formatted_json(compare, tmp_path):
    path = tmp_path / "metadata.json"
    original = {"version": "9.9.9", "eval_metrics": {}, "intended_use": "research, não clínico"}
    path.write_text(json.dumps(original, indent=4, ensure_ascii=False) + "\n")
    assert compare.update_metadata(_fake_comparison(0.6, 21.0, 0.8), path) == {
        "mean_dice": 0.6,
        "psnr": 21.0,
        "ssim": 0.8,
    }
    text = path.read_text()
    written = json.loads(text)
    assert list(written) == list(original) and written["intended_use"] == original["intended_use"]
    assert text == json.dumps(written, indent=4, ensure_ascii=False) + "\n"
    before = path.read_text()
    assert compare.update_metadata({"methods": {}}, path) is None
    assert path.read_text() == before


def test_metadata_eval_metrics_match_the_published_comparison(compare):
    """metadata.json and docs/README.md quote the same run: results/comparison.json."""
    result = json.loads((BUNDLE_ROOT / "results" / "comparison.json").read_text())
    assert json.loads(METADATA.read_text())["eval_metrics"] == compare.eval_metrics(result)


def test_docs_have_the_model_zoo_sections():
    text = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    headings = {line.strip() for line in text.splitlines() if line.startswith("## ")}
    for section in (
        "## Intended use: not for clinical use",
        "## Limitations",
        "## System requirements and memory",
        "## Network inputs and outputs",
        "## Watching training in TensorBoard",
        "## Model Zoo checks",
    ):
        assert section in headings, f"docs/README.md lacks '{section}'"
    assert "not for clinical use" in text.lower() and "tensorboard --logdir outputs/train/tensorboard" in text


# ------------------------------------------------------------------------------------------------------ formatting
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_config_follows_the_zoo_json_format(config):
    """The Model Zoo's pre-commit JSON style: 4-space indentation, non-ASCII kept, one final newline."""
    text = (CONFIGS / config).read_text(encoding="utf-8")
    expected = json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"
    assert text == expected, f"configs/{config}: rewrite it as json.dumps(obj, indent=4, ensure_ascii=False) + '\\n'"
