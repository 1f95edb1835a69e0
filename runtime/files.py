"""Writing outputs so that a reader never sees half of one: write beside the target, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; what we write is meant to be read as any file the user
    creates is, so it gets the mode the user's umask gives."""
    os.chmod(path, mode & ~_umask())


PARTIAL = ".partial"


def _remove_stale_partials(path: Path) -> None:
    """Partial folders of an earlier run for `path` whose writer is gone (killed, power lost) are removed; the
    writer's pid is in the folder's name (`.NAME.partial.PID.<random suffix>`)."""
    for stale in path.parent.glob(f".{path.name}{PARTIAL}.*"):
        try:
            pid = int(stale.name[len(f".{path.name}{PARTIAL}."):].split(".")[0])
        except ValueError:
            continue  # not one of ours: left alone
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same extension, so writers that go by it still work). It replaces
    `path` when the block succeeds and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{PARTIAL}{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _as_created(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` that replaces it (and anything there) when the block succeeds; on
    failure or interruption it is removed and `path` is left as it was. A folder left by a killed earlier run
    is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}.{os.getpid()}.", dir=path.parent))
    try:
        yield tmp
        for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _as_created(sub, 0o777)
        for f in tmp.rglob("*"):
            if f.is_file():
                _as_created(f, 0o666)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """`tmp` renamed to `path`. What was at `path` is first renamed aside (within the same folder, so both renames
    are atomic) and removed only once the new folder is in place: at every instant `path` is the old output or the
    new one, never a half-deleted one. The aside name is a partial of this process, so if it is killed between the
    renames the next writer of `path` removes it."""
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    old = tmp.parent / f"{tmp.name}.replaced"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)  # anything left is a stale partial, removed by the next writer
    else:
        old.unlink(missing_ok=True)


def holds(folder: Path, names: Iterable[str] | None = None, shown: int = 4) -> str:
    """What a folder holds, for a message: `notes.txt, data/ and 3 more`. `names`: only these entries."""
    names = sorted(f"{n}/" if (folder / n).is_dir() else n
                   for n in (names if names is not None else (p.name for p in folder.iterdir())))
    if len(names) > shown:
        return f"{', '.join(names[:shown])} and {len(names) - shown} more"
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1] if names else "")))


def replace_refusal(path: Path, not_ours: Callable[[Path], str | None], what: str,
                    option: str | None = None) -> str | None:
    """Before any work: why `--force` may not replace `path`, or None when it may: it does not exist, is an empty
    folder, or is a folder `not_ours` recognises as a `what` (it returns None for one, else what is wrong with it). A
    file, a link or anyone else's folder is never replaced: the message says what is there and what to do. `option`
    names the path in messages (`--out`)."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    other = f"another {option}" if option else "another folder"
    if path.is_symlink():
        return (f"{label} is a symbolic link; --force replaces only a {what} or an empty folder, never through a "
                f"link: give the folder it points to, or {other}")
    if not path.exists():
        return None
    if not path.is_dir():
        return (f"{label} is a file; --force replaces only a {what} or an empty folder, so it was left untouched: "
                f"remove it yourself or choose {other}")
    try:
        if not any(path.iterdir()):
            return None
        why = not_ours(path)
        listing = holds(path)
    except OSError as exc:
        return f"{label} cannot be read ({exc.strerror or exc}), so it is not replaced"
    if why is None:
        return None
    return (f"{label} holds {listing}, and is not a {what} ({why}); --force replaces only such a folder or an empty "
            f"one, so it was left untouched: move those files away or choose {other}")


AUDIO_SUFFIXES = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}


def check_audio_output(path: Path, option: str = "--out", sample_rate: int = 22050) -> Path:
    """Before any work: `path` can take a 16-bit audio file (a known extension, not a folder, a writable place).
    A tiny file of the same kind is written beside it and removed, so permission and format are known now."""
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; expected a file name ending in "
                         f"{', '.join(AUDIO_SUFFIXES)}")
    fmt = AUDIO_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{option} {path}: cannot write {path.suffix or 'a file without an extension'}; "
                         f"expected {', '.join(AUDIO_SUFFIXES)}")
    probe = path.parent / f".{path.stem}.check.{os.getpid()}{path.suffix}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(probe, np.zeros(8, np.float32), sample_rate, format=fmt,
                 subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    except (OSError, sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"{option} {path} cannot be written: {exc}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the probe was never made (no such folder): nothing to remove
    return path


def write_audio(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit audio (Vorbis for .ogg), written beside `path` and renamed: no half-written file is ever left."""
    import soundfile as sf

    fmt = AUDIO_SUFFIXES.get(Path(path).suffix.lower(), "WAV")
    try:
        with atomic_file(Path(path)) as tmp:
            sf.write(tmp, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, format=fmt,
                     subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    except (sf.LibsndfileError, RuntimeError) as exc:  # libsndfile's own report of a failed write (disk full)
        raise OSError(str(exc)) from None


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    with atomic_file(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: Path, error: type[Exception], what: str = "file") -> dict:
    """A JSON file, or `error` naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"missing {what} {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc
