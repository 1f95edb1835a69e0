"""token2wav: golden reproduction, released key layout, loading errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from opens2s_edge.runtime.token2wav_stream import InvalidTokensError, Token2WavError
from opens2s_edge.training.token2wav.config import (
    DecoderConfigError,
    dump_config,
    load_config,
    parse_config,
    preset_config,
)
from opens2s_edge.training.token2wav.decoder import (
    DecoderFilesError,
    build_modules,
    load_decoder,
    released_shapes,
)
from opens2s_edge.training.token2wav.flow import block_mask
from opens2s_edge.training.token2wav.init import write_random_decoder

REPO = Path(__file__).resolve().parents[1]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.fixture(scope="module")
def golden(golden_decoder: Path) -> dict[str, np.ndarray]:
    with np.load(golden_decoder / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def decoder(golden_decoder: Path):  # noqa: ANN201
    return load_decoder(golden_decoder)


def test_config_parses_to_the_tiny_preset(golden_decoder: Path) -> None:
    cfg = load_config(golden_decoder / "config.yaml")
    assert cfg == preset_config("tiny")
    for preset in ("tiny", "small", "full"):
        assert parse_config(dump_config(preset_config(preset))) == preset_config(preset)


def test_config_rejects_what_we_do_not_implement(golden_decoder: Path) -> None:
    text = (golden_decoder / "config.yaml").read_text()
    with pytest.raises(DecoderConfigError, match="use_cnn_module"):
        parse_config(text.replace("use_cnn_module: False", "use_cnn_module: True"))
    with pytest.raises(DecoderConfigError, match="<nope> names no key"):
        parse_config(text.replace("spk_embed_dim: !ref <spk_embed_dim>", "spk_embed_dim: !ref <nope>"))
    with pytest.raises(DecoderConfigError, match="HiFTGenerator"):
        parse_config(text.replace("generator.HiFTGenerator", "generator.Other"))


def test_golden_flow_encoder_mu(decoder, golden) -> None:  # noqa: ANN001
    mu, spks = decoder.backend.encode(golden["tokens"].astype(np.int64), np.zeros(192, np.float32))
    assert rel_err(mu, golden["mu"]) < 1e-4
    # A zero x-vector normalises to zero: the speaker input is the affine layer's bias.
    np.testing.assert_allclose(spks, decoder.flow.spk_embed_affine_layer.bias.detach().numpy(), atol=1e-7)


def test_golden_estimator_call(decoder, golden) -> None:  # noqa: ANN001
    args = [torch.from_numpy(golden[f"est_{k}"]) for k in ("x", "mask", "mu", "t", "spks", "cond")]
    with torch.inference_mode():
        out = decoder.estimator(*args).numpy()
    assert rel_err(out, golden["est_out"]) < 1e-4


def test_golden_mel_from_given_noise(decoder, golden) -> None:  # noqa: ANN001
    mel = decoder.mel(golden["tokens"], noise=golden["z"])
    assert rel_err(mel, golden["mel"]) < 1e-4


def max_abs(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got.astype(np.float64) - want).max())


# The golden README's tolerances: the reference's own fp32 noise on the waveform is 1.8e-4 (its float32
# per-sample phase sum); max abs 1e-3 for waveforms, 5e-4 for the source and F0.
WAV_TOL, SOURCE_TOL = 1e-3, 5e-4


def test_golden_hift_with_deterministic_source(decoder, golden) -> None:  # noqa: ANN001
    wav, source = decoder.vocode(golden["mel"])
    assert max_abs(wav, golden["hift_wav"]) <= WAV_TOL
    assert max_abs(source, golden["hift_source"][0]) <= SOURCE_TOL
    with torch.inference_mode():
        f0 = decoder.hift.f0_predictor(torch.from_numpy(golden["mel"])[None])[0].numpy()
    assert max_abs(f0, golden["hift_f0"]) <= SOURCE_TOL
    assert (f0 > decoder.config.hift.nsf_voiced_threshold).mean() > 0.5  # mostly voiced: the hard case


def test_golden_hift_with_real_noise_draws(decoder, golden) -> None:  # noqa: ANN001
    phase = golden["hiftn_phase"].reshape(-1).astype(np.float64) / (2 * np.pi)  # radians -> cycles
    phase[0] = 0.0  # the reference zeroes the fundamental's drawn phase
    wav, source = decoder.vocode(golden["hiftn_mel"], np.mod(phase, 1.0).astype(np.float32),
                                 golden["hiftn_noise"][0])
    assert max_abs(wav, golden["hiftn_wav"]) <= WAV_TOL
    assert max_abs(source, golden["hiftn_source"][0]) <= SOURCE_TOL


def test_sine_phase_is_continuous_across_vocoder_calls(decoder, golden) -> None:  # noqa: ANN001
    """The source of frames [cut, T) made in a second call that starts from the phase the first call reached
    (frame_phase, what streaming carries) equals the source of one call, to float32 precision."""
    hift = decoder.hift
    with torch.inference_mode():
        f0 = hift.f0_predictor(torch.from_numpy(golden["mel"])[None])
        frames = f0.shape[1]
        whole, frame_phase = hift.source(f0, torch.zeros(1, 9, 1), torch.zeros(1, 9, frames * 256))
        for cut in (1, 173, frames - 3):
            part, _ = hift.source(f0[:, cut:], frame_phase[:, :, cut:cut + 1], torch.zeros(1, 9, (frames - cut) * 256))
            assert max_abs(part[0, 0].numpy(), whole[0, 0, cut * 256:].numpy()) < 1e-5


def test_golden_flow_encoder_and_cfm_pieces(decoder, golden) -> None:  # noqa: ANN001
    tokens = torch.from_numpy(golden["tokens"].astype(np.int64))[None]
    with torch.inference_mode():
        enc, proj = decoder.flow.encode_tokens(tokens)
    assert rel_err(enc[0].numpy(), golden["flow_enc_out"]) < 1e-4
    assert rel_err(proj[0].numpy(), golden["flow_enc_proj"]) < 1e-4
    assert decoder.spec.frames(len(golden["tokens"])) == int(golden["feat_len"][0])
    mu, spks = decoder.backend.encode(golden["tokens"].astype(np.int64), np.zeros(192, np.float32))
    assert rel_err(spks, golden["spks"].reshape(-1)) < 1e-4
    from opens2s_edge.runtime.token2wav_stream import time_grid

    np.testing.assert_allclose(time_grid(decoder.spec.n_timesteps, decoder.spec.t_scheduler), golden["cfm_t_span"],
                               atol=1e-7)
    # Step 0 of the solver: the conditional and unconditional estimator passes, batched as one call of 2.
    t0 = np.zeros(2, np.float32)
    z = golden["z"]
    v = decoder.backend.estimate(np.stack([z, z]), np.ones((2, 1, z.shape[1]), np.float32),
                                 np.stack([mu, np.zeros_like(mu)]), t0, np.stack([spks, np.zeros_like(spks)]),
                                 np.stack([golden["cond"], np.zeros_like(golden["cond"])]))
    assert rel_err(v[0], golden["cfm_step0_cond"]) < 1e-4
    assert rel_err(v[1], golden["cfm_step0_uncond"]) < 1e-4


def test_golden_estimator_masking_facts(decoder, golden) -> None:  # noqa: ANN001
    """The estimator does not isolate padded frames (an additive 0/1 mask, GroupNorm over zeros): an item cut
    to its length differs from its padded row, and a 0-dim t gives the batched result."""
    args = {k: torch.from_numpy(golden[f"est_{k}"]) for k in ("x", "mask", "mu", "t", "spks", "cond")}
    with torch.inference_mode():
        item1 = decoder.estimator(*(args[k][1:2, ..., :40] if args[k].dim() == 3 else args[k][1:2]
                                    for k in ("x", "mask", "mu", "t", "spks", "cond"))).numpy()
        item0 = decoder.estimator(args["x"][:1], args["mask"][:1], args["mu"][:1], args["t"][0],
                                  args["spks"][:1], args["cond"][:1]).numpy()
    assert rel_err(item1, golden["est_out_item1_unpadded"]) < 1e-4
    assert rel_err(item0, golden["est_out_item0_t0dim"]) < 1e-4
    assert rel_err(golden["est_out"][1:2, :, :40], golden["est_out_item1_unpadded"]) > 1e-3


@pytest.mark.parametrize("name", ["stream", "stream48"])
def test_reference_worker_streaming_is_reproduced(decoder, golden, golden_decoder: Path,  # noqa: ANN001
                                                  name: str) -> None:
    """The reference worker's chunks, drift and lost tail, from the same tokens and its recorded noise."""
    from opens2s_edge.training.token2wav.reference_stream import ReferenceStream

    def series(kind: str) -> list[np.ndarray]:
        keys = [k for k in golden if k.startswith(f"{name}_{kind}_")]
        return [golden[k] for k in sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))]

    zs, want = series("z"), series("chunk")
    n = json.loads((golden_decoder / "golden.json").read_text())["streaming"][name]["n_tokens"]
    ref = ReferenceStream(decoder, noise=lambda i, _frames: zs[i])
    chunks = [c for c in [*ref.push(golden["tokens"][:n]), ref.finish()] if c.size]
    assert [c.shape for c in chunks] == [w.shape for w in want]
    for got, w in zip(chunks, want, strict=True):
        assert max_abs(got, w) <= WAV_TOL
    for got, w in zip(ref.flow_mels, series("flow_mel"), strict=True):
        assert rel_err(got, w) < 1e-4


