"""Deterministic random-init OpenS2S checkpoints in the released folder format: the embedded default.

`tiny` has the golden checkpoint's shapes (seconds on a CPU); `small` (~240 M parameters) is sized
for meaningful latency work on a CPU. The tokenizer is a byte-level BPE trained here on a built-in
text with Qwen3's special tokens and the OpenS2S tokens, so nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from opens2s_edge.runtime.files import holds, replace_refusal
from opens2s_edge.runtime.prompt import (
    AUDIO_END_TOKEN,
    AUDIO_START_TOKEN,
    GLM4VOICE_UNITS,
    SPEECH_TOKEN_FORMAT,
    TTS_END_TOKEN,
    TTS_START_TOKEN,
)

from .checkpoint import SINGLE_FILE, CheckpointError, save_checkpoint
from .opens2s import OpenS2S, OpenS2SConfig
from .qwen3 import init_weights

# Qwen3's added tokens in Qwen's order (special, or plain added tokens), then the four train.py adds.
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
OPENS2S_TOKENS = [AUDIO_START_TOKEN, AUDIO_END_TOKEN, TTS_START_TOKEN, TTS_END_TOKEN]
# Qwen2's pre-tokenizer split (what Qwen3's tokenizer.json carries).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (resources.files("opens2s_edge") / "assets" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
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
              rope_theta=1_000_000.0, use_cache=True, use_sliding_window=False, tie_word_embeddings=False,
              architectures=["Qwen3ForCausalLM"], sliding_window=None, torch_dtype="bfloat16")

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


def build_base_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE laid out as Qwen3's: NFC, the Qwen2 split, then its added tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    for token, special in QWEN3_ADDED_TOKENS:
        tok.add_tokens([AddedToken(token, special=special, normalized=False)])
    return tok


def _added_decoder(tok: Tokenizer) -> dict[str, dict]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _tokenizer_files(tok: Tokenizer, prefix: str, additional: list[str], chat_template: str) -> dict[str, bytes]:
    """tokenizer.json, the slow files (vocab.json, merges.txt, added_tokens.json) and the two configs, as
    transformers' save_pretrained writes them for a Qwen2Tokenizer."""
    out: dict[str, bytes] = {f"{prefix}tokenizer.json": tok.to_str().encode()}
    model = json.loads(tok.to_str())["model"]
    out[f"{prefix}vocab.json"] = json.dumps(model["vocab"], ensure_ascii=False).encode()
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    out[f"{prefix}merges.txt"] = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()
    added = tok.get_added_tokens_decoder()
    out[f"{prefix}added_tokens.json"] = json.dumps(
        {t.content: i for i, t in sorted(added.items(), key=lambda kv: kv[1].content)}, indent=2).encode()
    config = {"add_prefix_space": False, "added_tokens_decoder": _added_decoder(tok),
              "additional_special_tokens": additional, "bos_token": None, "chat_template": chat_template,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "extra_special_tokens": {}, "model_max_length": 131072, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    out[f"{prefix}tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    out[f"{prefix}special_tokens_map.json"] = json.dumps({
        "additional_special_tokens": [{"content": t, **entry} for t in additional],
        "eos_token": {"content": "<|im_end|>", **entry}, "pad_token": {"content": "<|endoftext|>", **entry}},
        indent=2).encode()
    return out


def tokenizer_assets(max_new_tokens: int, tts_max_new_tokens: int) -> tuple[dict[str, bytes], int, int]:
    """Files for the LLM and TTS tokenizers in the released conventions; returns (files, text vocab, tts vocab).

    The LLM tokenizer is the base plus the four OpenS2S tokens (train.py adds them as special tokens); the TTS
    tokenizer is the base plus `<|audio_0|>`..`<|audio_16383|>` as plain added tokens, and its eos is the base
    vocabulary's `<|im_end|>`: no `<|im_audio|>` token and no `<|audio_eos|>`, as in the released files.
    """
    base = build_base_tokenizer()
    text_tok = Tokenizer.from_str(base.to_str())
    text_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in OPENS2S_TOKENS])
    tts_tok = Tokenizer.from_str(base.to_str())
    tts_tok.add_tokens([SPEECH_TOKEN_FORMAT.format(i) for i in range(GLM4VOICE_UNITS)])
    files = _tokenizer_files(text_tok, "", OPENS2S_TOKENS, CHAT_TEMPLATE)
    qwen_special = [t for t, special in QWEN3_ADDED_TOKENS[1:14] if special]
    files.update(_tokenizer_files(tts_tok, "tts/", qwen_special, CHAT_TEMPLATE))
    im_end, endoftext = text_tok.token_to_id("<|im_end|>"), text_tok.token_to_id("<|endoftext|>")
    # As Qwen3 ships its generation config; the worker overrides the sampling fields per request.
    files["generation_config.json"] = json.dumps(
        {"bos_token_id": endoftext, "do_sample": True, "eos_token_id": [im_end, endoftext],
         "max_new_tokens": max_new_tokens, "pad_token_id": endoftext, "temperature": 0.6, "top_k": 20,
         "top_p": 0.95}, indent=2).encode()
    files["tts/generation_config.json"] = json.dumps(
        {"bos_token_id": endoftext, "do_sample": True, "eos_token_id": tts_tok.token_to_id("<|im_end|>"),
         "max_new_tokens": tts_max_new_tokens, "pad_token_id": endoftext}, indent=2).encode()
    files["audio/preprocessor_config.json"] = json.dumps({
        "chunk_length": 30, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 128, "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
        "sampling_rate": 16000}, indent=2).encode()
    return files, text_tok.get_vocab_size(with_added_tokens=True), tts_tok.get_vocab_size(with_added_tokens=True)


