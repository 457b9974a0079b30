"""What every result row carries about how it was made: code version, packages, device."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata

from . import paths


def provenance(device=None) -> dict:
    """Git commit and dirty flag, package versions and device name, for every row."""
    from .device import device_name

    return {**git_state(), **package_versions(), "device_name": device_name(device),
            "host": platform.node()}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(paths.ROOT), *args], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> dict:
    """The checkout's commit, whether its code differs from it, and a digest of that diff.

    ``MRILIB_GIT_COMMIT`` (and ``MRILIB_GIT_DIRTY``) name the commit of a copy of the tree
    that travelled without its history (tools/gpu/prepare.sh records them); they win over
    any ``.git`` the copy holds.
    """
    if os.environ.get("MRILIB_GIT_COMMIT"):
        dirty = os.environ.get("MRILIB_GIT_DIRTY")
        return {"git_commit": os.environ["MRILIB_GIT_COMMIT"],
                "git_dirty": None if dirty is None else dirty == "1", "git_diff_sha1": None}
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    # Results and figures are what the run writes; they do not make its code dirty.
    status = _git("status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)figures")
    diff = _git("diff", "HEAD", "--", "mrilib") if commit else None
    return {"git_commit": commit or "uncommitted",
            "git_dirty": bool(status and status.strip()) if status is not None else None,
            "git_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def package_versions() -> dict:
    """Versions of the packages a result depends on (None where not installed)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "diffusers", "numpy", "mrilib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
