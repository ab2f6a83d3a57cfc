//! Serves dataset models (`crate::model`) through the testbed: one bucket per model.

use std::sync::Arc;

use super::{ModelKind as CliKind, ObjectSource, SourceObject, TestbedArgs};
use crate::model::{DatasetModel, ModelConfig, ModelKind, ModelObject};

pub struct ModelSource {
    models: Vec<Arc<DatasetModel>>,
}

impl ModelSource {
    pub fn new(models: Vec<Arc<DatasetModel>>) -> Self {
        ModelSource { models }
    }

    /// The model the testbed's `--model/--patients/--seed/--size-scale` describe.
    pub fn from_args(args: &TestbedArgs) -> anyhow::Result<Self> {
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
        let kind = match args.model {
            CliKind::Dicom => ModelKind::Dicom,
            CliKind::Jpg => ModelKind::Jpg,
        };
        Ok(ModelSource::new(vec![DatasetModel::shared(ModelConfig {
            kind,
            patients,
            seed: args.seed,
            size_scale: args.size_scale,
        })]))
    }

    fn model(&self, bucket: &str) -> Option<&DatasetModel> {
        self.models.iter().find(|m| m.bucket() == bucket).map(|m| &**m)
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
        Some(m.list_from(start, limit).into_iter().map(to_source).collect())
    }

    fn stat(&self, bucket: &str, name: &str) -> Option<SourceObject> {
        self.model(bucket)?.stat(name).map(to_source)
    }

    fn read_at(&self, bucket: &str, obj: &SourceObject, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let m = self
            .model(bucket)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such bucket"))?;
        let mo = m
            .stat(&obj.name)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"))?;
        m.read_at(&mo, offset, buf);
        Ok(())
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
        let all = s.list_from("mimic-cxr-2.0.0.physionet.org", "", 100_000).unwrap();
        assert_eq!(all.len() as u64, m.object_count());
        let o = all.iter().find(|o| o.name.ends_with(".dcm")).unwrap();
        let mut buf = vec![0u8; o.size as usize];
        s.read_at("mimic-cxr-2.0.0.physionet.org", o, 0, &mut buf).unwrap();
        assert_eq!(&buf[128..132], b"DICM");
        assert!(s.list_from("nope", "", 1).is_none());
    }
}
