#!/usr/bin/env python3
"""Decode MIMIC-CXR-JPG images from a physiofs mount with Pillow.

Usage:
    python3 examples/read_jpg.py MOUNT_ROOT [-n 20]

MOUNT_ROOT is where the JPG bucket (gs://mimic-cxr-jpg-2.1.0.physionet.org) is mounted, e.g.

    physiofs mount --billing-project MY_PROJECT --bucket mimic-cxr-jpg-2.1.0.physionet.org /mnt/cxr-jpg
    python3 examples/read_jpg.py /mnt/cxr-jpg

(`physiofs demo --model jpg /tmp/cxr-jpg` gives you a small synthetic one.)

What it does:
1. Picks N images from IMAGE_FILENAMES (one relative path per line, in the bucket root),
   falling back to walking files/ in order when it is missing.
2. Reads mimic-cxr-2.0.0-metadata.csv.gz (one row per image: dicom_id, ViewPosition,
   Rows, Columns, ...) to know each image's view.
3. Opens and fully decodes each JPG (Image.open + load), printing its size, mode and view,
   and the overall throughput.

Needs: pillow (pip install pillow); pandas is used when installed.
"""

import argparse
import collections
import csv
import gzip
import os
import sys
import time


def from_image_filenames(root, n):
    index = os.path.join(root, "IMAGE_FILENAMES")
    if not os.path.exists(index):
        return None
    out = []
    with open(index) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(line)
                if len(out) == n:
                    break
    return out


def from_tree(root, n):
    """First n .jpg files walking files/ in sorted order (stops early, unlike glob)."""
    out = []

    def walk(rel):
        with os.scandir(os.path.join(root, rel)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if len(out) >= n:
                return
            r = f"{rel}/{e.name}"
            if e.is_dir():
                walk(r)
            elif e.name.endswith(".jpg"):
                out.append(r)

    if os.path.isdir(os.path.join(root, "files")):
        walk("files")
    return out


def read_metadata(root):
    """dicom_id -> (ViewPosition, Rows, Columns) from mimic-cxr-2.0.0-metadata.csv.gz ({} if absent)."""
    path = os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz")
    if not os.path.exists(path):
        return {}
    cols = ["dicom_id", "ViewPosition", "Rows", "Columns"]
    try:
        import pandas as pd

        df = pd.read_csv(path, compression="gzip", usecols=cols, dtype=str, keep_default_na=False)
        rows = df[cols].itertuples(index=False)
    except ImportError:
        with gzip.open(path, "rt", newline="") as f:
            rows = [tuple(r[c] for c in cols) for r in csv.DictReader(f)]
    return {d: (v or "-", int(r), int(c)) for d, v, r, c in rows}


def main():
    ap = argparse.ArgumentParser(
        description="Decode MIMIC-CXR-JPG images on a physiofs mount with Pillow.",
        usage="%(prog)s MOUNT_ROOT [-n N]",
    )
    ap.add_argument("root", metavar="MOUNT_ROOT", help="mount root of the JPG bucket")
    ap.add_argument("-n", "--count", type=int, default=20, help="number of images to decode (default 20)")
    args = ap.parse_args()

    try:
        from PIL import Image
    except ImportError:
        sys.exit("read_jpg.py needs Pillow: pip install pillow")

    root = args.root
    if not os.path.isdir(root):
        sys.exit(f"{root} is not a directory (is the bucket mounted there?)")

    paths = from_image_filenames(root, args.count)
    source = "IMAGE_FILENAMES"
    if paths is None:
        paths = from_tree(root, args.count)
        source = "a walk of files/"
    if not paths:
        sys.exit(f"no .jpg files found under {root} (is this the JPG bucket mimic-cxr-jpg-2.1.0?)")
    print(f"found {len(paths)} JPG files via {source}")

    t0 = time.perf_counter()
    meta = read_metadata(root)
    if meta:
        print(f"metadata: {len(meta)} rows from mimic-cxr-2.0.0-metadata.csv.gz in {time.perf_counter() - t0:.3f} s")
    else:
        print("metadata: mimic-cxr-2.0.0-metadata.csv.gz not found, views unknown")

    print(f"\n{'width x height':>15} {'mode':>4} {'view':>8} {'KB':>8}  path")
    views, modes = collections.Counter(), collections.Counter()
    total_bytes, agree = 0, 0
    t0 = time.perf_counter()
    for rel in paths:
        path = os.path.join(root, rel)
        with Image.open(path) as im:
            im.load()  # decode every pixel (Image.open alone only reads the header)
            w, h, mode = im.width, im.height, im.mode
        size = os.path.getsize(path)
        total_bytes += size
        dicom_id = os.path.basename(rel)[: -len(".jpg")]
        view, rows, cols = meta.get(dicom_id, ("?", None, None))
        if (rows, cols) == (h, w):
            agree += 1
        views[view] += 1
        modes[mode] += 1
        print(f"{f'{w}x{h}':>15} {mode:>4} {view:>8} {size / 1e3:>8.1f}  {rel}")
    dt = time.perf_counter() - t0
    print(
        f"\ndecoded {len(paths)} images in {dt:.3f} s: {len(paths) / dt:.1f} images/s, "
        f"{total_bytes / 1e6 / dt:.1f} MB/s of JPG"
    )
    print("modes:", dict(modes))
    print("views:", dict(views))
    if meta:
        print(f"size matches metadata Rows x Columns: {agree}/{len(paths)}")


if __name__ == "__main__":
    main()
