//! Object listing with prefix / delimiter / offsets / paging, on top of `ObjectSource::list_from`.
//!
//! Cost is proportional to the page size (plus one `list_from` per distinct prefix whose
//! objects overflow a batch), never to the bucket size.

use base64::Engine;

use super::source::{ObjectSource, SourceObject};

pub const MAX_PAGE: usize = 1000;

#[derive(Debug, Default, Clone)]
pub struct ListParams {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub page_token: Option<String>,
    pub max_results: Option<usize>,
    pub start_offset: Option<String>,
    pub end_offset: Option<String>,
}

#[derive(Debug, Default)]
pub struct ListPage {
    pub items: Vec<SourceObject>,
    pub prefixes: Vec<String>,
    pub next_page_token: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ListError {
    NoSuchBucket,
    BadPageToken,
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

pub fn list(src: &dyn ObjectSource, bucket: &str, p: &ListParams) -> Result<ListPage, ListError> {
    let max = match p.max_results {
        Some(0) | None => MAX_PAGE,
        Some(n) => n.min(MAX_PAGE),
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
        let batch = src
            .list_from(bucket, &cursor, want)
            .ok_or(ListError::NoSuchBucket)?;
        let exhausted = batch.len() < want;
        if batch.is_empty() {
            break;
        }
        for obj in batch {
            if !obj.name.starts_with(prefix) {
                break 'outer;
            }
            if let Some(e) = end
                && obj.name.as_str() >= e
            {
                break 'outer;
            }
            if let Some(sp) = &skip_prefix {
                if obj.name.starts_with(sp.as_str()) {
                    continue;
                }
                skip_prefix = None;
            }
            let collapsed = delim.and_then(|d| {
                obj.name[prefix.len()..]
                    .find(d)
                    .map(|i| obj.name[..prefix.len() + i + d.len()].to_string())
            });
            if count == max {
                // There is at least one more entry: resume right here.
                page.next_page_token = Some(encode_token(&obj.name));
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
                    cursor = successor(&obj.name);
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
