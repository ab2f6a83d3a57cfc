//! An in-memory object store with request counters and fault hooks, for unit tests of the
//! core without a kernel or a network.
//!
//! Listings are answered by the testbed's own listing function ([`listing::list_sorted`]), so
//! paging, delimiters, offsets and page tokens behave here exactly as they do over HTTP
//! against the testbed, which in turn is checked against fake-gcs-server and GCS's documented
//! behaviour (tests/testbed_conformance.rs). Faults beyond `fail_next` are injected by
//! wrapping this client in [`super::failure::FailureClient`].

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ClientError, ListPage, ListRequest, ObjectClient, ObjectMeta, ObjectVersion};
use crate::testbed::listing::{self, ListError, ListParams, Named};

impl Named for ObjectMeta {
    fn name(&self) -> &str {
        &self.name
    }
}

/// The client's listing request as the listing function takes it.
fn params(r: &ListRequest) -> ListParams {
    ListParams {
        prefix: r.prefix.clone(),
        delimiter: r.delimiter.clone(),
        page_token: r.page_token.clone(),
        max_results: r.max_results.map(|m| m as usize),
        start_offset: r.start_offset.clone(),
        end_offset: r.end_offset.clone(),
    }
}

#[derive(Default)]
pub struct FakeClient {
    bucket: String,
    objects: Mutex<BTreeMap<String, (ObjectMeta, Bytes)>>,
    /// Page size cap, like GCS's 1,000 (`listing::MAX_PAGE`).
    pub page_cap: usize,
    pub list_calls: AtomicU64,
    pub stat_calls: AtomicU64,
    pub get_calls: AtomicU64,
    /// Bytes media reads returned.
    pub get_bytes: AtomicU64,
    /// Fail this many upcoming requests with the given error.
    fail_next: Mutex<Option<(u32, ClientError)>>,
}

impl FakeClient {
    pub fn new(bucket: &str) -> Self {
        FakeClient {
            bucket: bucket.to_string(),
            page_cap: listing::MAX_PAGE,
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
            crc32c: Some(crate::crc::crc32c(&data)),
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
        let from = |start: &str, n: usize| {
            Some(
                objects
                    .range::<str, _>((Bound::Included(start), Bound::Unbounded))
                    .take(n)
                    .map(|(_, (meta, _))| meta.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let page =
            listing::list_sorted(from, &params(req), self.page_cap).map_err(|e| match e {
                ListError::BadPageToken => ClientError::Http {
                    status: 400,
                    message: format!("Invalid page token {:?}.", req.page_token),
                },
                ListError::NoSuchBucket => ClientError::NotFound(self.bucket.clone()),
            })?;
        Ok(ListPage {
            items: page.items,
            prefixes: page.prefixes,
            next_page_token: page.next_page_token,
        })
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
        self.get_bytes.fetch_add(end - start, Ordering::Relaxed);
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

    #[tokio::test]
    async fn page_tokens_are_the_testbeds() {
        let c = FakeClient::new("b").with_page_cap(2);
        for n in ["a", "b", "c"] {
            c.put(n, "x");
        }
        let first = c.list_page(&ListRequest::default()).await.unwrap();
        let tok = first.next_page_token.expect("a second page");
        // The same token the testbed hands out over HTTP for the same set.
        let mut m = crate::testbed::MemSource::new();
        for n in ["a", "b", "c"] {
            m.insert("b", n, &b"x"[..]);
        }
        let over_http = listing::list(
            &m,
            "b",
            &ListParams {
                max_results: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(over_http.next_page_token.as_deref(), Some(tok.as_str()));
        let bad = ListRequest {
            page_token: Some("not base64 !".into()),
            ..Default::default()
        };
        let e = c.list_page(&bad).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
    }
}