def preset_config(preset: str, text_vocab: int, tts_vocab: int, eos_ids: list[int], tts_eos: int) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    audio = {**_AUDIO, **p["audio"], "num_hidden_layers": p["audio"]["encoder_layers"]}
    llm = {**_QWEN3, **p["llm"], "vocab_size": text_vocab, "bos_token_id": eos_ids[1], "eos_token_id": eos_ids[0]}
    tts = {**_QWEN3, **p["tts"], "vocab_size": tts_vocab, "bos_token_id": eos_ids[1], "eos_token_id": tts_eos}
    return {
        "adapter_inner_dim": p["adapter_inner_dim"], "architectures": ["OmniSpeechModel"],
        "audio_encoder_config": audio, "conv_kernel_sizes": "5,5", "interleave_strategy": "4:8",
        "llm_config": llm, "lora_config": None, "model_type": "omnispeech", "torch_dtype": "bfloat16",
        "tts_lm_config": tts,
    }


# init's mark in each folder it writes: what `init --force` may replace. The released checkpoint has the same layout,
# so the layout alone would not tell the user's downloaded weights from a random init.
INIT_MARKER = ".opens2s-edge-init.json"
WRITTEN_BY = "opens2s-edge init"


def init_marker(kind: str, preset: str, seed: int, files: list[str]) -> bytes:
    """The mark's bytes: what wrote the folder, and every file it wrote (anything else found there is not init's)."""
    return (json.dumps({"written_by": WRITTEN_BY, "kind": kind, "preset": preset, "seed": seed,
                        "files": sorted(files)}, indent=2) + "\n").encode()


def not_init_output(kind: str) -> Callable[[Path], str | None]:
    """For runtime.files.replace_refusal: None for a `kind` ("checkpoint", "decoder") folder init wrote and nobody
    added to, else why it is not one."""

    def check(folder: Path) -> str | None:
        try:
            record = json.loads((folder / INIT_MARKER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return (f"it has no {INIT_MARKER}, the mark init leaves: a {kind} in the released layout may be the "
                    "released weights (an older init's output: delete it yourself)")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("written_by") != WRITTEN_BY or record.get("kind") != kind \
                or not isinstance(record.get("files"), list):
            return f"its {INIT_MARKER} is not the mark init leaves in a {kind}"
        written = {INIT_MARKER, *map(str, record["files"])}
        parents = {str(parent) for rel in written for parent in Path(rel).parents}
        foreign = sorted(rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*"))
                         if rel not in written and rel not in parents)
        return f"init did not write {holds(folder, foreign)}" if foreign else None

    return check


def check_replaceable(out_dir: Path, kind: str) -> None:
    """Before any work: `out_dir` may be replaced by init's `kind` folder (absent, empty, or init's own), else
    CheckpointError saying what is there."""
    refusal = replace_refusal(out_dir, not_init_output(kind), f"{kind} written by opens2s-edge init")
    if refusal is not None:
        raise CheckpointError(refusal)


def write_preset(preset: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """The preset's checkpoint in `out_dir`, replacing (`overwrite`) only an empty folder or one init wrote, and
    marked as init's (INIT_MARKER) so that a later `init --force` knows it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    if overwrite:
        check_replaceable(out_dir, "checkpoint")
    elif out_dir.exists() or out_dir.is_symlink():
        raise CheckpointError(f"{out_dir} already exists (pass overwrite/--force to replace it)")
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
    # The presets' weights fit one file (save_checkpoint shards from 5 GiB).
    files[INIT_MARKER] = init_marker("checkpoint", preset, seed, [*files, "config.json", SINGLE_FILE])
    # Stored in bf16, as the released checkpoint is (a bf16 training run saves it that way).
    return save_checkpoint(model, out_dir, assets=files, overwrite=overwrite, dtype=torch.bfloat16)
