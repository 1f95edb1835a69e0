"""The jsonl data format (lazy reading, named errors), the collator, the interleaved training layout against
the inference schedule, and the `train` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from opens2s_edge.cli import main as cli_main
from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID, PromptBuilder, SpeechVocab
from opens2s_edge.training.checkpoint import load_checkpoint
from opens2s_edge.training.data import IGNORE_INDEX, AudioRef, Collator, DataError, JsonlDataset, read_audio
from opens2s_edge.training.generate import GenerationOptions, Generator
from opens2s_edge.training.presets import write_preset
from opens2s_edge.training.stages import StageModel, interleave_layout, llm_inputs

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread: None) -> None:
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preset("tiny", tmp_path_factory.mktemp("data") / "ckpt")


def _wav(path: Path, seconds: float = 1.0, sr: int = 16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr)
    return path


def _row(audio: str = "a.wav", text: str = "hello there", units: object = "<|audio_1|><|audio_16383|>",
         spk: str = "") -> dict:
    return {"messages": [
        {"role": "user", "content": [{"text": "", "audio": audio, "speech_units": "", "spk_emb": ""}]},
        {"role": "assistant", "content": [{"text": text, "audio": "", "speech_units": units, "spk_emb": spk}]}]}


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    _wav(tmp_path / "a.wav")
    data = _write(tmp_path / "d.jsonl", [
        _row(), "", '{"messages": [', _row(audio="missing.wav"), _row(units="<|audio_16384|>"),
        _row(units="<|audio_3|> junk"), {"messages": [{"role": "assistant", "content": "x"}]}, _row(units=[5, -1]),
        _row(spk="nope.npy"),
    ])
    ds = JsonlDataset([data])
    assert len(ds) == 8  # the blank line is not a row
    assert ds[0].units == [1, 16383]
    expected = [
        (1, r"d\.jsonl:3: malformed JSON"),
        (2, r"d\.jsonl:4: audio file .*missing\.wav does not exist"),
        (3, r"d\.jsonl:5: speech unit 16384 is outside the vocabulary 0\.\.16383"),
        (4, r"d\.jsonl:6: speech_units has text that is not a <\|audio_i\|> token: 'junk'"),
        (5, r"d\.jsonl:7: expected messages \[system\?, user, assistant\]"),
        (6, r"d\.jsonl:8: speech unit -1 is outside"),
        (7, r"d\.jsonl:9: speaker embedding .*nope\.npy does not exist"),
    ]
    for i, pattern in expected:
        with pytest.raises(DataError, match=pattern):
            ds[i]
    with pytest.raises(DataError, match=r"d\.jsonl:3"):
        ds.validate()
    with pytest.raises(DataError, match="does not exist"):
        JsonlDataset([tmp_path / "none.jsonl"])


def test_audio_segments(tmp_path: Path) -> None:
    wav = _wav(tmp_path / "a.wav", 2.0)
    ref = AudioRef.parse(f"{wav.name}:8000:4000", tmp_path)
    assert (ref.path, ref.start, ref.frames) == (wav, 8000, 4000)
    full = read_audio(AudioRef(wav))
    np.testing.assert_allclose(read_audio(ref), full[8000:12000], atol=1e-4)
    with pytest.raises(DataError, match="past the end"):
        read_audio(AudioRef(wav, 10**6, 10), "x.jsonl:1")
    _wav(tmp_path / "b.wav", 1.0, sr=22050)
    with pytest.raises(DataError, match="need a 16000 Hz file"):
        read_audio(AudioRef.parse("b.wav:0:100", tmp_path))


def test_collate_matches_the_inference_prompt(tmp_path: Path, ckpt: Path) -> None:
    _wav(tmp_path / "a.wav")
    np.save(tmp_path / "spk.npy", np.ones((1, 1, 512), np.float32))
    text_only = {"messages": [{"role": "system", "content": "Be kind."},
                              {"role": "user", "content": "how are you"},
                              {"role": "assistant", "content": [{"text": "fine", "speech_units": [7, 8, 9]}]}]}
    ds = JsonlDataset([_write(tmp_path / "d.jsonl", [_row(spk="spk.npy"), text_only])])
    collator = Collator(ckpt, need_units=True, need_tts_text=True)
    batch = collator([ds[0], ds[1]])
    prompt = PromptBuilder.from_folder(ckpt)
    vocab = SpeechVocab.from_folder(ckpt / "tts")
    start = int(batch.response_start[0])
    assert batch.input_ids[0, :start].tolist() == prompt.prompt_ids()
    assert (batch.labels[0, :start] == IGNORE_INDEX).all()
    response = batch.input_ids[0, start: start + int(batch.response_len[0])].tolist()
    assert batch.labels[0, start: start + len(response)].tolist() == response
    assert prompt.decode(response) == "hello there"
    tok = prompt.tokenizer
    assert response[-2:] == [tok.token_to_id("<|im_tts_end|>"), tok.token_to_id("<|im_end|>")]
    assert batch.speech_ids[0, :3].tolist() == [vocab.offset + 1, vocab.offset + 16383, vocab.eos_ids[0]]
    assert batch.speech_len.tolist() == [3, 4]
    assert batch.audio_features.shape[0] == 1 and batch.audio_owner.tolist() == [0]
    assert (batch.input_ids[1] != AUDIO_PLACEHOLDER_ID).all()
    assert batch.speaker[0].sum() == 512 and batch.speaker[1].abs().sum() == 0
    assert batch.tts_text_ids is not None and int(batch.tts_text_len[1]) > 0
    with pytest.raises(DataError, match="needs user audio"):
        Collator(ckpt, need_user_audio=True)([ds[1]])


def test_interleave_layout() -> None:
    # M=4, N=8, 6 text states, 20 speech tokens: spk, h1-4, s1-8, h5-6, s9-16, s17-20.
    order = interleave_layout(6, 20, 4, 8)
    h = lambda i: i  # noqa: E731
    s = lambda j: 6 + j  # noqa: E731
    assert order == ([0] + [h(i) for i in range(1, 5)] + [s(j) for j in range(1, 9)] + [h(5), h(6)]
                     + [s(j) for j in range(9, 21)])
    assert interleave_layout(9, 3, 4, 8) == [0, 1, 2, 3, 4, 10, 11, 12, 5, 6, 7, 8, 9]


def test_training_layout_reproduces_greedy_generation(tmp_path: Path, ckpt: Path) -> None:
    """Teacher forcing on what greedy generation produced must predict exactly those tokens: the training
    sequence is the inference sequence, position for position."""

    wav_path = _wav(tmp_path / "a.wav", 1.5)
    model = load_checkpoint(ckpt)
    collator = Collator(ckpt)
    sample = JsonlDataset([_write(tmp_path / "d.jsonl", [_row(units="")])])[0]
    batch = collator([sample])
    start = int(batch.response_start[0])
    prompt_ids = batch.input_ids[0, :start].tolist()

    vocab = SpeechVocab.from_folder(ckpt / "tts")
    options = GenerationOptions(greedy=True, max_text_tokens=10, max_speech_tokens=40)
    from opens2s_edge.runtime.audio import load_wav

    result = Generator(ckpt, max_context=512)(load_wav(wav_path), options)
    assert result.prompt_ids == prompt_ids  # the training prompt is the inference prompt
    text_ids, speech_ids = result.text_ids, result.speech_ids
    assert len(text_ids) == 10 and len(speech_ids) > 16
    early_eos = any(vocab.is_eos(i) for i in speech_ids[:-1])
    assert not early_eos, "pick another input: an early speech EOS changes the schedule"

    batch.input_ids = torch.tensor([prompt_ids + text_ids])
    batch.labels = torch.tensor([[IGNORE_INDEX] * start + text_ids])
    batch.lengths = torch.tensor([start + len(text_ids)])
    batch.response_len = torch.tensor([len(text_ids)])
    batch.speech_ids = torch.tensor([speech_ids])
    batch.speech_len = torch.tensor([len(speech_ids)])
    stage = StageModel(model, "3")
    with torch.no_grad():
        embeds, labels, starts = llm_inputs(model, batch)
        logits, hidden = model.llm_model(embeds)
        s = int(starts[0])
        assert logits[0, s - 1: s - 1 + len(text_ids)].argmax(-1).tolist() == text_ids
        seq, tgt = stage.interleaved_inputs(batch, hidden, starts)
        tts_logits, _ = model.tts_lm_model(seq)
    where = (tgt[0] != IGNORE_INDEX).nonzero().flatten()
    assert tgt[0, where].tolist() == speech_ids
    allowed = torch.full((tts_logits.shape[-1],), float("-inf"))
    allowed[vocab.offset: vocab.offset + vocab.count] = 0
    allowed[list(vocab.eos_ids)] = 0
    assert (tts_logits[0, where] + allowed).argmax(-1).tolist() == speech_ids


@needs_espeak
def test_train_command(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from opens2s_edge.training.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "syn", n=3)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"checkpoint: {ckpt}\ndata: syn/data.jsonl\noutput_dir: out\nbatch_size: 2\n"
                      "lr: 1.0e-3\nlog_every: 1\nnum_threads: 1\nsave_every: 2\n")
    assert data.is_file()
    assert cli_main(["train", "--stage", "2a", "--config", str(config), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "wrote OpenS2S checkpoint" in out
    assert (tmp_path / "out" / "checkpoint" / "config.json").is_file()
    assert (tmp_path / "out" / "state" / "latest").read_text().strip() == "step-00000002"
    # Running again resumes at the end: nothing left to do, still a success.
    assert cli_main(["train", "--stage", "2a", "--config", str(config), "--max-steps", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out

    config.write_text(config.read_text() + "bogus_key: 1\n")
    assert cli_main(["train", "--stage", "2a", "--config", str(config)]) == 2
    assert "unknown config keys: bogus_key" in capsys.readouterr().err
    assert cli_main(["train", "--stage", "3", "--config", str(tmp_path / "none.yaml")]) == 2
