//! DICOM Part-10 writer (explicit VR little endian) and the synthetic pixel
//! generator.
//!
//! File layout: 128-byte zero preamble, `DICM`, file meta group (0002) with
//! group length, then the dataset in ascending tag order ending with the
//! PixelData (7FE0,0010) OW element header; the `Rows*Columns*2` pixel bytes
//! follow and are generated on demand (`PixelGen`).
//!
//! Identity conventions (checked by `check_model.py`):
//! - PatientID (0010,0020) = subject id digits (as in `pSUBJECT`),
//! - StudyID (0020,0010) = the 8-digit study id (as in `sSTUDY`),
//! - StudyInstanceUID (0020,000D) = `2.25.<study id><20-digit hash>`
//!   (starts with `"2.25." + study id`),
//! - SeriesInstanceUID (0020,000E) = StudyInstanceUID + `.<k+1>`,
//! - SOPInstanceUID (0008,0018) = MediaStorageSOPInstanceUID (0002,0003) =
//!   `2.25.<decimal value of the first 32 hex digits of the dicom id>`.

use super::attrs::{ImageInfo, StudyInfo, View};
use super::population::DicomId;
use super::rng::{fill_stream, hash2, hash3};

pub const SOP_DX: &str = "1.2.840.10008.5.1.4.1.1.1.1";
pub const SOP_CR: &str = "1.2.840.10008.5.1.4.1.1.1";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPL_CLASS_UID: &str = "2.25.178203515230939475302212474367405190112";

struct W(Vec<u8>);

impl W {
    fn elem(&mut self, group: u16, element: u16, vr: &[u8; 2], value: &[u8], pad: u8) {
        let len = value.len() + (value.len() & 1);
        self.0.extend_from_slice(&group.to_le_bytes());
        self.0.extend_from_slice(&element.to_le_bytes());
        self.0.extend_from_slice(vr);
        if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            self.0.extend_from_slice(&[0, 0]);
            self.0.extend_from_slice(&(len as u32).to_le_bytes());
        } else {
            self.0.extend_from_slice(&(len as u16).to_le_bytes());
        }
        self.0.extend_from_slice(value);
        if value.len() & 1 == 1 {
            self.0.push(pad);
        }
    }
    fn text(&mut self, group: u16, element: u16, vr: &[u8; 2], s: &str) {
        let pad = if vr == b"UI" { 0 } else { b' ' };
        self.elem(group, element, vr, s.as_bytes(), pad);
    }
    fn us(&mut self, group: u16, element: u16, v: u16) {
        self.elem(group, element, b"US", &v.to_le_bytes(), 0);
    }
}

pub fn sop_instance_uid(id: &DicomId) -> String {
    let v =
        ((id[0] as u128) << 96) | ((id[1] as u128) << 64) | ((id[2] as u128) << 32) | id[3] as u128;
    format!("2.25.{v}")
}

pub fn study_instance_uid(seed: u64, study: u32) -> String {
    let h = hash3(seed, 0x5717, study as u64); // < 2^64 < 10^20
    format!("2.25.{study}{h:020}")
}

pub fn sop_class(img: &ImageInfo) -> &'static str {
    if img.key.is_multiple_of(5) {
        SOP_CR
    } else {
        SOP_DX
    }
}

