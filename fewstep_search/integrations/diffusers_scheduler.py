"""`FewstepScheduler`: a diffusers scheduler that runs a fewstep-search result inside the model's own pipeline.

A pipeline calls `set_timesteps(N)`, then for each of `scheduler.timesteps` the network at that timestep and
`step(output, t, sample)`. This scheduler takes exactly the steps the search scored and Phase-2 trained for: the
schedule's N + 1 sigmas (EDM sigma) run with the last replaced by 0 (`fewstep_search.solvers.sampling_sigmas`), by
the same step objects as the tool's own solves (`fewstep_search.solvers.steps_for`: DDIM / Euler,
DPM-Solver++(2M), iPNDM), so N steps are N network calls and the samples match the tool's from the same noise.

Coordinates. The pipeline holds its state in the model's own coordinates and the scheduler converts at each step:
* `family = "vp"` (DDPM / SD UNets): the state is x_t, the EDM state is `x = x_t sqrt(1 + sigma^2)` and the
  network's output becomes D by the adapter's own map (`vp_output_to_x0`; epsilon, v or sample prediction);
* `family = "flow"` (SD3 / Flux transformers): the state is x_t at t = sigma / (1 + sigma), `x = x_t (1 + sigma)`,
  and D = x_t - t v (`flow_output_to_x0`).
The pipeline's own start (x_T ~ N(0, I)) is the prior every solve of the tool starts from
(`fewstep_search.schedules.prior_scale`), so `init_noise_sigma = 1` and `scale_model_input` is the identity.
`timesteps` are stored as the values the tool's adapter called the network with (`model_timesteps`), so the
network sees the same inputs in the pipeline as in the search.

The class lives in this module, which diffusers' loader must find already imported: an exported folder's
`model_index.json` names it, and `DiffusionPipeline.from_pretrained` resolves components of libraries other than
its own only from modules the caller has imported (diffusers never imports code a folder names). Hence the one
import line in the snippet:

    >>> import fewstep_search.integrations.diffusers_scheduler  # doctest: +SKIP
    >>> from diffusers import DiffusionPipeline  # doctest: +SKIP
    >>> images = DiffusionPipeline.from_pretrained("export-dir")(num_inference_steps=4).images  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin  # noqa: F401  (SchedulerMixin is looked up here by the loader)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor

from fewstep_search.models.diffusers_adapter import PREDICTION_TYPES, vp_output_to_x0
from fewstep_search.models.flow import flow_output_to_x0
from fewstep_search.solvers import STEPS, Steps, sampling_sigmas, steps_for

__all__ = ["FewstepScheduler", "SCHEDULER_FAMILIES", "FLOW_PREDICTION"]

SCHEDULER_FAMILIES = ("vp", "flow")
"""Model families whose pipelines this scheduler serves (an EDM-convention model has no diffusers pipeline)."""
FLOW_PREDICTION = "flow"
"""`prediction_type` of a flow model: the network predicts the velocity v = eps - x0."""


def _is_flux_default(sigmas: Sequence[float], n: int) -> bool:
    """Whether `sigmas` is Flux's pipeline default for n steps, `linspace(1, 1/n, n)`."""
    import numpy as np

    values = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    return values.size == n and bool(np.allclose(values, np.linspace(1.0, 1.0 / n, n), atol=1e-6))


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """The N-step sampler of one fewstep-search result (see the module docstring).

    Config: `sigmas` (N + 1 descending EDM sigmas, the last the schedule's sigma_min), `solver`, `family`,
    `timesteps` (N values the network is called with), `prediction_type`, `num_train_timesteps` (what pipelines
    read from a scheduler config), `name` (the schedule's) and `base_config` (the model's own scheduler config,
    which the tool's adapters read the noise schedule from: `models.diffusers_adapter.read_scheduler_config`).
    """

    order = 1
    _compatibles: list[str] = []
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        sigmas: Sequence[float] = (80.0, 0.002),
        solver: str = "ddim",
        family: str = "vp",
        timesteps: Sequence[float] = (999.0,),
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        name: str = "custom",
        base_config: dict[str, Any] | None = None,
    ) -> None:
        values = [float(s) for s in sigmas]
        if len(values) < 2 or any(not math.isfinite(s) or s <= 0 for s in values):
            raise ValueError(f"FewstepScheduler needs >= 2 positive finite sigmas, got {values}")
        if any(b >= a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"FewstepScheduler sigmas must be strictly decreasing, got {values}")
        if solver not in STEPS:
            raise ValueError(f"FewstepScheduler runs the solvers {', '.join(STEPS)}, not {solver!r}")
        if family not in SCHEDULER_FAMILIES:
            raise ValueError(f"FewstepScheduler serves {', '.join(SCHEDULER_FAMILIES)} models, not {family!r}")
        allowed = (FLOW_PREDICTION,) if family == "flow" else PREDICTION_TYPES
        if prediction_type not in allowed:
            raise ValueError(f"a {family} model's prediction_type is one of {', '.join(allowed)}, not "
                             f"{prediction_type!r}")
        if len(timesteps) != len(values) - 1:
            raise ValueError(f"FewstepScheduler needs one timestep per step: {len(values) - 1}, got {len(timesteps)}")
        self.nfe = len(values) - 1
        self.init_noise_sigma = 1.0  # the pipeline's N(0, I) start is the tool's prior (module docstring)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor([float(t) for t in timesteps], dtype=torch.float32)
        self._sigmas = torch.tensor(values, dtype=torch.float64)
        self._steps: Steps | None = None
        self._step_index = 0

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        *,
        sigmas: Sequence[float] | None = None,
        timesteps: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a pass of the stored schedule; `num_inference_steps` must be its N (or None).

        Flux's pipeline always passes `sigmas` (its default spacing `linspace(1, 1/N, N)`) and a resolution shift
        `mu`: that default is accepted and replaced by the stored schedule (which is absolute, so no shift
        applies); any other sigmas or timesteps are refused."""
        if sigmas is not None and _is_flux_default(sigmas, self.nfe):
            sigmas = None
        if sigmas is not None or timesteps is not None:
            raise ValueError("FewstepScheduler runs the schedule in its config; call the pipeline without sigmas or "
                             "timesteps")
        if num_inference_steps is not None and int(num_inference_steps) != self.nfe:
            raise ValueError(f"this scheduler runs the {self.nfe}-step {self.config.solver} schedule fewstep-search "
                             f"found; call the pipeline with num_inference_steps={self.nfe}")
        self.num_inference_steps = self.nfe
        self.timesteps = torch.tensor([float(t) for t in self.config.timesteps], dtype=torch.float32, device=device)
        self._sigmas = self._sigmas.to(device=device)
        self._steps = steps_for(self.config.solver, sampling_sigmas(self._sigmas))
        self._step_index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Pipelines that can start part-way (img2img) call this; a text-to-image pass starts at step 0."""
        if int(begin_index) != 0:
            raise ValueError("FewstepScheduler runs its whole schedule; it cannot start part-way (img2img)")

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """The identity: the network takes the pipeline's state as it is (module docstring)."""
        return sample

    def _to_edm(self, sample: Tensor, sigma: Tensor) -> Tensor:
        """The EDM state x of the pipeline's state at `sigma` (> 0)."""
        if self.config.family == "flow":
            return sample * (1.0 + sigma)
        return sample * torch.sqrt(1.0 + sigma**2)

    def _from_edm(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The pipeline's state of the EDM state x at `sigma` (0 after the last step: the sample itself)."""
        if self.config.family == "flow":
            return x / (1.0 + sigma)
        return x / torch.sqrt(1.0 + sigma**2)

    def _denoised(self, output: Tensor, sample: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        batch = sigma.expand(sample.shape[0])
        if self.config.family == "flow":
            return flow_output_to_x0(output, x_t=sample, sigma=batch)
        return vp_output_to_x0(output, x=x, sigma=batch, prediction_type=self.config.prediction_type)

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[Tensor]:
        """One step of the stored solver from the pipeline's state `sample` and the network's `model_output`."""
        if self._steps is None:
            raise RuntimeError("call set_timesteps before step")
        i = self._step_index
        if i >= self.nfe:
            raise RuntimeError(f"this scheduler's pass has {self.nfe} steps; call set_timesteps to start another")
        sigma = self._sigmas[i].to(sample.device)
        state = sample.to(torch.float64)
        x = self._to_edm(state, sigma)
        d = self._denoised(model_output.to(torch.float64), state, x, sigma)
        x_next = self._steps(i, x, d)
        self._step_index += 1
        prev = self._from_edm(x_next, self._steps.sigmas[i + 1].to(sample.device)).to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
