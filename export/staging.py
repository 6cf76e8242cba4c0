"""Writing a bundle atomically: into a temporary directory beside the destination, renamed into
place only when complete. A failed or interrupted export leaves the destination as it was."""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dyvte_rt.bundle.manifest import BundleError
from dyvte_rt.errors import InputError


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"--out {out} already exists and is not empty", hint="pass --overwrite to replace it"
        )


@contextlib.contextmanager
def staged_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty directory next to `out`; on success it becomes `out`, on any failure it is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the finished bundle private
    try:
        yield staging
        _move_into_place(staging, out, overwrite)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise BundleError(
                f"no space left on the device while writing the bundle next to {out}",
                hint="free some disk space or choose another --out",
            ) from None
        raise
    except BaseException:  # failures and Ctrl-C alike: leave nothing half-written behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished bundle into place; an old bundle is only removed after the swap."""
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise InputError(f"--out {out} appeared while exporting", hint="pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def graph_files(graph_path: Path) -> list[str]:
    """A graph's files: its .onnx and its own external data."""
    return sorted(
        p.name
        for p in graph_path.parent.iterdir()
        if p.name == graph_path.name or p.name.startswith(graph_path.name + ".")
    )
