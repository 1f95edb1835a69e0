"""The GLM-4-Voice decoder's `config.yaml`: read without HyperPyYAML, write in the same format.

The released file is HyperPyYAML: `!new:module.Class` nodes with keyword arguments and `!ref <key>` references.
We never import the named classes; we only check that each node names the class we implement, read its
arguments into typed dataclasses, and reject settings our modules do not implement.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class DecoderConfigError(ValueError):
    """config.yaml is unreadable or describes a decoder this package does not implement."""


@dataclass(frozen=True)
class _Tagged:
    kind: str  # "new", "name", "apply", ...
    target: str
    value: Any


@dataclass(frozen=True)
class _Ref:
    expr: str


class _Loader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tagged:
    kind, _, target = suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return _Tagged(kind, target, value)


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


_Loader.add_constructor("!ref", _construct_ref)
_Loader.add_multi_constructor("!", _construct_tagged)

_REF = re.compile(r"^<([A-Za-z_][\w.\[\]]*)>$")


def _resolve(value: Any, root: dict[str, Any], depth: int = 0) -> Any:
    if depth > 32:
        raise DecoderConfigError("config.yaml: !ref chain too deep (a reference cycle?)")
    if isinstance(value, _Ref):
        match = _REF.match(value.expr.strip())
        if not match:
            raise DecoderConfigError(f"config.yaml: unsupported !ref expression {value.expr!r} (only <key>)")
        node: Any = root
        for part in re.split(r"[.\[\]]+", match.group(1)):
            if not part:
                continue
            if not isinstance(node, dict) or part not in node:
                raise DecoderConfigError(f"config.yaml: !ref {value.expr} names no key")
            node = node[part]
        return _resolve(node, root, depth + 1)
    if isinstance(value, _Tagged):
        return _Tagged(value.kind, value.target, _resolve(value.value, root, depth + 1))
    if isinstance(value, dict):
        return {k: _resolve(v, root, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, depth + 1) for v in value]
    return value


@dataclass(frozen=True)
class EncoderConfig:
    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class LengthRegulatorConfig:
    channels: int
    sampling_ratios: tuple[int, ...]
    out_channels: int
    groups: int = 1


@dataclass(frozen=True)
class EstimatorConfig:
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int


@dataclass(frozen=True)
class CFMConfig:
    in_channels: int
    spk_emb_dim: int
    sigma_min: float
    t_scheduler: str
    inference_cfg_rate: float
    n_timesteps: int = 10  # the reference hard-codes 10 Euler steps in flow.inference


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int
    spk_embed_dim: int
    vocab_size: int
    input_frame_rate: float
    encoder: EncoderConfig
    length_regulator: LengthRegulatorConfig
    cfm: CFMConfig
    estimator: EstimatorConfig


@dataclass(frozen=True)
class F0PredictorConfig:
    num_class: int
    in_channels: int
    cond_channels: int


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0: F0PredictorConfig

    @property
    def hop(self) -> int:
        """Waveform samples per mel frame."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass(frozen=True)
class DecoderConfig:
    sample_rate: int
    flow: FlowConfig
    hift: HiFTConfig
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


_FLOW_CLASS = "cosyvoice.flow.flow.MaskedDiffWithXvec"
_ENCODER_CLASS = "cosyvoice.transformer.encoder.BlockConformerEncoder"
_LR_CLASS = "cosyvoice.flow.length_regulator.InterpolateRegulator"
_CFM_CLASS = "cosyvoice.flow.flow_matching.ConditionalCFM"
_ESTIMATOR_CLASS = "cosyvoice.flow.decoder.ConditionalDecoder"
_HIFT_CLASS = "cosyvoice.hifigan.generator.HiFTGenerator"
_F0_CLASS = "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"


def _node(value: Any, cls: str, where: str) -> dict[str, Any]:
    if not isinstance(value, _Tagged) or value.kind != "new":
        raise DecoderConfigError(f"config.yaml: {where} must be a !new:{cls} node")
    if value.target.rsplit(".", 1)[-1] != cls.rsplit(".", 1)[-1]:
        raise DecoderConfigError(f"config.yaml: {where} is {value.target}, expected {cls}")
    if not isinstance(value.value, dict):
        raise DecoderConfigError(f"config.yaml: {where} must hold keyword arguments")
    return value.value


