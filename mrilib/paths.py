"""Every path the project uses, in one place (Cookiecutter Data Science habit)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MRILIB_CACHE", ROOT / "cache"))
NOTEBOOKS = ROOT / "notebooks"
SHARED_DATA = ROOT.parent / "shared" / "data" / "alzheimer_mri"
# Generators a GPU trained and the project keeps in git (the one chapters 2-3 use), so that a
# checkout without a GPU runs those chapters from a real generator; the cache is looked at first.
KEPT_GENERATORS = ROOT / "generators"


def preset_name() -> str:
    """The preset selected by ``MRILIB_PRESET`` (``thesis`` unless told otherwise)."""
    return os.environ.get("MRILIB_PRESET", "thesis")


@contextlib.contextmanager
def preset_env(preset: str):
    """``MRILIB_PRESET=preset`` for the duration: every module reads the same preset."""
    before = os.environ.get("MRILIB_PRESET")
    os.environ["MRILIB_PRESET"] = preset
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MRILIB_PRESET", None)
        else:
            os.environ["MRILIB_PRESET"] = before


def figures_dir() -> Path:
    """Where figures go: ``figures/`` for the full protocol, ``cache/quick/`` otherwise.

    Quick runs (tests, nbval, seminars) must never overwrite the committed figures
    of the full GPU run.
    """
    if preset_name() == "thesis":
        return ROOT / "figures"
    return CACHE / preset_name() / "figures"


def results_dir() -> Path:
    """Where result tables go; same rule as :func:`figures_dir`."""
    if preset_name() == "thesis":
        return ROOT / "results"
    return CACHE / preset_name() / "results"


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; a seminar's shared server must be able to read ours.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, flag: str, kind: str = "folder") -> Path:
    """``path`` if a ``kind`` ("folder" or "file") can be written there, else a ValueError
    naming ``flag``: checked before a long run, so its results are not lost at the end.

    Nothing is created: the nearest existing folder on the way must accept a new file.
    """
    path = Path(path).expanduser()
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder; give a folder "
                         f"(it is created if missing)")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name inside it")
    start = path if kind == "folder" else path.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, so nothing can "
                         f"be written below it; give another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {str(path)!r}: cannot write in {str(existing)!r} "
                         f"({err.strerror or err}); give a path you can write to") from None
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a power loss (a paid image's file must not
    vanish while the manifest row that says it exists survives). POSIX only."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
