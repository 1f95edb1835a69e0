"""Stages 1, 2a, 2b, 3 on the tiny preset with a synthetic espeak-ng dataset, on the CPU: the loss falls,
only the stage's parameters move, a frozen parameter with a gradient is an error, resume reproduces an
uninterrupted run, and the stage-3 checkpoint (LoRA merged) loads and generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from opens2s_edge.training.checkpoint import load_checkpoint, read_state_dict
from opens2s_edge.training.presets import write_preset
from opens2s_edge.training.stages import TRAINABLE, FrozenParameterError
from opens2s_edge.training.synthetic import make_synthetic_dataset
from opens2s_edge.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread: None) -> None:
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    ckpt = write_preset("tiny", root / "ckpt")
    data = make_synthetic_dataset(root / "syn", n=8, text_only=2, speaker_every=3)
    speech_only = root / "syn" / "speech.jsonl"
    speech_only.write_text("".join(line for line in data.read_text().splitlines(True)[:8]))
    return {"root": root, "ckpt": ckpt, "data": data, "speech": speech_only}


def _cfg(setup: dict[str, Path], stage: str, out: str, **kw: object) -> TrainConfig:
    d = dict(stage=stage, checkpoint=str(setup["ckpt"]), output_dir=str(setup["root"] / out),
             data=[str(setup["speech" if stage == "1" else "data"])], batch_size=4, lr=3e-3, warmup_steps=5,
             lr_schedule="constant", log_every=20, feature_cache=64, save_final=False, num_threads=1, seed=3)
    d.update(kw)
    return TrainConfig.from_dict(d)


# stage: (steps, lr, required drop: final/initial loss)
PLANS = {"1": (200, 1e-2, 0.75), "2a": (60, 3e-3, 0.2), "2b": (80, 3e-3, 0.2), "3": (80, 3e-3, 0.2)}


@pytest.mark.parametrize("stage", list(PLANS))
def test_stage_loss_falls_and_only_its_parameters_move(setup: dict[str, Path], stage: str) -> None:
    steps, lr, ratio = PLANS[stage]
    trainer = Trainer(_cfg(setup, stage, f"falls_{stage}", max_steps=steps, lr=lr), log=lambda m: None)
    history = trainer.train()
    first = np.mean([h.loss for h in history[:5]])
    last = np.mean([h.loss for h in history[-5:]])
    assert last < ratio * first, f"stage {stage}: loss {first:.3f} -> {last:.3f}"
    if stage == "3":
        assert set(history[-1].parts) == {"text", "speech"}

    before = read_state_dict(setup["ckpt"])
    after = trainer.model.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved <= set(TRAINABLE[stage]), f"stage {stage} changed {moved - set(TRAINABLE[stage])}"
    assert moved, f"stage {stage} changed nothing"
    log = [json.loads(line) for line in (setup["root"] / f"falls_{stage}" / "train_log.jsonl").open()]
    assert len(log) == steps and log[-1]["step"] == steps


def test_frozen_parameter_with_a_gradient_is_an_error(setup: dict[str, Path]) -> None:
    trainer = Trainer(_cfg(setup, "2b", "frozen", max_steps=2), log=lambda m: None)
    # A stage plan bug: the LLM's final norm is trainable again although stage 2b froze the LLM.
    trainer.model.llm_model.model.norm.weight.requires_grad_(True)
    with pytest.raises(FrozenParameterError, match=r"llm_model\.model\.norm\.weight"):
        trainer.train()


def test_resume_reaches_the_same_state(setup: dict[str, Path]) -> None:
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the resumed RNG must match too
    common = dict(max_steps=6, save_every=3, lora=lora, lr_schedule="cosine", warmup_steps=2, log_every=1,
                  grad_accum=2, batch_size=3)
    straight = Trainer(_cfg(setup, "3", "resume_a", **common), log=lambda m: None)
    hist_a = straight.train()

    class Crash(Exception):
        pass

    def crash_at_step_5(msg: str) -> None:
        if "step 5/6" in msg:
            raise Crash

    with pytest.raises(Crash):
        Trainer(_cfg(setup, "3", "resume_b", **common), log=crash_at_step_5).train()
    messages: list[str] = []
    resumed = Trainer(_cfg(setup, "3", "resume_b", **common), log=messages.append)
    assert resumed.step == 3 and any("resumed from" in m for m in messages)
    hist_b = resumed.train()
    assert [h.step for h in hist_b] == [4, 5, 6]
    assert [h.loss for h in hist_b] == [h.loss for h in hist_a[3:]]
    sa, sb = straight.stage_model.state_dict(), resumed.stage_model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


def test_stage3_lora_checkpoint_is_plain_opens2s_and_generates(setup: dict[str, Path]) -> None:
    from opens2s_edge.runtime.audio import load_wav
    from opens2s_edge.training.generate import GenerationOptions, Generator

    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    trainer = Trainer(_cfg(setup, "3", "lora", max_steps=20, lora=lora, save_final=True), log=lambda m: None)
    history = trainer.train()
    assert history[-1].loss < history[0].loss
    out = setup["root"] / "lora" / "checkpoint"
    assert set(read_state_dict(out)) == set(read_state_dict(setup["ckpt"])), "LoRA keys must be merged away"
    merged = load_checkpoint(out)

    # The merged weights compute what the LoRA-wrapped model computed. The checkpoint is stored in its config's
    # dtype (bf16, as released), so each weight is rounded to 2^-9 relative: the outputs agree to ~1%.
    assert read_state_dict(out)["llm_model.lm_head.weight"].dtype == torch.bfloat16
    x = torch.randn(1, 7, merged.config.llm.hidden_size)
    trainer.model.eval()
    with torch.no_grad():
        ref, _ = trainer.model.llm_model(x)
        got, _ = merged.llm_model(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2

    wav_path = setup["root"] / "syn" / "wavs" / "user_0000.wav"
    result = Generator(out)(load_wav(wav_path), GenerationOptions(greedy=True, max_text_tokens=12,
                                                                  max_speech_tokens=24))
    assert result.text_ids and result.speech_ids
    assert all(0 <= u < 16384 for u in result.speech_units)

    # The trained checkpoint goes through export and the torch-free runtime unchanged.
    import json
    import subprocess
    import sys

    from opens2s_edge.export.pipeline import export_bundle
    from opens2s_edge.training.token2wav.init import write_random_decoder

    decoder = setup["root"] / "lora_decoder"
    write_random_decoder(decoder, "tiny")
    bundle = export_bundle(out, decoder, setup["root"] / "lora_bundle", max_context=256, progress=lambda _: None)
    run = subprocess.run([sys.executable, "-m", "opens2s_edge", "run", str(bundle), "--audio", str(wav_path),
                          "--out", str(setup["root"] / "lora_reply.wav"), "--greedy", "--json",
                          "--max-text-tokens", "12", "--max-speech-tokens", "24"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["text_ids"] == result.text_ids and reply["speech_ids"] == result.speech_ids


@pytest.mark.parametrize("fsdp", ["off", "on"])
def test_torchrun_two_processes(setup: dict[str, Path], tmp_path: Path, fsdp: str) -> None:
    """torchrun with 2 CPU processes (gloo): DDP, and FSDP2 forced on; both see the same first-step loss
    as each other, save state and write the merged checkpoint."""
    import subprocess
    import sys

    config = tmp_path / "cfg.yaml"
    config.write_text(f"checkpoint: {setup['ckpt']}\ndata: {setup['data']}\noutput_dir: out\nmax_steps: 2\n"
                      "batch_size: 2\nlr: 3.0e-3\nlog_every: 1\nnum_threads: 1\nsave_every: 2\nseed: 5\n"
                      f"fsdp: '{fsdp}'\nactivation_checkpointing: true\nlora: {{r: 4, alpha: 8, dropout: 0.0}}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "opens2s_edge.cli", "train", "--stage", "3", "--config", str(config)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ("FSDP" if fsdp == "on" else "DDP") in proc.stdout
    assert "step 2/2 loss" in proc.stdout
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").open()]
    (setup["root"] / f"torchrun_{fsdp}.json").write_text(json.dumps(log[0]["loss"]))
    other = setup["root"] / f"torchrun_{'on' if fsdp == 'off' else 'off'}.json"
    if other.is_file():
        assert abs(json.loads(other.read_text()) - log[0]["loss"]) < 1e-5
    assert load_checkpoint(tmp_path / "out" / "checkpoint") is not None
