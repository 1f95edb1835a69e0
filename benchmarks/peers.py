"""Whole-turn peers, same weights, same input, same decoding (greedy; speech argmax over the whole TTS
vocabulary as the reference does, so every peer can reach the same ids):

- `reference`: the reference's algorithm, written here on transformers' Qwen3ForCausalLM built from our checkpoint:
  Hugging Face `generate` called once per interleave chunk with `past_key_values` and the whole input-embedding
  history, as `OmniSpeechModel.generate(units_gen=True)` does; token2wav as the reference worker does it, 24-token
  chunks with the whole token history re-encoded as the flow prompt and all earlier mel as its condition.
  The reference runs generation on a second thread; here the token2wav chunk runs inline where the unit streamer
  receives the 24th unit (on a CPU the two threads would share the same cores).
- `torch`: our PyTorch pipeline (training.generate.Generator, static KV caches) + our streaming token2wav.
- `ort`: our torch-free runtime (runtime.engine.Engine) on the bundle, on onnxruntime.
- `trt`: the same runtime on the bundle's TensorRT engines (`opens2s-edge build`); skipped with the reason where
  TensorRT, cuda-python, a GPU or a matching engine set is missing.

Each `*_turns(config)` is a module-level function run in its own process by the harness; it loads the peer,
runs `warmup` untimed turns and `runs` timed ones, and returns a JSON-able dict.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import RssSampler
from .instrument import Call, Recorder, wrap
from .llm_peers import PeerSkipped


def _on_gpu(config: dict) -> bool:
    """PyTorch peers run on CUDA when the bench asks for a GPU provider and this torch sees a GPU."""
    import torch

    return bool({"cuda", "tensorrt"} & set(config["providers"])) and torch.cuda.is_available()


def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _turn_record(t0: float, first_text: float | None, first_audio: float | None, end: float, audio_samples: int,
                 sample_rate: int, text_ids: list[int], speech_ids: list[int], recorder: Recorder) -> dict[str, Any]:
    audio_s = audio_samples / sample_rate
    total = end - t0
    return {
        "first_text_s": None if first_text is None else first_text - t0,
        "first_audio_s": None if first_audio is None else first_audio - t0,
        "total_s": total, "audio_s": audio_s, "rtf": total / audio_s if audio_s else None,
        "text_tokens": len(text_ids), "speech_tokens": len(speech_ids),
        "text_ids": text_ids, "speech_ids": speech_ids,
        "components": recorder.turn.components(),
    }


def _run_turns(setup_s: float, turn: Any, config: dict, extra: dict | None = None) -> dict[str, Any]:
    wav = _load_wav(config["audio"])
    for _ in range(config["warmup"]):
        turn(wav)
    turns = []
    with RssSampler() as rss:
        for _ in range(config["runs"]):
            turns.append(turn(wav))
    return {"setup_s": setup_s, "turns": turns, "memory": {"turns_peak_rss_bytes": rss.peak}, **(extra or {})}


def _load_wav(path: str) -> np.ndarray:
    from opens2s_edge.runtime.audio import load_wav

    return load_wav(path)


# -- our engine: the torch-free runtime (onnxruntime, TensorRT) and the PyTorch backend ---------------------------
def engine_turns(engine: Any, setup_s: float, config: dict, extra: dict) -> dict[str, Any]:
    """Turns timed through the engine's own events: StepTiming for every decoder call and the audio encoder; the
    token2wav backend's three networks are timed per chunk by wrapping them (they run inside the stream)."""
    from opens2s_edge.runtime.engine import AudioChunk, StepTiming, TextDelta, TurnDone, TurnOptions
    from opens2s_edge.runtime.engine import SpeechToken as SpeechEvent

    rec = Recorder()
    rec.instrument_token2wav(engine.token2wav)

    def on_step(timing: StepTiming) -> None:
        if timing.kind == "audio":
            rec.turn.audio_encoder_s += timing.seconds
        elif timing.kind.startswith("llm_"):
            rec.turn.llm.append(Call(timing.positions, timing.seconds, timing.kind == "llm_step"))
        elif timing.kind.startswith("tts_"):
            rec.turn.tts.append(Call(timing.positions, timing.seconds, timing.kind == "tts_step"))

    options = TurnOptions(greedy=True, reference_sampling=True, max_text_tokens=config["max_text_tokens"],
                          max_speech_tokens=config["max_speech_tokens"], seed=0)

    def turn(wav: np.ndarray) -> dict[str, Any]:
        rec.new_turn()
        first_text = first_audio = None
        t0 = time.perf_counter()
        done = None
        for event in engine.turn(wav, options, on_step=on_step):
            if isinstance(event, TextDelta) and first_text is None:
                first_text = time.perf_counter()
            elif isinstance(event, SpeechEvent) and not engine.vocab.is_eos(event.token):
                rec.turn.units_pushed += 1
            elif isinstance(event, AudioChunk) and first_audio is None:
                first_audio = time.perf_counter()
            elif isinstance(event, TurnDone):
                done = event
        end = time.perf_counter()
        assert done is not None  # the engine always ends a turn with TurnDone
        record = _turn_record(t0, first_text, first_audio, end, done.audio.shape[0], done.sample_rate,
                              done.text_ids, done.speech_ids, rec)
        record["engine_latency"] = done.latency.to_json()
        record["stopped"] = done.stopped
        return record

    return _run_turns(setup_s, turn, config, {**extra, "engine": engine.backend.describe()})


