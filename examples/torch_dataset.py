#!/usr/bin/env python3
"""A PyTorch Dataset over a physiofs mount of MIMIC-CXR (DICOM or JPG), fed by a DataLoader.

Usage:
    python3 examples/torch_dataset.py MOUNT_ROOT [--workers 4] [--limit 256] [--batch-size 16] [--size 224]

MOUNT_ROOT is a mount of either bucket:
- gs://mimic-cxr-2.0.0.physionet.org (DICOM): items come from cxr-record-list.csv.gz;
- gs://mimic-cxr-jpg-2.1.0.physionet.org (JPG): items come from IMAGE_FILENAMES, with the
  view (PA/AP/LATERAL/...) joined from mimic-cxr-2.0.0-metadata.csv.gz.

Each item is (image, target): image is a float32 array of shape (1, SIZE, SIZE) scaled to
[0, 1], target a dict with subject_id, study_id and view. The dataset opens files by path only
in __getitem__, so DataLoader workers (separate processes) each read from the mount in
parallel; physiofs serves concurrent reads of different files independently, so more workers
means more images/s until the network or the CPUs (decoding, resizing) are the limit.

If torch is not installed, the script says so and runs the same Dataset through a
multiprocessing.Pool with the same number of workers, so the throughput numbers still mean
something (and the example runs in CI without a multi-GB torch install).

Needs: numpy, pillow, pydicom (DICOM mount); torch optional; pandas used when installed.
"""

import argparse
import collections
import csv
import gzip
import multiprocessing
import os
import sys
import time

import numpy as np

try:
    import torch
    from torch.utils.data import DataLoader, Dataset
except ImportError:  # the Pool fallback below needs none of it
    torch = None
    Dataset = object


def read_csv_gz(path, columns):
    """Rows of a .csv.gz as tuples of the given columns (strings)."""
    try:
        import pandas as pd

        df = pd.read_csv(path, compression="gzip", usecols=columns, dtype=str, keep_default_na=False)
        return list(df[columns].itertuples(index=False, name=None))
    except ImportError:
        with gzip.open(path, "rt", newline="") as f:
            return [tuple(r[c] for c in columns) for r in csv.DictReader(f)]


def detect_kind(root):
    if os.path.exists(os.path.join(root, "cxr-record-list.csv.gz")):
        return "dicom"
    if os.path.exists(os.path.join(root, "IMAGE_FILENAMES")):
        return "jpg"
    sys.exit(f"{root}: neither cxr-record-list.csv.gz (DICOM bucket) nor IMAGE_FILENAMES (JPG bucket) found")


class MimicCxrDataset(Dataset):
    """Images of a MIMIC-CXR mount, resized to size x size, as float32 in [0, 1]."""

    def __init__(self, root, kind="auto", limit=None, size=224):
        self.root = root
        self.kind = detect_kind(root) if kind == "auto" else kind
        self.size = size
        # items: (relative path, subject_id, study_id, view or "" when only the header knows)
        if self.kind == "dicom":
            rows = read_csv_gz(os.path.join(root, "cxr-record-list.csv.gz"), ["path", "subject_id", "study_id"])
            self.items = [(p, s, t, "") for p, s, t in rows[:limit]]
        else:
            with open(os.path.join(root, "IMAGE_FILENAMES")) as f:
                paths = [line.strip() for line in f if line.strip()][:limit]
            meta_path = os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz")
            views = {}
            if os.path.exists(meta_path):
                views = {d: v for d, v in read_csv_gz(meta_path, ["dicom_id", "ViewPosition"])}
            self.items = []
            for p in paths:
                # files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg
                parts = p.split("/")
                dicom_id = parts[-1][: -len(".jpg")]
                self.items.append((p, parts[2][1:], parts[3][1:], views.get(dicom_id, "")))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        rel, subject, study, view = self.items[i]
        path = os.path.join(self.root, rel)
        if self.kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                arr = 1.0 - arr
            view = str(ds.get("ViewPosition", "") or "")
            img = Image.fromarray(arr)  # mode "F"
        else:
            with Image.open(path) as im:
                img = im.convert("L")
        img = img.resize((self.size, self.size), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32)
        if self.kind == "jpg":
            x = x / 255.0
        target = {"subject_id": int(subject), "study_id": int(study), "view": view or "?"}
        return x[None, :, :], target

    def nbytes(self):
        """Total size of the source files (for MB/s)."""
        return sum(os.path.getsize(os.path.join(self.root, it[0])) for it in self.items)


