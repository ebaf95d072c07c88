"""``probekit.cli`` with the store written to a disk that has a few blocks left (tests/cli/test_cli_filesystem.py)."""
import errno
import io
import os
import sys

import h5py

from probekit.cli import main
from probekit.store import _writer

BLOCK = 4096


class SmallDisk(io.RawIOBase):
    """A new file on a disk with ``free`` blocks left, as ext4 or xfs allocate them: a write into a
    4 KiB block the file does not hold yet takes a free block, and fails with ENOSPC when none is left
    (nothing of it lands); rewriting a held block takes none; truncate makes a sparse hole."""

    def __init__(self, path, free):
        self.f, self.free, self.held = open(path, "w+b"), free, set()

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, b):
        return self.f.readinto(b)

    def truncate(self, size=None):
        return self.f.truncate(size)

    def flush(self):
        self.f.flush()

    def write(self, b):
        at = self.f.tell()
        new = set(range(at // BLOCK, (at + len(b) - 1) // BLOCK + 1)) - self.held if len(b) else set()
        if len(new) > self.free:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.free -= len(new)
        self.held |= new
        return self.f.write(b)


def on_small_disk(path, mode):
    assert mode == "w", mode  # the store is new
    return h5py.File(SmallDisk(path, int(os.environ["PK_FREE_BLOCKS"])), mode)


_writer._open_for_writing = on_small_disk
code = main(sys.argv[1:])
# HDF5 would close the abandoned file at exit, through this Python file object while the interpreter
# is torn down; a file of the operating system (the sec2 driver) needs no such care, see
# test_an_abandoned_store_file_lets_the_process_exit_cleanly
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
