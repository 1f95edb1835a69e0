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


def test_golden_hift_with_deterministic_source(decoder, golden) -> None:  # noqa: ANN001
    wav, source = decoder.vocode(golden["mel"])
    assert rel_err(wav, golden["hift_wav"]) < 1e-4
    assert rel_err(source, golden["hift_source"][0]) < 1e-4


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
    assert released_shapes(flow) == want["flow.pt"]
    assert released_shapes(hift, hift.weight_norm_layers()) == want["hift.pt"]


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
