"""The PyTorch CUDA backend (training/cuda_backend.py): the fixed-shape decode step that CUDA graphs capture.

On any machine: that step run eagerly (step mode `static`, the very code a graph records) reproduces the
reference's golden ids and the eager Generator's ids; it traces as one graph with no break (no host sync, no
shape that depends on the position); errors name what is missing. With a CUDA device: graph replay, eager
CUDA and CPU agree on the golden ids, bf16 answers a turn with finite logits, and `generate --device cuda` works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel cases run the kernels on the CPU in Triton's interpreter (read when kernels/ first loads them).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opens2s_edge.cli import main as cli_main  # noqa: E402
from opens2s_edge.runtime.audio import load_wav  # noqa: E402
from opens2s_edge.runtime.prompt import SpeechVocab  # noqa: E402
from opens2s_edge.training.checkpoint import load_checkpoint  # noqa: E402
from opens2s_edge.training.cuda_backend import (  # noqa: E402
    DeviceError,
    StaticDecodeStep,
    attention_windows,
    resolve_device,
    resolve_dtype,
    resolve_step_mode,
    use_kernels,
)
from opens2s_edge.training.generate import GenerationOptions, Generator, StepTiming  # noqa: E402
from opens2s_edge.training.qwen3 import ContextFull  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"
# Small attention windows so that one tiny turn crosses several of them (the default starts at 256).
WINDOWS = (16, 32, 64, 128, 512)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
# The golden budgets: 24 text and 96 speech tokens.
GREEDY_REF = dict(greedy=True, reference_sampling=True, max_text_tokens=24, max_speech_tokens=96)


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread: None) -> None:
    return None


def _golden_ids(golden_opens2s: Path, name: str, vocab: SpeechVocab) -> tuple[list[int], list[int]]:
    golden = np.load(golden_opens2s / "golden.npz")
    raw = golden[f"{name}/speech_ids_raw"].reshape(-1).tolist()
    return golden[f"{name}/text_ids"].reshape(-1).tolist(), [i for i in raw if not vocab.is_eos(i)]


def _count_static_calls(gen: Generator) -> dict[str, int]:
    """Wrap both decode steps' forward (what a graph captures) to count how often they run."""
    counts = {"llm": 0, "tts": 0}
    for name, step in (("llm", gen.llm_step), ("tts", gen.tts_step)):
        inner = step.forward

        def counted(kind: str, window: int, _inner=inner, _name=name) -> torch.Tensor:
            counts[_name] += 1
            return _inner(kind, window)

        step.forward = counted
    return counts


# -- the fixed-shape step on the CPU ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_golden(golden_opens2s: Path) -> Generator:
    return Generator(golden_opens2s, step_mode="static", max_context=512, attention_windows=WINDOWS)


@pytest.mark.parametrize("name", ["u1", "u2"])
def test_static_step_gives_the_golden_ids(static_golden: Generator, golden_opens2s: Path, name: str) -> None:
    gen = static_golden
    counts = _count_static_calls(gen)
    result = gen(load_wav(golden_opens2s / f"{name}.wav"), GenerationOptions(**GREEDY_REF))
    text_ids, speech_ids = _golden_ids(golden_opens2s, name, gen.vocab)
    assert result.text_ids == text_ids
    assert result.speech_ids == speech_ids
    # Every text step and every speech step went through the fixed-shape step, across several windows.
    kinds = [t.kind for t in result.timings]
    assert counts["llm"] == kinds.count("llm_step") == len(text_ids) - 1
    # The speaker input is a single position too, so it takes the same step ("embeds"); no feed here is one row.
    assert counts["tts"] == kinds.count("tts_step") + kinds.count("tts_start") > 40
    assert len(result.prompt_ids) + len(text_ids) > WINDOWS[1]
    assert 1 + len(text_ids) + kinds.count("tts_step") > WINDOWS[2]


@pytest.fixture(scope="module")
def eager_tiny(tiny_default: Path) -> Generator:
    return Generator(tiny_default / "checkpoint")