# multiprocessing.Pool fallback: each worker gets the dataset once, then only indexes.
_pool_dataset = None


def _pool_init(ds):
    global _pool_dataset
    _pool_dataset = ds


def _pool_get(i):
    x, target = _pool_dataset[i]
    return float(x.mean()), x.shape, target["view"]


def run_torch(ds, args):
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=False)
    views = collections.Counter()
    n, mean_sum, first_shape = 0, 0.0, None
    t0 = time.perf_counter()
    for images, target in loader:
        first_shape = first_shape or tuple(images.shape)
        n += images.shape[0]
        mean_sum += float(images.mean(dim=(1, 2, 3)).sum())
        views.update(target["view"])
    return n, time.perf_counter() - t0, mean_sum, views, f"batch tensor {first_shape}"


def run_pool(ds, args):
    views = collections.Counter()
    n, mean_sum, shape = 0, 0.0, None
    t0 = time.perf_counter()
    with multiprocessing.Pool(args.workers, initializer=_pool_init, initargs=(ds,)) as pool:
        for mean, shape, view in pool.imap(_pool_get, range(len(ds)), chunksize=1):
            n += 1
            mean_sum += mean
            views[view] += 1
    return n, time.perf_counter() - t0, mean_sum, views, f"item array {shape}"


def main():
    ap = argparse.ArgumentParser(
        description="PyTorch Dataset/DataLoader over a physiofs mount of MIMIC-CXR (multiprocessing.Pool without torch).",
        usage="%(prog)s MOUNT_ROOT [--workers N] [--limit N] [--batch-size N] [--size PX] [--kind auto|dicom|jpg]",
    )
    ap.add_argument("root", metavar="MOUNT_ROOT", help="mount root of the DICOM or the JPG bucket")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers / Pool processes (default 4)")
    ap.add_argument("--limit", type=int, default=256, help="use the first N images (default 256)")
    ap.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size (default 16)")
    ap.add_argument("--size", type=int, default=224, help="resize images to SIZE x SIZE (default 224)")
    ap.add_argument("--kind", choices=["auto", "dicom", "jpg"], default="auto", help="bucket kind (default: detect)")
    args = ap.parse_args()

    if not os.path.isdir(args.root):
        sys.exit(f"{args.root} is not a directory (is the bucket mounted there?)")

    t0 = time.perf_counter()
    ds = MimicCxrDataset(args.root, args.kind, args.limit, args.size)
    print(f"dataset: {len(ds)} {ds.kind} images from {args.root} (index read in {time.perf_counter() - t0:.2f} s)")
    if len(ds) == 0:
        sys.exit("no images")

    if torch is not None:
        print(f"torch {torch.__version__}: DataLoader(batch_size={args.batch_size}, num_workers={args.workers})")
        n, dt, mean_sum, views, shape = run_torch(ds, args)
    else:
        print(f"torch is not installed: skipping the torch DataLoader parts; "
              f"running the same Dataset through multiprocessing.Pool({args.workers})")
        n, dt, mean_sum, views, shape = run_pool(ds, args)

    mb = ds.nbytes() / 1e6
    print(f"loaded {n} images ({shape}) in {dt:.2f} s: {n / dt:.1f} images/s, {mb / dt:.1f} MB/s of source files")
    print(f"mean pixel value {mean_sum / max(n, 1):.3f}; views: {dict(views)}")


if __name__ == "__main__":
    main()
