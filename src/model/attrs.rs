//! Derived per-study and per-image attributes (views, sizes, dates, labels,
//! report text). All pure functions of (seed, ids).

use super::population::{DicomId, dicom_id};
use super::rng::{SplitMix, hash2, hash3};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Pa,
    Ap,
    Lateral,
    Ll,
}

impl View {
    pub fn code(self) -> &'static str {
        match self {
            View::Pa => "PA",
            View::Ap => "AP",
            View::Lateral => "LATERAL",
            View::Ll => "LL",
        }
    }
    pub fn meaning(self) -> &'static str {
        match self {
            View::Pa => "postero-anterior",
            View::Ap => "antero-posterior",
            View::Lateral => "lateral",
            View::Ll => "left lateral",
        }
    }
}

/// Image dimensions (rows, columns, weight) at size_scale 1.0. The weighted
/// mean pixel count is ~6.8 Mpx, i.e. ~13.6 MB per 16-bit DICOM.
pub const DIMS: [(u32, u32, u32); 8] = [
    (3056, 2544, 34),
    (2544, 3056, 10),
    (3050, 2539, 12),
    (2828, 2320, 14),
    (2500, 2048, 10),
    (2336, 2836, 8),
    (3520, 4280, 2),
    (2022, 1736, 14),
];

/// Scaled dimensions for table entry `i`: both sides multiplied by
/// sqrt(size_scale) so that the byte size scales by ~size_scale.
pub fn scaled_dims(i: usize, size_scale: f64) -> (u32, u32) {
    let f = size_scale.clamp(1e-9, 16.0).sqrt();
    let (r, c, _) = DIMS[i];
    let r = ((r as f64 * f).round() as u32).clamp(8, 65535);
    let c = ((c as f64 * f).round() as u32).clamp(8, 65535);
    (r, c)
}

fn pick_dims(h: u64) -> usize {
    let total: u32 = DIMS.iter().map(|d| d.2).sum();
    let mut x = (h % total as u64) as u32;
    for (i, d) in DIMS.iter().enumerate() {
        if x < d.2 {
            return i;
        }
        x -= d.2;
    }
    DIMS.len() - 1
}

pub const LABELS: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
];
const NO_FINDING: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    Blank,
    Pos,
    Neg,
    Unc,
}

impl Label {
    pub fn csv(self) -> &'static str {
        match self {
            Label::Blank => "",
            Label::Pos => "1.0",
            Label::Neg => "0.0",
            Label::Unc => "-1.0",
        }
    }
}

#[derive(Clone, Debug)]
pub struct StudyInfo {
    pub subject: u32,
    pub study: u32,
    /// Global study index.
    pub g: usize,
    pub frontal: View,
    pub description: &'static str,
    /// YYYYMMDD (MIMIC's shifted, 21xx-22xx years).
    pub date: String,
    /// HHMMSS.fff
    pub time: String,
    pub labels: [Label; 14],
    /// Images in listing order (sorted by dicom id).
    pub images: Vec<ImageInfo>,
}

#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub id: DicomId,
    /// Generation index within the study (0 = frontal).
    pub k: usize,
    pub view: View,
    /// Index into `DIMS`.
    pub dims: usize,
    /// Hash of the image identity (keys all its pseudo-random bytes).
    pub key: u64,
}

