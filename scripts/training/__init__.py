"""Training-campaign helpers shared by every training workflow (the diffusion model and the GAN baselines).

- :mod:`.campaign`: the rolling resume checkpoint, resuming from it, the exported weights, distributed set-up.
- :mod:`.handlers`: the campaign's wall clock and log, gradient clipping, the learning-rate schedule.
- :mod:`.data`: target images only for training, and validation pairs that are never test slices.
"""

from scripts.training.campaign import (
    EpochLengthFromData,
    ExportWeights,
    SafeCheckpointSaver,
    checkpoints,
    distributed_backend,
    latest_checkpoint,
    load_weights,
    resume_handlers,
    warm_start,
)
from scripts.training.data import (
    SOURCE_TAGS,
    SourceLeakError,
    paired_slices,
    paired_training_slices,
    require_tissue_labels,
    slice_sibling,
    spread,
    target_only,
    with_tissue_labels,
)
from scripts.training.handlers import ClipGradients, LearningRateSchedule, TrainingLog, WallClock, write_log_rows

__all__ = [
    "SOURCE_TAGS",
    "ClipGradients",
    "EpochLengthFromData",
    "ExportWeights",
    "LearningRateSchedule",
    "SafeCheckpointSaver",
    "SourceLeakError",
    "TrainingLog",
    "write_log_rows",
    "WallClock",
    "checkpoints",
    "distributed_backend",
    "latest_checkpoint",
    "load_weights",
    "paired_slices",
    "paired_training_slices",
    "require_tissue_labels",
    "resume_handlers",
    "slice_sibling",
    "spread",
    "target_only",
    "warm_start",
    "with_tissue_labels",
]
