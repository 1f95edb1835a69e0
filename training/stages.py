"""The three OpenS2S training stages: which parameters train, how each stage builds its sequences, its loss.

- stage 1: trains audio_adapter; loss = text CE of the LLM given the speech.
- stage 2a: trains tts_lm_model (speaker head included); loss = speech CE, TTS-text prefix -> units.
- stage 2b: trains llm2tts, llm_ln, tts_lm_model; loss = speech CE on the M:N interleaved layout.
- stage 3: trains audio_adapter, llm_model (full or LoRA), llm2tts, llm_ln, tts_lm_model;
  loss = text_weight * text CE + speech_weight * speech CE.

The audio encoder never trains. `FrozenGuard` turns a gradient on a frozen parameter into an error, so a
plan that silently trains (or pays optimizer memory for) the wrong module fails on its first step.

The interleaved layout is the inference schedule of runtime/interleave.py written as one sequence:
`[speaker, h1..hM, s1..sN, h(M+1)..h(2M), s(N+1)..s(2N), ..., remaining s.., EOS]`, where h_i is
`llm_ln(llm2tts(final-norm hidden state that predicted response token i))`; the response tokens are
`text <|im_tts_end|> <|im_end|>`, each of which hands its hidden state over at inference too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opens2s_edge.runtime.interleave import parse_strategy

from .data import IGNORE_INDEX, Batch
from .opens2s import OpenS2S

STAGES = ("1", "2a", "2b", "3")
TRAINABLE: dict[str, tuple[str, ...]] = {
    "1": ("audio_adapter",),
    "2a": ("tts_lm_model",),
    "2b": ("llm2tts", "llm_ln", "tts_lm_model"),
    "3": ("audio_adapter", "llm_model", "llm2tts", "llm_ln", "tts_lm_model"),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class StageError(ValueError):
    """A stage was asked for something it does not do (unknown stage, LoRA outside stage 3, ...)."""


class FrozenParameterError(RuntimeError):
    """A parameter the stage froze received a gradient."""


# -- LoRA ------------------------------------------------------------------------------------------------

@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update: y = x W^T + b + s * dropout(x) A^T B^T. It keeps the base
    `weight`/`bias` names, so `merge` gives back a plain nn.Linear and the checkpoint format is unchanged."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, device=dev, dtype=dt))
        # B starts at zero so the wrapped layer starts exactly as the base layer.
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A),
                                                             self.lora_B) * self.scaling

    def merge(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scaling)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def apply_lora(module: nn.Module, cfg: LoRAConfig) -> int:
    """Wrap every Linear whose attribute name is in cfg.targets; returns how many were wrapped."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in cfg.targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, cfg))
                count += 1
    if not count:
        raise StageError(f"LoRA targets {cfg.targets} match no Linear layer")
    return count


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRALinear back into a plain Linear (in place); returns how many were merged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
                count += 1
    return count


