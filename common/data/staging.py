"""Folders that appear whole or not at all: everything that writes a dataset, a sequence or a cache writes into a
temporary sibling folder and publishes it with one rename at the end, so a crash or Ctrl-C never leaves a
half-written folder that a later run would take for a finished one."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def staged_folder(dest: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest`` to write into. On a clean exit it becomes ``dest`` (``os.replace``,
    same filesystem): an existing ``dest`` is replaced when ``replace``, else kept (another process finished first;
    logged) and the new folder dropped. On an error the temporary folder is removed and the error raised."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists() and not replace:
            log.warning("%s appeared while it was being written (another process?); keeping it", dest)
        else:
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