pub fn study_info(seed: u64, subject: u32, study: u32, g: usize, n_images: usize) -> StudyInfo {
    let mut rng = SplitMix::new(hash3(seed, 0x57D1, study as u64));
    let frontal = if n_images >= 2 {
        if rng.next_f64() < 0.7 {
            View::Pa
        } else {
            View::Ap
        }
    } else if rng.next_f64() < 0.8 {
        View::Ap
    } else {
        View::Pa
    };
    let description = match (frontal, n_images) {
        (View::Ap, 1) => "CHEST (PORTABLE AP)",
        (View::Ap, _) => "CHEST (AP AND LAT)",
        (_, 1) => "CHEST (PA)",
        _ => "CHEST (PA AND LAT)",
    };
    // Per-patient anchor year (MIMIC shifts dates into 2100-2200), study within 6 years.
    let mut prng = SplitMix::new(hash3(seed, 0xDA7E, subject as u64));
    let anchor_year = 2110 + prng.below(90) as u32;
    let year = anchor_year + rng.below(6) as u32;
    let month = 1 + rng.below(12) as u32;
    let day = 1 + rng.below(28) as u32;
    let date = format!("{year:04}{month:02}{day:02}");
    let time = format!(
        "{:02}{:02}{:02}.{:03}",
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1000)
    );

    let mut labels = [Label::Blank; 14];
    if rng.next_f64() < 0.33 {
        labels[NO_FINDING] = Label::Pos;
        for i in [2usize, 9, 12] {
            if rng.next_f64() < 0.4 {
                labels[i] = Label::Neg;
            }
        }
    } else {
        let k = 1 + rng.below(3) as usize;
        for _ in 0..k {
            let mut i = rng.below(13) as usize;
            if i >= NO_FINDING {
                i += 1;
            }
            labels[i] = if rng.next_f64() < 0.75 {
                Label::Pos
            } else {
                Label::Unc
            };
        }
        for i in [9usize, 12, 3] {
            if labels[i] == Label::Blank && rng.next_f64() < 0.3 {
                labels[i] = Label::Neg;
            }
        }
    }
    if rng.next_f64() < 0.2 {
        labels[13] = Label::Pos;
        labels[NO_FINDING] = Label::Blank;
    }

    let mut images: Vec<ImageInfo> = (0..n_images)
        .map(|k| {
            let id = dicom_id(seed, study, k);
            let key = hash3(seed, 0x1AA6, ((id[0] as u64) << 32) | id[1] as u64)
                ^ hash2(((id[2] as u64) << 32) | id[3] as u64, id[4] as u64);
            let mut irng = SplitMix::new(key);
            let view = match k {
                0 => frontal,
                1 => {
                    if irng.next_f64() < 0.85 {
                        View::Lateral
                    } else {
                        View::Ll
                    }
                }
                _ => *irng.pick(&[View::Pa, View::Ap, View::Lateral, View::Ll]),
            };
            let dims = pick_dims(irng.next_u64());
            ImageInfo {
                id,
                k,
                view,
                dims,
                key,
            }
        })
        .collect();
    images.sort_by_key(|a| a.id);
    StudyInfo {
        subject,
        study,
        g,
        frontal,
        description,
        date,
        time,
        labels,
        images,
    }
}

/// Patient orientation meaning for the metadata CSV.
pub fn orientation(view: View, key: u64) -> &'static str {
    match (view, key % 10) {
        (_, 0) => "",
        (View::Ap, _) => "Recumbent",
        _ => "Erect",
    }
}

/// Split of a subject (train/validate/test; about 97.8 / 0.8 / 1.4 %).
pub fn split_of(seed: u64, subject: u32) -> &'static str {
    let x = hash3(seed, 0x5917, subject as u64) % 1000;
    if x < 8 {
        "validate"
    } else if x < 22 {
        "test"
    } else {
        "train"
    }
}

/// NegBio labels: like CheXpert with small deterministic disagreements.
pub fn negbio_labels(seed: u64, s: &StudyInfo) -> [Label; 14] {
    let mut l = s.labels;
    let h = hash3(seed, 0x7E6B, s.study as u64);
    if h.is_multiple_of(5) {
        let i = ((h >> 8) % 14) as usize;
        l[i] = match l[i] {
            Label::Unc => Label::Pos,
            Label::Neg => Label::Blank,
            x => x,
        };
    }
    l
}

