"""A checkpoint unlike the shared golden one in every way the golden README says real files may differ: other
sizes, fp32 storage, sharded with an index, a TTS vocabulary padded past its tokenizer, an int LLM eos and a
list TTS eos (another token), and an utterance longer than one 30 s window. Nothing here may rely on the
shared set's values; the oracles are transformers' Qwen3 on the same weights and the PyTorch pipeline against
the exported bundle on the torch-free runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opens2s_edge.runtime.bundle import load_bundle
from opens2s_edge.runtime.engine import Engine, TurnDone, TurnOptions
from opens2s_edge.training.checkpoint import load_checkpoint, read_generation_defaults, save_checkpoint
from opens2s_edge.training.generate import GenerationOptions, Generator
from opens2s_edge.training.opens2s import OpenS2S, OpenS2SConfig
from opens2s_edge.training.presets import preset_config, tokenizer_assets
from opens2s_edge.training.qwen3 import init_weights

PAD = 37  # rows past the TTS tokenizer, as a padded embedding table has


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> Path:
    files, text_vocab, tts_vocab = tokenizer_assets(16, 64)
    tts_tok = json.loads(files["tts/tokenizer.json"])
    endoftext = next(t["id"] for t in tts_tok["added_tokens"] if t["content"] == "<|endoftext|>")
    im_end = next(t["id"] for t in tts_tok["added_tokens"] if t["content"] == "<|im_end|>")
    llm_gen = json.loads(files["generation_config.json"])
    files["generation_config.json"] = json.dumps({**llm_gen, "eos_token_id": im_end}).encode()  # an int
    tts_gen = json.loads(files["tts/generation_config.json"])
    files["tts/generation_config.json"] = json.dumps({**tts_gen, "eos_token_id": [endoftext, im_end]}).encode()
    raw = preset_config("tiny", text_vocab, tts_vocab + PAD, [im_end, endoftext], endoftext)
    raw["audio_encoder_config"].update(d_model=48, encoder_attention_heads=3, encoder_ffn_dim=96, encoder_layers=3,
                                       num_hidden_layers=3)
    raw["llm_config"].update(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                             head_dim=16, intermediate_size=160)
    raw["tts_lm_config"].update(hidden_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                head_dim=20, intermediate_size=112)
    raw.update(adapter_inner_dim=40, interleave_strategy="3:5", torch_dtype="float32")
    torch.manual_seed(5)
    model = OpenS2S(OpenS2SConfig.from_dict(raw))
    init_weights(model, std=0.2, generator=torch.Generator().manual_seed(5))
    model.audio_encoder_model.reset_positions()
    with torch.no_grad():  # speech-token rows loud enough that speech, not padding, wins
        model.tts_lm_model.lm_head.weight[tts_vocab:] = 0.0
    out = tmp_path_factory.mktemp("variant") / "checkpoint"
    return save_checkpoint(model, out, assets=files, max_shard_bytes=1 << 20, dtype=torch.float32)


@pytest.fixture(scope="module")
def long_wav() -> np.ndarray:
    """31.5 s: the audio encoder needs a second window."""
    rng = np.random.default_rng(3)
    t = np.arange(int(16000 * 31.5)) / 16000
    return (0.2 * np.sin(2 * np.pi * (150 + 40 * np.sin(t)) * t) + 0.02 * rng.standard_normal(t.size)).astype(
        np.float32)


def test_variant_is_in_the_released_layout(variant: Path) -> None:
    index = json.loads((variant / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (variant / "model.safetensors").exists()
    assert {t.dtype for s in shards for t in load_file(variant / s).values()} == {torch.float32}
    defaults = read_generation_defaults(variant)
    assert len(defaults.text_eos_ids) == 1 and len(defaults.speech_eos_ids) == 2


def test_llm_matches_transformers_qwen3(variant: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = load_checkpoint(variant)
    for prefix, lm in (("llm_config", model.llm_model), ("tts_lm_config", model.tts_lm_model)):
        hf = Qwen3ForCausalLM(Qwen3Config(**model.config.raw[prefix])).eval()
        hf.load_state_dict(lm.state_dict(), strict=False)
        ids = torch.randint(0, lm.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = hf(ids).logits[0, -1]
            got, _ = lm(lm.embed(ids))
        torch.testing.assert_close(got[0, -1], want, rtol=1e-4, atol=1e-4)


def test_pytorch_and_runtime_agree_on_the_variant(variant: Path, long_wav: np.ndarray, tmp_path: Path) -> None:
    from opens2s_edge.export.pipeline import export_bundle
    from opens2s_edge.training.token2wav.init import write_random_decoder

    decoder = tmp_path / "decoder"
    write_random_decoder(decoder, "tiny", seed=1)
    bundle = export_bundle(variant, decoder, tmp_path / "bundle", max_context=256, max_audio_seconds=60,
                           progress=lambda _: None)
    engine = Engine.from_bundle(load_bundle(bundle))
    generator = Generator(variant)
    for options in (dict(greedy=True), dict(seed=4), dict(greedy=True, reference_sampling=True)):
        done = list(engine.turn(long_wav, TurnOptions(**options)))[-1]
        assert isinstance(done, TurnDone)
        ours = generator(long_wav, GenerationOptions(**options))
        assert (done.text_ids, done.speech_ids, done.speech_units) == (
            ours.text_ids, ours.speech_ids, ours.speech_units), options
        assert ours.adapter_out.shape[1] > 190  # both windows: 31.5 s at 6.25 Hz
        vocab = generator.vocab
        assert not any(vocab.is_eos(i) for i in ours.speech_ids)
        if not options.get("reference_sampling"):
            assert all(vocab.offset <= i < vocab.offset + vocab.count for i in ours.speech_ids)
        assert all(0 <= u < vocab.count for u in ours.speech_units)
    assert engine.bundle.manifest["tts"]["vocab_size"] == generator.model.config.tts.vocab_size
