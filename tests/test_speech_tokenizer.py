"""GLM-4-Voice's speech tokenizer: PyTorch definition, procedure, ONNX export, torch-free runtime, CLI, pipeline.

Oracles: the reference's own tokens on the golden tokenizer (../shared/golden/glm4voice_tokenizer_tiny, exact) and
its hidden states; transformers' WhisperFeatureExtractor for the log-mel, padding and masks; for random tokenizers of
other structures (held-out sizes, max pooling, no causal convolution, causal attention, no pooling, audio needing two
30 s segments) a float64 numpy re-statement of the reference's code written here, loops and all, fed by transformers'
feature extractor; PyTorch vs onnxruntime for the export.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.numpy import load_file, save_file
from scipy.special import erf

from opens2s_edge.cli import main as cli_main
from opens2s_edge.runtime import speech_tokenizer as st
from opens2s_edge.runtime.audio import AudioInputError
from opens2s_edge.runtime.audio import resample as project_resample
from opens2s_edge.training.speech_tokenizer import (
    GLM4VoiceTokenizer,
    load_encoder,
    write_random_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN_NAMES = ("u1", "u2")


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread: None) -> None:
    pass


@pytest.fixture(scope="session")
def golden_tokenizer() -> Path:
    from conftest import _golden

    return _golden("glm4voice_tokenizer_tiny")


@pytest.fixture(scope="session")
def golden(golden_tokenizer: Path) -> dict[str, np.ndarray]:
    with np.load(golden_tokenizer / "golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tok_bundle(golden_tokenizer: Path, tmp_path_factory) -> Path:
    from opens2s_edge.export.speech_tokenizer import export_speech_tokenizer

    return export_speech_tokenizer(golden_tokenizer, tmp_path_factory.mktemp("tok") / "bundle",
                                   progress=lambda _: None)


# The held-out structures: other sizes, max pooling, symmetric convolutions, layers after the pooling (the pooled
# block mask), plain causal attention, no pooling at all.
HELD_OUT = {
    "max_pool_k3": dict(d_model=80, heads=5, ffn_dim=160, encoder_layers=5, pooling_kernel=3, pooling_type="max",
                        pooling_position=2, quantize_position=4, vocab_size=512, block_size=30,
                        causal_convolution=False, seed=3),
    "causal_no_pool": dict(d_model=48, heads=3, ffn_dim=64, encoder_layers=3, pooling_kernel=None,
                           pooling_position=0, quantize_position=2, vocab_size=300, block_size=None,
                           causal_attention=True, seed=4),
}


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("held_out")
    return {name: write_random_tokenizer(root / name, **kw) for name, kw in HELD_OUT.items()}


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Audio with moving harmonics, pauses and noise (the tokenizer should see varying content)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 100 + 60 * np.sin(2 * np.pi * 0.37 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(h * phase) * np.exp(-h / 6) for h in range(1, 15))
    gate = (np.sin(2 * np.pi * 1.7 * t + seed) > -0.3).astype(float)
    return (0.2 * gate * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# -- the reference, restated in float64 numpy (the independent oracle) -------------------------------------------------

def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, causal: bool) -> np.ndarray:
    k = w.shape[2]
    x = np.pad(x, ((0, 0), (0, 0), (k - 1, 0) if causal else (1, 1)))
    n_out = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], n_out)) + b[None, :, None]
    for tap in range(k):
        out += np.einsum("oi,bit->bot", w[:, :, tap], x[:, :, tap: tap + stride * (n_out - 1) + 1: stride])
    return out


def _block_causal(mask: np.ndarray, block: int) -> np.ndarray:
    """As the reference builds it: lower triangle OR block-diagonal ones, AND the key mask."""
    n = mask.shape[1]
    m = np.tril(np.ones((n, n), bool))
    for start in range(0, n, block):
        m[start: start + block, start: start + block] = True
    return m[None] & mask[:, None, :].astype(bool)


def reference_tokens(folder: Path, wavs: list[np.ndarray]) -> tuple[list[list[int]], list[list[float]]]:
    """Tokens per input and each token's lead (best vs runner-up distance over max(1, |best|))."""
    from transformers import WhisperFeatureExtractor

    cfg = json.loads((folder / "config.json").read_text())
    w = {k[len("model.encoder."):]: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()
         if k.startswith("model.encoder.")}
    fe = WhisperFeatureExtractor.from_pretrained(str(folder))
    segments, owners = [], []
    for i, audio in enumerate(wavs):
        step = 0
        while step * 16000 < audio.shape[0]:
            segments.append(audio[step * 16000: (step + 30) * 16000])
            owners.append(i)
            step += 30
    k = cfg["pooling_kernel_size"]
    stride = 1 * 2 * (k or 1) * fe.hop_length
    heads, d = cfg["encoder_attention_heads"], cfg["d_model"]
    causal = cfg["encoder_causal_attention"] or cfg["quantize_causal_encoder"]
    tokens: list[list[int]] = [[] for _ in wavs]
    leads: list[list[float]] = [[] for _ in wavs]
    for start in range(0, len(segments), 128):
        f = fe(segments[start: start + 128], sampling_rate=16000, return_attention_mask=True, return_tensors="np",
               padding="longest", pad_to_multiple_of=stride)
        x = f["input_features"].astype(np.float64)
        causal_conv = cfg["encoder_causal_convolution"]
        x = _gelu(_conv1d(x, w["conv1.weight"], w["conv1.bias"], 1, causal_conv))
        x = _gelu(_conv1d(x, w["conv2.weight"], w["conv2.bias"], 2, causal_conv)).transpose(0, 2, 1)
        mask = f["attention_mask"][:, ::2]
        h = x + w["embed_positions.weight"][: x.shape[1]]
        block = cfg["quantize_causal_block_size"]

        def allowed(mask: np.ndarray, block: int | None) -> np.ndarray:
            n = mask.shape[1]
            if causal:
                return np.broadcast_to(np.tril(np.ones((n, n), bool))[None], (mask.shape[0], n, n))
            if block is not None:
                return _block_causal(mask, block)
            return np.broadcast_to(mask[:, None, :].astype(bool), (mask.shape[0], n, n))

        allow = allowed(mask, block)
        for idx in range(cfg["quantize_position"]):
            p = f"layers.{idx}."
            y = _layer_norm(h, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
            b_, t_, _ = y.shape
            q = (y @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]) * (d // heads) ** -0.5
            kk = y @ w[p + "self_attn.k_proj.weight"].T
            v = y @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
            q, kk, v = (a.reshape(b_, t_, heads, -1).transpose(0, 2, 1, 3) for a in (q, kk, v))
            s = np.where(allow[:, None], q @ kk.transpose(0, 1, 3, 2), -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b_, t_, d)
            h = h + a @ w[p + "self_attn.out_proj.weight"].T + w[p + "self_attn.out_proj.bias"]
            y = _layer_norm(h, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
            h = h + _gelu(y @ w[p + "fc1.weight"].T + w[p + "fc1.bias"]) @ w[p + "fc2.weight"].T + w[p + "fc2.bias"]
            if k is not None and idx + 1 == cfg["pooling_position"]:
                if h.shape[1] % k:
                    h = np.pad(h, ((0, 0), (0, k - h.shape[1] % k), (0, 0)))
                windows = h.reshape(h.shape[0], -1, k, d)
                h = windows.mean(2) if cfg["pooling_type"] == "avg" else windows.max(2)
                mask = mask[:, ::k]
                allow = allowed(mask, None if block is None else block // k)
        code = w["codebook.weight"]
        dist = (code ** 2).sum(1)[None, None] + (h ** 2).sum(-1, keepdims=True) - 2 * h @ code.T
        order = np.sort(dist, -1)
        lead = (order[..., 1] - order[..., 0]) / np.maximum(1.0, np.abs(order[..., 0]).max())
        for i in range(h.shape[0]):
            valid = mask[i].astype(bool)
            tokens[owners[start + i]] += dist[i].argmin(-1)[valid].tolist()
            leads[owners[start + i]] += lead[i][valid].tolist()
    return tokens, leads


def assert_same_choices(got: list[list[int]], want: list[list[int]], leads: list[list[float]],
                        min_lead: float = 1e-4) -> None:
    """Equal tokens wherever the oracle's best code leads clearly; nearly all positions must be clear."""
    assert [len(g) for g in got] == [len(w) for w in want]
    g, w, lead = (np.concatenate([np.asarray(x, float) for x in xs]) for xs in (got, want, leads))
    clear = lead > min_lead
    assert clear.mean() > 0.95, f"only {clear.mean():.1%} of the oracle's choices are clear"
    assert np.array_equal(g[clear], w[clear]), f"{int((g != w)[clear].sum())} clear choices differ"


# -- golden ---------------------------------------------------------------------------------------------------------

def test_golden_tokens_exact(golden_tokenizer: Path, golden: dict) -> None:
    tok = GLM4VoiceTokenizer(golden_tokenizer)
    assert (tok.codebook_size, tok.rate_hz) == (16384, 12.5)
    for name in GOLDEN_NAMES:
        assert tok.tokenize([golden[f"{name}/wav"]]) == [golden[f"{name}/tokens"].tolist()]
    # One list, one batch (u1 padded to u2's length), as the reference batches a list.
    assert tok.tokenize([golden[f"{n}/wav"] for n in GOLDEN_NAMES]) == [golden[f"{n}/tokens"].tolist()
                                                                        for n in GOLDEN_NAMES]
    assert tok.encode(golden["u1/wav"], 16000) == golden["u1/tokens"].tolist()


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_quantize_input(golden_tokenizer: Path, golden: dict, name: str) -> None:
    """The states at the quantization layer (before pooling) equal the reference's on the first segment."""
    tok = GLM4VoiceTokenizer(golden_tokenizer)
    wav = golden[f"{name}/wav"]
    batch = st.segment_batch([wav], [0], tok.features, st.padded_length([wav.size], tok.structure, tok.features))
    keep: list[torch.Tensor] = []
    pooled = tok.quantize_input(batch.features, batch.frame_lengths, keep)
    want = golden[f"{name}/quantize_input_window0"]
    got = keep[tok.structure.quantize_position - 1][0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    k = tok.structure.kernel
    np.testing.assert_allclose(pooled[0], got.reshape(-1, k, got.shape[1]).mean(1), atol=1e-5)


def test_features_and_masks_match_whisper_feature_extractor(golden_tokenizer: Path, golden: dict) -> None:
    from transformers import WhisperFeatureExtractor

    structure, features = st.read_tokenizer_configs(golden_tokenizer)
    wav = golden["u2/wav"]
    # Lengths that fill the stride exactly, miss it by one sample, and leave less than a window of padding.
    segs = [golden["u1/wav"], wav[: 1280 * 20], wav[: 1280 * 20 - 1], wav[: 1280 * 31 + 100], wav[:1]]
    fe = WhisperFeatureExtractor.from_pretrained(str(golden_tokenizer))
    want = fe(segs, sampling_rate=16000, return_attention_mask=True, return_tensors="np", padding="longest",
              pad_to_multiple_of=structure.stride_samples(features.hop))
    got = st.segment_batch(segs, list(range(len(segs))), features,
                           st.padded_length([s.size for s in segs], structure, features))
    np.testing.assert_allclose(got.features, want["input_features"], atol=2e-4, rtol=0)
    assert got.frame_lengths.tolist() == want["attention_mask"].sum(1).tolist()
    sub = want["attention_mask"][:, ::2][:, ::structure.kernel]
    assert [st.valid_tokens(int(n), structure) for n in got.frame_lengths] == sub.sum(1).tolist()


# -- export and the torch-free runtime ---------------------------------------------------------------------------------

def test_export_bundle_and_runtime_tokens(tok_bundle: Path, golden: dict) -> None:
    from opens2s_edge.export.checks import onnx_check, tensorrt_readiness
    from opens2s_edge.runtime.bundle import load_bundle

    bundle = load_bundle(tok_bundle)
    m = bundle.manifest
    assert m["kind"] == "speech_tokenizer" and m["dtype"] == "fp32"
    graph = m["graphs"]["speech_tokenizer"]
    assert [i["name"] for i in graph["inputs"]] == ["input_features", "feature_length"]
    assert [o["name"] for o in graph["outputs"]] == ["tokens", "token_length", "distance"]
    assert graph["outputs"][0]["dtype"] == "int64"
    assert graph["max_deviation"] <= graph["tolerance"] == 1e-4
    assert set(m["files"]) == {"speech_tokenizer.onnx", "speech_tokenizer.onnx.data"}
    path = bundle.graph_path("speech_tokenizer")
    onnx_check(path)
    assert tensorrt_readiness(path) == []
    assert m["speech_tokenizer"]["structure"]["block_size"] == 200
    tok = st.OnnxSpeechTokenizer(tok_bundle)
    assert tok.tokenize([golden[f"{n}/wav"] for n in GOLDEN_NAMES]) == [golden[f"{n}/tokens"].tolist()
                                                                        for n in GOLDEN_NAMES]


def test_runtime_path_imports_no_torch(tok_bundle: Path, golden_tokenizer: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from opens2s_edge.runtime.speech_tokenizer import OnnxSpeechTokenizer\n"
        f"tok = OnnxSpeechTokenizer({str(tok_bundle)!r})\n"
        f"z = np.load({str(golden_tokenizer / 'golden.npz')!r})\n"
        "assert tok.encode(z['u2/wav'], 16000) == z['u2/tokens'].tolist()\n"
        "assert 'opens2s_edge.training' not in sys.modules and 'opens2s_edge.export' not in sys.modules\n"
        "print('torch-free ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "torch-free ok" in proc.stdout


def test_tokenizer_bundle_refused_when_tampered_or_not_a_tokenizer(tok_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tok_bundle, copy)
    with open(copy / "speech_tokenizer.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(st.SpeechTokenizerError, match="sha256"):
        st.OnnxSpeechTokenizer(copy)
    manifest = json.loads((tok_bundle / "manifest.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(tok_bundle, other)
    del manifest["kind"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(st.SpeechTokenizerError, match="not a speech tokenizer bundle"):
        st.OnnxSpeechTokenizer(other)


# -- held-out structures against the float64 oracle ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HELD_OUT))
def test_held_out_structures_match_the_reference_procedure(held_out: dict[str, Path], name: str,
                                                           tmp_path: Path) -> None:
    from opens2s_edge.export.speech_tokenizer import export_speech_tokenizer

    folder = held_out[name]
    # 37 s needs two 30 s segments; the short inputs share its batch (padded to 30 s) and fill it unevenly.
    wavs = [_speechlike(37.0, 1), _speechlike(2.3, 2), _speechlike(0.05, 3)]
    want, leads = reference_tokens(folder, wavs)
    tok = GLM4VoiceTokenizer(folder)
    got = tok.tokenize(wavs)
    assert_same_choices(got, want, leads)
    assert len(set(got[0])) > 20, "a degenerate tokenizer (one code everywhere) would test nothing"
    rate = 16000 / tok.structure.stride_samples(160)
    assert len(got[0]) == -(-30 * 16000 // 160 // tok.structure.frames_per_token) + \
        -(-7 * 16000 // 160 // tok.structure.frames_per_token)
    assert tok.rate_hz == pytest.approx(rate)
    # Running a reference batch in chunks changes nothing (the padded length is the batch's).
    assert tok.tokenize(wavs, chunk=1) == got
    bundle = export_speech_tokenizer(folder, tmp_path / "bundle", progress=lambda _: None)
    assert_same_choices(st.OnnxSpeechTokenizer(bundle).tokenize(wavs), want, leads)


def test_random_tokenizer_layout_and_round_trip(held_out: dict[str, Path], tmp_path: Path) -> None:
    folder = held_out["max_pool_k3"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                 "generation_config.json"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["WhisperVQForConditionalGeneration"] and cfg["pooling_type"] == "max"
    stored = load_file(folder / "model.safetensors")
    # The released layout: every encoder layer, the final norm and the decoder are in the file.
    assert "model.encoder.layers.4.fc1.weight" in stored and "model.encoder.layer_norm.weight" in stored
    assert any(k.startswith("model.decoder.layers.0.encoder_attn.") for k in stored)
    model, _ = load_encoder(folder)
    state = model.state_dict()
    assert set(state) == {k[len("model.encoder."):] for k in stored if k.startswith("model.encoder.")
                          and not k.startswith("model.encoder.layer_norm")
                          and not k.startswith(("model.encoder.layers.4.",))}
    for key, value in state.items():
        np.testing.assert_array_equal(value.numpy(), stored["model.encoder." + key])
    again = write_random_tokenizer(tmp_path / "again", **HELD_OUT["max_pool_k3"])
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


# -- bad input ----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_tokenizer(tmp_path: Path) -> Path:
    return write_random_tokenizer(tmp_path / "tok", d_model=32, heads=2, ffn_dim=32, encoder_layers=3,
                                  quantize_position=2, pooling_position=1, vocab_size=64, seed=5)


def test_missing_and_misshaped_keys_are_named(small_tokenizer: Path) -> None:
    path = small_tokenizer / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.encoder.layers.1.fc2.weight"]
    tensors["model.encoder.codebook.weight"] = tensors["model.encoder.codebook.weight"][:10]
    tensors["model.encoder.stray.weight"] = np.zeros(3, np.float32)
    # Unused by the tokenizer: layers at and above quantize_position and the final norm may be absent.
    for key in [k for k in tensors if k.startswith(("model.encoder.layers.2.", "model.encoder.layer_norm"))]:
        del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(st.SpeechTokenizerError) as err:
        load_encoder(small_tokenizer)
    msg = str(err.value)
    assert "missing keys (1): layers.1.fc2.weight" in msg
    assert "unexpected keys (1): stray.weight" in msg
    assert "codebook.weight: file (10, 32), model (64, 32)" in msg
    assert "layers.2" not in msg and "layer_norm." not in msg.replace("self_attn_layer_norm", "")


def test_unused_layers_may_be_absent(small_tokenizer: Path) -> None:
    path = small_tokenizer / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items()
               if not k.startswith(("model.encoder.layers.2.", "model.encoder.layer_norm", "model.decoder."))}
    save_file(tensors, str(path))
    load_encoder(small_tokenizer)


@pytest.mark.parametrize("edit, match", [
    ({"quantize_vocab_size": None, "quantize_position": None}, "no VQ fields"),
    ({"pooling_position": 0}, "pooling_position 0 must be in 1..quantize_position"),
    ({"pooling_position": 3}, "pooling_position 3 must be in 1..quantize_position"),
    ({"pooling_type": "mean"}, "pooling_type 'mean'"),
    ({"quantize_position": 9}, "past the last of 3 encoder layers"),
    ({"quantize_causal_block_size": 3}, "smaller than the pooling kernel"),
    ({"encoder_attention_heads": 3}, "not divisible"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"max_source_positions": 1000}, "more than max_source_positions 1000"),
    ({"d_model": None}, "lacks d_model"),
])
def test_config_errors_are_named(small_tokenizer: Path, edit: dict, match: str) -> None:
    path = small_tokenizer / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in edit.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(st.SpeechTokenizerError, match=match):
        load_encoder(small_tokenizer)


@pytest.mark.parametrize("edit, match", [
    ({"n_fft": 0}, "n_fft 0"), ({"dither": 1.0}, "dither"), ({"feature_size": 80}, "feature_size 80"),
    ({"sampling_rate": 24000}, "sampling_rate 24000"), ({"feature_extractor_type": "X"}, "feature_extractor_type"),
])
def test_feature_extractor_errors_are_named(small_tokenizer: Path, edit: dict, match: str) -> None:
    path = small_tokenizer / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(st.SpeechTokenizerError, match=match):
        load_encoder(small_tokenizer)


def test_missing_folder_and_files(tmp_path: Path, small_tokenizer: Path) -> None:
    from opens2s_edge.training.speech_tokenizer import open_speech_tokenizer

    with pytest.raises(st.SpeechTokenizerError, match="does not exist"):
        open_speech_tokenizer(tmp_path / "nothing")
    with pytest.raises(st.SpeechTokenizerError, match="neither a GLM-4-Voice tokenizer folder"):
        open_speech_tokenizer(tmp_path)
    (small_tokenizer / "model.safetensors").unlink()
    with pytest.raises(st.SpeechTokenizerError, match="no model\\*.safetensors"):
        load_encoder(small_tokenizer)


def test_resampler(caplog: pytest.LogCaptureFixture) -> None:
    """Other rates become 16 kHz with the reference's windowed sinc: a tone keeps its frequency, the length is
    ceil(n * 16000 / rate), and it agrees with the project's own (Kaiser) resampler on band-limited audio."""
    for rate in (44100, 22050, 48000, 8000):
        n = rate * 2
        t = np.arange(n) / rate
        tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        out = st.resample_reference(tone, rate)
        assert out.size == -(-n * 16000 // rate)
        t16 = np.arange(out.size) / 16000
        inner = slice(200, out.size - 200)
        np.testing.assert_allclose(out[inner], 0.5 * np.sin(2 * np.pi * 440 * t16[inner]), atol=2e-3)
        np.testing.assert_allclose(out[inner], project_resample(tone, rate, 16000)[inner], atol=2e-3)
    stereo = np.stack([np.ones(4410, np.float32) * 0.1, -np.ones(4410, np.float32)], axis=1)
    with caplog.at_level(logging.WARNING):
        item = st.audio_input(stereo, 44100, "x.wav")
    assert item.resampled and item.channels == 2 and item.wav.size == 1600
    assert 0.09 < float(np.median(item.wav)) < 0.11  # the first channel, as the reference keeps
    assert "resampled 44100 Hz -> 16000 Hz" in caplog.text and "first is tokenized" in caplog.text


def test_other_rate_is_resampled_and_reported(golden_tokenizer: Path, golden: dict) -> None:
    tok = GLM4VoiceTokenizer(golden_tokenizer)
    wav = golden["u1/wav"]
    up = st.resample_reference(wav, 16000, 48000)
    # Up and back down is nearly the identity for speech (the roll-off only touches the top 1% of the band).
    assert tok.encode(up, 48000) == golden["u1/tokens"].tolist()


# -- the command -----------------------------------------------------------------------------------------------------

def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_tokenize(golden_tokenizer: Path, tok_bundle: Path, golden: dict, tmp_path: Path) -> None:
    folder = tmp_path / "wavs"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "a.wav", golden["u1/wav"], 16000, subtype="FLOAT")
    sf.write(folder / "sub" / "b.wav", golden["u2/wav"], 16000, subtype="FLOAT")
    stereo = np.stack([st.resample_reference(golden["u1/wav"], 16000, 44100)] * 2, axis=1)
    sf.write(tmp_path / "c44k.wav", stereo, 44100, subtype="FLOAT")
    rc, out, err = _cli("tokenize", "--tokenizer", str(golden_tokenizer), "--audio", str(folder),
                        str(tmp_path / "c44k.wav"), "--json", "--strings")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["audio"]).name for r in rows] == ["a.wav", "b.wav", "c44k.wav"]
    assert rows[0]["units"] == golden["u1/tokens"].tolist() and rows[1]["units"] == golden["u2/tokens"].tolist()
    assert rows[0]["speech_units"] == st.units_to_strings(golden["u1/tokens"])
    assert rows[2]["resampled"] and rows[2]["sample_rate"] == 44100 and rows[2]["channels"] == 2
    assert rows[2]["units"] == golden["u1/tokens"].tolist()
    assert "resampled 44100 Hz -> 16000 Hz" in err and "3/3 files" in err
    rc, out, _ = _cli("tokenize", "--tokenizer", str(tok_bundle), "--audio", str(folder / "a.wav"), "--quiet")
    assert rc == 0 and out == f"{folder / 'a.wav'}\t{' '.join(map(str, golden['u1/tokens']))}\n"


def test_cli_bad_input(golden_tokenizer: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
    (tmp_path / "none").mkdir()
    for audio, match in ((tmp_path / "missing.wav", "does not exist"), (tmp_path / "empty.wav", "is empty"),
                         (tmp_path / "bad.wav", "corrupt"), (tmp_path / "none", "holds no audio files")):
        rc, _, err = _cli("tokenize", "--tokenizer", str(golden_tokenizer), "--audio", str(audio))
        assert rc == 2 and match in err, err
    rc, _, err = _cli("tokenize", "--tokenizer", str(tmp_path), "--audio", str(golden_tokenizer / "u1.wav"))
    assert rc == 2 and "neither a GLM-4-Voice tokenizer folder" in err


def test_cli_export_tokenizer(golden_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    rc, stdout, _ = _cli("export-tokenizer", "--tokenizer", str(golden_tokenizer), "--out", str(out))
    assert rc == 0 and "TensorRT-ready" in stdout and (out / "manifest.json").is_file()
    rc, _, err = _cli("export-tokenizer", "--tokenizer", str(golden_tokenizer), "--out", str(out))
    assert rc == 2 and "already exists" in err
    rc, _, err = _cli("export-tokenizer", "--tokenizer", str(tmp_path / "no"), "--out", str(tmp_path / "c"))
    assert rc == 2 and "does not exist" in err and not (tmp_path / "c").exists()


# -- the data pipeline ---------------------------------------------------------------------------------------------

def test_pipeline_units_step(golden_tokenizer: Path, tok_bundle: Path, golden: dict, tmp_path: Path) -> None:
    from opens2s_edge.training.data_pipeline import (
        MEL_QUANTIZER,
        Clients,
        PipelineConfig,
        PipelineError,
        Steps,
        read_jsonl,
        run_pipeline,
        shard_path,
    )

    row = {"id": "x", "instruction_audio": "q.wav", "response": "Hello.",
           "response_audio": str(golden_tokenizer / "u1.wav")}
    want = st.units_to_strings(golden["u1/tokens"])
    for choice in (golden_tokenizer, tok_bundle):
        cfg = PipelineConfig(tmp_path / "seed.jsonl", tmp_path / "work", speech_tokenizer=choice)
        out = Steps(cfg, Clients(llm=None, tts=None)).units(row)
        assert out["messages"][2]["content"][0]["speech_units"] == want
        assert out["meta"]["units_tokenizer"] == f"glm4voice-tokenizer ({choice})"
    default = PipelineConfig(tmp_path / "seed.jsonl", tmp_path / "work")
    assert default.speech_tokenizer == MEL_QUANTIZER
    out = Steps(default, Clients(llm=None, tts=None)).units(row)
    assert out["meta"]["units_tokenizer"].startswith("mel-quantizer (no-weights stand-in")
    with pytest.raises(PipelineError, match="not a folder"):
        PipelineConfig(tmp_path / "seed.jsonl", tmp_path / "work", speech_tokenizer=tmp_path / "nope")
    # Through run_pipeline: the units step of a shard whose response speech is done.
    cfg = PipelineConfig(tmp_path / "seed.jsonl", tmp_path / "run", num_shards=1, speech_tokenizer=tok_bundle)
    shard = shard_path(cfg, "response_speech", 0)
    shard.parent.mkdir(parents=True)
    shard.write_text(json.dumps(row) + "\n")
    reports = run_pipeline(cfg, Clients(llm=None, tts=None), steps=["units"])
    assert [(r.step, r.status, r.items, r.failed) for r in reports] == [("units", "done", 1, 0)]
    (written,) = read_jsonl(shard_path(cfg, "units", 0))
    assert written["messages"][2]["content"][0]["speech_units"] == want


def test_synthetic_set_with_the_tokenizer(tok_bundle: Path, tmp_path: Path) -> None:
    import shutil

    if shutil.which("espeak-ng") is None and not os.environ.get("CI"):
        pytest.skip("espeak-ng is not installed")
    from opens2s_edge.training.synthetic import make_synthetic_dataset

    path = make_synthetic_dataset(tmp_path / "syn", n=1, speech_tokenizer=tok_bundle)
    row = json.loads(path.read_text().splitlines()[0])
    assert row["units_tokenizer"] == f"glm4voice-tokenizer ({tok_bundle})"
    wav, sr = sf.read(tmp_path / "syn" / "wavs" / "reply_0000.wav", dtype="float32")
    units = st.OnnxSpeechTokenizer(tok_bundle).encode(wav, sr)
    assert row["messages"][1]["content"][0]["speech_units"] == st.units_to_strings(units)


def test_runtime_module_has_no_torch_import() -> None:
    source = (REPO / "runtime" / "speech_tokenizer.py").read_text()
    assert "import torch" not in source and "opens2s_edge.training" not in source


def test_bad_samples_are_named(golden_tokenizer: Path) -> None:
    tok = GLM4VoiceTokenizer(golden_tokenizer)
    with pytest.raises(AudioInputError, match="NaN or Inf"):
        tok.encode(np.array([0.0, np.nan], np.float32), 16000)
    with pytest.raises(AudioInputError, match="input 1 has no samples"):
        tok.tokenize([np.zeros(100, np.float32), np.zeros(0, np.float32)])
    with pytest.raises(AudioInputError, match="sample rate 0"):
        tok.encode(np.zeros(10, np.float32), 0)


def test_ema_buffers_expected_when_the_config_names_a_decay(small_tokenizer: Path) -> None:
    path = small_tokenizer / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantize_ema_decay": 0.99}))
    with pytest.raises(st.SpeechTokenizerError, match="missing keys \\(2\\): ema_count, ema_weight"):
        load_encoder(small_tokenizer)
    tensors = load_file(small_tokenizer / "model.safetensors")
    tensors["model.encoder.ema_count"] = np.ones(64, np.float32)
    tensors["model.encoder.ema_weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, str(small_tokenizer / "model.safetensors"))
    load_encoder(small_tokenizer)


def test_released_sizes_on_meta() -> None:
    """The released tokenizer's structure (Whisper-large-v3 encoder, 16 of 32 layers used, 16384 codes)."""
    from opens2s_edge.training.speech_tokenizer import expected_shapes, whisper_vq_config

    cfg = whisper_vq_config(d_model=1280, encoder_layers=32, heads=20, ffn_dim=5120, pooling_position=16,
                            quantize_position=16)
    s = st.TokenizerStructure.from_config(cfg)
    shapes = expected_shapes(s)
    assert shapes["codebook.weight"] == (16384, 1280) and shapes["embed_positions2.weight"] == (375, 1280)
    assert "layers.15.fc2.weight" in shapes and "layers.16.fc1.weight" not in shapes
    assert s.frames_per_token == 8 and s.stride_samples(160) == 1280
    assert 330e6 < sum(int(np.prod(v)) for v in shapes.values()) < 345e6
