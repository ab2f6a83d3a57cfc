#!/usr/bin/env python3
"""Validate a physiofs MOUNT of one MIMIC-CXR bucket (or any directory holding one).

Usage: check_mount.py ROOT KIND      (KIND = dicom | jpg)

Runs every check of check_model.py (same directory) and then cross-checks the identities
against the bucket's own indexes, which check_model.py does not:
- dicom: for every row of cxr-record-list.csv.gz, the file at `path` exists and its DICOM
  PatientID == subject_id == the pSUBJECT of the path, StudyID == study_id == the sSTUDY of
  the path, and the file name is the dicom_id; every row of cxr-study-list.csv.gz names an
  existing report of that subject/study;
- jpg: every row of mimic-cxr-2.0.0-metadata.csv.gz / -split.csv.gz names an existing
  files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg, with NN == first two digits of the subject.
Prints one summary line ending in OK or FAILED; exit status 1 on any failure.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_model  # noqa: E402


def cross_check(root, kind):
    import pandas as pd

    fail = check_model.fail
    checked = 0
    if kind == "dicom":
        import pydicom

        df = pd.read_csv(os.path.join(root, "cxr-record-list.csv.gz"), dtype=str, keep_default_na=False)
        for r in df.itertuples():
            want = f"files/p{r.subject_id[:2]}/p{r.subject_id}/s{r.study_id}/{r.dicom_id}.dcm"
            if r.path != want:
                fail(f"record list row {r.Index}: path {r.path} != {want}")
                continue
            ds = pydicom.dcmread(os.path.join(root, r.path), stop_before_pixels=True)
            if str(ds.PatientID) != r.subject_id or str(ds.StudyID) != r.study_id:
                fail(f"{r.path}: PatientID/StudyID {ds.PatientID}/{ds.StudyID} "
                     f"!= record list {r.subject_id}/{r.study_id}")
            checked += 1
        st = pd.read_csv(os.path.join(root, "cxr-study-list.csv.gz"), dtype=str, keep_default_na=False)
        for r in st.itertuples():
            want = f"files/p{r.subject_id[:2]}/p{r.subject_id}/s{r.study_id}.txt"
            if r.path != want or not os.path.isfile(os.path.join(root, r.path)):
                fail(f"study list row {r.Index}: {r.path} (want existing {want})")
    else:
        for name in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-split.csv.gz"):
            df = pd.read_csv(os.path.join(root, name), dtype=str, keep_default_na=False)
            for r in df.itertuples():
                p = f"files/p{r.subject_id[:2]}/p{r.subject_id}/s{r.study_id}/{r.dicom_id}.jpg"
                if not os.path.isfile(os.path.join(root, p)):
                    fail(f"{name} row {r.Index}: no file {p}")
                checked += 1
    return checked


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in ("dicom", "jpg"):
        sys.exit("usage: check_mount.py ROOT dicom|jpg")
    root, kind = sys.argv[1], sys.argv[2]
    try:
        check_model.main()  # reads sys.argv itself; exits with its status
    except SystemExit:
        pass
    checked = cross_check(root, kind)
    failures = check_model.failures
    print(f"check_mount {kind}: {checked} index rows cross-checked against the files:",
          f"FAILED ({len(failures)} failures)" if failures else "OK")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