def _get(args: dict[str, Any], key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    if not isinstance(args, dict):
        raise DecoderConfigError(f"config.yaml: {where} must be a mapping of settings, got {type(args).__name__}")
    if key in args:
        return args[key]
    if default is dataclasses.MISSING:
        raise DecoderConfigError(f"config.yaml: {where} lacks {key!r}")
    return default


def _num(kind: type, args: dict[str, Any], key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    """A number field: an int or float where the reference builds one, or DecoderConfigError naming it."""
    value = _get(args, key, where, default)
    if isinstance(value, str):  # YAML 1.1 reads 1e-06 (no dot) as a string; the reference's float() takes it
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        what = "an integer" if kind is int else "a number"
        raise DecoderConfigError(f"config.yaml: {where}.{key} = {value!r:.40} is not {what}")
    return kind(value)


def _seq(args: dict[str, Any], key: str, where: str, default: Any, depth: int = 1) -> tuple:
    """A list (of lists) of integers, or DecoderConfigError naming the field."""
    value = _get(args, key, where, default)

    def ints(v: Any, d: int) -> tuple:
        if not isinstance(v, (list, tuple)):
            raise DecoderConfigError(f"config.yaml: {where}.{key} = {value!r:.40} is not a list of integers")
        if d > 1:
            return tuple(ints(x, d - 1) for x in v)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise DecoderConfigError(f"config.yaml: {where}.{key} = {value!r:.40} is not a list of integers")
        return tuple(v)

    return ints(value, depth)


def _expect(args: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any, where: str) -> None:
    value = args.get(key, default)
    if value not in allowed:
        raise DecoderConfigError(
            f"config.yaml: {where}.{key} = {value!r} is not implemented (supported: {', '.join(map(repr, allowed))})"
        )


def _parse_encoder(value: Any) -> EncoderConfig:
    w = "flow.encoder"
    a = _node(value, _ENCODER_CLASS, w)
    _expect(a, "input_layer", ("linear",), "conv2d", w)
    _expect(a, "pos_enc_layer_type", ("rel_pos_espnet",), "rel_pos", w)
    _expect(a, "selfattention_layer_type", ("block_rel_selfattn",), "rel_selfattn", w)
    _expect(a, "normalize_before", (True,), True, w)
    _expect(a, "use_cnn_module", (False,), True, w)
    _expect(a, "macaron_style", (False,), True, w)
    _expect(a, "activation_type", ("swish",), "swish", w)
    _expect(a, "key_bias", (True,), True, w)
    _expect(a, "static_chunk_size", (0,), 0, w)
    _expect(a, "use_dynamic_chunk", (False,), False, w)
    return EncoderConfig(
        input_size=_num(int, a, "input_size", w),
        output_size=_num(int, a, "output_size", w, 256),
        attention_heads=_num(int, a, "attention_heads", w, 4),
        linear_units=_num(int, a, "linear_units", w, 2048),
        num_blocks=_num(int, a, "num_blocks", w, 6),
        block_size=_num(int, a, "block_size", w, 25),
    )


def _parse_cfm(value: Any) -> tuple[CFMConfig, EstimatorConfig]:
    w = "flow.decoder"
    a = _node(value, _CFM_CLASS, w)
    params = _get(a, "cfm_params", w)
    if isinstance(params, _Tagged):  # !new:omegaconf.DictConfig {content: {...}}
        params = params.value.get("content", params.value) if isinstance(params.value, dict) else None
    if not isinstance(params, dict):
        raise DecoderConfigError("config.yaml: flow.decoder.cfm_params must be a mapping")
    _expect(params, "solver", ("euler",), "euler", "flow.decoder.cfm_params")
    _expect(params, "t_scheduler", ("cosine", "linear"), "linear", "flow.decoder.cfm_params")
    n_spks = _num(int, a, "n_spks", w, 1)
    if n_spks != 1:
        raise DecoderConfigError(f"config.yaml: flow.decoder.n_spks = {n_spks} is not implemented (supported: 1)")
    cfm = CFMConfig(
        in_channels=_num(int, a, "in_channels", w),
        spk_emb_dim=_num(int, a, "spk_emb_dim", w, 64),
        sigma_min=_num(float, params, "sigma_min", "flow.decoder.cfm_params", 1e-4),
        t_scheduler=str(params.get("t_scheduler", "linear")),
        inference_cfg_rate=_num(float, params, "inference_cfg_rate", "flow.decoder.cfm_params", 0.7),
    )
    we = "flow.decoder.estimator"
    e = _node(_get(a, "estimator", w), _ESTIMATOR_CLASS, we)
    _expect(e, "act_fn", ("gelu",), "snake", we)
    estimator = EstimatorConfig(
        in_channels=_num(int, e, "in_channels", we),
        out_channels=_num(int, e, "out_channels", we),
        channels=_seq(e, "channels", we, (256, 256)),
        attention_head_dim=_num(int, e, "attention_head_dim", we, 64),
        n_blocks=_num(int, e, "n_blocks", we, 1),
        num_mid_blocks=_num(int, e, "num_mid_blocks", we, 2),
        num_heads=_num(int, e, "num_heads", we, 4),
    )
    return cfm, estimator


def _parse_flow(value: Any) -> FlowConfig:
    w = "flow"
    a = _node(value, _FLOW_CLASS, w)
    _expect(a, "output_type", ("mel",), "mel", w)
    lr = _node(_get(a, "length_regulator", w), _LR_CLASS, "flow.length_regulator")
    channels = _num(int, lr, "channels", "flow.length_regulator")
    cfm, estimator = _parse_cfm(_get(a, "decoder", w))
    return FlowConfig(
        input_size=_num(int, a, "input_size", w, 512),
        output_size=_num(int, a, "output_size", w, 80),
        spk_embed_dim=_num(int, a, "spk_embed_dim", w, 192),
        vocab_size=_num(int, a, "vocab_size", w, 4096),
        input_frame_rate=_num(float, a, "input_frame_rate", w, 50),
        encoder=_parse_encoder(_get(a, "encoder", w)),
        length_regulator=LengthRegulatorConfig(
            channels=channels,
            sampling_ratios=_seq(lr, "sampling_ratios", "flow.length_regulator", dataclasses.MISSING),
            out_channels=_num(int, lr, "out_channels", "flow.length_regulator", None) if lr.get("out_channels")
            else channels,
            groups=_num(int, lr, "groups", "flow.length_regulator", 1),
        ),
        cfm=cfm,
        estimator=estimator,
    )


def _parse_hift(value: Any) -> HiFTConfig:
    w = "hift"
    a = _node(value, _HIFT_CLASS, w)
    f0 = _node(_get(a, "f0_predictor", w), _F0_CLASS, "hift.f0_predictor")
    istft = _get(a, "istft_params", w, {"n_fft": 16, "hop_len": 4})

    def ints(key: str, default: Any) -> tuple[int, ...]:
        return _seq(a, key, w, default)

    def nested(key: str, default: Any) -> tuple[tuple[int, ...], ...]:
        return _seq(a, key, w, default, depth=2)

    return HiFTConfig(
        in_channels=_num(int, a, "in_channels", w, 80),
        base_channels=_num(int, a, "base_channels", w, 512),
        nb_harmonics=_num(int, a, "nb_harmonics", w, 8),
        sampling_rate=_num(int, a, "sampling_rate", w, 22050),
        nsf_alpha=_num(float, a, "nsf_alpha", w, 0.1),
        nsf_sigma=_num(float, a, "nsf_sigma", w, 0.003),
        nsf_voiced_threshold=_num(float, a, "nsf_voiced_threshold", w, 10),
        upsample_rates=ints("upsample_rates", (8, 8)),
        upsample_kernel_sizes=ints("upsample_kernel_sizes", (16, 16)),
        n_fft=_num(int, istft, "n_fft", "hift.istft_params"),
        hop_len=_num(int, istft, "hop_len", "hift.istft_params"),
        resblock_kernel_sizes=ints("resblock_kernel_sizes", (3, 7, 11)),
        resblock_dilation_sizes=nested("resblock_dilation_sizes", ((1, 3, 5),) * 3),
        source_resblock_kernel_sizes=ints("source_resblock_kernel_sizes", (7, 11)),
        source_resblock_dilation_sizes=nested("source_resblock_dilation_sizes", ((1, 3, 5),) * 2),
        lrelu_slope=_num(float, a, "lrelu_slope", w, 0.1),
        audio_limit=_num(float, a, "audio_limit", w, 0.99),
        f0=F0PredictorConfig(
            num_class=_num(int, f0, "num_class", "hift.f0_predictor", 1),
            in_channels=_num(int, f0, "in_channels", "hift.f0_predictor", 80),
            cond_channels=_num(int, f0, "cond_channels", "hift.f0_predictor", 512),
        ),
    )


def _check(cfg: DecoderConfig) -> None:
    f, h = cfg.flow, cfg.hift
    problems = []
    if f.input_size != f.encoder.input_size:
        problems.append(f"flow.input_size {f.input_size} != flow.encoder.input_size {f.encoder.input_size}")
    if f.encoder.output_size % f.encoder.attention_heads:
        problems.append("flow.encoder.output_size is not divisible by attention_heads")
    if f.estimator.in_channels != 4 * f.output_size:
        problems.append(f"estimator.in_channels {f.estimator.in_channels} != 4 x output_size {f.output_size}")
    if f.cfm.spk_emb_dim != f.output_size:
        problems.append(f"flow.decoder.spk_emb_dim {f.cfm.spk_emb_dim} != output_size {f.output_size}")
    if h.in_channels != f.output_size:
        problems.append(f"hift.in_channels {h.in_channels} != flow.output_size {f.output_size}")
    if h.sampling_rate != cfg.sample_rate:
        problems.append(f"hift.sampling_rate {h.sampling_rate} != sample_rate {cfg.sample_rate}")
    if f.length_regulator.out_channels != f.output_size:
        problems.append("flow.length_regulator output channels differ from flow.output_size")
    if problems:
        raise DecoderConfigError("config.yaml: inconsistent sizes: " + "; ".join(problems))


def parse_config(text: str) -> DecoderConfig:
    """Parse the text of a GLM-4-Voice decoder config.yaml."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass with inert tag constructors
    except yaml.YAMLError as exc:
        raise DecoderConfigError(f"config.yaml is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or "flow" not in raw or "hift" not in raw:
        raise DecoderConfigError("config.yaml must be a mapping with 'flow' and 'hift' entries")
    try:
        flow = _parse_flow(_resolve(raw["flow"], raw))
        hift = _parse_hift(_resolve(raw["hift"], raw))
        sample_rate = _num(int, {"sample_rate": _resolve(raw.get("sample_rate", hift.sampling_rate), raw)},
                           "sample_rate", "config")
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        # A node of an unexpected shape the checks above did not foresee: still the file's fault, named.
        raise DecoderConfigError(f"config.yaml: a setting has an unexpected shape ({type(exc).__name__}: {exc})") \
            from None
    extra = {k: v for k, v in raw.items() if k not in ("flow", "hift", "sample_rate")}
    cfg = DecoderConfig(sample_rate=sample_rate, flow=flow, hift=hift, extra=extra)
    _check(cfg)
    return cfg


def load_config(path: Path) -> DecoderConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DecoderConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_config(text)


def dump_config(cfg: DecoderConfig) -> str:
    """The config in the released HyperPyYAML layout (what the reference's load_hyperpyyaml reads)."""
    f, e, lr, c, est, h = (
        cfg.flow, cfg.flow.encoder, cfg.flow.length_regulator, cfg.flow.cfm, cfg.flow.estimator, cfg.hift,
    )

    def seq(values: tuple[Any, ...]) -> str:
        return "[" + ", ".join(seq(v) if isinstance(v, tuple) else str(v) for v in values) + "]"

    # The released file's whole structure: the seed lines, the fixed params and an `llm:` section that the
    # reference builds at load and GLM-4-Voice's decoder never uses (small sizes here; readers skip it).
    return f"""# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: {cfg.sample_rate}
text_encoder_input_size: 32
llm_input_size: 32
llm_output_size: 32
spk_embed_dim: {f.spk_embed_dim}

# model params
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 32
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {f.input_size}
    output_size: {f.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {f.vocab_size}
    input_frame_rate: {f.input_frame_rate}
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {e.output_size}
        attention_heads: {e.attention_heads}
        linear_units: {e.linear_units}
        num_blocks: {e.num_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {e.block_size}
        input_size: {e.input_size}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: {lr.channels}
        sampling_ratios: {seq(lr.sampling_ratios)}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: {c.in_channels}
        n_spks: 1
        spk_emb_dim: {c.spk_emb_dim}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: {c.sigma_min:g}
                solver: 'euler'
                t_scheduler: '{c.t_scheduler}'
                training_cfg_rate: 0.2
                inference_cfg_rate: {c.inference_cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {est.in_channels}
            out_channels: {est.out_channels}
            channels: {seq(est.channels)}
            dropout: 0
            attention_head_dim: {est.attention_head_dim}
            n_blocks: {est.n_blocks}
            num_mid_blocks: {est.num_mid_blocks}
            num_heads: {est.num_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {h.in_channels}
    base_channels: {h.base_channels}
    nb_harmonics: {h.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {h.nsf_alpha}
    nsf_sigma: {h.nsf_sigma}
    nsf_voiced_threshold: {h.nsf_voiced_threshold:g}
    upsample_rates: {seq(h.upsample_rates)}
    upsample_kernel_sizes: {seq(h.upsample_kernel_sizes)}
    istft_params:
        n_fft: {h.n_fft}
        hop_len: {h.hop_len}
    resblock_kernel_sizes: {seq(h.resblock_kernel_sizes)}
    resblock_dilation_sizes: {seq(h.resblock_dilation_sizes)}
    source_resblock_kernel_sizes: {seq(h.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {seq(h.source_resblock_dilation_sizes)}
    lrelu_slope: {h.lrelu_slope}
    audio_limit: {h.audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: {h.f0.num_class}
        in_channels: {h.f0.in_channels}
        cond_channels: {h.f0.cond_channels}
"""


def preset_config(preset: str) -> DecoderConfig:
    """Decoder sizes by name: "full" (the released GLM-4-Voice decoder), "small", "tiny" (the golden sizes)."""
    sizes = {
        # emb, enc heads, enc ffn, enc blocks, est channels, est head dim, est blocks, est mid, est heads,
        # hift channels, f0 channels
        "full": (512, 8, 2048, 6, 256, 64, 4, 12, 8, 512, 512),
        "small": (128, 4, 256, 2, 96, 24, 1, 2, 4, 96, 64),
        "tiny": (64, 4, 128, 2, 64, 32, 1, 2, 2, 64, 32),
    }
    if preset not in sizes:
        raise DecoderConfigError(f"unknown decoder preset {preset!r} (expected one of {', '.join(sizes)})")
    emb, heads, ffn, blocks, ch, hdim, nb, mid, eheads, hch, f0ch = sizes[preset]
    flow = FlowConfig(
        input_size=emb,
        output_size=80,
        spk_embed_dim=192,
        vocab_size=16384,
        input_frame_rate=12.5,
        encoder=EncoderConfig(emb, emb, heads, ffn, blocks, block_size=10),
        length_regulator=LengthRegulatorConfig(80, (1, 1, 1, 1), 80),
        cfm=CFMConfig(240, 80, 1e-6, "cosine", 0.7),
        estimator=EstimatorConfig(320, 80, (ch, ch), hdim, nb, mid, eheads),
    )
    hift = HiFTConfig(
        in_channels=80,
        base_channels=hch,
        nb_harmonics=8,
        sampling_rate=22050,
        nsf_alpha=0.1,
        nsf_sigma=0.003,
        nsf_voiced_threshold=10.0,
        upsample_rates=(8, 8),
        upsample_kernel_sizes=(16, 16),
        n_fft=16,
        hop_len=4,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5),) * 3,
        source_resblock_kernel_sizes=(7, 11),
        source_resblock_dilation_sizes=((1, 3, 5),) * 2,
        lrelu_slope=0.1,
        audio_limit=0.99,
        f0=F0PredictorConfig(1, 80, f0ch),
    )
    return DecoderConfig(sample_rate=22050, flow=flow, hift=hift)
