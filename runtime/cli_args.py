"""Argument types every command shares: each refuses a bad value at parse time, naming what is accepted, so no
command starts its work (loading a model, running a turn) on an option it would fail on later."""

from __future__ import annotations

import argparse
import math
import os

MAX_THREADS = 4 * (os.cpu_count() or 1)


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def at_least(minimum: int) -> type:
    """An integer >= minimum."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; expected an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse  # type: ignore[return-value]


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected a number >= 0")
    return value


def probability(text: str) -> float:
    """A nucleus mass in (0, 1]."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]")
    return value


def threads(text: str) -> int:
    """0 (the runtime's default) up to 4 per core: more only makes the threads wait on each other."""
    value = int(_number(text, int))
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..{MAX_THREADS} (0: the default; "
                                         f"this machine has {os.cpu_count()} cores)")
    return value


SEED_MAX = 2**63 - 1


def seed(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..2^63-1")
    return value