fn sentence(i: usize, l: Label) -> Option<&'static str> {
    use Label::*;
    Some(match (i, l) {
        (0, Pos) => "Mild bibasilar atelectasis.",
        (0, Unc) => "Patchy opacity at the left base may reflect atelectasis.",
        (1, Pos) => "The heart is moderately enlarged.",
        (1, Unc) => "Heart size is possibly mildly enlarged.",
        (1, Neg) => "Heart size is normal.",
        (2, Pos) => "There is focal consolidation in the right lower lobe.",
        (2, Unc) => "Early consolidation cannot be excluded.",
        (2, Neg) => "There is no focal consolidation.",
        (3, Pos) => "There is mild pulmonary vascular congestion with interstitial edema.",
        (3, Unc) => "Possible mild pulmonary edema.",
        (3, Neg) => "No pulmonary edema.",
        (4, Pos) => "The cardiomediastinal silhouette is widened.",
        (4, Unc) => "The mediastinum may be slightly widened.",
        (4, Neg) => "The cardiomediastinal silhouette is within normal limits.",
        (5, Pos) => "An old healed right rib fracture is noted.",
        (5, Unc) => "Possible nondisplaced left rib fracture.",
        (5, Neg) => "No acute fracture is seen.",
        (6, Pos) => "A 1.2 cm nodule is seen in the left upper lobe.",
        (6, Unc) => "A possible small nodule projects over the right mid lung.",
        (7, Pos) => "Patchy opacities are seen in the lung bases.",
        (7, Unc) => "Subtle opacity in the right lower lung.",
        (8, Pos) => "The lungs are clear.",
        (9, Pos) => "Small bilateral pleural effusions.",
        (9, Unc) => "Possible trace left pleural effusion.",
        (9, Neg) => "No pleural effusion.",
        (10, Pos) => "Mild biapical pleural thickening.",
        (10, Unc) => "Possible pleural thickening at the right base.",
        (11, Pos) => "Findings are concerning for pneumonia.",
        (11, Unc) => "Infection cannot be excluded.",
        (11, Neg) => "No evidence of pneumonia.",
        (12, Pos) => "There is a small right apical pneumothorax.",
        (12, Unc) => "A tiny apical pneumothorax cannot be excluded.",
        (12, Neg) => "No pneumothorax.",
        (13, Pos) => {
            "Endotracheal tube terminates 4 cm above the carina. Right internal jugular line tip is in the SVC."
        }
        (13, Unc) => "A catheter is partially imaged.",
        _ => return None,
    })
}

const INDICATIONS: [&str; 8] = [
    "shortness of breath",
    "cough and fever",
    "chest pain",
    "hypoxia",
    "evaluate for pneumonia",
    "line placement",
    "altered mental status",
    "pre-operative evaluation",
];

/// A short, plausible free-text radiology report whose findings agree with the
/// study's CheXpert labels.
pub fn report_text(seed: u64, s: &StudyInfo) -> String {
    let mut rng = SplitMix::new(hash3(seed, 0x2E90, s.study as u64));
    let sex = if rng.next_f64() < 0.5 { "M" } else { "F" };
    let indication = rng.pick(&INDICATIONS);
    let technique = match s.description {
        "CHEST (PORTABLE AP)" => "Portable AP chest radiograph.",
        "CHEST (AP AND LAT)" => "Chest AP and lateral.",
        "CHEST (PA)" => "Chest PA.",
        _ => "Chest PA and lateral.",
    };
    let comparison = if rng.next_f64() < 0.5 {
        "None."
    } else {
        "Prior chest radiograph ___."
    };
    let mut findings: Vec<&str> = Vec::new();
    let mut impression: Vec<&str> = Vec::new();
    for (i, l) in s.labels.iter().enumerate() {
        if let Some(t) = sentence(i, *l) {
            findings.push(t);
            if matches!(l, Label::Pos | Label::Unc) && i != 8 && impression.len() < 2 {
                impression.push(t);
            }
        }
    }
    if findings.is_empty() {
        findings.push("No acute osseous abnormality.");
    }
    if impression.is_empty() {
        impression.push("No acute cardiopulmonary process.");
    }
    format!(
        "                                 FINAL REPORT\n \
         EXAMINATION:  {}\n \n \
         INDICATION:  ___ year old {} with {}.\n \n \
         TECHNIQUE:  {}\n \n \
         COMPARISON:  {}\n \n \
         FINDINGS: \n \n \
         {}\n \n \
         IMPRESSION: \n \n \
         {}\n",
        s.description,
        sex,
        indication,
        technique,
        comparison,
        findings.join("  "),
        impression.join("  ")
    )
}
