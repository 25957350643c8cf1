"""Folders written whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def save_folder_whole(output_dir: str | os.PathLike, *savables, purpose: str = "writing") -> Path:
    """`save_pretrained` every object of `savables` into `output_dir`, which then holds all of them or, on any
    failure, exactly what it held before.

    They are saved into a temporary sibling that is renamed into place; an existing folder is moved aside first (a
    folder cannot be renamed over a non-empty one) and comes back if the rename fails.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.{purpose}-", dir=output_dir.parent))
    retired = None
    try:
        for savable in savables:
            savable.save_pretrained(staging)
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.replaced-", dir=output_dir.parent))
            os.replace(output_dir, retired / output_dir.name)
        os.replace(staging, output_dir)
    except BaseException:
        if retired is not None and not output_dir.exists() and (retired / output_dir.name).exists():
            os.replace(retired / output_dir.name, output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return output_dir
