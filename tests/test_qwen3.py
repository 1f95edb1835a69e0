"""Our Qwen3 decoder against transformers' Qwen3ForCausalLM (the oracle), including GQA."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

from opens2s_edge.training.qwen3 import ContextFull, Qwen3Config, Qwen3LM

CONFIGS = [
    dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),  # MHA
    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),  # GQA 2:1
    dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),  # GQA 4:1, tied
]


def _pair(overrides: dict, seed: int) -> tuple[Qwen3ForCausalLM, Qwen3LM]:
    torch.manual_seed(seed)
    hf_config = HFQwen3Config(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              rope_theta=10000.0, attn_implementation="eager", **overrides)
    hf = Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = Qwen3LM(Qwen3Config.from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    if hf_config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, ours


@pytest.mark.parametrize("overrides", CONFIGS)
@torch.no_grad()
def test_logits_match_transformers(overrides: dict) -> None:
    hf, ours = _pair(overrides, seed=1)
    ids = torch.randint(0, 257, (2, 23))
    ref = hf(ids, output_hidden_states=True)
    logits, hidden = ours(ours.embed(ids))
    assert (logits - ref.logits).abs().max() < 1e-5
    # transformers' last hidden state is after the final norm: the state OpenS2S feeds the TTS LM.
    assert (hidden - ref.hidden_states[-1]).abs().max() < 1e-5


@pytest.mark.parametrize("overrides", CONFIGS)
@torch.no_grad()
def test_greedy_continuation_through_static_cache(overrides: dict) -> None:
    hf, ours = _pair(overrides, seed=2)
    prompt = torch.randint(0, 257, (1, 9))
    ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    ref_new = ref[0, 9:].tolist()
    ours.setup_cache(64)
    logits, _ = ours(ours.embed(prompt), 0)
    pos, out = 9, []
    for _ in range(32):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits, _ = ours(ours.embed(torch.tensor([[token]])), pos)
        pos += 1
    assert out == ref_new


@torch.no_grad()
def test_chunked_prefill_equals_full_prefill() -> None:
    _, ours = _pair(CONFIGS[1], seed=3)
    ids = torch.randint(0, 257, (1, 30))
    full, _ = ours(ours.embed(ids))
    ours.setup_cache(40)
    parts = [ours(ours.embed(ids[:, a:b]), a)[0] for a, b in ((0, 7), (7, 8), (8, 30))]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_cache_full_is_a_clear_stop() -> None:
    _, ours = _pair(CONFIGS[0], seed=4)
    ours.setup_cache(8)
    ours(ours.embed(torch.zeros(1, 8, dtype=torch.long)), 0)
    with pytest.raises(ContextFull, match="exceeds the cache of 8"):
        ours(ours.embed(torch.zeros(1, 1, dtype=torch.long)), 8)
