"""Our audio encoder against transformers' Qwen2AudioEncoder, the golden encoder/adapter outputs, and the
equivalence of the fixed-shape (exported) form with the trimmed reference computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2AudioEncoderConfig
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from opens2s_edge.training.audio_encoder import Adapter, AudioEncoder, AudioEncoderConfig
from opens2s_edge.training.checkpoint import load_checkpoint


@pytest.mark.parametrize("d_model, heads, layers", [(64, 4, 2), (96, 6, 3)])
@torch.no_grad()
def test_encoder_matches_transformers(d_model: int, heads: int, layers: int) -> None:
    torch.manual_seed(0)
    hf_config = Qwen2AudioEncoderConfig(d_model=d_model, encoder_attention_heads=heads, encoder_layers=layers,
                                        encoder_ffn_dim=2 * d_model, num_mel_bins=128, attn_implementation="eager")
    hf = Qwen2AudioEncoder(hf_config).eval()
    for name, p in hf.named_parameters():
        if "embed_positions" not in name:
            p.normal_(0, 0.2)
    ours = AudioEncoder(AudioEncoderConfig.from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    features = torch.randn(2, 128, 3000)
    ref = hf(features).last_hidden_state
    encoded, lengths = ours(features, torch.tensor([3000, 1234]))
    assert (encoded - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    assert lengths.tolist() == [750, 308]  # conv stride 2 then pooling 2, as the reference counts


@pytest.mark.parametrize("name", ["u1", "u2"])
@torch.no_grad()
def test_golden_encoder_and_adapter(golden_opens2s: Path, name: str) -> None:
    golden = np.load(golden_opens2s / "golden.npz")
    model = load_checkpoint(golden_opens2s)
    features = torch.from_numpy(golden[f"{name}/input_features"])
    length = torch.tensor([int(golden[f"{name}/feature_attention_mask"].sum())])
    encoded, enc_len = model.audio_encoder_model(features, length)
    ref = golden[f"{name}/encoder_out"]
    assert int(enc_len[0]) == ref.shape[1]
    ours = encoded[:, : ref.shape[1]].numpy()
    assert np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()) < 1e-4
    adapter_ref = golden[f"{name}/adapter_out"]
    adapted = model.encode_audio(features, length).numpy()
    assert adapted.shape == adapter_ref.shape
    assert np.abs(adapted - adapter_ref).max() / max(1.0, np.abs(adapter_ref).max()) < 1e-4


@torch.no_grad()
def test_fixed_shape_adapter_equals_trim_then_pad() -> None:
    """The reference trims the encoder output before the adapter's convolutions; we mask instead."""
    torch.manual_seed(1)
    adapter = Adapter(32, 16, 48, [5, 5]).eval()
    full = torch.randn(1, 750, 32)
    for valid in (1, 2, 53, 137, 750):
        masked, out_len = adapter(full, torch.tensor([valid]))
        trimmed, trim_len = adapter(full[:, :valid], torch.tensor([valid]))
        assert out_len.tolist() == trim_len.tolist()
        n = int(out_len[0])
        assert (masked[:, :n] - trimmed[:, :n]).abs().max() < 1e-5


@torch.no_grad()
def test_long_audio_is_encoded_window_by_window(golden_opens2s: Path) -> None:
    model = load_checkpoint(golden_opens2s)
    enc = model.audio_encoder_model
    features = torch.randn(1, 128, 6000)
    encoded, lengths = enc(features, torch.tensor([3000 + 900]))
    first, _ = enc(features[:, :, :3000], torch.tensor([3000]))
    second, second_len = enc(features[:, :, 3000:], torch.tensor([900]))
    assert int(lengths[0]) == 750 + int(second_len[0])
    expected = torch.cat([first, second], dim=1)
    assert (encoded - expected).abs().max() < 1e-5
