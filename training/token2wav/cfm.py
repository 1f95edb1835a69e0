"""Conditional flow matching: the estimator plus the sampling settings.

The Euler/CFG loop itself is `opens2s_edge.runtime.token2wav_stream.solve_flow` (numpy, torch-free), shared with
the streaming and onnxruntime paths; this module only adapts the torch estimator to it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from opens2s_edge.runtime.token2wav_stream import solve_flow

from .config import CFMConfig, EstimatorConfig
from .estimator import ConditionalDecoder


def estimator_callable(estimator: ConditionalDecoder):  # noqa: ANN201 - returns runtime.Estimate
    """numpy-in/numpy-out view of the estimator, for `solve_flow`."""
    param = next(estimator.parameters())

    def estimate(x, mask, mu, t, spks, cond):  # noqa: ANN001, ANN202 - numpy arrays, see Token2WavBackend
        args = [
            torch.from_numpy(np.ascontiguousarray(a)).to(param.device, param.dtype)
            for a in (x, mask, mu, t, spks, cond)
        ]
        with torch.inference_mode():
            return estimator(*args).float().cpu().numpy()

    return estimate


class ConditionalCFM(nn.Module):
    """Holds `estimator` (parameter prefix `decoder.estimator.` in flow.pt) and the sampler settings."""

    def __init__(self, cfg: CFMConfig, estimator_cfg: EstimatorConfig):
        super().__init__()
        self.cfg = cfg
        self.estimator = ConditionalDecoder(estimator_cfg)

    def solve(
        self,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
        n_timesteps: int | None = None,
    ) -> torch.Tensor:
        """mu, cond, noise (80, T) or (1, 80, T); spks (80,) or (1, 80) -> mel with the shape of mu."""
        shape = mu.shape
        bins = shape[-2]

        def arr(a: torch.Tensor, *dims: int) -> np.ndarray:
            return a.detach().float().cpu().reshape(*dims).numpy()

        mel = solve_flow(
            estimator_callable(self.estimator),
            arr(mu, bins, -1), arr(spks, -1), arr(cond, bins, -1), arr(noise, bins, -1),
            n_steps=n_timesteps or self.cfg.n_timesteps,
            cfg_rate=self.cfg.inference_cfg_rate,
            scheduler=self.cfg.t_scheduler,
        )
        return torch.from_numpy(mel).reshape(shape).to(mu.device)
