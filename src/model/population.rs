//! The patient / study / image population: a compact, sorted, flat structure.
//!
//! Only ids and counts are stored (about 6 MB at full scale); every other
//! attribute (dicom ids, views, dates, labels, ...) is derived on demand from
//! the seed and these ids. The population does not depend on the bucket kind,
//! so the DICOM and JPG models built with the same seed describe the same
//! patients, studies and dicom ids (as in the real buckets).

use super::rng::{SplitMix, hash2, hash3};

/// Real MIMIC-CXR totals.
pub const FULL_PATIENTS: u64 = 65_379;
pub const FULL_STUDIES: u64 = 227_835;
pub const FULL_IMAGES: u64 = 377_110;

/// Upper bound on `patients` (subject ids must stay 8-digit and unique).
pub const MAX_PATIENTS: u32 = 1_000_000;

const SUBJECT_LO: u64 = 10_000_032;
const SUBJECT_HI: u64 = 19_999_997; // inclusive
const STUDY_LO: u64 = 50_000_000;
const STUDY_HI: u64 = 59_999_999; // inclusive

pub struct Population {
    /// Sorted, unique 8-digit subject ids.
    pub subjects: Vec<u32>,
    /// `subj_start[i]..subj_start[i+1]` = global study indices of subject i.
    pub subj_start: Vec<u32>,
    /// Study ids (unique), grouped by subject, ascending within a subject.
    /// Global study order == listing order.
    pub studies: Vec<u32>,
    /// `img_start[g]..img_start[g+1]` = global image indices of study g (1..=3 images).
    pub img_start: Vec<u32>,
}

/// Pick `n` sorted unique values in `[lo, hi]`: one uniformly random value in
/// each of `n` equal-width buckets.
fn spread_ids(rng: &mut SplitMix, n: u64, lo: u64, hi: u64) -> Vec<u32> {
    let span = hi - lo + 1;
    assert!(n <= span);
    (0..n)
        .map(|i| {
            let a = lo + i * span / n;
            let b = lo + (i + 1) * span / n; // exclusive, b > a since n <= span
            (a + rng.below(b - a)) as u32
        })
        .collect()
}

impl Population {
    pub fn new(patients: u32, seed: u64) -> Self {
        let n = patients.min(MAX_PATIENTS) as u64;
        // Totals: exact at full scale, proportional otherwise.
        let s_total = (n * FULL_STUDIES + FULL_PATIENTS / 2) / FULL_PATIENTS;
        let s_total = s_total.max(n);
        let i_total = (n * FULL_IMAGES + FULL_PATIENTS / 2) / FULL_PATIENTS;
        let i_total = i_total.clamp(s_total, 3 * s_total);

        let mut rng = SplitMix::new(hash2(seed, 0x5EB1_EC75));
        let subjects = spread_ids(&mut rng, n, SUBJECT_LO, SUBJECT_HI);

        // Studies per patient: 1 + a heavy-tailed share of the extra studies,
        // largest-remainder style so the total is exact.
        let extra = s_total - n;
        let weights: Vec<f64> = (0..n)
            .map(|_| {
                let u = 1.0 - rng.next_f64(); // (0, 1]
                let e = -u.ln();
                e * e
            })
            .collect();
        let wsum: f64 = weights.iter().sum();
        let mut counts: Vec<u64> = weights
            .iter()
            .map(|w| {
                if wsum > 0.0 {
                    (extra as f64 * w / wsum).floor() as u64
                } else {
                    0
                }
            })
            .collect();
        let assigned: u64 = counts.iter().sum();
        let mut rest = extra.saturating_sub(assigned);
        if n > 0 {
            let mut order: Vec<u32> = (0..n as u32).collect();
            rng.shuffle(&mut order);
            let mut k = 0usize;
            while rest > 0 {
                counts[order[k % order.len()] as usize] += 1;
                rest -= 1;
                k += 1;
            }
        }
        let mut subj_start = Vec::with_capacity(n as usize + 1);
        let mut acc = 0u32;
        subj_start.push(0);
        for c in &counts {
            acc += 1 + *c as u32;
            subj_start.push(acc);
        }
        debug_assert_eq!(acc as u64, s_total);

        // Study ids: sorted unique spread, shuffled, then sorted per subject.
        let mut studies = spread_ids(&mut rng, s_total, STUDY_LO, STUDY_HI);
        rng.shuffle(&mut studies);
        for i in 0..n as usize {
            studies[subj_start[i] as usize..subj_start[i + 1] as usize].sort_unstable();
        }

        // Images per study: exact numbers of 1-, 2- and 3-image studies, shuffled.
        let e = i_total - s_total;
        let n3 = (s_total / 10).min(e / 2);
        let n2 = e - 2 * n3;
        let n1 = s_total - n2 - n3;
        let mut per: Vec<u8> = Vec::with_capacity(s_total as usize);
        per.extend(std::iter::repeat_n(1u8, n1 as usize));
        per.extend(std::iter::repeat_n(2u8, n2 as usize));
        per.extend(std::iter::repeat_n(3u8, n3 as usize));
        rng.shuffle(&mut per);
        let mut img_start = Vec::with_capacity(s_total as usize + 1);
        let mut acc = 0u32;
        img_start.push(0);
        for c in &per {
            acc += *c as u32;
            img_start.push(acc);
        }
        debug_assert_eq!(acc as u64, i_total);

        Population {
            subjects,
            subj_start,
            studies,
            img_start,
        }
    }

