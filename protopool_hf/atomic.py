"""Atomic saves: a file, a JSON file or a whole folder is replaced in one step, or not at all.

Everything the package writes for others to read goes through here:

* `write_file` / `write_json`: the content goes to a hidden temporary sibling, is flushed to disk, then replaces the
  target with one `os.replace`. A reader sees the old file or the new one, never a half-written one.
* `replace_folder`: a model folder is filled in a hidden sibling (`.NAME.protopool-XXXX.new`) and swapped in with two
  renames (target -> `.NAME.protopool-XXXX.old`, new -> target). The target always holds one complete folder, except
  during the instant between the renames, when it is missing. A process killed there leaves both complete copies;
  the next `replace_folder` on that target (e.g. the next save) finishes the swap before it writes
  (`finish_interrupted_swap`).

Durability against power loss is attempted for files (fsync) but not for folders. A reader that loads a folder file by
file while another process swaps it can get files of both (as with any save into a shared folder).
"""

import glob
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


__all__ = ["finish_interrupted_swap", "link_or_copy", "read_json", "replace_folder", "write_file", "write_json"]

logger = logging.getLogger(__name__)


def write_file(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write `path` atomically: `write(temporary path)` fills a hidden sibling, which then replaces `path`.

    If `write` raises, `path` is left as it was and the temporary file is removed.

    Args:
        path: the file to write; its folder must exist.
        write: called with the temporary path (same folder, so the final rename cannot cross file systems).

    Returns:
        `path`.

    Example:
        ```python
        >>> import tempfile
        >>> from pathlib import Path
        >>> from protopool_hf.atomic import write_file
        >>> path = write_file(Path(tempfile.mkdtemp()) / "notes.txt", lambda tmp: tmp.write_text("hello"))
        >>> path.read_text()
        'hello'

        ```
    """
    path = Path(path)
    # A fresh name, not a mkstemp file: the file `write` creates gets the usual permissions (umask), not 0600.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as JSON (indented, sorted keys; other objects as `str`) to `path` atomically (`write_file`).

    Example:
        ```python
        >>> import tempfile
        >>> from pathlib import Path
        >>> from protopool_hf.atomic import read_json, write_json
        >>> path = write_json(Path(tempfile.mkdtemp()) / "marker.json", {"stage": "warmup", "step": 10})
        >>> read_json(path)
        {'stage': 'warmup', 'step': 10}

        ```
    """
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    return write_file(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; a ValueError naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): fix or delete it.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def replace_folder(folder: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Replace `folder` by a new one that `fill(staging folder)` writes, in one swap: all of it, or nothing.

    `fill` writes into an empty hidden sibling of `folder`; it may read the old `folder` (e.g. to carry files over),
    which stays untouched until `fill` returns. The sibling then takes `folder`'s place (module docstring) and the old
    copy is deleted. If `fill` raises, `folder` is left as it was and the sibling is removed.

    Args:
        folder: the target; created (with its parents) if missing.
        fill: writes the new content into the folder it is given.

    Returns:
        `folder`, as an absolute path.

    Raises:
        NotADirectoryError: `folder` is a file.

    Example:
        ```python
        >>> import tempfile
        >>> from pathlib import Path
        >>> from protopool_hf.atomic import replace_folder
        >>> folder = replace_folder(Path(tempfile.mkdtemp()) / "model", lambda new: (new / "a.txt").write_text("1"))
        >>> folder = replace_folder(folder, lambda new: (new / "b.txt").write_text("2"))
        >>> sorted(path.name for path in folder.iterdir())
        ['b.txt']

        ```
    """
    folder = Path(folder).absolute()
    finish_interrupted_swap(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder: pass a folder path for the model.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.protopool-", suffix=".new", dir=folder.parent))
    try:
        fill(staging)
        _swap_in(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def finish_interrupted_swap(folder: str | os.PathLike) -> None:
    """Repair a swap cut short between its two renames: no `folder`, its old copy at `.NAME.protopool-XXXX.old`.

    If the new copy (`.NAME.protopool-XXXX.new`) is there, it was complete before the first rename: it is moved into
    place and the old copy deleted. Otherwise the old copy is moved back. Nothing happens when `folder` exists.
    """
    folder = Path(folder)
    if folder.exists():
        return
    for backup in sorted(folder.parent.glob(f".{glob.escape(folder.name)}.protopool-*.old")):
        new = backup.with_suffix(".new")
        if new.is_dir():
            logger.warning("Finishing an interrupted save of %s: moving %s into place.", folder, new)
            os.rename(new, folder)
            shutil.rmtree(backup)
        else:
            logger.warning("Restoring %s from %s, left by an interrupted save.", folder, backup)
            os.rename(backup, folder)
        return


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Hard-link `source` to `target` (a symlink is recreated as a symlink); copy where links are not possible."""
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(staging: Path, folder: Path) -> None:
    """Put `staging` at `folder`; the old content, if any, ends up at `staging`'s path (for deletion)."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    backup = staging.with_suffix(".old")
    os.rename(folder, backup)
    os.rename(staging, folder)  # a crash before this line is repaired by finish_interrupted_swap
    os.rename(backup, staging)
