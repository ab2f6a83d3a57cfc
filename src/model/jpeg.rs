//! JPEG objects: one real grayscale "base" JPEG per image-dimension variant
//! (encoded once per model, lazily, memoised), made unique and sized per
//! object by inserting APP15 padding segments after the base's APP0 (JFIF)
//! segment.
//!
//! Object layout: `base[..ins] ++ padding ++ base[ins..]` where `ins` is the
//! end of the base's APP0 segment (or 2, right after SOI). The padding is
//! `k` APP15 segments (`FF EF <len:u16 BE> "PHYSIOFS" <pseudo-random bytes>`),
//! each at most 65537 bytes in total, sizes as equal as possible. Pseudo-random
//! payload bytes are the model byte stream for the object's key at the
//! object's absolute offset.

use super::attrs::View;
use super::dicom::PixelGen;
use super::rng::fill_stream;

pub struct BaseJpeg {
    pub bytes: Vec<u8>,
    pub ins: usize,
}

/// Mean JPEG bytes per pixel in MIMIC-CXR-JPG (~1.6 MB for ~6.8 Mpx).
pub const BYTES_PER_PIXEL: f64 = 1.6e6 / 6.8e6;
pub const MIN_PAD: u64 = 64;
const SEG_MAX: u64 = 65537; // 2 (marker) + 2 (length) + 65533 payload
const IDENT: &[u8; 8] = b"PHYSIOFS";

pub fn encode_base(rows: u32, cols: u32) -> BaseJpeg {
    let gen_ = PixelGen::new(rows, cols, View::Pa);
    let mut pix = vec![0u8; rows as usize * cols as usize];
    let mut row = vec![0u16; cols as usize];
    for (r, line) in pix.chunks_exact_mut(cols as usize).enumerate() {
        gen_.smooth_row(r as u32, &mut row);
        for (p, v) in line.iter_mut().zip(&row) {
            *p = (v >> 4) as u8;
        }
    }
    let mut bytes = Vec::new();
    let enc = jpeg_encoder::Encoder::new(&mut bytes, 85);
    enc.encode(
        &pix,
        cols as u16,
        rows as u16,
        jpeg_encoder::ColorType::Luma,
    )
    .expect("jpeg encode");
    assert!(bytes.len() >= 4 && bytes[0] == 0xFF && bytes[1] == 0xD8);
    let ins = if bytes[2] == 0xFF && bytes[3] == 0xE0 {
        4 + u16::from_be_bytes([bytes[4], bytes[5]]) as usize
    } else {
        2
    };
    BaseJpeg { bytes, ins }
}

/// Padding length for an object whose target size is `target`.
pub fn pad_len(base_len: u64, target: u64) -> u64 {
    target.saturating_sub(base_len).max(MIN_PAD)
}

/// Fill `buf` with bytes of the padding region starting at padding offset
/// `poff`; `abs` is the absolute object offset of padding offset 0.
fn fill_pad(key: u64, pad: u64, abs: u64, poff: u64, buf: &mut [u8]) {
    fill_stream(key, abs + poff, buf);
    let k = pad.div_ceil(SEG_MAX);
    let q = pad / k;
    let rem = pad % k;
    let seg_start = |j: u64| {
        if j < rem {
            j * (q + 1)
        } else {
            rem * (q + 1) + (j - rem) * q
        }
    };
    let seg_len = |j: u64| if j < rem { q + 1 } else { q };
    let mut j = if poff < rem * (q + 1) {
        poff / (q + 1)
    } else {
        rem + (poff - rem * (q + 1)) / q
    };
    let end = poff + buf.len() as u64;
    while j < k && seg_start(j) < end {
        let s = seg_start(j);
        let len = seg_len(j);
        let mut hdr = [0u8; 12];
        hdr[0] = 0xFF;
        hdr[1] = 0xEF;
        hdr[2..4].copy_from_slice(&((len - 2) as u16).to_be_bytes());
        hdr[4..12].copy_from_slice(IDENT);
        // overlap of [s, s+12) with [poff, end)
        let a = s.max(poff);
        let b = (s + 12).min(end);
        if a < b {
            buf[(a - poff) as usize..(b - poff) as usize]
                .copy_from_slice(&hdr[(a - s) as usize..(b - s) as usize]);
        }
        j += 1;
    }
}

/// Read bytes of a padded JPEG object.
pub fn read(base: &BaseJpeg, key: u64, pad: u64, off: u64, buf: &mut [u8]) {
    let ins = base.ins as u64;
    let mut pos = 0usize;
    let mut o = off;
    while pos < buf.len() {
        let rest = buf.len() - pos;
        if o < ins {
            let n = ((ins - o) as usize).min(rest);
            buf[pos..pos + n].copy_from_slice(&base.bytes[o as usize..o as usize + n]);
            pos += n;
            o += n as u64;
        } else if o < ins + pad {
            let n = ((ins + pad - o) as usize).min(rest);
            fill_pad(key, pad, ins, o - ins, &mut buf[pos..pos + n]);
            pos += n;
            o += n as u64;
        } else {
            let b = (o - pad) as usize;
            let n = (base.bytes.len() - b).min(rest);
            buf[pos..pos + n].copy_from_slice(&base.bytes[b..b + n]);
            pos += n;
            o += n as u64;
        }
    }
}
