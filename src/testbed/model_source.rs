//! Serves dataset models (`crate::model`) through the testbed: one bucket per model.
//! Synthetic objects (`--synthetic`) are layered over them by `overlay::Overlay`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::overlay::{Overlay, synthetic_source};
use super::source::{ObjectSource, SourceObject, gcs_hashes};
use crate::cli::{TestbedArgs, TestbedModel as CliKind};
use crate::model::{DatasetModel, ModelConfig, ModelKind, ModelObject};

/// crc32c and md5Hash, base64, as GCS lists them.
type Hashes = (String, Option<String>);

pub struct ModelSource {
    models: Vec<Arc<DatasetModel>>,
    /// Per model: whether listings carry crc32c/md5Hash (see [`HASH_LIMIT_BYTES`]).
    hashed: Vec<bool>,
    /// Hashes computed so far, by (bucket, name).
    memo: Mutex<HashMap<(String, String), Hashes>>,
}

/// Real GCS lists every object with its crc32c and md5Hash. The model's content is generated,
/// so hashing means generating each object once; that is done (and remembered) for models up
/// to this many bytes in all, and skipped for bigger ones (the full-scale model, benchmarks).
pub const HASH_LIMIT_BYTES: u64 = 1 << 30;

impl ModelSource {
    pub fn new(models: Vec<Arc<DatasetModel>>) -> Self {
        let hashed = models
            .iter()
            .map(|m| {
                m.object_count() <= 100_000
                    && m.list_from("", usize::MAX)
                        .iter()
                        .map(|o| o.size)
                        .sum::<u64>()
                        <= HASH_LIMIT_BYTES
            })
            .collect();
        ModelSource {
            models,
            hashed,
            memo: Mutex::new(HashMap::new()),
        }
    }

    /// What the testbed's `--model/--add-model/--patients/--seed/--size-scale` describe, with
    /// `--synthetic` objects over it (specs without a bucket go to the first model's bucket).
    pub fn from_args(args: &TestbedArgs) -> anyhow::Result<Arc<dyn ObjectSource>> {
        let patients = u32::try_from(args.patients)
            .ok()
            .filter(|p| (*p as u64) <= crate::model::MAX_PATIENTS as u64 && *p > 0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--patients {} is out of range (1..={}; the real dataset has {})",
                    args.patients,
                    crate::model::MAX_PATIENTS,
                    crate::model::FULL_PATIENTS
                )
            })?;
        if !(args.size_scale > 0.0 && args.size_scale <= 16.0) {
            anyhow::bail!("--size-scale {} must be in (0, 16]", args.size_scale);
        }
        let mut kinds = vec![args.model];
        for k in &args.add_model {
            if !kinds.contains(k) {
                kinds.push(*k);
            }
        }
        let models: Vec<_> = kinds
            .iter()
            .map(|k| {
                let kind = match k {
                    CliKind::Dicom => ModelKind::Dicom,
                    CliKind::Jpg => ModelKind::Jpg,
                };
                DatasetModel::shared(ModelConfig {
                    kind,
                    patients,
                    seed: args.seed,
                    size_scale: args.size_scale,
                })
            })
            .collect();
        let first = models[0].bucket().to_string();
        let models = Arc::new(ModelSource::new(models));
        if args.synthetic.is_empty() {
            return Ok(models);
        }
        let extra = synthetic_source(&args.synthetic, Some(&first))?;
        Ok(Arc::new(Overlay::new(models, extra)))
    }

    fn model(&self, bucket: &str) -> Option<&DatasetModel> {
        self.models
            .iter()
            .find(|m| m.bucket() == bucket)
            .map(|m| &**m)
    }

    fn is_hashed(&self, bucket: &str) -> bool {
        self.models
            .iter()
            .zip(&self.hashed)
            .any(|(m, h)| *h && m.bucket() == bucket)
    }
}

fn to_source(o: ModelObject) -> SourceObject {
    SourceObject {
        name: o.name,
        size: o.size,
        generation: o.generation,
        updated_unix: o.updated_unix,
        content_type: o.content_type.to_string(),
    }
}

impl ObjectSource for ModelSource {
    fn buckets(&self) -> Vec<String> {
        self.models.iter().map(|m| m.bucket().to_string()).collect()
    }