@pytest.mark.parametrize("options", [dict(greedy=True), dict(seed=3, max_text_tokens=20, max_speech_tokens=60)])
def test_static_step_matches_the_eager_generator(eager_tiny: Generator, tiny_default: Path, options: dict) -> None:
    wav = load_wav(HELLO)
    static = Generator(tiny_default / "checkpoint", step_mode="static", max_context=512, attention_windows=WINDOWS)
    ours, reference = static(wav, GenerationOptions(**options)), eager_tiny(wav, GenerationOptions(**options))
    assert ours.to_json() == reference.to_json()
    assert len(ours.speech_ids) > 10
    assert eager_tiny.step_mode == "eager" and eager_tiny.llm_step is None


def test_one_state_feeds_use_the_embeds_step(tiny_default: Path, tmp_path: Path) -> None:
    """Under an M=1 strategy the TTS LM takes one projected LLM state at a time: the step's embeds input."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_default / "checkpoint", folder)
    config = json.loads((folder / "config.json").read_text())
    config["interleave_strategy"] = "1:3"
    (folder / "config.json").write_text(json.dumps(config))
    wav, options = load_wav(HELLO), GenerationOptions(greedy=True, max_text_tokens=12)
    reference = Generator(folder, max_context=256)(wav, options)
    static = Generator(folder, step_mode="static", max_context=256, attention_windows=(16, 32, 256))
    seen: list[str] = []
    inner = static.tts_step.forward
    static.tts_step.forward = lambda kind, window: seen.append(kind) or inner(kind, window)
    ours = static(wav, options)
    assert ours.to_json() == reference.to_json()
    # One per text token's state, and the speaker input (a single position too).
    assert seen.count("embeds") == len(ours.text_ids) + 1 and seen.count("token") > 0


def test_step_traces_as_one_graph_without_breaks(golden_opens2s: Path) -> None:
    """Dynamo with fullgraph=True fails on any graph break (a host sync such as .item()/.tolist(), a
    data-dependent shape such as nonzero) and recompiles on any position baked in as a constant."""
    from torch._dynamo.testing import CompileCounter

    lm = load_checkpoint(golden_opens2s).llm_model
    lm.setup_cache(64)
    step = StaticDecodeStep(lm, "static", windows=(16, 64))
    counter = CompileCounter()
    traced = torch.compile(step.forward, backend=counter, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            for kind, window, positions in (("token", 16, (0, 5, 11)), ("embeds", 64, (20, 40, 63))):
                for pos in positions:
                    step.ids.fill_(pos + 7)
                    step.inputs.normal_()
                    step.pos.fill_(pos)
                    assert torch.equal(traced(kind, window), step.forward(kind, window))
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 2  # one graph per (input kind, window), whatever the position


@torch.inference_mode()
def test_static_step_equals_the_prefix_forward(golden_opens2s: Path) -> None:
    """One step at a tensor position over a window equals the eager forward at an integer position."""
    lm = load_checkpoint(golden_opens2s).tts_lm_model
    lm.setup_cache(96)
    step = StaticDecodeStep(lm, "static", windows=(32, 96))
    prompt = lm.embed(torch.arange(40, 77)[None])
    lm(prompt, 0)
    logits, hidden = lm(lm.embed(torch.tensor([[123]])), 37)
    lm(prompt, 0)  # the same cache state again
    row = step.token(123, 37)
    assert step.window_for(37) == 96 and step.window_for(31) == 32
    v = lm.config.vocab_size
    assert torch.allclose(row[:v], logits[0, -1], atol=1e-5) and torch.allclose(row[v:], hidden[0, -1], atol=1e-5)
    with pytest.raises(ContextFull, match="exceeds the cache of 96"):
        step.token(1, 96)


def test_windows_and_switches() -> None:
    assert attention_windows(4096) == (256, 512, 1024, 2048, 4096)
    assert attention_windows(3000) == (256, 512, 1024, 2048, 3000)
    assert attention_windows(100) == (100,)
    cpu = torch.device("cpu")
    assert resolve_step_mode(cpu) == "eager"
    assert resolve_step_mode(torch.device("cuda")) == "graph"
    assert resolve_step_mode(torch.device("cuda"), cuda_graphs=False) == "eager"
    assert resolve_step_mode(cpu, compile=True) == "compile"
    with pytest.raises(DeviceError, match="CUDA graphs need a CUDA device"):
        resolve_step_mode(cpu, cuda_graphs=True)
    with pytest.raises(DeviceError, match="cannot run with graphs off"):
        resolve_step_mode(torch.device("cuda"), cuda_graphs=False, compile=True)
    assert resolve_dtype(None, cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(DeviceError, match="dtype 'int8' is not supported"):
        resolve_dtype("int8", cpu)
    with pytest.raises(DeviceError, match="not supported: use cpu or cuda"):
        resolve_device("mps")


def test_timings_cover_the_turn(eager_tiny: Generator) -> None:
    seen: list[StepTiming] = []
    result = eager_tiny(load_wav(HELLO), GenerationOptions(greedy=True, max_text_tokens=10, max_speech_tokens=30),
                        on_step=seen.append)
    assert seen == result.timings
    kinds = [t.kind for t in result.timings]
    assert kinds[:3] == ["audio", "llm_prefill", "tts_start"]
    assert kinds.count("llm_step") == len(result.text_ids) - 1
    # Every text token's hidden state is fed to the TTS LM once.
    assert sum(t.positions for t in result.timings if t.kind == "tts_feed") == len(result.text_ids)
    assert all(t.seconds >= 0 for t in result.timings)
    starts = [t.start_s for t in result.timings]
    assert starts == sorted(starts) and result.total_s >= starts[-1]
    summary = result.timing_summary()
    assert summary["llm_step"]["count"] == len(result.text_ids) - 1 and summary["llm_step"]["tokens_per_s"] > 0
    assert "first_audio_s" not in summary  # no decoder


def test_reply_audio_from_the_generator(golden_opens2s: Path, golden_decoder: Path) -> None:
    from opens2s_edge.training.token2wav.decoder import load_decoder

    gen = Generator(golden_opens2s, decoder=golden_decoder)
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(greedy=True, max_speech_tokens=24, seed=2))
    stream = load_decoder(golden_decoder).stream(gen.stream_config, seed=2)
    reference = np.concatenate([stream.push([u]) for u in result.speech_units] + [stream.finalize()])
    assert result.sample_rate == 22050
    np.testing.assert_array_equal(result.audio, reference)
    assert result.timing_summary()["token2wav"]["positions"] == len(result.speech_units) == 24


# -- the Triton kernels (kernels/) on the CPU: Triton's interpreter where CUDA is absent -----------------------------
def _triton_or_skip() -> None:
    pytest.importorskip("triton", reason="Triton is not installed: the kernels= triton cases need it")


def _golden_for(gen: Generator, golden_opens2s: Path, name: str) -> tuple[list[int], list[int]]:
    golden = np.load(golden_opens2s / "golden.npz")
    raw = golden[f"{name}/speech_ids_raw"].reshape(-1).tolist()
    return golden[f"{name}/text_ids"].reshape(-1).tolist(), [i for i in raw if not gen.vocab.is_eos(i)]


def test_triton_kernels_give_the_golden_ids(golden_opens2s: Path) -> None:
    """The fixed-shape step (the code a CUDA graph captures) on the Triton primitive set: one window over the whole
    cache (the attention kernel reads only the filled rows itself), the golden ids."""
    _triton_or_skip()
    gen = Generator(golden_opens2s, step_mode="static", max_context=512, attention_windows=WINDOWS)
    use_kernels(gen, "triton")
    assert gen.llm_step.windows == gen.tts_step.windows == (512,)
    assert gen.model.llm_model.ops.name == gen.model.tts_lm_model.ops.name == "triton"
    counts = _count_static_calls(gen)
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(**GREEDY_REF))
    text_ids, speech_ids = _golden_for(gen, golden_opens2s, "u1")
    assert (result.text_ids, result.speech_ids) == (text_ids, speech_ids)
    assert counts["llm"] == len(text_ids) - 1 and counts["tts"] > 40


def test_generate_with_triton_kernels_and_int8_weights(golden_opens2s: Path, capsys) -> None:
    """The flags reach the model: the golden ids' start with the kernels, a shorter turn with int8 weights."""
    _triton_or_skip()
    base = ["generate", "--checkpoint", str(golden_opens2s), "--audio", str(golden_opens2s / "u1.wav"), "--greedy",
            "--reference-sampling", "--json", "--kernels", "triton", "--max-context", "256", "--timings",
            "--max-text-tokens", "6", "--max-speech-tokens", "12"]
    assert cli_main(base) == 0
    captured = capsys.readouterr()
    reply = json.loads(captured.out)
    text_ids, speech_ids = _golden_for(Generator(golden_opens2s, max_context=64), golden_opens2s, "u1")
    assert reply["text_ids"] == text_ids[: len(reply["text_ids"])] and len(reply["text_ids"]) == 6
    summary = json.loads(captured.err[captured.err.index("{"):])
    assert (summary["kernels"], summary["weights"]) == ("triton", None)
    assert cli_main([*base, "--weights", "int8"]) == 0
    captured = capsys.readouterr()
    assert 0 < len(json.loads(captured.out)["speech_ids"]) <= 12
    assert json.loads(captured.err[captured.err.index("{"):])["weights"] == "int8"
    with pytest.raises(DeviceError, match="kernels 'cuda' is not one of torch, triton"):
        use_kernels(Generator(golden_opens2s, max_context=64), "cuda")


