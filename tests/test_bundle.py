"""Bundle-level checks: Model Zoo metadata keys, pinned versions against what is installed, configs that parse."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from helpers import BUNDLE_ROOT, composed_parser
from monai.bundle import ConfigParser

from scripts.configs import DEFAULT_METHOD, TRAINED_METHOD, WORKFLOWS, available_methods, config_files

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


# Configs composed by scripts.configs (a base, a method override, a workflow override) are parsed the way the runner
# merges them; the data-preparation ones stand alone or override prepare.json.
COMPOSED = (
    [(workflow, None) for workflow in WORKFLOWS]
    + [("evaluate", method) for method in available_methods(BUNDLE_ROOT)]
    + [("inference", method) for method in available_methods(BUNDLE_ROOT)]
)
STANDALONE = {"prepare.json": [], "prepare_second_physics.json": ["prepare.json"],
              "prepare_validation.json": ["prepare.json"], "fit_segmenter.json": [],
              "make_demo.json": [], "metadata.json": []}  # fmt: skip


def test_every_config_file_is_composed_or_stands_alone():
    composed = {Path(f).name for workflow, method in COMPOSED for f in config_files(workflow, method)}
    on_disk = {p.name for p in CONFIGS.glob("*.json")} | {p.name for p in (CONFIGS / "methods").glob("*.json")}
    assert on_disk == composed | set(STANDALONE), (
        f"configs neither composed nor standalone: {on_disk ^ (composed | set(STANDALONE))}"
    )


@pytest.mark.parametrize("workflow, method", COMPOSED)
def test_every_workflow_composes_with_every_method(workflow, method):
    parser = composed_parser(workflow, method)
    assert parser["method"] == (method or TRAINED_METHOD.get(workflow, DEFAULT_METHOD))
    assert "%configs/" not in json.dumps(parser.get()), "cross-file macros resolve against the working directory"
    for key in ("network_def", "translator", "initialize", "run"):
        assert key in parser, f"{workflow} with {method}: no '{key}'"


@pytest.mark.parametrize("config", sorted(STANDALONE))
def test_standalone_configs_parse(config):
    parser = ConfigParser()
    parser.read_config([CONFIGS / f for f in [*STANDALONE[config], config]])
    assert parser.get()
    if config == "prepare_second_physics.json":
        assert parser["simulator#_target_"] == "scripts.prepare.MRSimulator"
        assert parser["simulator#field_strength"] == 3.0 and parser["source"] == "labelmaps"


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


SHARED_SETTINGS = [
    "num_steps", "guidance_scale", "guidance_every", "eta", "stop_timestep", "num_samples", "image_size", "model_size",
    "prediction_type", "lmi_bins", "lmi_sigma", "network_def", "conditioner", "noise_scheduler", "sampling_scheduler",
    "translator", "paired_preprocessing", "segmenter_path", "validation_postprocessing", "validation_metrics",
]  # fmt: skip


@pytest.mark.parametrize("setting", SHARED_SETTINGS)
def test_workflows_agree_on_every_shared_setting(setting):
    """A setting two workflows share has one home, the base (or the method's override): the evaluation measures what
    inference ships and training validates the network it trains. No workflow override may redefine it."""
    for override in {f for files in WORKFLOWS.values() for f in files}:
        keys = ConfigParser.load_config_file(BUNDLE_ROOT / override)
        assert setting not in keys and f"+{setting}" not in keys, f"{override} redefines the shared '{setting}'"
    for method in available_methods(BUNDLE_ROOT):
        values = {"inference": composed_parser("inference", method).get(setting)}
        values["evaluate"] = composed_parser("evaluate", method).get(setting)
        trainer = "train" if method == DEFAULT_METHOD else f"train_{method}"
        if trainer in WORKFLOWS:
            values[trainer] = composed_parser(trainer, None).get(setting)
        first = values["inference"]
        assert all(value == first for value in values.values()), f"{setting} differs between workflows: {values}"
