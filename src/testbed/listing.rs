//! Object listing with prefix / delimiter / offsets / paging: GCS's listing semantics, once.
//!
//! [`list_sorted`] is a pure function of a name-ordered object set and a query. The testbed's
//! HTTP handler answers with it (through [`list`], over an [`ObjectSource`]), and so does the
//! in-memory `client::fake::FakeClient`, so the unit tests of the core and the tests that go
//! over HTTP see one model of GCS listings, not two that could drift apart.
//!
//! Cost is proportional to the page size (plus one range query per distinct prefix whose
//! objects overflow a batch), never to the bucket size.

use base64::Engine;

use super::source::{ObjectSource, SourceObject};

/// The most entries (items + prefixes) GCS puts in one page.
pub const MAX_PAGE: usize = 1000;

/// One listing query, as the JSON API's `objects.list` takes it.
#[derive(Debug, Default, Clone)]
pub struct ListParams {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub page_token: Option<String>,
    /// `None` or `Some(0)`: the page cap.
    pub max_results: Option<usize>,
    pub start_offset: Option<String>,
    pub end_offset: Option<String>,
}

/// One page of a listing of objects of type `T`.
#[derive(Debug)]
pub struct ListPage<T = SourceObject> {
    pub items: Vec<T>,
    pub prefixes: Vec<String>,
    pub next_page_token: Option<String>,
}

