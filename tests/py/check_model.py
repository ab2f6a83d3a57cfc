#!/usr/bin/env python3
"""Validate a physiofs dataset model written to a directory.

Usage: check_model.py DIR KIND      (KIND = dicom | jpg)

Checks (exit status 1 on any failure):
- every .dcm is read by pydicom; pixel_array shape == (Rows, Columns),
  values <= 4095; PatientID == path subject; StudyID == path study;
  StudyInstanceUID starts with "2.25.<study>"; SOPInstanceUID ==
  MediaStorageSOPInstanceUID == "2.25.<int of first 32 hex digits of dicom_id>";
  transfer syntax is explicit VR little endian;
- every .jpg is decoded by PIL (Image.open(f).load());
- every .csv.gz is read by pandas with exactly the expected columns, and its
  rows agree with the files present;
- reports (.txt under files/) look like reports; IMAGE_FILENAMES lists every image;
- `sha256sum -c SHA256SUMS.txt` passes (run in DIR).
"""
import gzip
import os
import re
import subprocess
import sys

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
          "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
          "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
COLUMNS = {
    "cxr-record-list.csv.gz": ["subject_id", "study_id", "dicom_id", "path"],
    "cxr-study-list.csv.gz": ["subject_id", "study_id", "path"],
    "mimic-cxr-2.0.0-metadata.csv.gz": [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"],
    "mimic-cxr-2.0.0-chexpert.csv.gz": ["subject_id", "study_id"] + LABELS,
    "mimic-cxr-2.0.0-negbio.csv.gz": ["subject_id", "study_id"] + LABELS,
    "mimic-cxr-2.0.0-split.csv.gz": ["dicom_id", "study_id", "subject_id", "split"],
}
TOP = {
    "dicom": ["LICENSE.txt", "SHA256SUMS.txt", "cxr-record-list.csv.gz", "cxr-study-list.csv.gz"],
    "jpg": ["IMAGE_FILENAMES", "LICENSE.txt", "README", "SHA256SUMS.txt",
            "mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz",
            "mimic-cxr-2.0.0-negbio.csv.gz", "mimic-cxr-2.0.0-split.csv.gz"],
}
IMG_RE = re.compile(r"^files/p(\d\d)/p(1\d{7})/s(5\d{7})/([0-9a-f]{8}(?:-[0-9a-f]{8}){4})\.(dcm|jpg)$")
TXT_RE = re.compile(r"^files/p(\d\d)/p(1\d{7})/s(5\d{7})\.txt$")

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def main():
    root, kind = sys.argv[1], sys.argv[2]
    names = []
    for dp, _, fns in os.walk(root):
        for fn in fns:
            names.append(os.path.relpath(os.path.join(dp, fn), root).replace(os.sep, "/"))
    names.sort()
    top = sorted(n for n in names if "/" not in n)
    if top != TOP[kind]:
        fail(f"top-level files {top} != {TOP[kind]}")
    images, reports = [], []
    for n in names:
        if "/" not in n:
            continue
        m = IMG_RE.match(n)
        t = TXT_RE.match(n)
        if m:
            if m.group(1) != m.group(2)[:2]:
                fail(f"pNN mismatch {n}")
            if m.group(5) != ("dcm" if kind == "dicom" else "jpg"):
                fail(f"wrong image extension {n}")
            images.append((n, m.group(2), m.group(3), m.group(4)))
        elif t and kind == "dicom":
            reports.append((n, t.group(2), t.group(3)))
        else:
            fail(f"unexpected file {n}")
    if not images:
        fail("no images")

    if kind == "dicom":
        import pydicom
        for n, subj, study, did in images:
            ds = pydicom.dcmread(os.path.join(root, n))
            if ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.1":
                fail(f"{n}: transfer syntax {ds.file_meta.TransferSyntaxUID}")
            if ds.file_meta.MediaStorageSOPClassUID not in ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1"):
                fail(f"{n}: SOP class {ds.file_meta.MediaStorageSOPClassUID}")
            arr = ds.pixel_array
            if arr.shape != (ds.Rows, ds.Columns):
                fail(f"{n}: pixel_array shape {arr.shape} != {(ds.Rows, ds.Columns)}")
            if int(arr.max()) > 4095:
                fail(f"{n}: pixel value > 4095")
            if str(ds.PatientID) != subj:
                fail(f"{n}: PatientID {ds.PatientID} != {subj}")
            if str(ds.StudyID) != study:
                fail(f"{n}: StudyID {ds.StudyID} != {study}")
            if not str(ds.StudyInstanceUID).startswith("2.25." + study):
                fail(f"{n}: StudyInstanceUID {ds.StudyInstanceUID}")
            want_uid = "2.25." + str(int(did.replace("-", "")[:32], 16))
            if ds.SOPInstanceUID != want_uid or ds.file_meta.MediaStorageSOPInstanceUID != want_uid:
                fail(f"{n}: SOPInstanceUID {ds.SOPInstanceUID} != {want_uid}")
            if ds.ViewPosition not in ("PA", "AP", "LATERAL", "LL"):
                fail(f"{n}: ViewPosition {ds.ViewPosition}")
            for attr, val in (("BitsAllocated", 16), ("BitsStored", 12), ("HighBit", 11),
                              ("PixelRepresentation", 0), ("SamplesPerPixel", 1)):
                if getattr(ds, attr) != val:
                    fail(f"{n}: {attr} = {getattr(ds, attr)}")
            if ds.PhotometricInterpretation != "MONOCHROME2" or not re.match(r"^\d{8}$", ds.StudyDate):
                fail(f"{n}: photometric/date")
            if len(ds.PixelData) != ds.Rows * ds.Columns * 2:
                fail(f"{n}: PixelData length")
        for n, subj, study in reports:
            txt = open(os.path.join(root, n), encoding="utf-8").read()
            if "FINAL REPORT" not in txt or "FINDINGS:" not in txt or "IMPRESSION:" not in txt:
                fail(f"{n}: not a report")
        studies_with_images = {(s, t) for _, s, t, _ in images}
        if studies_with_images != {(s, t) for _, s, t in reports}:
            fail("reports and image studies differ")
    else:
        from PIL import Image
        for n, *_ in images:
            with open(os.path.join(root, n), "rb") as f:
                im = Image.open(f)
                im.load()
                if im.mode != "L":
                    fail(f"{n}: mode {im.mode}")
        listed = open(os.path.join(root, "IMAGE_FILENAMES")).read().split("\n")
        if listed[-1] != "" or listed[:-1] != [i[0] for i in images]:
            fail("IMAGE_FILENAMES does not list exactly the images")

    import pandas as pd
    img_ids = {did for _, _, _, did in images}
    for n in top:
        if not n.endswith(".csv.gz"):
            continue
        df = pd.read_csv(os.path.join(root, n), compression="gzip", dtype=str, keep_default_na=False)
        if list(df.columns) != COLUMNS[n]:
            fail(f"{n}: columns {list(df.columns)}")
            continue
        if "dicom_id" in df.columns and set(df["dicom_id"]) != img_ids:
            fail(f"{n}: dicom ids differ from files")
        if n in ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-negbio.csv.gz"):
            vals = set(df[LABELS].values.ravel())
            if not vals <= {"1.0", "0.0", "-1.0", ""}:
                fail(f"{n}: label values {vals}")
            if len(df) != len({(s, t) for _, s, t, _ in images}):
                fail(f"{n}: row count")
        if n == "mimic-cxr-2.0.0-split.csv.gz" and not set(df["split"]) <= {"train", "validate", "test"}:
            fail(f"{n}: split values")
        if n == "cxr-record-list.csv.gz":
            if list(df["path"]) != [i[0] for i in images]:
                fail(f"{n}: paths differ from files")
        if n == "cxr-study-list.csv.gz":
            if list(df["path"]) != [r[0] for r in reports]:
                fail(f"{n}: paths differ from reports")
        if n == "mimic-cxr-2.0.0-metadata.csv.gz" and kind == "jpg":
            dims = {r.dicom_id: (int(r.Rows), int(r.Columns)) for r in df.itertuples()}
            for p, _, _, did in images:
                with Image.open(os.path.join(root, p)) as im:
                    if (im.height, im.width) != dims[did]:
                        fail(f"{p}: size {im.size} vs metadata {dims[did]}")

    sums = open(os.path.join(root, "SHA256SUMS.txt")).read().splitlines()
    covered = {line.split("  ", 1)[1] for line in sums}
    want = set(top) - {"SHA256SUMS.txt"}
    if kind == "jpg" and len(names) <= 2000:
        want |= {n for n in names if "/" in n}
    if covered != want:
        fail(f"SHA256SUMS.txt covers {sorted(covered)[:5]}..., want {sorted(want)[:5]}...")
    r = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS.txt"], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"sha256sum -c failed: {r.stdout} {r.stderr}")

    print(f"{kind}: checked {len(images)} images, {len(reports)} reports, {len(top)} top-level files:",
          "FAILED" if failures else "OK")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