/// Everything up to and including the PixelData element header.
pub fn header(seed: u64, s: &StudyInfo, img: &ImageInfo, rows: u32, cols: u32) -> Vec<u8> {
    let sop_uid = sop_instance_uid(&img.id);
    let class = sop_class(img);
    let mut meta = W(Vec::with_capacity(256));
    meta.elem(0x0002, 0x0001, b"OB", &[0, 1], 0);
    meta.text(0x0002, 0x0002, b"UI", class);
    meta.text(0x0002, 0x0003, b"UI", &sop_uid);
    meta.text(0x0002, 0x0010, b"UI", EXPLICIT_VR_LE);
    meta.text(0x0002, 0x0012, b"UI", IMPL_CLASS_UID);
    meta.text(0x0002, 0x0013, b"SH", "PHYSIOFS_MODEL");

    let mut w = W(Vec::with_capacity(1024));
    w.0.resize(128, 0);
    w.0.extend_from_slice(b"DICM");
    w.elem(
        0x0002,
        0x0000,
        b"UL",
        &(meta.0.len() as u32).to_le_bytes(),
        0,
    );
    w.0.extend_from_slice(&meta.0);

    let study_uid = study_instance_uid(seed, s.study);
    let series_uid = format!("{study_uid}.{}", img.k + 1);
    let modality = if class == SOP_CR { "CR" } else { "DX" };
    w.text(0x0008, 0x0005, b"CS", "ISO_IR 100");
    w.text(0x0008, 0x0008, b"CS", "ORIGINAL\\PRIMARY");
    w.text(0x0008, 0x0016, b"UI", class);
    w.text(0x0008, 0x0018, b"UI", &sop_uid);
    w.text(0x0008, 0x0020, b"DA", &s.date);
    w.text(0x0008, 0x0030, b"TM", &s.time);
    w.text(0x0008, 0x0060, b"CS", modality);
    w.text(0x0008, 0x0070, b"LO", "PHYSIOFS SYNTHETIC");
    w.text(0x0008, 0x1030, b"LO", s.description);
    w.text(0x0010, 0x0010, b"PN", "");
    w.text(0x0010, 0x0020, b"LO", &s.subject.to_string());
    w.text(0x0018, 0x0015, b"CS", "CHEST");
    w.text(0x0018, 0x5101, b"CS", img.view.code());
    w.text(0x0020, 0x000D, b"UI", &study_uid);
    w.text(0x0020, 0x000E, b"UI", &series_uid);
    w.text(0x0020, 0x0010, b"SH", &s.study.to_string());
    w.text(0x0020, 0x0011, b"IS", &(img.k + 1).to_string());
    w.text(0x0020, 0x0013, b"IS", "1");
    w.us(0x0028, 0x0002, 1);
    w.text(0x0028, 0x0004, b"CS", "MONOCHROME2");
    w.us(0x0028, 0x0010, rows as u16);
    w.us(0x0028, 0x0011, cols as u16);
    w.us(0x0028, 0x0100, 16);
    w.us(0x0028, 0x0101, 12);
    w.us(0x0028, 0x0102, 11);
    w.us(0x0028, 0x0103, 0);
    w.text(0x0028, 0x1050, b"DS", "2048");
    w.text(0x0028, 0x1051, b"DS", "4096");
    // PixelData element header; value follows.
    w.0.extend_from_slice(&0x7FE0u16.to_le_bytes());
    w.0.extend_from_slice(&0x0010u16.to_le_bytes());
    w.0.extend_from_slice(b"OW\0\0");
    w.0.extend_from_slice(&(rows * cols * 2).to_le_bytes());
    w.0
}

const LUNG_DEPTH: i32 = 1500;

/// Synthetic chest-like 12-bit image: bright body with a brighter
/// mediastinum, two dark elliptical lungs, dark background, plus noise.
/// Pixel (r, c) = colbase[c] - max(0, lx[c] - ly(r)) + 2*noise(r, c), where
/// noise(r, c) is byte c of the model byte stream keyed by hash2(key, r)
/// (one 64-bit hash per 8 pixels). All values are in 250..=3310 (< 4096).
pub struct PixelGen {
    pub rows: u32,
    pub cols: u32,
    colbase: Vec<i16>,
    /// Lung darkening profile across columns, already scaled by LUNG_DEPTH.
    lx: Vec<i16>,
}

