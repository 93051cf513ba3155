"""Bundle-level checks: Model Zoo metadata keys, pinned versions against what is installed, configs that parse."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version

import pytest
import yaml
from helpers import BUNDLE_ROOT
from monai.bundle import ConfigParser

CONFIGS = BUNDLE_ROOT / "configs"

REQUIRED_METADATA_KEYS = {
    "schema",
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "name",
    "task",
    "description",
    "authors",
    "copyright",
    "data_source",
    "data_type",
    "intended_use",
    "references",
    "network_data_format",
}
TENSOR_FORMAT_KEYS = {
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
}


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text())


def _base_version(text: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': local build tags do not change the pinned release."""
    return text.split("+")[0]


def test_metadata_has_every_model_zoo_key(metadata):
    missing = REQUIRED_METADATA_KEYS - metadata.keys()
    assert not missing, f"metadata.json lacks {sorted(missing)}"
    assert "optional_packages_version" not in metadata, "MONAI 1.6 renamed it: use required_packages_version only"
    assert metadata["version"] in metadata["changelog"], "the current version needs a changelog entry"
    assert "not to be used clinically" in metadata["intended_use"]
    refs = " ".join(metadata["references"])
    for paper in ("Mutual Information Guided Diffusion", "SDEdit", "Cycle-Consistent", "StyleGAN2-ADA"):
        assert paper in refs
    for direction in ("inputs", "outputs"):
        for name, fmt in metadata["network_data_format"][direction].items():
            assert TENSOR_FORMAT_KEYS <= fmt.keys(), f"{direction}.{name} lacks {TENSOR_FORMAT_KEYS - fmt.keys()}"
            assert fmt["modality"] == "MR"
            assert len(fmt["spatial_shape"]) == 2 and fmt["num_channels"] == len(fmt["channel_def"])


def test_pinned_versions_match_installed(metadata):
    assert _base_version(version("monai")) == metadata["monai_version"]
    assert _base_version(version("torch")) == metadata["pytorch_version"]
    assert version("numpy") == metadata["numpy_version"]
    for package, pinned in metadata["required_packages_version"].items():
        assert version(package) == pinned, f"{package}: metadata pins {pinned}, installed {version(package)}"


def test_requirements_pin_the_same_versions(metadata):
    pins = {}
    for line in (BUNDLE_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.txt: '{line}' is not pinned with =="
            pins[name.lower()] = pinned
    assert pins["torch"] == metadata["pytorch_version"]
    assert pins["monai"] == metadata["monai_version"]
    assert pins["numpy"] == metadata["numpy_version"]
    for package, pinned in metadata["required_packages_version"].items():
        assert pins[package.lower()] == pinned


# Override files are only meaningful merged onto the config they extend, as the bundle runner merges them.
OVERRIDES = {"multi_gpu_train.json": "train.json", "prepare_second_physics.json": "prepare.json"}


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_every_config_parses(config):
    parser = ConfigParser()
    files = [CONFIGS / OVERRIDES[config], CONFIGS / config] if config in OVERRIDES else [CONFIGS / config]
    parser.read_config(files)
    assert parser.get() is not None
    if config == "prepare_second_physics.json":
        assert parser["simulator#_target_"] == "scripts.simulation.MRSimulator"
        assert parser["simulator#field_strength"] == 3.0 and parser["source"] == "labelmaps"
    elif config in OVERRIDES:
        assert parser["train#sampler"]["_target_"] == "DistributedSampler"
        assert parser["train#dataloader#sampler"] == "@train#sampler"


def test_large_files_are_listed_with_their_hash():
    entries = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]
    for entry in entries:
        assert {"name", "path", "url", "hash_val", "hash_type"} <= entry.keys()
        path = BUNDLE_ROOT / entry["path"]
        assert path.is_file(), f"large_files.yml lists {entry['path']}, which is not in the bundle"
        assert entry["hash_type"] == "sha256"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["hash_val"], f"{entry['path']} hash differs"


def test_docs_name_every_data_source():
    text = (BUNDLE_ROOT / "docs" / "data_license.txt").read_text()
    for source in ("SynthSeg", "MNI152", "IXI", "BrainWeb", "Apache", "CC BY-SA 3.0"):
        assert source in text


SHARED_SETTINGS = {
    # setting: the workflows that use it; each must resolve to the same value in all of them
    "num_steps": ["inference", "evaluate"],
    "sdedit_start": ["inference", "evaluate"],
    "guidance_scale": ["inference", "evaluate"],
    "guidance_every": ["inference", "evaluate"],
    "eta": ["inference", "evaluate"],
    "image_size": ["inference", "evaluate", "train"],
    "model_size": ["inference", "evaluate", "train"],
    "prediction_type": ["inference", "evaluate", "train"],
    "lmi_bins": ["inference", "evaluate", "train"],
    "lmi_sigma": ["inference", "evaluate", "train"],
    "network_def": ["inference", "evaluate", "train"],
    "conditioner": ["inference", "evaluate", "train"],
    "sampling_scheduler": ["inference", "evaluate"],
}


@pytest.mark.parametrize("setting", sorted(SHARED_SETTINGS))
def test_workflows_agree_on_every_shared_setting(setting):
    """A setting two workflows share must have one value: the evaluation measures what inference ships."""
    values = {}
    for name in SHARED_SETTINGS[setting]:
        parser = ConfigParser()
        parser.read_config(BUNDLE_ROOT / "configs" / f"{name}.json")
        parser.resolve_macro_and_relative_ids()
        values[name] = parser.get(setting)
    first = next(iter(values.values()))
    assert all(value == first for value in values.values()), f"{setting} differs between workflows: {values}"