def test_streaming_keeps_the_length_the_reference_loses(decoder, golden) -> None:  # noqa: ANN001
    reference_streamed = sum(len(golden[k]) for k in golden if k.startswith("stream_chunk_"))
    assert reference_streamed == len(golden["hift_wav"]) - 256  # the reference's one-frame drift
    stream = decoder.stream(random_source=False)
    pieces = [stream.push(golden["tokens"][i : i + 1]) for i in range(len(golden["tokens"]))]
    pieces.append(stream.finalize())
    assert sum(len(p) for p in pieces) == len(golden["hift_wav"])


def test_block_mask_equals_the_reference_grid_mask() -> None:
    for n, block in [(1, 10), (8, 3), (25, 10), (30, 10), (7, 1)]:
        want = np.tril(np.ones((n, n), bool))
        for i in range(n):  # the reference's loop, as a specification
            start = (i // block) * block
            want[i, start : start + block] = True
        assert np.array_equal(block_mask(n, block).numpy(), want)


def test_full_size_modules_have_the_released_keys_and_shapes(golden_root: Path) -> None:
    want = json.loads((golden_root / "glm4voice_decoder_full_keys.json").read_text())
    flow, hift = build_modules(preset_config("full"), "meta")
    for name, module, wn in (("flow.pt", flow, ()), ("hift.pt", hift, hift.weight_norm_layers())):
        assert released_shapes(module, wn) == {k: v["shape"] for k, v in want[name].items()}
        assert {v["dtype"] for v in want[name].values()} == {"float32"}
        assert sum(int(np.prod(v["shape"])) for v in want[name].values()) == dict(want["n_params"])[name]


def test_random_decoder_is_deterministic_and_in_released_format(tmp_path: Path) -> None:
    write_random_decoder(tmp_path / "a", "tiny", seed=3)
    write_random_decoder(tmp_path / "b", "tiny", seed=3)
    write_random_decoder(tmp_path / "c", "tiny", seed=4)
    for name in ("flow.pt", "hift.pt"):
        a, b, c = (torch.load(tmp_path / d / name, weights_only=True) for d in "abc")
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
    hift = torch.load(tmp_path / "a" / "hift.pt", weights_only=True)
    assert "conv_pre.weight_g" in hift and "conv_pre.weight_v" in hift and "conv_pre.weight" not in hift
    dec = load_decoder(tmp_path / "a")
    wav = dec.tokens_to_wav([1, 2, 3], seed=0)
    assert wav.shape == (dec.spec.frames(3) * 256,) and np.isfinite(wav).all()


def test_bad_tokens_are_named(decoder) -> None:  # noqa: ANN001
    with pytest.raises(InvalidTokensError, match=r"id 16384 at position 1 .*0 <= id < 16384"):
        decoder.tokens_to_wav([5, 16384, 7])
    with pytest.raises(InvalidTokensError, match=r"id -1 at position 0"):
        decoder.tokens_to_wav([-1])
    with pytest.raises(InvalidTokensError, match="empty"):
        decoder.tokens_to_wav([])
    with pytest.raises(InvalidTokensError, match="integer"):
        decoder.tokens_to_wav(np.array([1.5]))
    stream = decoder.stream()
    with pytest.raises(InvalidTokensError, match="out of range"):
        stream.push([20000])


def _copy_decoder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "flow.pt", "hift.pt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_missing_and_mismatched_decoder_files_are_named(golden_decoder: Path, tmp_path: Path) -> None:
    with pytest.raises(DecoderFilesError, match="does not exist"):
        load_decoder(tmp_path / "nowhere")
    d = _copy_decoder(golden_decoder, tmp_path / "missing")
    (d / "hift.pt").unlink()
    with pytest.raises(DecoderFilesError, match="lacks hift.pt"):
        load_decoder(d)

    d = _copy_decoder(golden_decoder, tmp_path / "keys")
    state = torch.load(d / "flow.pt", weights_only=True)
    del state["encoder_proj.bias"], state["input_embedding.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["encoder.after_norm.weight"] = torch.zeros(3)
    torch.save(state, d / "flow.pt")
    with pytest.raises(DecoderFilesError) as err:
        load_decoder(d)
    msg = str(err.value)
    for key in ("encoder_proj.bias", "input_embedding.weight", "extra.weight", "encoder.after_norm.weight: file (3,)"):
        assert key in msg
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg and "mis-shaped keys (1)" in msg

    d = _copy_decoder(golden_decoder, tmp_path / "sizes")  # weights of the tiny model, config of the small one
    (d / "config.yaml").write_text(dump_config(preset_config("small")))
    with pytest.raises(DecoderFilesError, match="flow.pt does not match config.yaml"):
        load_decoder(d)

    d = _copy_decoder(golden_decoder, tmp_path / "garbage")
    (d / "hift.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DecoderFilesError, match="hift.pt: not a readable PyTorch state dict"):
        load_decoder(d)

    d = _copy_decoder(golden_decoder, tmp_path / "yaml")
    (d / "config.yaml").write_text("flow: [unclosed")
    with pytest.raises(DecoderFilesError, match="config.yaml"):
        load_decoder(d)
    assert issubclass(DecoderFilesError, Token2WavError)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "opens2s_edge", "token2wav", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )


def test_cli_writes_the_wav(tmp_path: Path) -> None:
    dec_dir = tmp_path / "decoder"
    write_random_decoder(dec_dir, "tiny", seed=0)
    tokens = np.random.default_rng(0).integers(0, 16384, 23)
    (tmp_path / "tokens.txt").write_text(" ".join(map(str, tokens)))
    np.save(tmp_path / "tokens.npy", tokens)
    outs = {}
    for name, extra in [("stream", ["--stream", "--chunk", "10"]), ("plain", [])]:
        src = tmp_path / ("tokens.txt" if name == "stream" else "tokens.npy")
        out = tmp_path / f"{name}.wav"
        result = _run_cli("--decoder", str(dec_dir), "--tokens", str(src), "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr
        with wave.open(str(out)) as w:
            assert w.getframerate() == 22050 and w.getnchannels() == 1 and w.getsampwidth() == 2
            outs[name] = w.getnframes()
    assert outs["stream"] == outs["plain"] == (23 * 441 // 64) * 256
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    bad = _run_cli("--decoder", str(dec_dir), "--tokens", "1,2,70000", "--out", str(tmp_path / "x.wav"))
    assert bad.returncode == 2 and "--tokens '1,2,70000'" in bad.stderr and "70000" in bad.stderr
    assert not (tmp_path / "x.wav").exists()
    bad = _run_cli("--decoder", str(tmp_path / "none"), "--tokens", "1", "--out", str(tmp_path / "x.wav"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
