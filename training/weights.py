"""Comparing a state dict with the keys and shapes a model expects, for errors that name every problem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def key_mismatches(expected: Mapping[str, Sequence[int]], state: Mapping[str, torch.Tensor],
                   optional: frozenset[str] = frozenset()) -> list[str]:
    """One line per kind of problem: missing keys, unexpected keys, mis-shaped keys (file vs model).
    Keys in `optional` may be absent (tied weights that writers leave out)."""
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    misshaped = sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k])}"
                       for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
    return problems
