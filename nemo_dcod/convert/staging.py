"""Write a checkpoint folder all at once or not at all.

A conversion writes into ``.<name>.partial-<pid>`` beside the target; only when everything,
verification included, has succeeded is it renamed to the target (an existing target is first
moved aside, then removed). On any failure the partial folder is removed, so a failed or
interrupted run never leaves something that looks like a checkpoint at the target path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["refuse_existing", "staged_directory"]


def refuse_existing(target: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise ``FileExistsError`` if ``target`` exists and ``overwrite`` is false."""
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass {flag} (overwrite=true) to replace it.")


@contextlib.contextmanager
def staged_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging path (not yet created: NeMo's writers refuse an existing folder) that
    becomes ``target`` when the block succeeds.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is false (checked before the block).
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not staging.is_dir():
        raise RuntimeError(f"{staging}: the conversion wrote nothing")
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