def runtime_turns(config: dict, backend: str) -> dict[str, Any]:
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.engine import Engine
    from opens2s_edge.runtime.onnx_backend import BackendError

    t_setup = time.perf_counter()
    bundle = load_bundle(config["bundle"], verify=False)
    try:
        if backend == "onnxruntime":
            engine = Engine.from_bundle(bundle, tuple(config["providers"]), config["threads"])
        else:
            engine = Engine.from_bundle(bundle, backend=backend)
    except BackendError as exc:
        if backend == "onnxruntime":
            raise
        # No TensorRT, no GPU or no engine set for this GPU: a reason to report, not a failure.
        raise PeerSkipped(str(exc)) from exc
    setup_s = time.perf_counter() - t_setup
    return engine_turns(engine, setup_s, config, {"backend": backend, "dtype": bundle.spec.dtype,
                                                  "form": bundle.spec.form})


def ort_turns(config: dict) -> dict[str, Any]:
    return runtime_turns(config, "onnxruntime")


def trt_turns(config: dict) -> dict[str, Any]:
    return runtime_turns(config, "tensorrt")


def torch_turns(config: dict) -> dict[str, Any]:
    """Our PyTorch path: the same engine on the PyTorch backend. On a GPU machine asked to bench a GPU provider,
    as a user there would run it: CUDA, bf16, decode steps replayed as CUDA graphs captured before the first turn."""
    import torch

    from opens2s_edge.training.generate import Generator

    _threads(config["threads"])
    on_gpu = _on_gpu(config)
    t_setup = time.perf_counter()
    device = {"device": "cuda", "cuda_graphs": True} if on_gpu else {}
    gen = Generator(config["checkpoint"], max_context=config["max_context"], decoder=config["decoder"], **device)
    if on_gpu:
        gen.warmup()
    setup_s = time.perf_counter() - t_setup
    return engine_turns(gen.engine, setup_s, config, {"torch_threads": torch.get_num_threads(),
                                                      "device": str(gen.device), "dtype": str(gen.dtype),
                                                      "step_mode": gen.step_mode})


