"""Deterministic random-init OpenS2S checkpoints in the released folder format: the embedded default.

`tiny` has the golden checkpoint's shapes (seconds on a CPU); `small` (~240 M parameters) is sized
for meaningful latency work on a CPU. The tokenizer is a byte-level BPE trained here on a built-in
text with Qwen3's special tokens and the OpenS2S tokens, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from opens2s_edge.runtime.prompt import NUM_SPEECH_TOKENS, SPEECH_EOS_TOKEN, SPEECH_TOKEN_FORMAT

from .checkpoint import save_checkpoint
from .opens2s import OpenS2S, OpenS2SConfig
from .qwen3 import init_weights

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<|im_audio_start|>", "<|im_audio_end|>", "<|im_tts_start|>", "<|im_tts_end|>", "<|im_audio|>",
]
# Qwen3's template restricted to plain system/user/assistant turns, thinking switchable off.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
CORPUS = """\
You are a helpful assistant. I am so sorry to hear that you had a hard day; it is completely understandable
to feel tired and overwhelmed. Congratulations on your new job! That is wonderful news, and you must be
very proud of yourself. Would you like to talk about what happened? I am here to listen. The weather today
is lovely and warm, a perfect afternoon for a walk in the park with a friend. Thank you for sharing that
with me. It sounds like you are worried about the exam tomorrow, but you have prepared well and I believe
in you. Let us take a deep breath together. What would make you feel a little better right now? Music,
a cup of tea, or a short rest can help. I understand how frustrating it is when plans change at the last
minute. You did your best, and that matters. How was your weekend? Did you do anything fun or relaxing?
Eight, nine, ten: numbers, dates and times such as 3:45 pm on Monday, the 21st of June, 2026.
"""

_AUDIO = dict(activation_dropout=0.0, activation_function="gelu", attention_dropout=0.0, dropout=0.0,
              encoder_layerdrop=0.0, init_std=0.02, max_source_positions=1500, model_type="qwen2_audio_encoder",
              num_mel_bins=128, scale_embedding=False)
_QWEN3 = dict(attention_bias=False, attention_dropout=0.0, hidden_act="silu", initializer_range=0.02,
              max_position_embeddings=4096, model_type="qwen3", rms_norm_eps=1e-6, rope_scaling=None,
              rope_theta=1_000_000.0, use_cache=True, use_sliding_window=False, tie_word_embeddings=False)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        audio=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128),
        llm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128),
        tts=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128),
        adapter_inner_dim=32, max_new_tokens=48, tts_max_new_tokens=192),
    "small": dict(
        audio=dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536),
        llm=dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=64, intermediate_size=3072),
        tts=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=64, intermediate_size=1536),
        adapter_inner_dim=256, max_new_tokens=64, tts_max_new_tokens=256),
}


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def _tokenizer_config(tok: Tokenizer, eos: str, extra_added: int = 0) -> dict:
    added = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                           single_word=False, special=True)
             for t in SPECIAL_TOKENS}
    if extra_added:
        for i in range(NUM_SPEECH_TOKENS):
            t = SPEECH_TOKEN_FORMAT.format(i)
            added[str(tok.token_to_id(t))] = dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                  single_word=False, special=True)
        added[str(tok.token_to_id(SPEECH_EOS_TOKEN))] = dict(
            content=SPEECH_EOS_TOKEN, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    return {"added_tokens_decoder": added, "additional_special_tokens": SPECIAL_TOKENS[1:],
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": eos,
            "model_max_length": 131072, "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2TokenizerFast"}


def tokenizer_assets(max_new_tokens: int, tts_max_new_tokens: int) -> tuple[dict[str, bytes], int, int]:
    """Files for the LLM and TTS tokenizers; returns (files, text vocab size, tts vocab size)."""
    text_tok = build_tokenizer()
    text_vocab = text_tok.get_vocab_size(with_added_tokens=True)
    files = {
        "tokenizer.json": text_tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(_tokenizer_config(text_tok, "<|im_end|>"), indent=2).encode(),
    }
    tts_tok = Tokenizer.from_str(text_tok.to_str())
    tts_tok.add_special_tokens([SPEECH_TOKEN_FORMAT.format(i) for i in range(NUM_SPEECH_TOKENS)] + [SPEECH_EOS_TOKEN])
    tts_vocab = tts_tok.get_vocab_size(with_added_tokens=True)
    files["tts/tokenizer.json"] = tts_tok.to_str().encode()
    files["tts/tokenizer_config.json"] = json.dumps(_tokenizer_config(tts_tok, SPEECH_EOS_TOKEN, 1)).encode()
    special_map = {"additional_special_tokens": SPECIAL_TOKENS[1:], "pad_token": "<|endoftext|>"}
    files["special_tokens_map.json"] = json.dumps({**special_map, "eos_token": "<|im_end|>"}, indent=2).encode()
    files["tts/special_tokens_map.json"] = json.dumps({**special_map, "eos_token": SPEECH_EOS_TOKEN}, indent=2).encode()
    im_end, endoftext = text_tok.token_to_id("<|im_end|>"), text_tok.token_to_id("<|endoftext|>")
    files["generation_config.json"] = json.dumps(
        {"eos_token_id": [im_end, endoftext], "max_new_tokens": max_new_tokens}, indent=2).encode()
    files["tts/generation_config.json"] = json.dumps(
        {"eos_token_id": tts_tok.token_to_id(SPEECH_EOS_TOKEN), "max_new_tokens": tts_max_new_tokens},
        indent=2).encode()
    files["audio/preprocessor_config.json"] = json.dumps({
        "chunk_length": 30, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 128, "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
        "sampling_rate": 16000}, indent=2).encode()
    return files, text_vocab, tts_vocab


def preset_config(preset: str, text_vocab: int, tts_vocab: int, eos_ids: list[int], tts_eos: int) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    audio = {**_AUDIO, **p["audio"], "num_hidden_layers": p["audio"]["encoder_layers"]}
    llm = {**_QWEN3, **p["llm"], "vocab_size": text_vocab, "bos_token_id": eos_ids[1], "eos_token_id": eos_ids[0]}
    tts = {**_QWEN3, **p["tts"], "vocab_size": tts_vocab, "eos_token_id": tts_eos}
    return {
        "adapter_inner_dim": p["adapter_inner_dim"], "architectures": ["OmniSpeechModel"],
        "audio_encoder_config": audio, "conv_kernel_sizes": "5,5", "interleave_strategy": "4:8",
        "llm_config": llm, "lora_config": None, "model_type": "omnispeech", "torch_dtype": "float32",
        "tts_lm_config": tts,
    }


def write_preset(preset: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    files, text_vocab, tts_vocab = tokenizer_assets(p["max_new_tokens"], p["tts_max_new_tokens"])
    gen = json.loads(files["generation_config.json"])
    tts_gen = json.loads(files["tts/generation_config.json"])
    config = OpenS2SConfig.from_dict(preset_config(preset, text_vocab, tts_vocab, gen["eos_token_id"],
                                                   tts_gen["eos_token_id"]))
    torch.manual_seed(seed)
    model = OpenS2S(config)
    generator = torch.Generator().manual_seed(seed)
    init_weights(model, std=0.02 if preset != "tiny" else 0.2, generator=generator)
    model.audio_encoder_model.reset_positions()  # a fixed sinusoid table in the released model, not learned
    return save_checkpoint(model, out_dir, assets=files, overwrite=overwrite)