impl<T> Default for ListPage<T> {
    fn default() -> Self {
        ListPage {
            items: Vec::new(),
            prefixes: Vec::new(),
            next_page_token: None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ListError {
    NoSuchBucket,
    BadPageToken,
}

/// What a listing needs to know of an object: its name.
pub trait Named {
    fn name(&self) -> &str;
}

impl Named for SourceObject {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Smallest string greater than every string that starts with `s` (None if there is none).
pub fn prefix_successor(s: &str) -> Option<String> {
    let mut chars: Vec<char> = s.chars().collect();
    while let Some(c) = chars.pop() {
        let mut n = c as u32 + 1;
        if (0xD800..0xE000).contains(&n) {
            n = 0xE000;
        }
        if let Some(nc) = char::from_u32(n) {
            chars.push(nc);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Smallest string strictly greater than `s`.
fn successor(s: &str) -> String {
    let mut r = String::with_capacity(s.len() + 1);
    r.push_str(s);
    r.push('\0');
    r
}

fn encode_token(cursor: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(cursor.as_bytes())
}

fn decode_token(tok: &str) -> Option<String> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok.trim_end_matches('='))
        .ok()?;
    String::from_utf8(b).ok()
}

/// The testbed's listing of one bucket of `src` (what `GET /b/{bucket}/o` answers).
pub fn list(src: &dyn ObjectSource, bucket: &str, p: &ListParams) -> Result<ListPage, ListError> {
    list_sorted(|start, n| src.list_from(bucket, start, n), p, MAX_PAGE)
}

/// Answers the listing query `p` over a name-ordered object set, with pages of at most
/// `page_cap` entries (GCS: [`MAX_PAGE`]; a smaller one exercises paging with few objects).
///
/// `from(start, n)` is the set: up to `n` objects whose names are `>= start`, in byte-wise
/// lexicographic order, or None if there is no such bucket. Page tokens are opaque (the
/// base64 of where the next page starts); a token this function did not make is refused.
pub fn list_sorted<T: Named>(
    mut from: impl FnMut(&str, usize) -> Option<Vec<T>>,
    p: &ListParams,
    page_cap: usize,
) -> Result<ListPage<T>, ListError> {
    let page_cap = page_cap.max(1);
    let max = match p.max_results {
        Some(0) | None => page_cap,
        Some(n) => n.min(page_cap),
    };
    let prefix = p.prefix.as_str();
    let delim = p.delimiter.as_deref().filter(|d| !d.is_empty());
    let end = p.end_offset.as_deref().filter(|e| !e.is_empty());

    let mut cursor = prefix.to_string();
    if let Some(s) = p.start_offset.as_deref()
        && s > cursor.as_str()
    {
        cursor = s.to_string();
    }
    if let Some(t) = p.page_token.as_deref().filter(|t| !t.is_empty()) {
        let c = decode_token(t).ok_or(ListError::BadPageToken)?;
        if c > cursor {
            cursor = c;
        }
    }

    let mut page = ListPage::default();
    let mut count = 0usize;
    // Objects inside this prefix are skipped (it was already emitted).
    let mut skip_prefix: Option<String> = None;

    'outer: loop {
        let want = (max - count + 1).clamp(2, MAX_PAGE + 1);
        let batch = from(&cursor, want).ok_or(ListError::NoSuchBucket)?;
        let exhausted = batch.len() < want;
        if batch.is_empty() {
            break;
        }
        for obj in batch {
            let name = obj.name();
            if !name.starts_with(prefix) {
                break 'outer;
            }
            if let Some(e) = end
                && name >= e
            {
                break 'outer;
            }
            if let Some(sp) = &skip_prefix {
                if name.starts_with(sp.as_str()) {
                    continue;
                }
                skip_prefix = None;
            }
            let collapsed = delim.and_then(|d| {
                name[prefix.len()..]
                    .find(d)
                    .map(|i| name[..prefix.len() + i + d.len()].to_string())
            });
            if count == max {
                // There is at least one more entry: resume right here.
                page.next_page_token = Some(encode_token(name));
                break 'outer;
            }
            count += 1;
            match collapsed {
                Some(pfx) => {
                    match prefix_successor(&pfx) {
                        Some(next) => cursor = next,
                        None => break 'outer,
                    }
                    page.prefixes.push(pfx.clone());
                    skip_prefix = Some(pfx);
                }
                None => {
                    cursor = successor(name);
                    page.items.push(obj);
                }
            }
        }
        if exhausted {
            break;
        }
        // If we are skipping a prefix, jump past its range rather than walking it.
        if skip_prefix.is_some() {
            skip_prefix = None;
        }
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::super::mem::MemSource;
    use super::*;

    fn names(p: &ListPage) -> Vec<&str> {
        p.items.iter().map(|o| o.name.as_str()).collect()
    }

    #[test]
    fn successor_math() {
        assert_eq!(prefix_successor("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_successor("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_successor("x\u{10FFFF}").as_deref(), Some("y"));
        assert_eq!(prefix_successor(""), None);
    }

    #[test]
    fn delimiter_paging_no_repeats() {
        let mut m = MemSource::new();
        for d in 0..30 {
            for f in 0..50 {
                m.insert("b", &format!("dir{d:02}/f{f:03}"), &b"x"[..]);
            }
        }
        m.insert("b", "top.txt", &b"y"[..]);
        let mut all_prefixes = Vec::new();
        let mut items = Vec::new();
        let mut tok = None;
        let mut pages = 0;
        loop {
            let p = list(
                &m,
                "b",
                &ListParams {
                    delimiter: Some("/".into()),
                    max_results: Some(7),
                    page_token: tok.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
            pages += 1;
            all_prefixes.extend(p.prefixes.clone());
            items.extend(names(&p).into_iter().map(String::from));
            match p.next_page_token {
                Some(t) => tok = Some(t),
                None => break,
            }
        }
        assert_eq!(all_prefixes.len(), 30);
        let mut dedup = all_prefixes.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), 30);
        assert_eq!(items, vec!["top.txt"]);
        assert_eq!(pages, 5); // 31 entries / 7
    }

    #[test]
    fn prefix_and_offsets() {
        let mut m = MemSource::new();
        for n in ["a", "a/1", "a/2", "a/3", "b/1", "c"] {
            m.insert("b", n, &b""[..]);
        }
        let p = list(
            &m,
            "b",
            &ListParams {
                prefix: "a/".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(names(&p), vec!["a/1", "a/2", "a/3"]);
        let p = list(
            &m,
            "b",
            &ListParams {
                start_offset: Some("a/2".into()),
                end_offset: Some("b/1".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(names(&p), vec!["a/2", "a/3"]);
        assert!(p.next_page_token.is_none());
        // Exactly max entries and nothing after: no token.
        let p = list(
            &m,
            "b",
            &ListParams {
                prefix: "a/".into(),
                max_results: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(p.next_page_token.is_none());
        assert_eq!(
            list(&m, "nope", &ListParams::default()).unwrap_err(),
            ListError::NoSuchBucket
        );
    }
}
