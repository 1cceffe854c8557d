"""Artifact store on a local (or shared) directory: the embedded default."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from imagine.storage.base import ArtifactNotFound, ArtifactStore, check_key


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _atomic_write(self, key: str, write) -> int:  # noqa: ANN001 - callable(fileobj)
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def put_file(self, key: str, source: Path) -> int:
        def copy(fh: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, fh)

        return self._atomic_write(key, copy)

    def put_bytes(self, key: str, data: bytes) -> int:
        return self._atomic_write(key, lambda fh: fh.write(data))

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise ArtifactNotFound(key) from e

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as e:
            raise ArtifactNotFound(key) from e

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # drop the job's folder the key emptied (`inputs/<tenant>/<job>/`): only that one, never a shared parent a
        # concurrent writer may be creating a sibling in
        if path.parent != self.root:
            with contextlib.suppress(OSError):  # not empty, or gone
                path.parent.rmdir()