    pub fn patient_count(&self) -> u64 {
        self.subjects.len() as u64
    }
    pub fn study_count(&self) -> u64 {
        self.studies.len() as u64
    }
    pub fn image_count(&self) -> u64 {
        *self.img_start.last().unwrap() as u64
    }
    pub fn images_in(&self, g: usize) -> usize {
        (self.img_start[g + 1] - self.img_start[g]) as usize
    }
    /// Subject index owning global study index `g`.
    pub fn subject_of(&self, g: usize) -> usize {
        self.subj_start.partition_point(|&s| s as usize <= g) - 1
    }
    pub fn find_subject(&self, subject: u32) -> Option<usize> {
        self.subjects.binary_search(&subject).ok()
    }
    /// Global study index of `study` under subject index `si`.
    pub fn find_study(&self, si: usize, study: u32) -> Option<usize> {
        let a = self.subj_start[si] as usize;
        let b = self.subj_start[si + 1] as usize;
        self.studies[a..b].binary_search(&study).ok().map(|k| a + k)
    }
}

/// A dicom id: five 32-bit groups, printed as `%08x-%08x-%08x-%08x-%08x`.
/// Numeric order of the array equals the lexicographic order of the string.
pub type DicomId = [u32; 5];

pub fn format_dicom_id(id: &DicomId) -> String {
    format!(
        "{:08x}-{:08x}-{:08x}-{:08x}-{:08x}",
        id[0], id[1], id[2], id[3], id[4]
    )
}

/// The id a name spells, or None. The name comes from a request, so its bytes are checked
/// before anything is sliced (a multi-byte character is a miss, not a panic).
pub fn parse_dicom_id(s: &str) -> Option<DicomId> {
    let b = s.as_bytes();
    if b.len() != 44 {
        return None;
    }
    let mut id = [0u32; 5];
    for (k, v) in id.iter_mut().enumerate() {
        let part = &b[k * 9..k * 9 + 8];
        if k < 4 && b[k * 9 + 8] != b'-' {
            return None;
        }
        if !part
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        {
            return None;
        }
        *v = part.iter().fold(0u32, |acc, c| {
            (acc << 4) | (*c as char).to_digit(16).unwrap()
        });
    }
    Some(id)
}

/// The `k`-th generated image of a study (generation order, not listing order).
pub fn dicom_id(seed: u64, study: u32, k: usize) -> DicomId {
    let h1 = hash3(seed, 0xD1C0_0001, ((study as u64) << 8) | k as u64);
    let h2 = hash2(h1, 0xD1C0_0002);
    let h3 = hash2(h1, 0xD1C0_0003);
    [
        (h1 >> 32) as u32,
        h1 as u32,
        (h2 >> 32) as u32,
        h2 as u32,
        (h3 >> 32) as u32,
    ]
}
