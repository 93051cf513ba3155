"""The config files each workflow composes: a base, a method override and a workflow override, merged in order by
``python -m monai.bundle run --config_file "[...]"`` (later files override earlier ones, ``+key`` appends).

- ``configs/inference.json`` is the base: the default translator (network, conditioning, schedulers, sampling
  settings) and the inference workflow, runnable alone.
- ``configs/methods/<method>.json`` switches the translator (``network_def``, ``model_path``, ``translator``).
- ``configs/evaluate.json``, ``configs/train*.json`` and ``configs/multi_gpu_train.json`` switch the workflow.

Benchmarks and tests build their commands here, so the composition has one home; docs/README.md lists the same
commands for users. The checks of settings that the configs run in ``initialize``, before any network is built,
live here too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_METHOD",
    "WORKFLOWS",
    "available_methods",
    "check_method",
    "check_num_steps",
    "check_sdedit_start",
    "check_stop_timestep",
    "config_files",
]

DEFAULT_METHOD = "lmi"  # the translator of the base config, without a method override file
BASE = "configs/inference.json"
METHODS_DIR = "configs/methods"
WORKFLOWS = {
    "inference": [],
    "evaluate": ["configs/evaluate.json"],
    "train": ["configs/train.json"],
    "multi_gpu_train": ["configs/train.json", "configs/multi_gpu_train.json"],
    "train_lmi_paper": ["configs/train_lmi_paper.json"],
    "train_cyclegan": ["configs/train_cyclegan.json"],
    "train_stylegan": ["configs/train_stylegan.json"],
}
# the method each training workflow trains (its method override comes before the workflow's files)
TRAINED_METHOD = {
    "train": DEFAULT_METHOD,
    "multi_gpu_train": DEFAULT_METHOD,
    "train_lmi_paper": "lmi_paper",
    "train_cyclegan": "cyclegan",
    "train_stylegan": "stylegan",
}


def available_methods(bundle_root: str | Path = ".") -> list[str]:
    """The default method and one per file in configs/methods/."""
    return sorted({DEFAULT_METHOD} | {path.stem for path in (Path(bundle_root) / METHODS_DIR).glob("*.json")})


def config_files(
    workflow: str = "inference", method: str | None = None, bundle_root: str | Path | None = None
) -> list[str]:
    """The ``--config_file`` list of `workflow` with `method` (paths relative to the bundle root, or under
    `bundle_root` when given). A training workflow brings its own method; the evaluation and inference ones take any."""
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow '{workflow}'; choose one of {sorted(WORKFLOWS)}")
    trained = TRAINED_METHOD.get(workflow)
    if method is not None and trained is not None and method != trained:
        raise ValueError(f"workflow '{workflow}' trains method '{trained}', not '{method}'")
    method = trained or method or DEFAULT_METHOD
    override = [] if method == DEFAULT_METHOD else [f"{METHODS_DIR}/{method}.json"]
    if trained is None:  # inference, evaluation: the method last, so its "+initialize" checks follow the workflow's
        files = [BASE, *WORKFLOWS[workflow], *override]
    else:  # training: the method's network before the workflow that trains it
        files = [BASE, *override, *WORKFLOWS[workflow]]
    return [str(Path(bundle_root) / f) for f in files] if bundle_root is not None else files


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    """The number of reverse steps, checked before any network is built."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be a whole number in 1-{num_train_timesteps}, got {num_steps!r}")


def check_stop_timestep(stop_timestep: int, num_train_timesteps: int) -> None:
    """The last reverse step walked (``stop_timestep``), checked before any network is built."""
    if not isinstance(stop_timestep, int) or not 0 <= stop_timestep < num_train_timesteps:
        raise ValueError(f"stop_timestep must be a timestep in 0-{num_train_timesteps - 1}, got {stop_timestep!r}")


def check_sdedit_start(sdedit_start: int, num_train_timesteps: int) -> None:
    """SDEdit's start timestep (configs/methods/sdedit.json), checked before any network is built."""
    if not isinstance(sdedit_start, int) or not 0 < sdedit_start < num_train_timesteps:
        raise ValueError(f"sdedit_start must be a timestep in 1-{num_train_timesteps - 1}, got {sdedit_start!r}")


def check_method(method: str, translator: object, bundle_root: str | os.PathLike) -> None:
    """`method` names the translator the composed configs build.

    A method is chosen by adding its override file ``configs/methods/<method>.json`` to ``--config_file``; the base
    configs are the default method. ``--method`` alone would only relabel the outputs, so it is refused unless the
    composed translator implements that method (its ``method_names``).
    """
    available = available_methods(bundle_root)
    if method not in available:
        raise ValueError(f"unknown method '{method}'; choose one of {available}")
    names = tuple(getattr(translator, "method_names", ()))
    if method not in names:
        raise ValueError(
            f"method '{method}' is set but the configs build {type(translator).__name__} ({', '.join(names) or '?'}); "
            f"choose a method by adding configs/methods/{method}.json to --config_file, not by --method"
        )
