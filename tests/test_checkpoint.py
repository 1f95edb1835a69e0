"""The OpenS2S folder format: full-size key list, round trip, sharding, and named errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from opens2s_edge.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from opens2s_edge.training.generate import GenerationOptions, Generator
from opens2s_edge.training.opens2s import OpenS2S, OpenS2SConfig
from opens2s_edge.training.presets import write_preset

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"


def test_full_size_keys_and_shapes(golden_root: Path) -> None:
    """Our OpenS2S built from the config.json the reference writes at full size has its every key and shape."""
    full = json.loads((golden_root / "opens2s_full_keys.json").read_text())
    with torch.device("meta"):
        model = OpenS2S(OpenS2SConfig.from_dict(full["config_json"]))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(full["keys"])
    assert ours == {k: v["shape"] for k, v in full["keys"].items()}
    # The reference builds its LLM with from_config, which takes llm_config.torch_dtype: only the LLM comes up
    # in bf16 there. We load every sub-model in the dtype asked for, so the loader reads each file's own dtype.
    bf16 = {k.split(".")[0] for k, v in full["keys"].items() if v["dtype"] == "bfloat16"}
    assert bf16 == {"llm_model"} and full["config_json"]["llm_config"]["torch_dtype"] == "bfloat16"
    assert sum(v.numel() for v in model.state_dict().values()) == full["n_params"]
    by_module = {m: sum(v.numel() for k, v in model.state_dict().items() if k.startswith(m + "."))
                 for m in full["n_params_by_module"]}
    assert by_module == full["n_params_by_module"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_preset("tiny", tmp_path_factory.mktemp("tiny") / "checkpoint")


def test_init_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = write_preset("tiny", tmp_path / "again")
    a, b = load_file(tiny / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rel in ("tokenizer.json", "tts/tokenizer.json", "config.json", "generation_config.json"):
        assert (tiny / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_round_trip_sharded_gives_identical_outputs(tiny: Path, tmp_path: Path) -> None:
    wav = np.sin(np.linspace(0, 900, 24000)).astype(np.float32) * 0.3
    options = GenerationOptions(greedy=True, max_text_tokens=12, max_speech_tokens=40)
    first = Generator(tiny)(wav, options)
    model = load_checkpoint(tiny)
    resaved = save_checkpoint(model, tmp_path / "resaved", assets_from=tiny, max_shard_bytes=1 << 20)
    assert (resaved / "model.safetensors.index.json").is_file()
    assert len(list(resaved.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((resaved / "config.json").read_text()) == json.loads((tiny / "config.json").read_text())
    second = Generator(resaved)(wav, options)
    assert first.to_json() == second.to_json()
    assert len(first.text_ids) > 0 and len(first.speech_ids) > 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_files_are_named(tiny: Path, tmp_path: Path) -> None:
    broken = _copy(tiny, tmp_path / "no_weights")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="expected model.safetensors"):
        load_checkpoint(broken)
    broken = _copy(tiny, tmp_path / "no_config")
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_unexpected_missing_and_misshaped_keys_are_all_named(tiny: Path, tmp_path: Path) -> None:
    broken = _copy(tiny, tmp_path / "bad_keys")
    state = load_file(broken / "model.safetensors")
    state["llm_model.extra.weight"] = torch.zeros(3)
    del state["llm_ln.bias"]
    state["llm2tts.weight"] = torch.zeros(5, 5)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(broken)
    message = str(err.value)
    assert "llm_model.extra.weight" in message and "unexpected" in message
    assert "llm_ln.bias" in message and "missing" in message
    assert "llm2tts.weight: file (5, 5)" in message


def test_corrupt_weights_are_named(tiny: Path, tmp_path: Path) -> None:
    broken = _copy(tiny, tmp_path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_checkpoint(broken)


def test_generate_command_on_the_default(tmp_path: Path) -> None:
    init = subprocess.run([sys.executable, "-m", "opens2s_edge", "init", "--preset", "tiny", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    ckpt = tmp_path / "d" / "checkpoint"
    run = subprocess.run([sys.executable, "-m", "opens2s_edge", "generate", "--checkpoint", str(ckpt),
                          "--audio", str(HELLO), "--json", "--max-text-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert len(reply["text_ids"]) <= 8 and isinstance(reply["text"], str)
    again = subprocess.run([sys.executable, "-m", "opens2s_edge", "init", "--preset", "tiny", str(tmp_path / "d")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist|not found|missing"),
    (b"", "empty|no audio|corrupt|not a"),
    (b"RIFF\x00\x00garbage", "corrupt|not a|could not"),
])
def test_generate_command_names_bad_audio(tiny: Path, tmp_path: Path, content: bytes | None, expected: str) -> None:
    wav = tmp_path / "bad.wav"
    if content is not None:
        wav.write_bytes(content)
    run = subprocess.run([sys.executable, "-m", "opens2s_edge", "generate", "--checkpoint", str(tiny),
                          "--audio", str(wav)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "bad.wav" in run.stderr
    assert "Traceback" not in run.stderr

    assert re.search(expected, run.stderr, re.I), run.stderr
