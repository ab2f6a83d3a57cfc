#!/usr/bin/env Rscript
# Read MIMIC-CXR index files and a DICOM header from a physiofs mount, with base R.
#
# Usage:
#   Rscript examples/read_metadata.R MOUNT_ROOT
#
# MOUNT_ROOT is a mount of either bucket:
#   - gs://mimic-cxr-2.0.0.physionet.org (DICOM): reads cxr-record-list.csv.gz
#     (subject_id, study_id, dicom_id, path) and parses the header of the first .dcm file;
#   - gs://mimic-cxr-jpg-2.1.0.physionet.org (JPG): reads mimic-cxr-2.0.0-metadata.csv.gz
#     (one row per image: ViewPosition, Rows, Columns, StudyDate, ...) and checks the first JPG.
# e.g.
#   physiofs mount --billing-project MY_PROJECT --bucket mimic-cxr-2.0.0.physionet.org /mnt/cxr
#   Rscript examples/read_metadata.R /mnt/cxr
# (`physiofs demo /tmp/cxr` gives you a small synthetic bucket without credentials.)
#
# Needs only base R (Debian: apt-get install r-base-core). When the data.table package is
# installed (r-cran-data.table, or install.packages("data.table")) the CSV is also read with
# data.table::fread, which is much faster on the real 377,110-row files.
#
# The DICOM part uses readBin on the first 64 KiB only: physiofs fetches just the byte ranges
# that are read, so looking at headers does not download the ~14 MB of pixel data per file.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 1 || args[1] %in% c("-h", "--help")) {
  cat("usage: Rscript read_metadata.R MOUNT_ROOT\n",
      "  MOUNT_ROOT: physiofs mount of mimic-cxr-2.0.0 (DICOM) or mimic-cxr-jpg-2.1.0 (JPG)\n",
      sep = "")
  quit(status = 2)
}
root <- args[1]
if (!dir.exists(root)) {
  cat(sprintf("%s is not a directory (is the bucket mounted there?)\n", root))
  quit(status = 1)
}

record_list <- file.path(root, "cxr-record-list.csv.gz")
metadata <- file.path(root, "mimic-cxr-2.0.0-metadata.csv.gz")
if (file.exists(record_list)) {
  kind <- "dicom"
  csv_path <- record_list
} else if (file.exists(metadata)) {
  kind <- "jpg"
  csv_path <- metadata
} else {
  cat(sprintf("%s: neither cxr-record-list.csv.gz nor mimic-cxr-2.0.0-metadata.csv.gz found\n", root))
  quit(status = 1)
}

# ---- 1. The CSV index with base R --------------------------------------------------------
# gzfile() decompresses on the fly; ids are read as character to keep leading digits intact.
cat(sprintf("== %s (base R read.csv) ==\n", basename(csv_path)))
elapsed <- system.time(
  df <- read.csv(gzfile(csv_path), colClasses = "character", stringsAsFactors = FALSE)
)[["elapsed"]]
cat(sprintf("rows: %d, columns: %s\n", nrow(df), paste(names(df), collapse = ", ")))
cat(sprintf("read in %.3f s\n", elapsed))
cat(sprintf("patients: %d, studies: %d\n",
            length(unique(df$subject_id)), length(unique(df$study_id))))
if (kind == "dicom") {
  per_study <- table(table(df$study_id))
  cat("images per study:", paste(sprintf("%s:%d", names(per_study), per_study), collapse = " "), "\n")
} else {
  views <- table(df$ViewPosition, useNA = "ifany")
  cat("ViewPosition:", paste(sprintf("%s=%d", names(views), views), collapse = " "), "\n")
}
print(head(df, 3), right = FALSE)

# ---- 2. The same with data.table::fread (if installed) -----------------------------------
if (requireNamespace("data.table", quietly = TRUE)) {
  # fread reads .gz itself only when R.utils is installed; otherwise let gzip decompress.
  elapsed <- system.time(
    dt <- if (requireNamespace("R.utils", quietly = TRUE)) {
      data.table::fread(csv_path, colClasses = "character")
    } else {
      data.table::fread(cmd = paste("gzip -dc", shQuote(csv_path)), colClasses = "character")
    }
  )[["elapsed"]]
  cat(sprintf("\n== data.table::fread: %d rows in %.3f s (same as read.csv: %s) ==\n",
              nrow(dt), elapsed, identical(as.data.frame(dt), df)))
} else {
  cat("\n(data.table not installed: skipping fread; install r-cran-data.table to try it)\n")
}

