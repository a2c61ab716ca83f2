"""Ray's storage (a local folder, a shared file system or a URI such as s3://): copying the best and last
models there from a worker and back to the driver, through pyarrow's file systems as Ray Train does."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow.fs


def is_uri(path: str) -> bool:
    return "://" in path


def storage_filesystem(storage_path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, root path in it) of Ray's storage: a local folder or a URI (s3://, gs://)."""
    if is_uri(storage_path):
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), storage_path


def upload_folder(local: Path, storage_path: str, relative: str) -> None:
    """Replace STORAGE/relative with a copy of `local` (written beside it first, then moved over)."""
    fs, root = storage_filesystem(storage_path)
    dest, staging = f"{root}/{relative}", f"{root}/{relative}.uploading"
    fs.delete_dir_contents(staging, missing_dir_ok=True)
    pyarrow.fs.copy_files(str(local), staging, destination_filesystem=fs)
    if fs.get_file_info(dest).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(dest)
    fs.move(staging, dest)


def download_folder(storage_path: str, relative: str, local: Path) -> Path | None:
    """Copy STORAGE/relative to `local` (nothing to do when they are the same folder); None if it is absent."""
    fs, root = storage_filesystem(storage_path)
    source = f"{root}/{relative}"
    if fs.get_file_info(source).type == pyarrow.fs.FileType.NotFound:
        return None
    if not is_uri(storage_path) and Path(source).resolve() == local.resolve():
        return local
    shutil.rmtree(local, ignore_errors=True)
    pyarrow.fs.copy_files(source, str(local), source_filesystem=fs)
    return local
