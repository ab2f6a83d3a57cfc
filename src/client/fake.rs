//! An in-memory object store with GCS listing semantics and request counters, for unit tests
//! of the core without a kernel or a network.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ClientError, ListPage, ListRequest, ObjectClient, ObjectMeta, ObjectVersion};

#[derive(Default)]
pub struct FakeClient {
    bucket: String,
    objects: Mutex<BTreeMap<String, (ObjectMeta, Bytes)>>,
    /// Page size cap, like GCS's 1,000.
    pub page_cap: usize,
    pub list_calls: AtomicU64,
    pub stat_calls: AtomicU64,
    pub get_calls: AtomicU64,
    /// Fail this many upcoming requests with the given error.
    fail_next: Mutex<Option<(u32, ClientError)>>,
}

impl FakeClient {
    pub fn new(bucket: &str) -> Self {
        FakeClient {
            bucket: bucket.to_string(),
            page_cap: 1000,
            ..Default::default()
        }
    }

    /// Caps pages at `cap` entries (to exercise paging with few objects).
    pub fn with_page_cap(mut self, cap: usize) -> Self {
        self.page_cap = cap;
        self
    }

    pub fn put(&self, name: &str, data: impl Into<Bytes>) -> ObjectMeta {
        let data = data.into();
        let mut objects = self.objects.lock().unwrap();
        let generation = objects.get(name).map_or(1, |(m, _)| m.generation + 1);
        let meta = ObjectMeta {
            name: name.to_string(),
            size: data.len() as u64,
            generation,
            updated: SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_600_000_000 + generation as u64),
            crc32c: Some(crc32c::crc32c(&data)),
        };
        objects.insert(name.to_string(), (meta.clone(), data));
        meta
    }

    pub fn fail_next(&self, count: u32, err: ClientError) {
        *self.fail_next.lock().unwrap() = Some((count, err));
    }

    fn injected(&self) -> Result<(), ClientError> {
        let mut f = self.fail_next.lock().unwrap();
        if let Some((n, e)) = f.as_mut() {
            let e = e.clone();
            *n -= 1;
            if *n == 0 {
                *f = None;
            }
            return Err(e);
        }
        Ok(())
    }

    pub fn requests(&self) -> u64 {
        self.list_calls.load(Ordering::Relaxed)
            + self.stat_calls.load(Ordering::Relaxed)
            + self.get_calls.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl ObjectClient for FakeClient {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn list_page(&self, req: &ListRequest) -> Result<ListPage, ClientError> {
        self.list_calls.fetch_add(1, Ordering::Relaxed);
        self.injected()?;
        let objects = self.objects.lock().unwrap();
        let cap = req
            .max_results
            .map_or(self.page_cap, |m| (m as usize).min(self.page_cap));
        let mut start = req.prefix.clone();
        if let Some(s) = &req.start_offset {
            start = start.max(s.clone());
        }
        // The page token is the last name (or prefix) returned; continue strictly after it.
        let after = req.page_token.clone();
        let mut page = ListPage::default();
        let mut last = None;
        for (name, (meta, _)) in objects.range(start..) {
            if !name.starts_with(&req.prefix) {
                break;
            }
            if req.end_offset.as_ref().is_some_and(|e| name >= e) {
                break;
            }
            let entry = match &req.delimiter {
                Some(d) => match name[req.prefix.len()..].find(d.as_str()) {
                    Some(i) => Err(name[..req.prefix.len() + i + d.len()].to_string()),
                    None => Ok(meta),
                },
                None => Ok(meta),
            };
            let key = match &entry {
                Ok(m) => m.name.clone(),
                Err(p) => p.clone(),
            };
            if after.as_ref().is_some_and(|a| key <= *a) {
                continue;
            }
            if last.as_ref() == Some(&key) {
                continue;
            }
            if page.items.len() + page.prefixes.len() == cap {
                page.next_page_token = last.clone();
                break;
            }
            match entry {
                Ok(m) => page.items.push(m.clone()),
                Err(p) => page.prefixes.push(p),
            }
            last = Some(key);
        }
        Ok(page)
    }

    async fn stat(&self, name: &str) -> Result<ObjectMeta, ClientError> {
        self.stat_calls.fetch_add(1, Ordering::Relaxed);
        self.injected()?;
        self.objects
            .lock()
            .unwrap()
            .get(name)
            .map(|(m, _)| m.clone())
            .ok_or_else(|| ClientError::NotFound(name.to_string()))
    }

    async fn get_range(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ClientError> {
        let (name, generation, object_size) = (obj.name, obj.generation, obj.size);
        self.get_calls.fetch_add(1, Ordering::Relaxed);
        self.injected()?;
        let objects = self.objects.lock().unwrap();
        let (meta, data) = objects
            .get(name)
            .ok_or_else(|| ClientError::NotFound(name.to_string()))?;
        if meta.generation != generation {
            return Err(ClientError::NotFound(format!("{name}#{generation}")));
        }
        assert_eq!(
            meta.size, object_size,
            "caller's size disagrees with the store"
        );
        if start > end || end > meta.size {
            return Err(ClientError::Http {
                status: 416,
                message: "range not satisfiable".into(),
            });
        }
        Ok(data.slice(start as usize..end as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::list_all;

    #[tokio::test]
    async fn listing_pages_and_delimits() {
        let c = FakeClient::new("b").with_page_cap(3);
        for n in ["a/1", "a/2", "a/x/1", "a/x/2", "a/y/1", "a/z", "b"] {
            c.put(n, "x");
        }
        let req = ListRequest {
            prefix: "a/".into(),
            delimiter: Some("/".into()),
            ..Default::default()
        };
        let all = list_all(&c, &req).await.unwrap();
        let names: Vec<_> = all.items.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a/1", "a/2", "a/z"]);
        assert_eq!(all.prefixes, ["a/x/", "a/y/"]);
        assert_eq!(c.list_calls.load(Ordering::Relaxed), 2);
        let flat = list_all(&c, &ListRequest::default()).await.unwrap();
        assert_eq!(flat.items.len(), 7);
    }
}
