"""The faults themselves, done to real files and file systems (no mocks).

* `mount_tmpfs` / `unmount`: the store on a small tmpfs of its own.
* `fill_disk`: a filler file written until the file system answers ENOSPC.
* `corrupt_adapter`: truncate a file, flip bytes in place (same size), or remove the metadata.
* `break_checkpoint` / `restore_checkpoint`: a generator checkpoint whose weights file is cut in
  half (the server reads config.json at start and loads the weights on the first generation,
  so the generator fails while stored adapters stay servable).
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; None on success, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=60)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_disk(filler: Path, chunk: int = 1 << 20) -> int:
    """Write ``filler`` until ENOSPC (then byte by byte in smaller pieces); bytes written."""
    written = 0
    block = b"\0" * chunk
    with open(filler, "wb", buffering=0) as f:
        size = chunk
        while size >= 1:
            try:
                written += f.write(block[:size])
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                size //= 16
    return written


def corrupt_adapter(folder: Path, how: str) -> str:
    """Corrupt one stored adapter folder: ``truncate`` (safetensors cut in half), ``flip`` (16
    bytes of the safetensors' data inverted, same size), ``no_meta`` (loragen_meta.json removed),
    ``header`` (the safetensors' 8-byte header length overwritten, same size)."""
    st = folder / "adapter_model.safetensors"
    if how == "truncate":
        size = st.stat().st_size
        with open(st, "r+b") as f:
            f.truncate(size // 2)
        return f"adapter_model.safetensors truncated from {size} to {size // 2} bytes"
    if how in ("flip", "header"):
        with open(st, "r+b") as f:
            off = 0 if how == "header" else st.stat().st_size - 4096
            f.seek(off)
            data = f.read(8 if how == "header" else 16)
            f.seek(off)
            f.write(bytes(b ^ 0xFF for b in data))
        return f"{len(data)} bytes of adapter_model.safetensors inverted at offset {off}"
    if how == "no_meta":
        (folder / "loragen_meta.json").unlink()
        return "loragen_meta.json removed"
    raise ValueError(how)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def break_checkpoint(ckpt: Path) -> str:
    """Keep the weights aside as model.safetensors.good and leave a half-length copy in place."""
    w = ckpt / "model.safetensors"
    good = ckpt / "model.safetensors.good"
    os.replace(w, good)
    data = good.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    return f"model.safetensors cut from {len(data)} to {len(data) // 2} bytes"


def restore_checkpoint(ckpt: Path) -> None:
    os.replace(ckpt / "model.safetensors.good", ckpt / "model.safetensors")