# ---- 3. A DICOM header with readBin ------------------------------------------------------
# DICOM Part 10: a 128-byte preamble, the magic "DICM", then data elements. MIMIC-CXR files
# use explicit VR little endian: group (2 bytes), element (2), VR (2 letters), then a 2-byte
# length, or 2 reserved bytes and a 4-byte length for the VRs below.
long_vrs <- c("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
text_vrs <- c("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UT")
names_of <- c("00020010" = "TransferSyntaxUID", "00080018" = "SOPInstanceUID",
              "00080060" = "Modality", "00100020" = "PatientID", "00185101" = "ViewPosition",
              "0020000D" = "StudyInstanceUID", "00200010" = "StudyID", "00280010" = "Rows",
              "00280011" = "Columns", "00280100" = "BitsAllocated", "7FE00010" = "PixelData")

u16 <- function(buf, pos) as.integer(buf[pos]) + 256L * as.integer(buf[pos + 1])
u32 <- function(buf, pos) {
  sum(as.numeric(buf[pos:(pos + 3)]) * c(1, 256, 65536, 16777216))
}

# Skips a sequence or item of undefined length starting at pos (1-based, just after the
# length field); returns the position after its delimiter.
skip_undefined <- function(buf, pos) {
  while (pos + 7 <= length(buf)) {
    g <- u16(buf, pos); e <- u16(buf, pos + 2); len <- u32(buf, pos + 4)
    if (g == 0xFFFE && (e == 0xE0DD || e == 0xE00D)) return(pos + 8)  # end of sequence/item
    if (g == 0xFFFE && e == 0xE000) {                                  # an item
      pos <- if (len == 0xFFFFFFFF) skip_undefined(buf, pos + 8) else pos + 8 + len
      next
    }
    el <- read_element(buf, pos)                                       # an element in an item
    if (is.null(el)) return(length(buf) + 1)
    pos <- el$next_pos
  }
  length(buf) + 1
}

read_element <- function(buf, pos) {
  if (pos + 7 > length(buf)) return(NULL)
  group <- u16(buf, pos); element <- u16(buf, pos + 2)
  vr <- rawToChar(buf[(pos + 4):(pos + 5)])
  if (vr %in% long_vrs) {
    len <- u32(buf, pos + 8); value_pos <- pos + 12
  } else {
    len <- u16(buf, pos + 6); value_pos <- pos + 8
  }
  tag <- sprintf("%04X%04X", group, element)
  if (len == 0xFFFFFFFF) {
    next_pos <- skip_undefined(buf, value_pos)
    len <- NA
  } else {
    next_pos <- value_pos + len
  }
  value <- ""
  if (!is.na(len) && len > 0 && tag != "7FE00010" && value_pos + len - 1 <= length(buf)) {
    bytes <- buf[value_pos:(value_pos + len - 1)]
    if (vr %in% text_vrs) {
      value <- trimws(rawToChar(bytes[bytes != as.raw(0)]))
    } else if (vr == "US") {
      value <- paste(u16(bytes, seq(1, len, by = 2)), collapse = "\\")
    } else if (vr == "UL") {
      value <- format(u32(bytes, 1), scientific = FALSE)
    } else if (vr != "SQ") {
      value <- sprintf("<%d bytes>", len)
    }
  }
  list(tag = tag, vr = vr, len = len, value = value, next_pos = next_pos)
}

if (kind == "dicom") {
  dcm <- file.path(root, df$path[1])
  cat(sprintf("\n== DICOM header of %s (readBin) ==\n", df$path[1]))
  con <- file(dcm, "rb")
  buf <- readBin(con, what = "raw", n = 65536)
  close(con)
  magic <- rawToChar(buf[129:132])
  cat(sprintf("file size %.0f bytes; bytes 128..131: \"%s\" -> %s\n", file.size(dcm), magic,
              if (magic == "DICM") "DICOM Part 10 file" else "NOT A DICOM FILE"))
  if (magic != "DICM") quit(status = 1)
  pos <- 133
  shown <- 0
  found <- character(0)
  while (!is.null(el <- read_element(buf, pos))) {
    label <- if (!is.na(names_of[el$tag])) names_of[el$tag] else ""
    if (shown < 25 || label != "") {
      cat(sprintf("(%s,%s) %s %-18s %s\n", substr(el$tag, 1, 4), substr(el$tag, 5, 8), el$vr,
                  label, substr(el$value, 1, 64)))
      shown <- shown + 1
    }
    if (label != "") found[label] <- el$value
    if (el$tag == "7FE00010") {
      cat(sprintf("PixelData starts at byte %d: the header is %d bytes of a %.0f-byte file\n",
                  pos - 1, pos - 1, file.size(dcm)))
      break
    }
    pos <- el$next_pos
  }
  ids <- strsplit(df$path[1], "/")[[1]]
  ok <- identical(unname(found["PatientID"]), df$subject_id[1]) &&
    identical(unname(found["StudyID"]), df$study_id[1])
  cat(sprintf("PatientID %s, StudyID %s, %s x %s, %s: %s the record list (%s/%s)\n",
              found["PatientID"], found["StudyID"], found["Rows"], found["Columns"],
              found["ViewPosition"], if (ok) "match" else "DO NOT match", ids[3], ids[4]))
} else {
  # The metadata CSV has no path column; IMAGE_FILENAMES has the relative paths.
  first <- readLines(file.path(root, "IMAGE_FILENAMES"), n = 1)
  jpg <- file.path(root, first)
  con <- file(jpg, "rb")
  head_bytes <- readBin(con, what = "raw", n = 4)
  close(con)
  cat(sprintf("\n== first JPG (readBin; the JPG bucket has no DICOM files) ==\n%s starts with %s (%s)\n",
              first, paste(head_bytes, collapse = " "),
              if (identical(head_bytes[1:3], as.raw(c(0xFF, 0xD8, 0xFF)))) "JPEG SOI marker" else "not a JPEG"))
}
