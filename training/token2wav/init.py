"""A deterministic random-init decoder folder in the released GLM-4-Voice format (no download needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from opens2s_edge.runtime.files import atomic_file, write_text_atomic

from .config import dump_config, preset_config
from .decoder import build_modules, unfold_weight_norm

PRESETS = ("tiny", "small", "full")


def _save_atomic(obj: object, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def write_random_decoder(out_dir: Path, preset: str, seed: int = 0) -> None:
    """Write config.yaml, flow.pt and hift.pt (HiFT with weight_g/weight_v pairs, as released) into out_dir.

    Presets: "tiny" (the golden test sizes), "small" (bigger, still quick on a laptop CPU), "full" (the released
    sizes, 131 M parameters). The same preset and seed give the same tensors.
    """
    cfg = preset_config(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow, hift = build_modules(cfg, "cpu")
        with torch.no_grad():
            # Default init makes exp(magnitude) saturate at the clip; a smaller last layer gives quiet noise.
            hift.conv_post.weight.mul_(0.1)
            hift.conv_post.bias.zero_()
    flow_state = {k: v.detach().clone().contiguous() for k, v in flow.state_dict().items()}
    hift_state = unfold_weight_norm(
        {k: v.detach().clone().contiguous() for k, v in hift.state_dict().items()}, hift.weight_norm_layers()
    )
    _save_atomic(flow_state, out_dir / "flow.pt")
    _save_atomic(hift_state, out_dir / "hift.pt")
    write_text_atomic(out_dir / "config.yaml", dump_config(cfg))
