"""HiFT vocoder (CosyVoice HiFTGenerator): F0 predictor, neural source-filter sine source, iSTFTNet decoder.

Export-friendly: the source's random start phase and additive noise are inputs (zeros switch them off), and the
STFT of the source and the final inverse STFT are fixed-weight convolutions instead of torch.stft/istft, which
have no ONNX export. Parameter names follow the released `hift.pt` once its weight_g/weight_v pairs are folded
(`weight_norm_layers` lists the layers stored that way).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import F0PredictorConfig, HiFTConfig


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, per channel (linear-scale alpha)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, padding=_padding(kernel, 1)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=True):
            x = x + c2(a2(c1(a1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, cfg: F0PredictorConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            in_channels = cfg.in_channels if i == 0 else cfg.cond_channels
            layers += [nn.Conv1d(in_channels, cfg.cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) -> f0 in Hz (B, T)."""
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SourceModuleHnNSF(nn.Module):
    """Merges the sine harmonics into one excitation: tanh(Linear(n_sines -> 1))."""

    def __init__(self, n_sines: int):
        super().__init__()
        self.l_linear = nn.Linear(n_sines, 1)

    def forward(self, sines: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l_linear(sines.transpose(1, 2))).transpose(1, 2)


def _stft_kernels(n_fft: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward STFT, inverse STFT and squared-window kernels for a periodic Hann window (float64 -> float32)."""
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # scipy get_window("hann", fftbins=True)
    angle = 2 * np.pi * np.outer(k, n) / n_fft
    stft = np.concatenate([window * np.cos(angle), -window * np.sin(angle)])[:, None, :]
    # One-sided inverse DFT: interior bins count twice; the imaginary parts of DC and Nyquist are ignored
    # (their sine rows vanish), exactly as irfft does.
    weight = np.where((k == 0) | (k == n_fft // 2), 1.0, 2.0)[:, None] / n_fft
    istft = np.concatenate([weight * np.cos(angle) * window, -weight * np.sin(angle) * window])[:, None, :]
    win_sq = (window**2)[None, None, :]
    return (torch.tensor(stft, dtype=torch.float32), torch.tensor(istft, dtype=torch.float32),
            torch.tensor(win_sq, dtype=torch.float32))


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.hop = cfg.hop
        self.n_sines = cfg.nb_harmonics + 1
        self.n_fft = cfg.n_fft
        self.istft_hop = cfg.hop_len
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        base = cfg.base_channels
        self.m_source = SourceModuleHnNSF(self.n_sines)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        spec_ch = cfg.n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        cum = np.cumprod([1, *cfg.upsample_rates[::-1][:-1]])[::-1]
        for i, (u, k, d) in enumerate(
            zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=True)
        ):
            ch = base // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(
                nn.Conv1d(spec_ch, ch, 1, 1) if u == 1 else nn.Conv1d(spec_ch, ch, u * 2, u, padding=u // 2)
            )
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = nn.Conv1d(ch, spec_ch, 7, 1, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0)
        stft, istft, win_sq = _stft_kernels(cfg.n_fft)
        self.register_buffer("stft_kernel", stft, persistent=False)
        self.register_buffer("istft_kernel", istft, persistent=False)
        self.register_buffer("window_sq", win_sq, persistent=False)
        self.register_buffer(
            "harmonics", torch.arange(1, self.n_sines + 1, dtype=torch.float32)[None, :, None], persistent=False
        )

    def weight_norm_layers(self) -> list[str]:
        """Layers whose weight the released hift.pt stores as a weight_g/weight_v pair."""
        return [
            name for name, m in self.named_modules()
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) and not name.startswith("source_downs.")
        ]

    def source(
        self, f0: torch.Tensor, phase: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 (B, T) Hz, phase (B, S, 1) cycles, noise (B, S, T*hop) -> source (B, 1, T*hop), frame_phase (B, S, T).

        The reference's sine phase is one float32 cumulative sum over every sample (thousands of cycles at 22 kHz),
        whose rounding differs between runtimes. F0 is constant within a frame (nearest upsampling), so the same
        sum is taken per frame, then within the frame: the phase a frame advances (hop steps, mod 1) is split
        into a part on a 2^-10 grid, whose running sum is exact in float32 in any order (up to 16384 frames), and a
        remainder below 2^-11 whose running sum is tiny; inside the frame the phase is k steps on from the
        frame's start. Every quantity stays below a few cycles, so float32 holds it to ~1e-6 cycles.
        """
        cfg = self.cfg
        hop = self.hop
        step = f0[:, None, :] * self.harmonics / cfg.sampling_rate  # (B, S, T) cycles per sample
        advance = step * hop
        advance = advance - torch.floor(advance)  # cycles a whole frame advances, mod 1
        coarse = torch.floor(advance * 1024.0 + 0.5) / 1024.0
        fine = advance - coarse
        # Exclusive running sums: the phase before each frame's first sample.
        coarse_sum = torch.cumsum(coarse, dim=-1) - coarse
        fine_sum = torch.cumsum(fine, dim=-1) - fine
        start = coarse_sum - torch.floor(coarse_sum) + fine_sum + phase
        frame_phase = start - torch.floor(start)
        k = torch.arange(1, hop + 1, device=f0.device, dtype=f0.dtype)  # the reference's cumsum is inclusive
        cycles = frame_phase[..., None] + step[..., None] * k
        cycles = (cycles - torch.floor(cycles)).flatten(2)  # (B, S, T*hop)
        sines = cfg.nsf_alpha * torch.sin(2 * math.pi * cycles)
        f0_up = f0[:, None, :, None].expand(-1, -1, -1, hop).flatten(2)  # nearest upsampling, (B, 1, T*hop)
        uv = (f0_up > cfg.nsf_voiced_threshold).to(sines.dtype)
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * (cfg.nsf_alpha / 3)
        sines = sines * uv + noise_amp * noise
        return self.m_source(sines), frame_phase

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """torch.stft(center=True, reflect pad, Hann) as a conv: (B, 1, L) -> (B, n_fft + 2, L / hop + 1)."""
        pad = self.n_fft // 2
        return F.conv1d(F.pad(x, (pad, pad), mode="reflect"), self.stft_kernel, stride=self.istft_hop)

    def _istft(self, spec: torch.Tensor) -> torch.Tensor:
        """torch.istft(center=True) as a transposed conv (overlap-add) over the window envelope: -> (B, L)."""
        ola = F.conv_transpose1d(spec, self.istft_kernel, stride=self.istft_hop)
        envelope = F.conv_transpose1d(torch.ones_like(spec[:1, :1]), self.window_sq, stride=self.istft_hop)
        pad = self.n_fft // 2
        return (ola / envelope)[:, 0, pad:-pad]

    def forward(
        self, mel: torch.Tensor, phase: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mel (B, 80, T); phase (B, S, 1) source start phase in cycles; noise (B, S, T*hop) standard normal
        (zeros for none) -> wav (B, T*hop), source (B, 1, T*hop), frame_phase (B, S, T)."""
        s, frame_phase = self.source(self.f0_predictor(mel), phase, noise)
        return self.decode(mel, s), s, frame_phase

    def decode(self, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) and its source excitation (B, 1, T*hop) -> waveform (B, T*hop)."""
        cfg = self.cfg
        s_stft = self._stft(s)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as in the reference
        bins = self.n_fft // 2 + 1
        magnitude = torch.clamp(torch.exp(x[:, :bins]), max=1e2)
        angle = torch.sin(x[:, bins:])
        wav = self._istft(torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=1))
        return torch.clamp(wav, -cfg.audio_limit, cfg.audio_limit)
