"""Load a GLM-4-Voice decoder folder (config.yaml, flow.pt, hift.pt) and run it: tokens -> waveform."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from opens2s_edge.runtime.token2wav_stream import (
    StreamConfig,
    Token2WavError,
    Token2WavStream,
    synthesize,
    synthesize_mel,
    validate_tokens,
)

from ..weights import key_mismatches
from .backend import TorchBackend, spec_from_config
from .config import DecoderConfig, DecoderConfigError, load_config
from .flow import Flow
from .hift import HiFTGenerator

DECODER_FILES = ("config.yaml", "flow.pt", "hift.pt")


class DecoderFilesError(Token2WavError):
    """A decoder folder whose files are missing, unreadable or do not match its config.yaml."""


def fold_weight_norm(state: dict[str, torch.Tensor], layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Replace each layer's weight_g/weight_v pair by weight = g * v / ||v|| (norm over all dims but 0)."""
    out = dict(state)
    for name in layers:
        g_key, v_key = f"{name}.weight_g", f"{name}.weight_v"
        if g_key in out and v_key in out:
            g, v = out.pop(g_key), out.pop(v_key)
            norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
            out[f"{name}.weight"] = g * v / norm
    return out


def unfold_weight_norm(state: dict[str, torch.Tensor], layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """The inverse, as torch's weight_norm stores it: g = ||w|| per output slice, v = w."""
    out = {}
    layer_set = {f"{name}.weight" for name in layers}
    for key, value in state.items():
        if key in layer_set:
            base = key[: -len(".weight")]
            out[f"{base}.weight_g"] = value.flatten(1).norm(dim=1).reshape(-1, *([1] * (value.dim() - 1)))
            out[f"{base}.weight_v"] = value
        else:
            out[key] = value
    return out


def released_shapes(module: nn.Module, weight_norm_layers: Iterable[str] = ()) -> dict[str, list[int]]:
    """Every key and shape of the module's state dict in the released file format (works on the meta device)."""
    layers = set(weight_norm_layers)
    shapes: dict[str, list[int]] = {}
    for key, value in module.state_dict().items():
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if base in layers:
            shapes[f"{base}.weight_g"] = [value.shape[0]] + [1] * (value.dim() - 1)
            shapes[f"{base}.weight_v"] = list(value.shape)
        else:
            shapes[key] = list(value.shape)
    return shapes


def build_modules(cfg: DecoderConfig, device: str | torch.device = "cpu") -> tuple[Flow, HiFTGenerator]:
    """Flow and HiFT with uninitialised weights (`device="meta"` allocates nothing)."""
    with torch.device(device):
        return Flow(cfg.flow, cfg.sample_rate, cfg.hift.hop), HiFTGenerator(cfg.hift)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or non-weights file
        raise DecoderFilesError(f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DecoderFilesError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def _check_keys(path: Path, state: dict[str, torch.Tensor], expected: dict[str, list[int]]) -> None:
    problems = key_mismatches(expected, state)
    if problems:
        raise DecoderFilesError(f"{path} does not match config.yaml: " + "; ".join(problems))


class Token2Wav:
    """A loaded decoder: non-streaming `tokens_to_wav`, streaming `stream()`, and the pieces for tests/export."""

    def __init__(self, cfg: DecoderConfig, flow: Flow, hift: HiFTGenerator):
        self.config = cfg
        self.flow = flow.eval()
        self.hift = hift.eval()
        self.spec = spec_from_config(cfg)
        self.backend = TorchBackend(self.flow, self.hift, self.spec)

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    @property
    def estimator(self) -> nn.Module:
        return self.flow.decoder.estimator

    def mel(
        self,
        tokens: Iterable[int] | np.ndarray,
        *,
        noise: np.ndarray | None = None,
        seed: int = 0,
        prompt_tokens: np.ndarray | None = None,
        prompt_mel: np.ndarray | None = None,
        embedding: np.ndarray | None = None,
    ) -> np.ndarray:
        """tokens -> mel (80, frames); `noise` (80, frames incl. prompt) is the solver's initial noise."""
        return synthesize_mel(
            self.backend, validate_tokens(tokens, self.spec.vocab_size),
            noise=noise, seed=seed, prompt_tokens=prompt_tokens, prompt_mel=prompt_mel, embedding=embedding,
        )

    def vocode(
        self, mel: np.ndarray, phase: np.ndarray | None = None, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """mel (80, T) -> (wav (T*256,), source (T*256,)); no phase/noise = the deterministic source."""
        mel = np.asarray(mel, np.float32)
        n_samples = mel.shape[-1] * self.spec.hop
        phase = np.zeros(self.spec.n_sines, np.float32) if phase is None else phase
        noise = np.zeros((self.spec.n_sines, n_samples), np.float32) if noise is None else noise
        p = next(self.hift.parameters())
        with torch.inference_mode():
            wav, source, _ = self.hift(
                torch.from_numpy(mel).to(p.device)[None],
                torch.from_numpy(np.asarray(phase, np.float32)).to(p.device).reshape(1, -1, 1),
                torch.from_numpy(np.asarray(noise, np.float32)).to(p.device)[None],
            )
        return wav[0].cpu().numpy(), source[0, 0].cpu().numpy()

    def tokens_to_wav(
        self,
        tokens: Iterable[int] | np.ndarray,
        *,
        seed: int = 0,
        random_source: bool = True,
        embedding: np.ndarray | None = None,
    ) -> np.ndarray:
        """Non-streaming synthesis: float32 waveform at `sample_rate`, frames(N) * 256 samples."""
        return synthesize(self.backend, tokens, embedding=embedding, seed=seed, random_source=random_source)

    def stream(
        self,
        config: StreamConfig | None = None,
        *,
        seed: int = 0,
        random_source: bool = True,
        embedding: np.ndarray | None = None,
    ) -> Token2WavStream:
        return Token2WavStream(self.backend, config, seed=seed, random_source=random_source, embedding=embedding)


def load_decoder(decoder_dir: Path | str, device: str | torch.device = "cpu") -> Token2Wav:
    """Read a decoder folder strictly: every key present with its shape, nothing extra; weight norm folded."""
    root = Path(decoder_dir)
    if not root.is_dir():
        raise DecoderFilesError(
            f"decoder folder {root} does not exist; expected a folder with {', '.join(DECODER_FILES)}"
        )
    missing = [name for name in DECODER_FILES if not (root / name).is_file()]
    if missing:
        raise DecoderFilesError(f"decoder folder {root} lacks {', '.join(missing)}")
    try:
        cfg = load_config(root / "config.yaml")
    except DecoderConfigError as exc:
        raise DecoderFilesError(f"{root / 'config.yaml'}: {exc}") from exc
    flow_meta, hift_meta = build_modules(cfg, "meta")
    wn_layers = hift_meta.weight_norm_layers()
    flow_state = _read_state(root / "flow.pt")
    _check_keys(root / "flow.pt", flow_state, released_shapes(flow_meta))
    hift_state = _read_state(root / "hift.pt")
    _check_keys(root / "hift.pt", hift_state, released_shapes(hift_meta, wn_layers))
    flow, hift = build_modules(cfg, "cpu")
    flow.load_state_dict(flow_state, strict=True)
    hift.load_state_dict(fold_weight_norm(hift_state, wn_layers), strict=True)
    return Token2Wav(cfg, flow.to(device), hift.to(device))