    fn list_from(&self, bucket: &str, start: &str, limit: usize) -> Option<Vec<SourceObject>> {
        let m = self.model(bucket)?;
        Some(
            m.list_from(start, limit)
                .into_iter()
                .map(to_source)
                .collect(),
        )
    }

    fn stat(&self, bucket: &str, name: &str) -> Option<SourceObject> {
        self.model(bucket)?.stat(name).map(to_source)
    }

    fn read_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        let m = self
            .model(bucket)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such bucket"))?;
        let mo = m
            .stat(&obj.name)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"))?;
        m.read_at(&mo, offset, buf);
        Ok(())
    }

    fn hashes(&self, bucket: &str, obj: &SourceObject) -> Option<(String, Option<String>)> {
        if !self.is_hashed(bucket) {
            return None;
        }
        let key = (bucket.to_string(), obj.name.clone());
        if let Some(h) = self.memo.lock().unwrap().get(&key) {
            return Some(h.clone());
        }
        let m = self.model(bucket)?;
        let mo = m.stat(&obj.name)?;
        let mut buf = vec![0u8; mo.size as usize];
        m.read_at(&mo, 0, &mut buf);
        let (crc, md5) = gcs_hashes(&buf);
        let h = (crc, Some(md5));
        self.memo.lock().unwrap().insert(key, h.clone());
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_model_bucket() {
        let m = DatasetModel::shared(ModelConfig {
            kind: ModelKind::Dicom,
            patients: 3,
            seed: 1,
            size_scale: 0.001,
        });
        let s = ModelSource::new(vec![m.clone()]);
        assert_eq!(s.buckets(), ["mimic-cxr-2.0.0.physionet.org"]);
        let all = s
            .list_from("mimic-cxr-2.0.0.physionet.org", "", 100_000)
            .unwrap();
        assert_eq!(all.len() as u64, m.object_count());
        let o = all.iter().find(|o| o.name.ends_with(".dcm")).unwrap();
        let mut buf = vec![0u8; o.size as usize];
        s.read_at("mimic-cxr-2.0.0.physionet.org", o, 0, &mut buf)
            .unwrap();
        assert_eq!(&buf[128..132], b"DICM");
        assert!(s.list_from("nope", "", 1).is_none());
    }

    #[test]
    fn two_models_and_synthetic_objects() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            tb: TestbedArgs,
        }
        let c = Cli::try_parse_from([
            "x",
            "--patients",
            "3",
            "--size-scale",
            "0.001",
            "--add-model",
            "jpg",
            "--synthetic",
            "bench/1g.bin=1GiB",
            "--synthetic",
            "gs://mimic-cxr-jpg-2.1.0.physionet.org/zz.bin=1000",
        ])
        .unwrap();
        let s = ModelSource::from_args(&c.tb).unwrap();
        let (d, j) = (crate::model::DICOM_BUCKET, crate::model::JPG_BUCKET);
        assert_eq!(s.buckets(), [d, j]);
        let plain = ModelSource::from_args(
            &Cli::try_parse_from(["x", "--patients", "3", "--size-scale", "0.001"])
                .unwrap()
                .tb,
        )
        .unwrap();
        let all = s.list_from(d, "", 100_000).unwrap();
        assert_eq!(
            all.len(),
            plain.list_from(d, "", 100_000).unwrap().len() + 1
        );
        assert!(all.windows(2).all(|w| w[0].name < w[1].name));
        let big = s.stat(d, "bench/1g.bin").unwrap();
        assert_eq!(big.size, 1 << 30);
        let mut buf = vec![0u8; 1 << 16];
        s.read_at(d, &big, (1 << 30) - (1 << 16), &mut buf).unwrap();
        assert!(buf.iter().any(|&v| v != 0));
        assert_eq!(s.stat(j, "zz.bin").unwrap().size, 1000);
        assert!(
            s.list_from(j, "", 100_000)
                .unwrap()
                .iter()
                .any(|o| o.name.ends_with(".jpg"))
        );
        // Model objects still read as before.
        let o = all.iter().find(|o| o.name.ends_with(".dcm")).unwrap();
        let mut h = vec![0u8; 132];
        s.read_at(d, o, 0, &mut h).unwrap();
        assert_eq!(&h[128..132], b"DICM");
    }
}
