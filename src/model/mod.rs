//! Deterministic generator of MIMIC-CXR-shaped buckets ("the dataset model").
//!
//! Nothing is stored: every object's name, size, metadata and bytes are a
//! pure function of `(seed, name, offset)` (plus `size_scale`). Only a compact
//! population index (sorted ids and counts, ~6 MB at full scale) is built at
//! construction; the top-level files (CSV indexes, SHA256SUMS, ...) are built
//! lazily on first use and then kept.
//!
//! Buckets:
//! - `Dicom` (`mimic-cxr-2.0.0.physionet.org`): `LICENSE.txt`, `SHA256SUMS.txt`
//!   (covers the other top-level files only), `cxr-record-list.csv.gz`,
//!   `cxr-study-list.csv.gz`, and `files/pNN/pSUBJECT/sSTUDY.txt` +
//!   `files/pNN/pSUBJECT/sSTUDY/<dicom_id>.dcm`.
//! - `Jpg` (`mimic-cxr-jpg-2.1.0.physionet.org`): `IMAGE_FILENAMES`,
//!   `LICENSE.txt`, `README`, `SHA256SUMS.txt`, the four
//!   `mimic-cxr-2.0.0-*.csv.gz` files and `files/.../<dicom_id>.jpg` (no
//!   reports). `SHA256SUMS.txt` covers every other object when the model has
//!   at most `SHA256_ALL_MAX_OBJECTS` objects, otherwise only the other
//!   top-level files (hashing ~600 GB is not cheap).
//!
//! The population (subjects, studies, dicom ids, views, dims, labels) depends
//! only on `(patients, seed)`, so a DICOM and a JPG model with the same seed
//! describe the same images. At `patients = 65379` the counts are exactly the
//! real ones (227,835 studies, 377,110 images).
//!
//! See `dicom.rs` for the DICOM header conventions (PatientID / StudyID /
//! StudyInstanceUID / SOPInstanceUID) and `jpeg.rs` for the JPEG layout.

pub mod attrs;
pub mod dicom;
pub mod files;
pub mod jpeg;
pub mod population;
pub mod rng;

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use attrs::{StudyInfo, scaled_dims, study_info};
use population::{Population, format_dicom_id, parse_dicom_id};
use rng::{hash_str, hash2};

pub use population::{FULL_IMAGES, FULL_PATIENTS, FULL_STUDIES, MAX_PATIENTS};

/// JPG bucket: `SHA256SUMS.txt` lists every object iff the model has at most
/// this many objects.
pub const SHA256_ALL_MAX_OBJECTS: u64 = 2_000;

pub const DICOM_BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";
pub const JPG_BUCKET: &str = "mimic-cxr-jpg-2.1.0.physionet.org";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelKind {
    Dicom,
    Jpg,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Dicom => "dicom",
            ModelKind::Jpg => "jpg",
        })
    }
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "dicom" => Ok(ModelKind::Dicom),
            "jpg" => Ok(ModelKind::Jpg),
            _ => Err(format!(
                "unknown model kind {s:?} (expected \"dicom\" or \"jpg\")"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Number of patients (65,379 = full scale; capped at `MAX_PATIENTS`).
    pub patients: u32,
    pub seed: u64,
    /// 1.0 = real sizes (DICOM ~13.6 MB, JPG ~1.6 MB mean); sides of the
    /// images scale with sqrt(size_scale). Clamped to [1e-9, 16].
    pub size_scale: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Dicom,
            patients: FULL_PATIENTS as u32,
            seed: 0,
            size_scale: 1.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelObject {
    pub name: String,
    pub size: u64,
    pub generation: i64,
    pub updated_unix: i64,
    pub content_type: &'static str,
}

/// Where a name lives in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// Index into the kind's top-level name list.
    Top(usize),
    /// Report of global study `g` (DICOM only).
    Report(usize),
    /// Image at listing position `pos` of global study `g`.
    Image(usize, usize),
}

pub struct DatasetModel {
    cfg: ModelConfig,
    pop: Population,
    top_names: &'static [&'static str],
    /// Number of top-level names sorting before "files/".
    n_pre: usize,
    tops: OnceLock<Vec<Arc<Vec<u8>>>>,
    jpeg_bases: Vec<OnceLock<jpeg::BaseJpeg>>,
    /// One pixel generator per (dims, lateral).
    pixel_gens: Vec<OnceLock<dicom::PixelGen>>,
    /// Direct-mapped cache of recently read images (bounded, tiny).
    img_cache: Vec<Mutex<Option<Arc<ImageCtx>>>>,
    #[cfg(test)]
    work: Work,
}

