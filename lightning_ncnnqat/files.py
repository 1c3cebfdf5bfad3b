"""Atomic writes into the export directory.

Every file is written under a hidden temporary name in the destination directory and renamed
over its final name only when complete (``os.replace`` is atomic within one filesystem), so a
reader never sees half a file and a failing step leaves nothing of its own behind. Files that
belong together (``.param`` + ``.bin``) are renamed together, after both are complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

#: Everything the export may write, in the order it writes them.
OUTPUT_NAMES = (
    "model.onnx",
    "model.table",
    "model.ncnn.param",
    "model.ncnn.bin",
    "model.ncnn.table",
    "model.int8.param",
    "model.int8.bin",
    "run_int8.py",
    "main.cpp",
    "DEPLOY.md",
    "report.json",
)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_files_atomically(export_dir: Path, contents: dict[str, bytes | str | Path]) -> list[Path]:
    """Write ``{name: bytes | text | source file}`` into ``export_dir``; all land or none.

    A ``Path`` value is copied (it may live on another filesystem). Returns the final paths.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    tmps: list[tuple[Path, Path]] = []
    try:
        for name, content in contents.items():
            final = export_dir / name
            tmp = _tmp_name(final)
            tmps.append((tmp, final))
            if isinstance(content, Path):
                shutil.copyfile(content, tmp)
            elif isinstance(content, str):
                tmp.write_text(content, encoding="utf-8", newline="\n")
            else:
                tmp.write_bytes(content)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, final in tmps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in tmps:
            if tmp.exists():
                tmp.unlink()
    return [final for _, final in tmps]


def remove_stale_outputs(export_dir: Path) -> list[str]:
    """Remove outputs of an earlier export (so a failed step cannot leave a stale file that
    looks like it belongs to this model) and leftover temporaries. Returns what was removed."""
    removed = []
    if not export_dir.is_dir():
        return removed
    for name in OUTPUT_NAMES:
        p = export_dir / name
        if p.is_file():
            p.unlink()
            removed.append(name)
    for p in export_dir.glob(".model.*.tmp"):
        p.unlink()
        removed.append(p.name)
    for p in export_dir.glob(".report.json.*.tmp"):
        p.unlink()
        removed.append(p.name)
    return removed
