#!/usr/bin/env python3
"""Read MIMIC-CXR DICOM files from a physiofs mount with pydicom.

Usage:
    python3 examples/read_dicom.py MOUNT_ROOT [-n 20] [--no-pixels]

MOUNT_ROOT is where the DICOM bucket (gs://mimic-cxr-2.0.0.physionet.org) is mounted, e.g.

    physiofs mount --billing-project MY_PROJECT --bucket mimic-cxr-2.0.0.physionet.org /mnt/cxr
    python3 examples/read_dicom.py /mnt/cxr

(`physiofs demo /tmp/cxr` gives you a small synthetic one without any credentials.)

What it does:
1. Picks N files from the bucket's own index, cxr-record-list.csv.gz (subject_id, study_id,
   dicom_id, path). Reading the index is much cheaper than walking the tree: the real bucket
   has 377,110 images under 65,379 patient folders. Without the index it falls back to walking
   files/ in order and stops after N files.
2. Header scan: pydicom.dcmread(..., stop_before_pixels=True) of each file. pydicom stops at
   the PixelData element, so only the first few KiB of each ~14 MB file are fetched from the
   bucket; this is the fast way to build a table of PatientID / ViewPosition / sizes.
3. Reads one file in full and decodes its pixel_array (the whole object is downloaded).

Needs: pydicom and numpy (pip install pydicom numpy); pandas is used when installed.
"""

import argparse
import csv
import gzip
import os
import re
import sys
import time

# files/pNN/pSUBJECT/sSTUDY/DICOM_ID.dcm
PATH_RE = re.compile(r"files/p\d\d/p(\d+)/s(\d+)/([^/]+)\.dcm$")


def from_record_list(root, n):
    """First n image paths (relative to root) listed in cxr-record-list.csv.gz, or None."""
    index = os.path.join(root, "cxr-record-list.csv.gz")
    if not os.path.exists(index):
        return None
    try:
        import pandas as pd

        # nrows: only the start of the (gzip-compressed) CSV is read and decompressed.
        df = pd.read_csv(index, compression="gzip", dtype=str, nrows=n)
        paths = list(df["path"])
    except ImportError:
        paths = []
        with gzip.open(index, "rt", newline="") as f:
            for row in csv.DictReader(f):
                paths.append(row["path"])
                if len(paths) == n:
                    break
    return paths


def from_tree(root, n):
    """First n .dcm files found walking files/ in sorted order (stops early, unlike glob)."""
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
            elif e.name.endswith(".dcm"):
                out.append(r)

    if os.path.isdir(os.path.join(root, "files")):
        walk("files")
    return out


def main():
    ap = argparse.ArgumentParser(
        description="pydicom header scan (and one full pixel read) of MIMIC-CXR DICOMs on a physiofs mount.",
        usage="%(prog)s MOUNT_ROOT [-n N] [--no-pixels]",
    )
    ap.add_argument("root", metavar="MOUNT_ROOT", help="mount root of the DICOM bucket")
    ap.add_argument("-n", "--count", type=int, default=20, help="number of files to scan (default 20)")
    ap.add_argument("--no-pixels", action="store_true", help="skip the full pixel_array read")
    args = ap.parse_args()

    try:
        import pydicom
    except ImportError:
        sys.exit("read_dicom.py needs pydicom and numpy: pip install pydicom numpy")

    root = args.root
    if not os.path.isdir(root):
        sys.exit(f"{root} is not a directory (is the bucket mounted there?)")

    paths = from_record_list(root, args.count)
    source = "cxr-record-list.csv.gz"
    if paths is None:
        paths = from_tree(root, args.count)
        source = "a walk of files/"
    if not paths:
        sys.exit(f"no .dcm files found under {root} (is this the DICOM bucket mimic-cxr-2.0.0?)")
    print(f"found {len(paths)} DICOM files via {source}")

    # 1. Header scan ----------------------------------------------------------------------
    print(f"\n{'PatientID':>10} {'StudyID':>9} {'ViewPosition':>12} {'Rows x Cols':>12}  StudyInstanceUID")
    matches = 0
    t0 = time.perf_counter()
    for rel in paths:
        ds = pydicom.dcmread(os.path.join(root, rel), stop_before_pixels=True)
        patient = str(ds.get("PatientID", "?"))
        study = str(ds.get("StudyID", "?"))
        view = str(ds.get("ViewPosition", "") or "-")
        dims = f"{ds.get('Rows', '?')}x{ds.get('Columns', '?')}"
        print(f"{patient:>10} {study:>9} {view:>12} {dims:>12}  {ds.get('StudyInstanceUID', '?')}")
        # MIMIC-CXR convention: PatientID is the subject id and StudyID the study id of the path.
        m = PATH_RE.search(rel)
        if m and m.group(1) == patient and m.group(2) == study:
            matches += 1
    dt = time.perf_counter() - t0
    print(
        f"\nheader scan: {len(paths)} files in {dt:.3f} s "
        f"({len(paths) / dt:.1f} files/s, {1000 * dt / len(paths):.1f} ms/file)"
    )
    print(f"PatientID/StudyID match the path: {matches}/{len(paths)}")

    # 2. One full read ----------------------------------------------------------------------
    if not args.no_pixels:
        rel = paths[0]
        path = os.path.join(root, rel)
        t0 = time.perf_counter()
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        dt = time.perf_counter() - t0
        mb = os.path.getsize(path) / 1e6
        print(
            f"\npixel_array of {rel}:\n"
            f"  shape {arr.shape}, dtype {arr.dtype}, min {arr.min()}, max {arr.max()}\n"
            f"  read + decode: {mb:.1f} MB in {dt:.3f} s ({mb / dt:.1f} MB/s)"
        )


if __name__ == "__main__":
    main()
