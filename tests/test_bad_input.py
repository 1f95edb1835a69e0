"""Bad input, as a hostile but realistic user gives it: every failure named before the work starts, exit status 2,
no traceback, nothing half-written, files made with the user's umask; faults while running (a graph file removed
under a loaded engine, the disk filling up while the reply is written)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from opens2s_edge.runtime.bundle import BundleError, load_bundle
from opens2s_edge.runtime.engine import Engine, TurnDone, TurnOptions
from opens2s_edge.runtime.files import atomic_dir

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"


def _cli(*args: str, preexec=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([sys.executable, "-m", "opens2s_edge", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


def _refused(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)


@pytest.mark.parametrize("option, value, accepted", [
    ("--seed", "-1", "0..2^63-1"), ("--top-p", "2", "outside (0, 1]"), ("--top-k", "-5", ">= 0"),
    ("--temperature", "-1", "negative"), ("--temperature", "nan", "not a finite number"),
    ("--max-text-tokens", "-1", ">= 1"), ("--max-speech-tokens", "0", ">= 1"), ("--threads", "1000", "outside 0.."),
    ("--threads", "-3", "outside 0.."),
])
def test_options_are_refused_at_parse_time(tiny_bundle: Path, tmp_path: Path, option: str, value: str,
                                           accepted: str) -> None:
    out = tmp_path / "reply.wav"
    run = _cli("run", str(tiny_bundle), "--audio", str(HELLO), "--out", str(out), f"{option}={value}")
    _refused(run, option, accepted)
    assert not out.exists()


def test_bad_outputs_are_refused_before_the_turn(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    for out, needle in ((tmp_path / "reply.mp3", "cannot write .mp3"), (folder, "is a folder"),
                        (tmp_path / "reply", "without an extension"), (blocked / "reply.wav", "cannot be written")):
        run = _cli("run", str(tiny_bundle), "--audio", str(HELLO), "--out", str(out))
        _refused(run, "--out", needle)
        assert "[latency]" not in run.stderr  # refused before the turn ran
    run = _cli("token2wav", "--decoder", str(tmp_path), "--tokens", "1,2", "--out", str(tmp_path / "x.flv"))
    _refused(run, "--out", "cannot write .flv")


def test_bad_audio_is_named(tiny_bundle: Path, tmp_path: Path) -> None:
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.r_[np.zeros(8000), [np.nan, np.inf], np.zeros(8000)].astype(np.float32), 16000,
             subtype="FLOAT")
    sf.write(tmp_path / "whole.wav", np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1,
             16000, subtype="PCM_16")
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    folder = tmp_path / "a_folder.wav"
    folder.mkdir()
    for audio, needle in ((nan, "NaN or Inf"), (tmp_path / "cut.wav", "is truncated"), (folder, "is a folder")):
        run = _cli("run", str(tiny_bundle), "--audio", str(audio), "--out", str(tmp_path / "r.wav"))
        _refused(run, needle)
        assert not (tmp_path / "r.wav").exists()
    _refused(_cli("run", str(HELLO), "--audio", str(HELLO), "--out", str(tmp_path / "r.wav")),
             "is a file, not a bundle folder")


def test_token_lists(tmp_path: Path) -> None:
    from opens2s_edge.training.token2wav.init import write_random_decoder

    decoder = tmp_path / "decoder"
    write_random_decoder(decoder, "tiny")
    pasted = ",".join(str(i % 16384) for i in range(400))  # far longer than a file name may be
    out = tmp_path / "long.wav"
    run = _cli("token2wav", "--decoder", str(decoder), "--tokens", pasted, "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert sf.info(out).frames > 0
    np.save(tmp_path / "grid.npy", np.ones((3, 4), np.int64))
    _refused(_cli("token2wav", "--decoder", str(decoder), "--tokens", str(tmp_path / "grid.npy"), "--out",
                  str(tmp_path / "g.wav")), "1-D array", "(3, 4)")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: [m], "expected a JSON object"),
    (lambda m: {**m, "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}}, "expected {sha256, size}"),
    (lambda m: {k: v for k, v in m.items() if k != "graphs"}, "'graphs' must be a non-empty object"),
    (lambda m: {k: v for k, v in m.items() if k != "token2wav"}, "missing 'token2wav'"),
    (lambda m: {**m, "generation": {**m["generation"], "max_text_tokens": "many"}}, "generation.max_text_tokens"),
])
def test_malformed_manifests_are_named(tiny_bundle: Path, tmp_path: Path, edit, needle: str) -> None:  # noqa: ANN001
    bad = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(edit(manifest)))
    for command in (["run", str(bad), "--audio", str(HELLO), "--out", str(tmp_path / "r.wav")],
                    ["inspect", str(bad)]):
        _refused(_cli(*command), needle, "manifest.json")
    (bad / "manifest.json").write_bytes(os.urandom(300))
    _refused(_cli("inspect", str(bad)), str(bad / "manifest.json"), "not valid JSON")


def test_outputs_follow_the_umask_and_stale_partials_go(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "out"
        stale = tmp_path / f".out.partial.{2**22 + 12345}.abcd"  # a pid no process has
        stale.mkdir()
        (stale / "half.onnx").write_bytes(b"x")
        foreign = tmp_path / ".out.partial.notapid"
        foreign.mkdir()
        with atomic_dir(target) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "file.bin").write_bytes(b"data")
        assert not stale.exists() and foreign.exists()  # ours removed, a stranger's left alone
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        assert stat.S_IMODE((target / "sub" / "file.bin").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_graph_removed_under_a_loaded_engine(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    engine = Engine.from_bundle(load_bundle(bundle))
    wav, _ = sf.read(HELLO, dtype="float32")
    options = TurnOptions(greedy=True, max_text_tokens=6, max_speech_tokens=20)
    first = list(engine.turn(wav, options))[-1]
    (bundle / "llm.onnx").unlink()
    (bundle / "hift.onnx").write_bytes(b"garbage")
    again = list(engine.turn(wav, options))[-1]  # the sessions hold the graphs: the engine keeps serving
    assert isinstance(again, TurnDone) and again.text_ids == first.text_ids
    with pytest.raises(BundleError, match="hift.onnx has 7 bytes|llm.onnx is missing"):
        load_bundle(bundle)


def test_disk_full_while_writing_the_reply(tiny_bundle: Path, tmp_path: Path) -> None:
    import resource
    import signal

    def small_disk() -> None:  # the child may write 20 kB per file: the reply does not fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "reply.wav"
    run = _cli("run", str(tiny_bundle), "--audio", str(HELLO), "--out", str(out), "--max-text-tokens", "16",
               preexec=small_disk)
    _refused(run, "--out", "could not be written")
    assert not out.exists() and not list(tmp_path.glob(".reply*"))


def test_disk_full_while_writing_a_bundle(tiny_default: Path, tmp_path: Path) -> None:
    import resource
    import signal

    def small_disk() -> None:  # 2 MB per file: the first graphs fit, a later graph's weights do not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "bundle"
    run = _cli("export", "--checkpoint", str(tiny_default / "checkpoint"), "--decoder", str(tiny_default / "decoder"),
               "--out", str(out), preexec=small_disk)
    _refused(run, "--out", "the export stopped", "file-size limit", "no partial bundle")
    assert "1/8 audio_encoder: checked" in run.stdout  # it failed part-way, not before it began
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no hidden partial folder


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_force_replaces_only_a_bundle_or_an_empty_folder(tiny_default: Path, tiny_bundle: Path,
                                                                tmp_path: Path) -> None:
    from opens2s_edge.export.pipeline import export_bundle

    export = ["export", "--checkpoint", str(tiny_default / "checkpoint"), "--decoder", str(tiny_default / "decoder"),
              "--max-context", "256", "--force", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's notes")
    web = tmp_path / "web"  # another program's manifest.json is not a bundle's
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my app"}')
    (web / "index.js").write_text("console.log(1)")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    added = shutil.copytree(tiny_bundle, tmp_path / "added")  # a bundle the user put a reply into
    (added / "reply.wav").write_bytes(b"RIFF")
    for out, needles in ((mine, ("holds notes.txt", "no manifest.json")),
                         (web, ("index.js and manifest.json", "not a bundle manifest", "no bundle holds index.js")),
                         (a_file, ("is a file",)), (added, ("does not list reply.wav",))):
        before = _snapshot(out)
        run = _cli(*export, str(out))
        _refused(run, f"--out {out}", "left untouched", *needles)
        assert "[export] opening" not in run.stdout  # refused before any work
        assert _snapshot(out) == before
    own = shutil.copytree(tiny_bundle, tmp_path / "own")  # export's own earlier output (--max-context 512)
    run = _cli(*export, str(own))
    assert run.returncode == 0, run.stderr
    assert load_bundle(own).manifest["graphs"]["llm"]["limits"]["max_context"] == 256
    empty = tmp_path / "empty"
    empty.mkdir()
    export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", empty, max_context=256, force=True,
                  progress=lambda _: None)
    assert load_bundle(empty).manifest["graphs"]["llm"]["limits"]["max_context"] == 256
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside


def test_init_force_replaces_only_its_own_folders(tmp_path: Path) -> None:
    root = tmp_path / "init"
    (root / "checkpoint").mkdir(parents=True)
    (root / "decoder").mkdir()
    run = _cli("init", "--force", str(root))  # empty folders: replaced
    assert run.returncode == 0, run.stderr
    first = _snapshot(root)
    assert ".opens2s-edge-init.json" in {Path(k).name for k in first}
    run = _cli("init", "--force", str(root))  # its own earlier output: replaced, with the same (seeded) files
    assert run.returncode == 0, run.stderr
    again = _snapshot(root)
    assert again.keys() == first.keys()
    # torch.save's zip names its records after the (temporary) file name: only the other files compare as bytes.
    assert all(again[k] == first[k] for k in first if not k.endswith(".pt"))
    (root / "decoder" / "mine.wav").write_bytes(b"RIFF")  # the user's file in init's folder
    released = shutil.copytree(root / "checkpoint", tmp_path / "released" / "checkpoint")
    (released / ".opens2s-edge-init.json").unlink()  # the released layout without init's mark: maybe real weights
    (tmp_path / "a_file").mkdir()
    (tmp_path / "a_file" / "checkpoint").write_text("a file where the folder would go")
    for out, needles in ((root, (f"{root / 'decoder'} holds", "init did not write mine.wav")),
                         (released.parent, ("has no .opens2s-edge-init.json", "released weights")),
                         (tmp_path / "a_file", ("is a file",))):
        before = _snapshot(out)
        run = _cli("init", "--force", str(out))
        _refused(run, "left untouched", *needles)
        assert "[init] writing" not in run.stdout  # both folders are checked before either is written
        assert _snapshot(out) == before
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