def merge_lora_state_dict(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """The same merge on a (gathered) state dict: `x.lora_A`/`x.lora_B` fold into `x.weight`."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            base = key[: -len(".lora_A")]
            a, b = state[key], state[base + ".lora_B"]
            w = out[base + ".weight"]
            out[base + ".weight"] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
    return out


# -- which parameters train --------------------------------------------------------------------------------

def configure_stage(model: OpenS2S, stage: str, lora: LoRAConfig | None = None) -> list[str]:
    """Freeze everything, then unfreeze the stage's modules (LoRA adapters instead of the LLM when given).
    Returns the names of the trainable parameters."""
    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if lora is not None and stage != "3":
        raise StageError(f"LoRA applies to the LLM in stage 3 only, not stage {stage}")
    model.requires_grad_(False)
    for name in TRAINABLE[stage]:
        if name == "llm_model" and lora is not None:
            apply_lora(model.llm_model, lora)
            for n, p in model.llm_model.named_parameters():
                p.requires_grad_(n.endswith((".lora_A", ".lora_B")))
        else:
            getattr(model, name).requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


class FrozenGuard:
    """Remembers which parameters a stage froze; `check` after backward raises if any got a gradient."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}

    def check(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if n in self.frozen and p.grad is not None]
        if bad:
            shown = ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
            raise FrozenParameterError(f"{len(bad)} frozen parameter(s) received a gradient: {shown}")


# -- sequences -------------------------------------------------------------------------------------------

def interleave_layout(n_text: int, n_speech: int, text_span: int, speech_span: int) -> list[int]:
    """Order of the TTS LM inputs for one response, as indices into the pool
    [speaker (0), h_1..h_T (1..T), s_1..s_S (T+1..T+S)]: M hidden states, then N speech tokens, repeated;
    once either runs out, the other follows whole."""
    order, i, j = [0], 0, 0
    while i < n_text or j < n_speech:
        take = min(text_span, n_text - i)
        order.extend(range(1 + i, 1 + i + take))
        i += take
        take = min(speech_span, n_speech - j)
        order.extend(range(1 + n_text + j, 1 + n_text + j + take))
        j += take
    return order


def _pad_stack(rows: list[Tensor], value: float = 0.0) -> Tensor:
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def llm_inputs(model: OpenS2S, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Embeddings with each audio spliced in at its placeholder. Returns (embeds (B,L,D), labels (B,L),
    response_start (B,)) in spliced positions; padding is on the right, which a causal model never reads."""
    lm = model.llm_model
    ids = batch.input_ids
    token_embeds = lm.embed(ids.clamp(min=0))
    per_sample_audio: list[list[Tensor]] = [[] for _ in range(ids.shape[0])]
    if batch.audio_features is not None:
        dtype = next(model.audio_adapter.parameters()).dtype
        encoded, enc_len = model.audio_encoder_model(batch.audio_features.to(dtype), batch.audio_lengths)
        embeds, emb_len = model.audio_adapter(encoded, enc_len)
        for a, owner in enumerate(batch.audio_owner.tolist()):
            per_sample_audio[owner].append(embeds[a, : int(emb_len[a])])
    rows, labels, starts = [], [], []
    for b in range(ids.shape[0]):
        n = int(batch.lengths[b])
        where = (ids[b, :n] < 0).nonzero().flatten().tolist()
        if len(where) != len(per_sample_audio[b]):
            raise ValueError(f"{batch.where[b]}: {len(where)} audio placeholders but "
                             f"{len(per_sample_audio[b])} audio inputs")
        pieces, lab, cut, shift = [], [], 0, 0
        for pos, audio in zip(where, per_sample_audio[b], strict=True):
            pieces += [token_embeds[b, cut:pos], audio.to(token_embeds.dtype)]
            lab += [batch.labels[b, cut:pos], batch.labels.new_full((audio.shape[0],), IGNORE_INDEX)]
            shift += audio.shape[0] - 1
            cut = pos + 1
        pieces.append(token_embeds[b, cut:n])
        lab.append(batch.labels[b, cut:n])
        rows.append(torch.cat(pieces))
        labels.append(torch.cat(lab))
        starts.append(int(batch.response_start[b]) + shift)
    return _pad_stack(rows), _pad_stack(labels, IGNORE_INDEX), torch.tensor(starts)


def text_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Next-token CE where labels are the input ids (IGNORE_INDEX off the response): the logits at
    position p are scored against the label at p + 1."""
    target = labels[:, 1:]
    count = int((target != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / max(count, 1), count


def _speech_sequences(tts_lm: nn.Module, prefix: list[Tensor], speaker: Tensor, batch: Batch,
                      layout: Iterable[list[int]] | None) -> tuple[Tensor, Tensor]:
    """Per sample: pool = [speaker input, prefix rows, speech embeddings]; order it (the interleaved layout,
    or prefix-then-speech), and set a target wherever the next input is a speech token."""
    speech_ids = batch.speech_ids
    speech_embeds = tts_lm.embed(speech_ids) if speech_ids is not None else None
    layouts = list(layout) if layout is not None else None
    seqs, targets = [], []
    for b, pre in enumerate(prefix):
        n_speech = int(batch.speech_len[b]) if batch.speech_len is not None else 0
        parts = [speaker[b: b + 1].to(pre.dtype), pre]
        pool_ids = [IGNORE_INDEX] * (1 + pre.shape[0])
        if n_speech:
            parts.append(speech_embeds[b, :n_speech].to(pre.dtype))
            pool_ids += speech_ids[b, :n_speech].tolist()
        pool = torch.cat(parts)
        order = layouts[b] if layouts is not None else list(range(pool.shape[0]))
        ids_in_order = [pool_ids[k] for k in order]
        seqs.append(pool[torch.tensor(order, device=pool.device)])
        targets.append(torch.tensor(ids_in_order[1:] + [IGNORE_INDEX], device=pool.device))
    return _pad_stack(seqs), _pad_stack(targets, IGNORE_INDEX)


def speech_loss(tts_lm: nn.Module, embeds: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    logits, _ = tts_lm(embeds)
    count = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    # Dividing a zero sum keeps the graph (and DDP's view of which parameters were used) intact.
    return loss / max(count, 1), count


@dataclass
class StageOutput:
    loss: Tensor
    parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


class StageModel(nn.Module):
    """Wraps OpenS2S so one `forward(batch)` computes the stage's loss: the unit DDP/FSDP wrap."""

    def __init__(self, model: OpenS2S, stage: str, text_weight: float = 1.0, speech_weight: float = 1.0):
        super().__init__()
        if stage not in STAGES:
            raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        self.model = model
        self.stage = stage
        self.text_weight, self.speech_weight = text_weight, speech_weight
        self.text_span, self.speech_span = parse_strategy(model.config.interleave_strategy)

    def forward(self, batch: Batch) -> StageOutput:
        m = self.model
        tts = m.tts_lm_model
        if self.stage == "2a":
            if batch.tts_text_ids is None or batch.speech_ids is None:
                raise ValueError("stage 2a needs tts_text_ids and speech_ids (Collator(need_tts_text, need_units))")
            text = tts.embed(batch.tts_text_ids)
            prefix = [text[b, : int(batch.tts_text_len[b])] for b in range(text.shape[0])]
            seq, tgt = _speech_sequences(tts, prefix, tts.speaker_input(batch.speaker.to(text.dtype)), batch, None)
            loss, n = speech_loss(tts, seq, tgt)
            return StageOutput(loss, {"speech": loss.item()}, n)

        embeds, labels, starts = llm_inputs(m, batch)
        logits, hidden = m.llm_model(embeds)
        parts: dict[str, float] = {}
        total = embeds.new_zeros(())
        tokens = 0
        if self.stage in ("1", "3"):
            t_loss, n = text_loss(logits, labels)
            parts["text"] = t_loss.item()
            total = total + (self.text_weight if self.stage == "3" else 1.0) * t_loss
            tokens += n
        if self.stage in ("2b", "3"):
            if self.stage == "2b" and batch.speech_ids is None:
                raise ValueError("stage 2b needs speech_ids (Collator(need_units=True))")
            seq, tgt = self.interleaved_inputs(batch, hidden, starts)
            s_loss, n = speech_loss(tts, seq, tgt)
            parts["speech"] = s_loss.item()
            total = total + (self.speech_weight if self.stage == "3" else 1.0) * s_loss
            tokens += n
        return StageOutput(total, parts, tokens)


    def interleaved_inputs(self, batch: Batch, hidden: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        """TTS LM inputs (B, L, D) in the M:N layout and their next-token targets (B, L), from the LLM's
        final-norm hidden states over the spliced sequence."""
        m = self.model
        # h_i is the state that predicted response token i: one position before it.
        rows = [hidden[b, s - 1: s - 1 + int(batch.response_len[b])] for b, s in enumerate(starts.tolist())]
        projected = [m.tts_input(r) for r in rows]
        speaker = m.tts_lm_model.speaker_input(batch.speaker.to(hidden.dtype))
        n_speech = batch.speech_len.tolist() if batch.speech_len is not None else [0] * len(rows)
        layouts = [interleave_layout(r.shape[0], s, self.text_span, self.speech_span)
                   for r, s in zip(rows, n_speech, strict=True)]
        return _speech_sequences(m.tts_lm_model, projected, speaker, batch, layouts)


def collator_needs(stage: str) -> dict[str, bool]:
    """What the Collator must produce for a stage."""
    return {
        "need_audio": stage in ("1", "2b", "3"),
        "need_units": stage in ("2a", "2b"),
        "need_tts_text": stage == "2a",
        # Stage 1 trains only the adapter: a row without speech would teach it nothing.
        "need_user_audio": stage == "1",
    }