impl PixelGen {
    pub fn new(rows: u32, cols: u32, view: View) -> Self {
        let lateral = matches!(view, View::Lateral | View::Ll);
        let mut colbase = Vec::with_capacity(cols as usize);
        let mut lx = Vec::with_capacity(cols as usize);
        let inv = 1.0 / cols as f32;
        for c in 0..cols {
            let x = (c as f32 + 0.5) * inv;
            let d = (x - 0.5) / 0.44;
            let mut base = if d.abs() < 1.0 {
                2500.0 - 600.0 * d * d
            } else {
                250.0
            };
            if !lateral && (x - 0.5).abs() < 0.05 {
                base += 300.0;
            }
            colbase.push(base as i16);
            let t = if lateral {
                (x - 0.5) / 0.3
            } else {
                let cx = if x < 0.5 { 0.31 } else { 0.69 };
                (x - cx) / 0.16
            };
            lx.push(((1.0 - t * t) * LUNG_DEPTH as f32).max(-30000.0) as i16);
        }
        PixelGen {
            rows,
            cols,
            colbase,
            lx,
        }
    }

    #[inline]
    fn ly(&self, r: u32) -> i16 {
        let y = (r as f32 + 0.5) / self.rows as f32;
        let t = (y - 0.47) / 0.32;
        (t * t * LUNG_DEPTH as f32).min(30000.0) as i16
    }

    /// Noise-free 12-bit row (used for the JPEG base image).
    pub fn smooth_row(&self, r: u32, out: &mut [u16]) {
        let ly = self.ly(r);
        for ((o, b), l) in out.iter_mut().zip(&self.colbase).zip(&self.lx) {
            *o = (*b - (*l - ly).max(0)) as u16;
        }
    }

    /// Write row `r` (little-endian u16, `2*cols` bytes) into `out`.
    pub fn row(&self, key: u64, r: u32, out: &mut [u8]) {
        debug_assert_eq!(out.len(), 2 * self.cols as usize);
        let cols = self.cols as usize;
        let ly = self.ly(r);
        let kr = hash2(key, r as u64);
        // In chunks of 256 pixels: noise bytes, i16 values, then LE bytes
        // (simple loops the compiler vectorises).
        let mut noise = [0u8; 256];
        let mut vals = [0i16; 256];
        let mut c0 = 0usize;
        while c0 < cols {
            let n = (cols - c0).min(256);
            fill_stream(kr, c0 as u64, &mut noise[..n]);
            let cb = &self.colbase[c0..c0 + n];
            let lx = &self.lx[c0..c0 + n];
            for (((v, b), l), z) in vals[..n].iter_mut().zip(cb).zip(lx).zip(&noise[..n]) {
                *v = *b - (*l - ly).max(0) + 2 * (*z as i16);
            }
            for (o, v) in out[2 * c0..2 * (c0 + n)]
                .chunks_exact_mut(2)
                .zip(&vals[..n])
            {
                o.copy_from_slice(&v.to_le_bytes());
            }
            c0 += n;
        }
    }

    /// Fill `buf` with pixel-data bytes starting at byte offset `off` (relative
    /// to the start of the pixel data).
    pub fn fill(&self, key: u64, off: u64, buf: &mut [u8]) {
        let rb = 2 * self.cols as u64;
        let mut pos = 0usize;
        let mut r = off / rb;
        let mut in_row = off % rb;
        let mut scratch: Vec<u8> = Vec::new();
        while pos < buf.len() {
            let want = (buf.len() - pos).min((rb - in_row) as usize);
            if in_row == 0 && want == rb as usize {
                self.row(key, r as u32, &mut buf[pos..pos + want]);
            } else {
                if scratch.is_empty() {
                    scratch.resize(rb as usize, 0);
                }
                self.row(key, r as u32, &mut scratch);
                buf[pos..pos + want]
                    .copy_from_slice(&scratch[in_row as usize..in_row as usize + want]);
            }
            pos += want;
            r += 1;
            in_row = 0;
        }
    }
}
