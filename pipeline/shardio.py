"""Writing and reading shard files: atomic, byte-deterministic webdataset tars (uncompressed ustar).

A file appears under its final name only once it is complete (temp file, then `os.replace`). Temp files are
hidden (`.name.tmp-PID`), so neither the `train-*.tar` patterns of the dataset card nor `verify` ever see one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock, Timeout

from pipeline.errors import UserError

TEMP_MARK = ".tmp-"
BLOCK, RECORD = 512, 20 * 512  # tar block, and the record size the archive is padded to (as tarfile does)
# Every header field that could vary by machine, user or time is pinned, so bytes depend only on the data.
TAR_HEADER = {"user": "episodes", "group": "episodes", "mode": 0o444, "mtime": 0}


def _header_template() -> tuple[bytes, bytes, int]:
    """The parts of a ustar header around (name, size), and their byte sum for the checksum."""
    def field(text: str, width: int) -> bytes:
        return text.encode("ascii").ljust(width, b"\0")

    def octal(value: int, width: int) -> bytes:
        return f"{value:0{width - 1}o}".encode("ascii") + b"\0"

    middle = octal(TAR_HEADER["mode"], 8) + octal(0, 8) + octal(0, 8)  # mode, uid, gid
    tail = (octal(TAR_HEADER["mtime"], 12) + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000"
            + field(TAR_HEADER["user"], 32) + field(TAR_HEADER["group"], 32) + b"\0" * (8 + 8 + 155 + 12))
    return middle, tail, sum(middle) + sum(tail)


_MIDDLE, _TAIL, _TEMPLATE_SUM = _header_template()


def tar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file, byte-identical to what tarfile (and so webdataset.TarWriter) writes
    with TAR_HEADER; name must be ASCII and at most 100 bytes."""
    name_field = name.encode("ascii").ljust(100, b"\0")
    size_field = f"{size:011o}".encode("ascii") + b"\0"
    checksum = _TEMPLATE_SUM + sum(name_field) + sum(size_field)  # checksum field itself counts as 8 spaces
    tail = _TAIL[:12] + f"{checksum:06o}".encode("ascii") + b"\0 " + _TAIL[20:]
    return name_field + _MIDDLE + size_field + tail


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member: header, data, zero padding to a whole block."""
    if len(name) > 100 or not name.isascii():
        raise ValueError(f"tar member name {name!r} must be ASCII and at most 100 bytes")
    return b"".join((tar_header(name, len(data)), data, b"\0" * (-len(data) % BLOCK)))


def tar_end(offset: int) -> bytes:
    """End-of-archive (two zero blocks), padded to a whole record, after `offset` bytes of members."""
    return b"\0" * (2 * BLOCK + (-(offset + 2 * BLOCK) % RECORD))


def write_shard(path: Path, samples: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """Write (key, json bytes) samples as the webdataset tar `path` (one member `<key>.json` each);
    returns (sample count, sha256 hex), hashed while writing rather than by reading the file back.

    The bytes are those of webdataset.TarWriter(mtime=0, **TAR_HEADER), encoded here because TarWriter's
    per-member cost (TarInfo copies, pax checks, stream buffering) was as large as sampling an episode, and
    because its header bytes follow the running Python's tarfile version while these are pinned."""
    def write(raw) -> tuple[int, str]:
        sha256, count, offset = hashlib.sha256(), 0, 0
        for key, data in samples:
            member = tar_member(f"{key}.json", data)
            sha256.update(member)
            raw.write(member)
            count, offset = count + 1, offset + len(member)
        end = tar_end(offset)
        sha256.update(end)
        raw.write(end)
        return count, sha256.hexdigest()

    return write_atomically(path, write)


def write_atomically(path: Path, write_to):
    """Call `write_to(file)` on a temp file, then move it to `path`; on any failure, remove the temp file."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb", buffering=1 << 20) as raw:  # few large writes: syscalls cost per call
            result = write_to(raw)
            raw.flush()
            os.fsync(raw.fileno())  # the data is on disk before the name says it is complete
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write (a full disk) names no file: say which one it was
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda raw: raw.write(data))


def check_writable_dir(directory: Path, flag: str) -> None:
    """Fail now, with one line naming the flag, rather than after minutes of work that cannot be saved."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe = Path(directory) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {flag} {directory}: {err.strerror or err}") from None


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def read_shard(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every member, in file order; raises tarfile.TarError/EOFError if damaged."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                yield member.name, None
                continue
            yield member.name, tar.extractfile(member).read()


def swap_dir_in(fresh: Path, target: Path, old: Path) -> None:
    """Put the complete directory `fresh` in the place of `target`. An earlier `target` is moved to `old` first
    and put back if the swap fails or is interrupted, so it goes whole or stays whole; removing `old` after a
    swap is the caller's."""
    if not target.exists():
        os.replace(fresh, target)
        return
    os.replace(target, old)
    try:
        os.replace(fresh, target)
    except BaseException:
        os.replace(old, target)
        raise


@contextlib.contextmanager
def exclusive(lock_file: Path, busy: str):
    """Hold `lock_file` for the block, or fail at once with UserError(busy) while another process holds it:
    one writer at a time. The OS drops the lock when its holder dies."""
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(busy) from None
    try:
        yield
    finally:
        lock.release()
