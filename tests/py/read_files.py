#!/usr/bin/env python3
"""Read files the way a user's program does and report what each read gave.

Usage: read_files.py ROOT < NAMES      (one path relative to ROOT per line)

For each name, in order: open it, read it to the end with plain read(2) calls of 1 MiB, and
print one JSON line on stdout:
  {"name": N, "sha256": HEX, "bytes": COUNT, "reads": CALLS}         read to the end
  {"name": N, "errno": "EIO", "op": "read", "offset": OFF}           a call failed
A failed file is not retried. The SHA-256 is of the bytes read; the caller compares it with
the file's expected one (so a reader that took an error for an end of file is caught there).
Exit status: 0 if every file was read to the end, 1 if any call failed, 2 on bad usage.
"""
import errno
import hashlib
import json
import os
import sys

CHUNK = 1 << 20


def read_one(root, name):
    path = os.path.join(root, name)
    op, offset = "open", 0
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            h = hashlib.sha256()
            reads = 0
            op = "read"
            while True:
                b = os.read(fd, CHUNK)
                reads += 1
                if not b:
                    break
                h.update(b)
                offset += len(b)
        finally:
            os.close(fd)
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno))
        return {"name": name, "errno": code, "op": op, "offset": offset}
    return {"name": name, "sha256": h.hexdigest(), "bytes": offset, "reads": reads}


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = sys.argv[1]
    failed = 0
    for line in sys.stdin:
        name = line.rstrip("\n")
        if not name:
            continue
        r = read_one(root, name)
        failed += "errno" in r
        print(json.dumps(r), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