# -- the reference's algorithm on transformers ----------------------------------------------------------------
def hf_causal_lm(lm_config: dict, state: dict, attn_implementation: str = "sdpa") -> Any:
    """transformers' Qwen3ForCausalLM holding the tensors of one of our decoders (shared, not copied)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    cfg = Qwen3Config(**{k: v for k, v in lm_config.items() if k != "model_type"})
    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    keys = set(model.state_dict())
    missing = model.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=False, assign=True)
    if missing.missing_keys:
        raise ValueError(f"checkpoint lacks {missing.missing_keys} for Qwen3ForCausalLM")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) are not in any state dict: build them for real.
    model.model.rotary_emb = Qwen3RotaryEmbedding(config=cfg)
    return model.eval()


class _UnitSink:
    """The reference worker's unit streamer and token2wav loop (training/token2wav/reference_stream.py): every id
    the TTS LM emits becomes `id - units_bias` (non-speech ids, the eos among them, unit 0), and every 24 units
    the flow re-encodes the whole history."""

    def __init__(self, decoder: Any, vocab: Any, rec: Recorder):
        from opens2s_edge.training.token2wav.reference_stream import ReferenceStream

        self.vocab, self.rec = vocab, rec
        self.stream = ReferenceStream(decoder)
        wrap(self.stream, "_vocode", rec.vocode)
        self.pieces: list[np.ndarray] = []
        self.first_audio: float | None = None

    def put(self, value: Any) -> None:
        ids = np.asarray(value.cpu() if hasattr(value, "cpu") else value).reshape(-1).tolist()
        self.rec.turn.units_pushed += len(ids)
        self._keep(self.stream.push(self.vocab.to_units(ids)))

    def end(self) -> None:
        self._keep([self.stream.finish()])

    def _keep(self, chunks: list[np.ndarray]) -> None:
        for wav in chunks:
            if wav.size:
                self.pieces.append(wav)
                if self.first_audio is None:
                    self.first_audio = time.perf_counter()


class ReferencePipeline:
    """OmniSpeechModel.generate(units_gen=True) on transformers' generate, per interleave chunk."""

    def __init__(self, checkpoint: str, decoder_dir: str, device: str = "cpu"):
        import torch

        from opens2s_edge.runtime.prompt import PromptBuilder, SpeechVocab
        from opens2s_edge.training.checkpoint import load_checkpoint, read_frontend, read_generation_defaults
        from opens2s_edge.training.token2wav.decoder import load_decoder

        folder = Path(checkpoint)
        # Our modules supply what the reference computes outside its two LMs (audio encoder + adapter, llm2tts,
        # llm_ln, the speaker head): same weights, same functions.
        # On a GPU in bf16, as the reference serves; fp32 on a CPU.
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_checkpoint(folder, dtype=self.dtype, device=self.device)
        raw = self.model.config.raw
        self.llm = hf_causal_lm(raw["llm_config"], self.model.llm_model.state_dict()).to(self.device)
        self.tts = hf_causal_lm(raw["tts_lm_config"], self.model.tts_lm_model.state_dict()).to(self.device)
        self.prompt = PromptBuilder.from_folder(folder)
        self.vocab = SpeechVocab.from_folder(folder / "tts")
        self.defaults = read_generation_defaults(folder)
        self.frontend = read_frontend(folder, self.model.config)
        from opens2s_edge.runtime.interleave import parse_strategy

        m, n = parse_strategy(self.model.config.interleave_strategy)
        self.text_span, self.speech_span = m, n
        self.decoder = load_decoder(decoder_dir, device=self.device)

    def turn(self, wav: np.ndarray, max_text: int, max_speech: int, rec: Recorder) -> dict[str, Any]:
        import torch
        from transformers import GenerationConfig

        from opens2s_edge.runtime.audio import audio_features
        from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID
        from opens2s_edge.training.opens2s import SPEAKER_DIM

        model = self.model
        eos = list(self.defaults.text_eos_ids)
        sink = _UnitSink(self.decoder, self.vocab, rec)
        first_text = None
        t0 = time.perf_counter()
        with torch.inference_mode():
            features, length = audio_features(wav, self.frontend)
            audio_embeds = model.encode_audio(torch.from_numpy(features).to(self.device, self.dtype),
                                              torch.tensor([length], device=self.device))
            inputs_embeds = model.splice_prompt(self.prompt.prompt_ids(), audio_embeds, AUDIO_PLACEHOLDER_ID)
            spk = model.tts_lm_model.speaker_input(torch.zeros(1, 1, SPEAKER_DIM, device=self.device,
                                                               dtype=self.dtype))
            gen_cfg = GenerationConfig(max_new_tokens=max_text, eos_token_id=eos, do_sample=False,
                                       pad_token_id=eos[0])
            tts_cfg = GenerationConfig(max_new_tokens=max_speech, eos_token_id=list(self.defaults.speech_eos_ids),
                                       do_sample=False, pad_token_id=self.defaults.speech_eos_ids[0])
            max_new, tts_max_new = max_text, max_speech
            sequences, units = [], []
            tts_inputs = [spk]
            llm_past = tts_past = None
            finished, first_step = False, True
            while not finished:
                gen_cfg.update(max_new_tokens=min(self.text_span, max_new))
                out = self.llm.generate(inputs_embeds=inputs_embeds, generation_config=gen_cfg,
                                        return_dict_in_generate=True, output_hidden_states=True,
                                        past_key_values=llm_past)
                llm_past = out.past_key_values
                generated = out.sequences.shape[1]
                max_new -= generated
                if out.sequences[0, -1].item() in eos or max_new < 1:
                    finished = True
                if first_text is None and generated:
                    first_text = time.perf_counter()  # the reference streams text when a chunk's generate returns
                sequences.append(out.sequences)
                inputs_embeds = torch.cat([inputs_embeds, self.llm.get_input_embeddings()(out.sequences)], dim=1)
                hs = out.hidden_states
                if first_step:
                    hidden = torch.cat([hs[0][-1][:, -1:, :]] + [hs[i][-1] for i in range(len(hs) - generated + 1,
                                                                                         len(hs))], dim=1)
                    first_step = False
                else:
                    hidden = torch.cat([hs[i][-1] for i in range(len(hs) - generated, len(hs))], dim=1)
                tts_inputs.append(model.tts_input(hidden))
                budget = tts_max_new if finished else min(self.speech_span, tts_max_new)
                if budget < 1:
                    break
                tts_cfg.update(max_new_tokens=budget)
                tts_out = self.tts.generate(inputs_embeds=torch.cat(tts_inputs, dim=1), generation_config=tts_cfg,
                                            past_key_values=tts_past, return_dict_in_generate=True,
                                            streamer=sink if finished else None)
                if not finished:
                    sink.put(tts_out.sequences[0])
                tts_past = tts_out.past_key_values
                tts_max_new -= tts_out.sequences.shape[1]
                units.append(tts_out.sequences)
                tts_inputs.append(self.tts.get_input_embeddings()(tts_out.sequences))
            sink.end()
        end = time.perf_counter()
        text_ids = torch.cat(sequences, dim=1)[0].tolist() if sequences else []
        speech_ids = [i for i in (torch.cat(units, dim=1)[0].tolist() if units else []) if not self.vocab.is_eos(i)]
        samples = sum(p.shape[0] for p in sink.pieces)
        return _turn_record(t0, first_text, sink.first_audio, end, samples, self.decoder.sample_rate, text_ids,
                            speech_ids, rec)


