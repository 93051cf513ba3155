"""The evaluation's own inferers: the identity "method" (the floor every method must beat) and a per-slice timer."""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer

from scripts.tensors import validate_source


class IdentityInferer(Inferer):
    """The untranslated source image (already scaled to [0, 1] by the preprocessing): the floor of the comparison."""

    method_names = ("identity",)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module | None = None, *args, **kwargs) -> torch.Tensor:
        validate_source(inputs)
        return inputs.clone().clamp(0.0, 1.0)

    def sample(self, inputs: torch.Tensor, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The translator interface of every method, so the floor also runs through the inference workflow."""
        return self(inputs, network)


class TimedInferer(Inferer):
    """Wraps a method's inferer; as an ignite handler it reports the wall-clock seconds per slice of each call.

    Per-case values go to ``engine.state.metric_details["seconds"]`` (so ``MetricsSaver`` writes them with the other
    per-case metrics) and their mean to ``engine.state.metrics["seconds_per_slice"]``. Only the inferer call is
    timed: loading, segmentation and metrics are not part of a method's cost.
    """

    def __init__(self, inferer: Inferer) -> None:
        super().__init__()
        self.inferer = inferer
        self.seconds: list[float] = []

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        start = time.perf_counter()
        output = self.inferer(inputs, network, *args, **kwargs)
        elapsed = time.perf_counter() - start
        self.seconds += [elapsed / max(1, inputs.shape[0])] * max(1, inputs.shape[0])
        return output

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.seconds = []

    def _report(self, engine: Engine) -> None:
        if not self.seconds:
            return
        values = torch.tensor(self.seconds, dtype=torch.float64)[:, None]
        if not hasattr(engine.state, "metric_details"):
            engine.state.metric_details = {}
        engine.state.metric_details["seconds"] = values
        engine.state.metrics["seconds_per_slice"] = float(values.mean())
