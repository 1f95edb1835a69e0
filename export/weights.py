"""Checkpoint weights for the export, never all in memory: the model skeleton on the meta device, a per-tensor reader of
the safetensors files, a module made runnable one transformer layer at a time (the fp32 reference), and weightless
placeholders to trace on (the graph's weights are then written one tensor at a time, export/onnx_graph.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from opens2s_edge.training.checkpoint import (
    CheckpointError,
    check_state_dict,
    read_config,
    tie_missing_heads,
    weight_files,
)
from opens2s_edge.training.opens2s import OpenS2S
from opens2s_edge.training.qwen3 import rope_tables


class CheckpointWeights:
    """The tensors of a checkpoint's safetensors files, read one at a time (the files are memory-mapped by
    safe_open; nothing is loaded until `get`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[Path, object] = {}
        for path in weight_files(folder):
            handle = self._open(path)
            for key in handle.keys():
                self.where[key] = path
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
        return self._handles[path]

    def get(self, key: str) -> Tensor:
        return self._open(self.where[key]).get_tensor(key)


def open_model(folder: Path, max_context: int) -> tuple[OpenS2S, CheckpointWeights]:
    """The OpenS2S model on the meta device (no memory) and a per-tensor reader of its weights; the
    checkpoint's keys and shapes are checked against config.json as `load_checkpoint` does."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config = read_config(folder)
    weights = CheckpointWeights(folder)
    with torch.device("meta"):
        model = OpenS2S(config)
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in weights.shapes.items()}, str(folder))
    tie_missing_heads(model, set(weights.where), folder)
    for lm in (model.llm_model, model.tts_lm_model):
        # RoPE tables are computed, not stored: real (CPU) buffers, constants in the graph.
        cos, sin = rope_tables(lm.config.head_dim, max_context, lm.config.rope_theta)
        lm.register_buffer("rope_cos", cos, persistent=False)
        lm.register_buffer("rope_sin", sin, persistent=False)
        lm._rope_len = max_context
    return model.eval(), weights


def checkpoint_keys(model: nn.Module, module: nn.Module, present: set[str]) -> dict[str, str]:
    """Parameter name inside `module` -> its checkpoint key (tied weights resolve to the stored one)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return {name: next(k for k in names[id(p)] if k in present)
            for name, p in module.named_parameters(remove_duplicate=False)}


def _set_params(module: nn.Module, names: list[str], make: Callable[[str], Tensor], keys: dict[str, str]) -> None:
    # One Parameter per checkpoint key, so tied weights (lm_head = embed_tokens) stay one tensor.
    made: dict[str, nn.Parameter] = {}
    for name in names:
        key = keys[name]
        if key not in made:
            made[key] = nn.Parameter(make(name), requires_grad=False)
        owner_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner_name), leaf, made[key])


def release(module: nn.Module, keys: dict[str, str]) -> None:
    """Back to the meta device: the memory of `module`'s weights is freed."""
    params = dict(module.named_parameters(remove_duplicate=False))
    _set_params(module, list(keys), lambda n: torch.empty(params[n].shape, dtype=params[n].dtype, device="meta"),
                keys)


def materialize(module: nn.Module, keys: dict[str, str], weights: CheckpointWeights, dtype: torch.dtype,
                names: list[str] | None = None) -> None:
    _set_params(module, list(keys) if names is None else names, lambda n: weights.get(keys[n]).to(dtype), keys)


def _units(module: nn.Module) -> dict[str, nn.Module]:
    """The members of the outermost ModuleLists (transformer layers): what is streamed one at a time."""
    units: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(u + ".") for u in units):
            for i, child in enumerate(m):
                units[f"{name}.{i}" if name else str(i)] = child
    return units


@contextmanager
def streamed(module: nn.Module, keys: dict[str, str], weights: CheckpointWeights,
             dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """`module` runnable at `dtype` with one layer's weights in memory at a time: everything outside the
    layer lists is loaded now, each layer just before it runs and freed just after."""
    units = _units(module)
    in_unit = {u: [n for n in keys if n.startswith(u + ".")] for u in units}
    inside = {n for names in in_unit.values() for n in names}
    hooks = []
    try:
        materialize(module, keys, weights, dtype, [n for n in keys if n not in inside])
        for prefix, unit in units.items():
            names = in_unit[prefix]
            sub = {n[len(prefix) + 1:]: keys[n] for n in names}

            def pre(m, args, sub=sub):
                _set_params(m, list(sub), lambda name: weights.get(sub[name]).to(dtype), sub)

            def post(m, args, out, sub=sub):
                release(m, sub)

            hooks += [unit.register_forward_pre_hook(pre), unit.register_forward_hook(post)]
        yield
    finally:
        for h in hooks:
            h.remove()
        release(module, keys)


def placeholders(module: nn.Module, keys: dict[str, str], dtype: torch.dtype, keep_fp32: tuple[type, ...]) -> None:
    """Weights that occupy no memory (one scalar, expanded): enough to trace the graph, whose weights are
    then written from the checkpoint one tensor at a time (`attach_weights`)."""
    island = {f"{mn}.{pn}" if mn else pn
              for mn, m in module.named_modules() if keep_fp32 and isinstance(m, keep_fp32)
              for pn, _ in m.named_parameters(recurse=False)} if dtype != torch.float32 else set()
    params = dict(module.named_parameters(remove_duplicate=False))
    order = {key: i for i, key in enumerate(dict.fromkeys(keys.values()))}

    def make(name: str) -> Tensor:
        return _distinct_scalar(order[keys[name]], torch.float32 if name in island else dtype).expand(
            params[name].shape)

    _set_params(module, list(keys), make, keys)


def _distinct_scalar(i: int, dtype: torch.dtype) -> Tensor:
    # The exporter merges initializers of equal value: every placeholder holds a different finite number
    # (consecutive bit patterns from the smallest normal upward), so each weight keeps its own input.
    bits, smallest_normal = {torch.float32: (torch.int32, 0x00800000), torch.float16: (torch.int16, 0x0400),
                             torch.bfloat16: (torch.int16, 0x0080)}[dtype]
    return torch.tensor(smallest_normal + i, dtype=bits).view(dtype)