def _hf_positions(args: tuple, kwargs: dict) -> int:
    x = kwargs.get("inputs_embeds")
    if x is None:
        x = kwargs.get("input_ids", args[0] if args else None)
    return int(x.shape[1])


def reference_turns(config: dict) -> dict[str, Any]:
    import torch
    import transformers

    _threads(config["threads"])
    transformers.logging.set_verbosity_error()
    t_setup = time.perf_counter()
    pipe = ReferencePipeline(config["checkpoint"], config["decoder"], "cuda" if _on_gpu(config) else "cpu")
    setup_s = time.perf_counter() - t_setup
    rec = Recorder()
    wrap(pipe.model, "encode_audio", rec.audio)
    wrap(pipe.llm, "forward", rec.decoder("llm", _hf_positions))
    wrap(pipe.tts, "forward", rec.decoder("tts", _hf_positions))
    wrap(pipe.decoder.backend, "encode", rec.encode)
    wrap(pipe.decoder.backend, "estimate", rec.estimate)

    def turn(wav: np.ndarray) -> dict[str, Any]:
        rec.new_turn()
        return pipe.turn(wav, config["max_text_tokens"], config["max_speech_tokens"], rec)

    return _run_turns(setup_s, turn, config, {"torch_threads": torch.get_num_threads(),
                                              "transformers": transformers.__version__})


TURN_PEERS = {"reference": reference_turns, "torch": torch_turns, "ort": ort_turns, "trt": trt_turns}
