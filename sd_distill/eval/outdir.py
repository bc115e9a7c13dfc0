"""The comparison's ``--out_dir``: checked before any model loads, never a file written over that this
tool did not write, and every file replaced only once its new version is complete.

Ours are the files named in the folder's manifest (written before the first image, so even a run
killed half-way leaves its files recognisable) or in a ``report.json`` of ours (folders written
before the manifest existed). Other files in the folder are left alone: we only write our own names.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import fsync_dir, remove_stale_temps, temp_sibling
from .config import CompareError
from .prompts import image_file_name

REPORT_FILES = ("grid.png", "report.md", "report.json")
CURVE_FILE = "guidance_curve.png"  # with several guidance scales
MANIFEST = ".sd_distill_compare_files.json"


def planned_files(prompts: list[str], column_keys: list[str], curve: bool = False) -> list[str]:
    """Every file a run writes, relative to ``out_dir`` (images first, ``report.json`` last)."""
    images = [f"{key}/{image_file_name(i, p)}" for key in column_keys for i, p in enumerate(prompts)]
    return images + ([CURVE_FILE] if curve else []) + list(REPORT_FILES)


def out_dir_error(out: Path, planned: list[str]) -> str | None:
    """Why the comparison cannot write ``planned`` into ``out`` (``None`` when it can)."""
    if out.exists() and not out.is_dir():
        return f"--out_dir {out} is a file, not a folder; give a folder"
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return f"--out_dir {out} cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK) or (existing == out and not _can_create_in(out)):
        return f"--out_dir {out} is not writable ({existing} is read-only for this user); give another folder"
    ours = owned_files(out) if out.is_dir() else set()
    foreign = [f for f in planned if (out / f).exists() and f not in ours]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return (
            f"--out_dir {out} holds files this tool did not write and would replace: {', '.join(foreign[:3])}{more}; "
            "give another --out_dir or move them"
        )
    return None


def _can_create_in(folder: Path) -> bool:
    """Really try: ``os.access`` says yes on a read-only mount for some file systems."""
    probe = folder / f".sd_distill_probe_{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def owned_files(out: Path) -> set[str]:
    """Files of ``out`` an earlier comparison wrote (manifest, or a report.json of ours)."""
    owned: set[str] = set()
    manifest = _read_json(out / MANIFEST)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), list):
        owned.update(str(f) for f in manifest["files"])
    report = _read_json(out / "report.json")
    if isinstance(report, dict) and "models" in report and isinstance(report.get("images"), list):
        owned.update(REPORT_FILES)
        for entry in report["images"]:
            if isinstance(entry, dict) and isinstance(entry.get("files"), dict):
                owned.update(str(f) for f in entry["files"].values())
    return owned


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def claim(out: Path, planned: list[str]) -> None:
    """Record ``planned`` as ours and withdraw an earlier comparison's report, before writing any of it."""
    out.mkdir(parents=True, exist_ok=True)
    for name in [*planned, MANIFEST]:  # half files of a comparison killed while writing them
        if (out / name).parent.is_dir():
            remove_stale_temps((out / name).parent, Path(name).name)
    earlier = owned_files(out)
    files = sorted(earlier | set(planned))
    write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"files": files}, indent=1)))
    _withdraw_reports(out, earlier)


# Why the earlier report goes before the first new image, rather than rendering under temporary names
# and swapping the set in at the end: the set is many files beside the user's own, so the swap is many
# renames, and a kill or a full disk half-way through it mixes two runs all the same. Instead the old
# report goes first and the new one comes last (after its images, and after settle): a comparison that
# does not finish leaves images and no report, never a report beside images it does not describe.
def _withdraw_reports(out: Path, earlier: set[str]) -> None:
    """Remove the reports ``earlier`` (ours) names; report.json first, as it marks a complete folder."""
    for name in ("report.json", "report.md", "grid.png", CURVE_FILE):
        if name in earlier:
            try:
                (out / name).unlink(missing_ok=True)
            except OSError as exc:
                raise CompareError(f"cannot remove {out / name} of an earlier comparison: {exc.strerror}") from None
    fsync_dir(out)  # gone for good before a new image lands, even if the machine then loses power


def settle(out: Path, planned: list[str]) -> list[str]:
    """Once this run's images are all written, before its reports: remove what an earlier comparison here
    wrote and this one does not (images of prompts or scales no longer asked for), so the folder shows
    one run, and a report is never beside images it does not show; returns them."""
    stale = sorted(f for f in owned_files(out) - set(planned) - {MANIFEST} if (out / f).is_file())
    for name in stale:
        path = out / name
        path.unlink()
        if path.parent != out and not any(path.parent.iterdir()):
            path.parent.rmdir()  # a column folder left empty
    write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"files": sorted(planned)}, indent=1)))
    return stale


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` next to ``path``, then rename: an old file is replaced only by a complete new one.
    A full disk is one CompareError naming the file and the free space."""
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise CompareError(f"no space left on the device writing {path} ({free:.0f} MB free there)") from None
        raise CompareError(f"cannot write {path}: {exc.strerror or exc}") from None