/// What the model computed, counted so that unit tests can check costs by counts instead of
/// by the clock: a listing page touches the studies of that page (not the bucket), and the
/// reads of one image share one context (its header or JPG layout is not rebuilt per read).
#[cfg(test)]
#[derive(Default)]
struct Work {
    /// Studies whose attributes or first name were computed.
    studies: std::sync::atomic::AtomicU64,
    /// Image contexts (DICOM header, JPG padding length) built for a read.
    image_ctxs: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl Work {
    fn count(c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn take(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

const IMG_CACHE_SLOTS: usize = 256;

/// What `read_at` needs to produce an image's bytes.
struct ImageCtx {
    name: String,
    key: u64,
    dims: usize,
    lateral: bool,
    /// DICOM header (empty for JPG).
    header: Vec<u8>,
    /// JPG padding length (0 for DICOM).
    pad: u64,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<DatasetModel>();
};

impl DatasetModel {
    pub fn new(cfg: ModelConfig) -> Self {
        let pop = Population::new(cfg.patients, cfg.seed);
        let top_names: &'static [&'static str] = match cfg.kind {
            ModelKind::Dicom => &files::DICOM_TOP,
            ModelKind::Jpg => &files::JPG_TOP,
        };
        let n_pre = top_names
            .iter()
            .filter(|n| n.as_bytes() < b"files/".as_slice())
            .count();
        let jpeg_bases = (0..attrs::DIMS.len()).map(|_| OnceLock::new()).collect();
        let pixel_gens = (0..attrs::DIMS.len() * 2)
            .map(|_| OnceLock::new())
            .collect();
        let img_cache = (0..IMG_CACHE_SLOTS).map(|_| Mutex::new(None)).collect();
        DatasetModel {
            cfg,
            pop,
            top_names,
            n_pre,
            tops: OnceLock::new(),
            jpeg_bases,
            pixel_gens,
            img_cache,
            #[cfg(test)]
            work: Work::default(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn kind(&self) -> ModelKind {
        self.cfg.kind
    }

    pub fn bucket(&self) -> &'static str {
        match self.cfg.kind {
            ModelKind::Dicom => DICOM_BUCKET,
            ModelKind::Jpg => JPG_BUCKET,
        }
    }

    pub fn object_count(&self) -> u64 {
        let per_study = match self.cfg.kind {
            ModelKind::Dicom => self.pop.study_count(),
            ModelKind::Jpg => 0,
        };
        self.top_names.len() as u64 + per_study + self.pop.image_count()
    }
    pub fn image_count(&self) -> u64 {
        self.pop.image_count()
    }
    pub fn study_count(&self) -> u64 {
        self.pop.study_count()
    }
    pub fn patient_count(&self) -> u64 {
        self.pop.patient_count()
    }

    /// `Arc::new(Self::new(cfg))` plus a detached background thread that runs
    /// `prewarm()`, so the first listing of the bucket root (which needs the
    /// top-level CSV files) and the first JPG reads do not pay the lazy
    /// generation cost (~1-3 s at full scale). Requests arriving earlier simply
    /// wait for (or share) the same one-time work.
    pub fn shared(cfg: ModelConfig) -> Arc<Self> {
        let m = Arc::new(Self::new(cfg));
        let w = Arc::downgrade(&m);
        std::thread::spawn(move || {
            if let Some(m) = w.upgrade() {
                m.prewarm();
            }
        });
        m
    }

    /// Build the lazily generated parts (top-level files and JPEG base
    /// images) now, e.g. from a background thread right after construction.
    pub fn prewarm(&self) {
        std::thread::scope(|sc| {
            if self.cfg.kind == ModelKind::Jpg {
                sc.spawn(|| {
                    for d in 0..self.jpeg_bases.len() {
                        self.jpeg_base(d);
                    }
                });
            }
            self.tops();
        });
    }

    // ---------------------------------------------------------------- names

    fn ext(&self) -> &'static str {
        match self.cfg.kind {
            ModelKind::Dicom => "dcm",
            ModelKind::Jpg => "jpg",
        }
    }

    fn study(&self, g: usize) -> StudyInfo {
        #[cfg(test)]
        Work::count(&self.work.studies);
        let si = self.pop.subject_of(g);
        study_info(
            self.cfg.seed,
            self.pop.subjects[si],
            self.pop.studies[g],
            g,
            self.pop.images_in(g),
        )
    }

    /// Tree entries of study `st`, in listing order.
    fn study_entries(&self, st: &StudyInfo) -> Vec<(String, Entry)> {
        let mut v = Vec::with_capacity(4);
        if self.cfg.kind == ModelKind::Dicom {
            v.push((
                files::report_path(st.subject, st.study),
                Entry::Report(st.g),
            ));
        }
        for (pos, img) in st.images.iter().enumerate() {
            v.push((
                files::image_path(st.subject, st.study, &format_dicom_id(&img.id), self.ext()),
                Entry::Image(st.g, pos),
            ));
        }
        v
    }

    /// Name of the first tree entry of study `g` (cheap for DICOM).
    fn first_name(&self, g: usize) -> String {
        #[cfg(test)]
        Work::count(&self.work.studies);
        let si = self.pop.subject_of(g);
        let (subject, study) = (self.pop.subjects[si], self.pop.studies[g]);
        match self.cfg.kind {
            ModelKind::Dicom => files::report_path(subject, study),
            ModelKind::Jpg => {
                let st = study_info(self.cfg.seed, subject, study, g, self.pop.images_in(g));
                files::image_path(subject, study, &format_dicom_id(&st.images[0].id), "jpg")
            }
        }
    }

    fn resolve(&self, name: &str) -> Option<(Entry, Option<StudyInfo>)> {
        if let Some(i) = self.top_names.iter().position(|n| *n == name) {
            return Some((Entry::Top(i), None));
        }
        // files/pNN/pSSSSSSSS/sTTTTTTTT.txt | files/pNN/pSSSSSSSS/sTTTTTTTT/<44>.ext
        // The name comes from a request: check the fixed fields byte by byte before slicing,
        // so a multi-byte character anywhere is a miss, never a slice inside a character.
        let rest = name.strip_prefix("files/p")?;
        let b = rest.as_bytes();
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        if b.len() < 2 + 2 + 8 + 2 + 8 + 1
            || b[2] != b'/'
            || b[3] != b'p'
            || b[12] != b'/'
            || b[13] != b's'
            || !digits(0..2)
            || !digits(4..12)
            || !digits(14..22)
            || b[4..6] != b[0..2]
        {
            return None;
        }
        // Bytes 0..22 are ASCII, so these are character boundaries.
        let (subj, study) = (&rest[4..12], &rest[14..22]);
        let subject: u32 = subj.parse().ok()?;
        let study: u32 = study.parse().ok()?;
        let si = self.pop.find_subject(subject)?;
        let g = self.pop.find_study(si, study)?;
        let tail = &rest[22..];
        if tail == ".txt" {
            if self.cfg.kind != ModelKind::Dicom {
                return None;
            }
            let st = study_info(self.cfg.seed, subject, study, g, self.pop.images_in(g));
            return Some((Entry::Report(g), Some(st)));
        }
        let tail = tail.strip_prefix('/')?;
        let id = tail.strip_suffix(self.ext())?.strip_suffix('.')?;
        let id = parse_dicom_id(id)?;
        let st = study_info(self.cfg.seed, subject, study, g, self.pop.images_in(g));
        let pos = st.images.iter().position(|im| im.id == id)?;
        Some((Entry::Image(g, pos), Some(st)))
    }

    // --------------------------------------------------------------- objects

    fn make_object(&self, name: String, size: u64, content_type: &'static str) -> ModelObject {
        let h = hash_str(self.cfg.seed ^ 0x6E4E_0B1E, &name);
        let base: i64 = match self.cfg.kind {
            ModelKind::Dicom => 1_568_764_800, // 2019-09-18T00:00:00Z
            ModelKind::Jpg => 1_573_689_600,   // 2019-11-14T00:00:00Z
        };
        let updated_unix = base + (h % (2 * 86_400)) as i64;
        let generation = updated_unix * 1_000_000 + ((h >> 32) % 1_000_000) as i64;
        ModelObject {
            name,
            size,
            generation,
            updated_unix,
            content_type,
        }
    }

    fn top_content_type(name: &str) -> &'static str {
        if name.ends_with(".gz") {
            "application/gzip"
        } else if name.ends_with(".txt") {
            "text/plain"
        } else {
            "application/octet-stream"
        }
    }

    fn image_dims(&self, st: &StudyInfo, pos: usize) -> (u32, u32) {
        scaled_dims(st.images[pos].dims, self.cfg.size_scale)
    }

    fn jpeg_base(&self, dims: usize) -> &jpeg::BaseJpeg {
        self.jpeg_bases[dims].get_or_init(|| {
            let (r, c) = scaled_dims(dims, self.cfg.size_scale);
            jpeg::encode_base(r, c)
        })
    }

    /// (base, pad length) of a JPG object.
    fn jpeg_layout(&self, st: &StudyInfo, pos: usize) -> (&jpeg::BaseJpeg, u64) {
        let img = &st.images[pos];
        let base = self.jpeg_base(img.dims);
        let (r, c) = self.image_dims(st, pos);
        let frac = (hash2(img.key, 0x51E) >> 11) as f64 / (1u64 << 53) as f64;
        let target = (jpeg::BYTES_PER_PIXEL * r as f64 * c as f64 * (0.7 + 0.6 * frac)) as u64;
        (base, jpeg::pad_len(base.bytes.len() as u64, target))
    }

    fn dicom_header(&self, st: &StudyInfo, pos: usize) -> Vec<u8> {
        let (r, c) = self.image_dims(st, pos);
        dicom::header(self.cfg.seed, st, &st.images[pos], r, c)
    }

    fn entry_object(&self, name: String, e: Entry, st: Option<&StudyInfo>) -> ModelObject {
        match e {
            Entry::Top(i) => {
                let size = self.tops()[i].len() as u64;
                self.make_object(name, size, Self::top_content_type(self.top_names[i]))
            }
            Entry::Report(_) => {
                let size = attrs::report_text(self.cfg.seed, st.unwrap()).len() as u64;
                self.make_object(name, size, "text/plain")
            }
            Entry::Image(_, pos) => {
                let st = st.unwrap();
                match self.cfg.kind {
                    ModelKind::Dicom => {
                        let (r, c) = self.image_dims(st, pos);
                        let size =
                            self.dicom_header(st, pos).len() as u64 + r as u64 * c as u64 * 2;
                        self.make_object(name, size, "application/dicom")
                    }
                    ModelKind::Jpg => {
                        let (base, pad) = self.jpeg_layout(st, pos);
                        self.make_object(name, base.bytes.len() as u64 + pad, "image/jpeg")
                    }
                }
            }
        }
    }

    /// Up to `limit` objects whose name is >= `start` (byte-wise
    /// lexicographic order, as GCS sorts), in order.
    pub fn list_from(&self, start: &str, limit: usize) -> Vec<ModelObject> {
        let mut out = Vec::with_capacity(limit.min(4096));
        if limit == 0 {
            return out;
        }
        let sb = start.as_bytes();
        for (i, n) in self.top_names[..self.n_pre].iter().enumerate() {
            if n.as_bytes() >= sb {
                out.push(self.entry_object(n.to_string(), Entry::Top(i), None));
                if out.len() == limit {
                    return out;
                }
            }
        }
        let s_total = self.pop.studies.len();
        if s_total > 0 {
            // Largest g whose first entry is <= start (entries of earlier
            // studies are all < start); 0 if none.
            let p = partition_point(s_total, |g| self.first_name(g).as_bytes() <= sb);
            let mut g = p.saturating_sub(1);
            while g < s_total {
                let st = self.study(g);
                for (name, e) in self.study_entries(&st) {
                    if name.as_bytes() >= sb {
                        out.push(self.entry_object(name, e, Some(&st)));
                        if out.len() == limit {
                            return out;
                        }
                    }
                }
                g += 1;
            }
        }
        for (i, n) in self.top_names.iter().enumerate().skip(self.n_pre) {
            if n.as_bytes() >= sb {
                out.push(self.entry_object(n.to_string(), Entry::Top(i), None));
                if out.len() == limit {
                    return out;
                }
            }
        }
        out
    }

    pub fn stat(&self, name: &str) -> Option<ModelObject> {
        let (e, st) = self.resolve(name)?;
        Some(self.entry_object(name.to_string(), e, st.as_ref()))
    }

    /// Fill `buf` with the object's bytes starting at `offset` (caller
    /// guarantees offset+buf.len() <= size). Unknown names read as zeros.
    pub fn read_at(&self, obj: &ModelObject, offset: u64, buf: &mut [u8]) {
        if let Some(ctx) = self.cached_image_ctx(&obj.name) {
            return self.read_image(&ctx, offset, buf);
        }
        let Some((e, st)) = self.resolve(&obj.name) else {
            debug_assert!(false, "read_at of unknown object {}", obj.name);
            buf.fill(0);
            return;
        };
        match e {
            Entry::Top(i) => {
                let t = &self.tops()[i];
                copy_from(t, offset, buf);
            }
            Entry::Report(_) => {
                let t = attrs::report_text(self.cfg.seed, st.as_ref().unwrap());
                copy_from(t.as_bytes(), offset, buf);
            }
            Entry::Image(_, pos) => {
                let ctx = self.image_ctx(st.as_ref().unwrap(), pos, obj.name.clone());
                self.read_image(&ctx, offset, buf);
            }
        }
    }

    fn image_ctx(&self, st: &StudyInfo, pos: usize, name: String) -> Arc<ImageCtx> {
        #[cfg(test)]
        Work::count(&self.work.image_ctxs);
        let img = &st.images[pos];
        let (header, pad) = match self.cfg.kind {
            ModelKind::Dicom => (self.dicom_header(st, pos), 0),
            ModelKind::Jpg => (Vec::new(), self.jpeg_layout(st, pos).1),
        };
        let lateral = matches!(img.view, attrs::View::Lateral | attrs::View::Ll);
        let ctx = Arc::new(ImageCtx {
            name,
            key: img.key,
            dims: img.dims,
            lateral,
            header,
            pad,
        });
        let slot = (hash_str(0, &ctx.name) % IMG_CACHE_SLOTS as u64) as usize;
        *self.img_cache[slot].lock().unwrap() = Some(ctx.clone());
        ctx
    }

    fn cached_image_ctx(&self, name: &str) -> Option<Arc<ImageCtx>> {
        let slot = (hash_str(0, name) % IMG_CACHE_SLOTS as u64) as usize;
        let g = self.img_cache[slot].lock().unwrap();
        g.as_ref().filter(|c| c.name == name).cloned()
    }

    fn pixel_gen(&self, dims: usize, lateral: bool) -> &dicom::PixelGen {
        self.pixel_gens[dims * 2 + lateral as usize].get_or_init(|| {
            let (r, c) = scaled_dims(dims, self.cfg.size_scale);
            let view = if lateral {
                attrs::View::Lateral
            } else {
                attrs::View::Pa
            };
            dicom::PixelGen::new(r, c, view)
        })
    }

    fn read_image(&self, ctx: &ImageCtx, offset: u64, buf: &mut [u8]) {
        match self.cfg.kind {
            ModelKind::Dicom => {
                let hdr = &ctx.header;
                let h = hdr.len() as u64;
                let mut done = 0usize;
                if offset < h {
                    done = ((h - offset) as usize).min(buf.len());
                    buf[..done].copy_from_slice(&hdr[offset as usize..offset as usize + done]);
                }
                if done < buf.len() {
                    let pg = self.pixel_gen(ctx.dims, ctx.lateral);
                    pg.fill(ctx.key, offset + done as u64 - h, &mut buf[done..]);
                }
            }
            ModelKind::Jpg => {
                jpeg::read(self.jpeg_base(ctx.dims), ctx.key, ctx.pad, offset, buf);
            }
        }
    }

    /// Whole content of an object (convenience for tests and small objects).
    pub fn read_all(&self, obj: &ModelObject) -> Vec<u8> {
        let mut v = vec![0u8; obj.size as usize];
        self.read_at(obj, 0, &mut v);
        v
    }

    // ------------------------------------------------------ top-level files

    fn tops(&self) -> &Vec<Arc<Vec<u8>>> {
        self.tops.get_or_init(|| self.build_tops())
    }

    fn build_tops(&self) -> Vec<Arc<Vec<u8>>> {
        let pop = &self.pop;
        let seed = self.cfg.seed;
        let names = self.top_names;
        let mut content: Vec<Option<Vec<u8>>> = vec![None; names.len()];
        std::thread::scope(|sc| {
            let mut handles = Vec::new();
            for (i, n) in names.iter().enumerate() {
                let n = *n;
                let scale = self.cfg.size_scale;
                let h = sc.spawn(move || -> Option<Vec<u8>> {
                    Some(match n {
                        "LICENSE.txt" => files::LICENSE.as_bytes().to_vec(),
                        "README" => files::README.as_bytes().to_vec(),
                        "SHA256SUMS.txt" => return None,
                        "cxr-record-list.csv.gz" => files::record_list(pop, seed),
                        "cxr-study-list.csv.gz" => files::study_list(pop),
                        "IMAGE_FILENAMES" => files::image_filenames(pop, seed),
                        "mimic-cxr-2.0.0-chexpert.csv.gz" => files::labels_csv(pop, seed, false),
                        "mimic-cxr-2.0.0-negbio.csv.gz" => files::labels_csv(pop, seed, true),
                        "mimic-cxr-2.0.0-metadata.csv.gz" => files::metadata(pop, seed, scale),
                        "mimic-cxr-2.0.0-split.csv.gz" => files::split_csv(pop, seed),
                        other => unreachable!("no generator for {other}"),
                    })
                });
                handles.push((i, h));
            }
            for (i, h) in handles {
                content[i] = h.join().expect("top-level file generator panicked");
            }
        });
        // SHA256SUMS.txt
        use sha2::{Digest, Sha256};
        let mut lines: Vec<(String, String)> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            if let Some(c) = &content[i] {
                lines.push((n.to_string(), hex(&Sha256::digest(c))));
            }
        }
        if self.cfg.kind == ModelKind::Jpg && self.object_count() <= SHA256_ALL_MAX_OBJECTS {
            let mut buf = vec![0u8; 1 << 20];
            for g in 0..pop.studies.len() {
                let st = self.study(g);
                for (name, e) in self.study_entries(&st) {
                    let obj = self.entry_object(name.clone(), e, Some(&st));
                    let mut hasher = Sha256::new();
                    let mut off = 0u64;
                    while off < obj.size {
                        let n = ((obj.size - off) as usize).min(buf.len());
                        self.read_at(&obj, off, &mut buf[..n]);
                        hasher.update(&buf[..n]);
                        off += n as u64;
                    }
                    lines.push((name, hex(&hasher.finalize())));
                }
            }
        }
        lines.sort();
        let mut sums = String::new();
        for (n, h) in lines {
            sums.push_str(&h);
            sums.push_str("  ");
            sums.push_str(&n);
            sums.push('\n');
        }
        let i = names.iter().position(|n| *n == "SHA256SUMS.txt").unwrap();
        content[i] = Some(sums.into_bytes());
        content.into_iter().map(|c| Arc::new(c.unwrap())).collect()
    }
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

fn copy_from(src: &[u8], offset: u64, buf: &mut [u8]) {
    let o = (offset as usize).min(src.len());
    let n = buf.len().min(src.len() - o);
    buf[..n].copy_from_slice(&src[o..o + n]);
    buf[n..].fill(0);
}

/// First index in `0..n` for which `pred` is false (pred must be monotone: true then false).
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Write every object of `model` under `dir` (object name = relative path).
/// Returns the number of objects written. Intended for small models (e.g. to
/// seed emulator buckets or for `check_model.py`).
pub fn write_model_to_dir(model: &DatasetModel, dir: &Path) -> std::io::Result<u64> {
    let mut count = 0u64;
    let mut start = String::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let page = model.list_from(&start, 1000);
        if page.is_empty() {
            break;
        }
        for obj in &page {
            write_object(model, obj, dir, &mut buf)?;
            count += 1;
        }
        start = format!("{}\0", page.last().unwrap().name);
    }
    Ok(count)
}

/// Write the named objects of `model` under `dir`; unknown names are an error.
pub fn write_objects_to_dir(
    model: &DatasetModel,
    names: &[&str],
    dir: &Path,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    for n in names {
        let obj = model.stat(n).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no object {n}"))
        })?;
        write_object(model, &obj, dir, &mut buf)?;
    }
    Ok(())
}

fn write_object(
    model: &DatasetModel,
    obj: &ModelObject,
    dir: &Path,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let path = dir.join(&obj.name);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut off = 0u64;
    while off < obj.size {
        let n = ((obj.size - off) as usize).min(buf.len());
        model.read_at(obj, off, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.flush()
}

#[cfg(test)]
mod tests;
