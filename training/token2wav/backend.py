"""The PyTorch implementation of the runtime's `Token2WavBackend` protocol."""

from __future__ import annotations

import numpy as np
import torch

from opens2s_edge.runtime.token2wav_stream import DecoderSpec

from .cfm import estimator_callable
from .config import DecoderConfig
from .flow import Flow
from .hift import HiFTGenerator


def spec_from_config(cfg: DecoderConfig) -> DecoderSpec:
    return DecoderSpec(
        vocab_size=cfg.flow.vocab_size,
        token_rate=cfg.flow.input_frame_rate,
        sample_rate=cfg.sample_rate,
        hop=cfg.hift.hop,
        mel_bins=cfg.flow.output_size,
        block_size=cfg.flow.encoder.block_size,
        spk_dim=cfg.flow.spk_embed_dim,
        n_sines=cfg.hift.nb_harmonics + 1,
        n_timesteps=cfg.flow.cfm.n_timesteps,
        cfg_rate=cfg.flow.cfm.inference_cfg_rate,
        t_scheduler=cfg.flow.cfm.t_scheduler,
    )


class TorchBackend:
    """Runs the three networks in PyTorch; numpy in, numpy out."""

    def __init__(self, flow: Flow, hift: HiFTGenerator, spec: DecoderSpec):
        self.flow = flow
        self.hift = hift
        self.spec = spec
        self.estimate = estimator_callable(flow.decoder.estimator)

    def _tensor(self, a: np.ndarray, module: torch.nn.Module) -> torch.Tensor:
        p = next(module.parameters())
        return torch.from_numpy(np.ascontiguousarray(a)).to(p.device, p.dtype)

    def encode(self, tokens: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = next(self.flow.parameters())
        tok = torch.from_numpy(np.asarray(tokens, np.int64)).to(p.device)[None]
        with torch.inference_mode():
            mu, spks = self.flow(tok, self._tensor(embedding, self.flow)[None])
        return mu[0].float().cpu().numpy(), spks[0].float().cpu().numpy()

    def vocode(self, mel: np.ndarray, phase: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            wav, _, frame_phase = self.hift(
                self._tensor(mel, self.hift)[None],
                self._tensor(phase, self.hift).reshape(1, -1, 1),
                self._tensor(noise, self.hift)[None],
            )
        return wav[0].float().cpu().numpy(), frame_phase[0].float().cpu().numpy()