# -- the command ----------------------------------------------------------------------------------------------
@no_cuda
def test_generate_on_cuda_without_cuda_is_a_clear_error(golden_opens2s: Path, capsys) -> None:
    rc = cli_main(["generate", "--checkpoint", str(golden_opens2s), "--audio", str(golden_opens2s / "u1.wav"),
                   "--device", "cuda"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: CUDA was requested but is not available" in err and "--device cpu" in err
    assert "Traceback" not in err


def test_generate_refuses_graphs_on_cpu_and_out_without_decoder(golden_opens2s: Path, capsys) -> None:
    base = ["generate", "--checkpoint", str(golden_opens2s), "--audio", str(golden_opens2s / "u1.wav")]
    assert cli_main([*base, "--cuda-graphs"]) == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert cli_main([*base, "--out", "reply.wav"]) == 2
    assert "--out needs --decoder" in capsys.readouterr().err


def test_generate_speaks_and_times(golden_opens2s: Path, golden_decoder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reply.wav"
    rc = cli_main(["generate", "--checkpoint", str(golden_opens2s), "--audio", str(golden_opens2s / "u1.wav"),
                   "--greedy", "--max-speech-tokens", "24", "--decoder", str(golden_decoder), "--out", str(out),
                   "--timings", "--json", "--max-context", "256"])
    assert rc == 0
    captured = capsys.readouterr()
    reply = json.loads(captured.out)
    assert len(reply["speech_ids"]) == 24
    summary = json.loads(captured.err[captured.err.index("{"):])
    assert summary["device"] == "cpu" and summary["step_mode"] == "eager" and summary["dtype"] == "float32"
    assert summary["first_audio_s"] > 0
    with wave.open(str(out)) as w:
        assert w.getframerate() == 22050 and w.getnframes() > 0


# -- on a CUDA device -----------------------------------------------------------------------------------------
@pytest.fixture
def fp32_cuda():
    """fp32 means fp32: no TF32 in cuDNN convolutions (the audio encoder), so ids can match the CPU's."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@needs_cuda
@pytest.mark.parametrize("name", ["u1", "u2"])
def test_cuda_graphs_eager_cuda_and_cpu_agree_on_golden(golden_opens2s: Path, fp32_cuda: None, name: str) -> None:
    wav = load_wav(golden_opens2s / f"{name}.wav")
    options = GenerationOptions(**GREEDY_REF)
    graphs = Generator(golden_opens2s, "fp32", 512, device="cuda", attention_windows=WINDOWS)
    assert graphs.step_mode == "graph"
    eager = Generator(golden_opens2s, "fp32", 512, device="cuda", cuda_graphs=False)
    cpu = Generator(golden_opens2s, max_context=512)
    text_ids, speech_ids = _golden_ids(golden_opens2s, name, cpu.vocab)
    first = graphs(wav, options)
    again = graphs(wav, options)  # the second turn replays the graphs captured in the first
    for result in (first, again, eager(wav, options), cpu(wav, options)):
        assert result.text_ids == text_ids
        assert result.speech_ids == speech_ids
    assert graphs.llm_step.graphs >= 2 and graphs.tts_step.graphs >= 3


@needs_cuda
def test_cuda_step_has_no_host_sync(golden_opens2s: Path) -> None:
    lm = load_checkpoint(golden_opens2s, device="cuda").llm_model
    lm.setup_cache(64)
    step = StaticDecodeStep(lm, "static", windows=(16, 64))
    with torch.inference_mode():
        step.ids.fill_(3)
        step.pos.fill_(9)
        for window in step.windows:  # lazy initialisation (cuBLAS handles, ...) happens outside the check
            step.forward("token", window)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for window in step.windows:
                step.forward("token", window)
                step.forward("embeds", window)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@needs_cuda
def test_warmup_captures_every_window(golden_opens2s: Path, fp32_cuda: None) -> None:
    gen = Generator(golden_opens2s, "fp32", 512, device="cuda", attention_windows=WINDOWS)
    # The LLM's token step, the TTS LM's token and single-state steps, each for every window.
    assert gen.warmup() == 3 * len(WINDOWS)
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(**GREEDY_REF))
    assert (result.text_ids, result.speech_ids) == _golden_ids(golden_opens2s, "u1", gen.vocab)
    assert (gen.llm_step.graphs, gen.tts_step.graphs) == (len(WINDOWS), 2 * len(WINDOWS))  # none mid-turn


@needs_cuda
def test_bf16_turn_on_cuda(golden_opens2s: Path, golden_decoder: Path, monkeypatch) -> None:
    import opens2s_edge.training.generate as generate_module

    gen = Generator(golden_opens2s, "bf16", 512, device="cuda", decoder=golden_decoder)
    assert gen.model.llm_model.lm_head.weight.dtype == torch.bfloat16 and gen.step_mode == "graph"
    assert next(gen.decoder.flow.parameters()).device.type == "cuda"
    rows: list[np.ndarray] = []  # every row a graph replay handed to the host
    real = generate_module.host_row
    monkeypatch.setattr(generate_module, "host_row", lambda row: rows.append(real(row)) or rows[-1])
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(greedy=True))
    assert len(result.text_ids) > 1 and len(result.speech_ids) > 0
    single = [t for t in result.timings
              if t.kind in ("llm_step", "tts_step") or (t.kind == "tts_feed" and t.positions == 1)]
    assert len(rows) == len(single) >= len(result.text_ids)
    assert all(np.isfinite(r).all() for r in rows)
    assert np.isfinite(result.llm_first_logits).all() and np.isfinite(result.tts_first_logits).all()
    assert result.audio is not None and result.audio.size > 0 and np.isfinite(result.audio).all()


@needs_cuda
def test_compiled_step_on_cuda(golden_opens2s: Path, fp32_cuda: None) -> None:
    gen = Generator(golden_opens2s, "fp32", 256, device="cuda", compile=True)
    assert gen.step_mode == "compile"
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(**GREEDY_REF))
    assert (result.text_ids, result.speech_ids) == _golden_ids(golden_opens2s, "u1", gen.vocab)


@needs_cuda
@pytest.mark.parametrize("name", ["u1", "u2"])
def test_triton_kernels_under_cuda_graphs_give_the_golden_ids(golden_opens2s: Path, fp32_cuda: None,
                                                              name: str) -> None:
    """fp32 on the GPU with the Triton kernels, every single-position step a replayed CUDA graph: one graph per
    input kind (the whole cache, whatever the position), the golden ids, twice (the second turn replays)."""
    _triton_or_skip()
    gen = Generator(golden_opens2s, "fp32", 512, device="cuda", attention_windows=WINDOWS)
    use_kernels(gen, "triton")
    assert gen.warmup() == 3
    wav = load_wav(golden_opens2s / f"{name}.wav")
    text_ids, speech_ids = _golden_for(gen, golden_opens2s, name)
    for _ in range(2):
        result = gen(wav, GenerationOptions(**GREEDY_REF))
        assert (result.text_ids, result.speech_ids) == (text_ids, speech_ids)
    assert (gen.llm_step.graphs, gen.tts_step.graphs) == (1, 2)


@needs_cuda
def test_triton_kernels_on_cuda_answer_as_the_cpu_on_the_tiny_preset(tiny_default: Path, fp32_cuda: None) -> None:
    """Without golden data too: fp32 CUDA graphs on the Triton kernels give the CPU eager generator's ids on the
    tiny preset (the CPU path is the one checked against the reference's golden ids)."""
    _triton_or_skip()
    options = GenerationOptions(greedy=True, max_text_tokens=16, max_speech_tokens=64)
    wav = load_wav(HELLO)
    cpu = Generator(tiny_default / "checkpoint", max_context=512)(wav, options)
    gen = Generator(tiny_default / "checkpoint", "fp32", 512, device="cuda")
    use_kernels(gen, "triton")
    assert gen(wav, options).to_json() == cpu.to_json()
    assert len(cpu.speech_ids) > 10


@needs_cuda
@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_triton_kernels_bf16_turn_on_cuda(golden_opens2s: Path, weights: str | None) -> None:
    _triton_or_skip()
    gen = Generator(golden_opens2s, "bf16", 512, device="cuda")
    use_kernels(gen, "triton", weights)
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(greedy=True))
    assert len(result.text_ids) > 1 and len(result.speech_ids) > 0
    assert np.isfinite(result.llm_first_logits).all() and np.isfinite(result.tts_first_logits).all()


@needs_cuda
def test_triton_kernels_through_torch_compile(golden_opens2s: Path, fp32_cuda: None) -> None:
    _triton_or_skip()
    gen = Generator(golden_opens2s, "fp32", 256, device="cuda", compile=True)
    use_kernels(gen, "triton")
    result = gen(load_wav(golden_opens2s / "u1.wav"), GenerationOptions(**GREEDY_REF))
    assert (result.text_ids, result.speech_ids) == _golden_for(gen, golden_opens2s, "u1")


@needs_cuda
def test_generate_command_on_cuda(golden_opens2s: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opens2s_edge", "generate", "--checkpoint", str(golden_opens2s),
         "--audio", str(golden_opens2s / "u1.wav"), "--greedy", "--reference-sampling", "--json",
         "--device", "cuda", "--dtype", "fp32", "--timings"],
        capture_output=True, text=True, check=True, timeout=300)
    reply = json.loads(out.stdout)
    golden = np.load(golden_opens2s / "golden.npz")
    assert reply["text_ids"] == golden["u1/text_ids"].reshape(-1).tolist()
    assert reply["speech_ids"] == golden["u1/speech_ids_raw"].reshape(-1).tolist()
    summary = json.loads(out.stderr[out.stderr.index("{"):])
    assert summary["device"] == "cuda:0" and summary["step_mode"] == "graph"
