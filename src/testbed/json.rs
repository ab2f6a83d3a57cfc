//! GCS JSON shapes: object/bucket resources, listings, errors.

use serde::Serialize;

use super::source::{SourceObject, b64};

/// `unix` seconds as RFC 3339 with milliseconds and `Z`, e.g. `2023-11-14T22:13:20.000Z`.
pub fn rfc3339_millis(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

// Howard Hinnant's days -> civil date algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// GCS-style etag: base64 of the protobuf-ish `08 <varint generation> 10 01`.
pub fn etag(generation: i64) -> String {
    let mut v = vec![0x08u8];
    let mut g = generation as u64;
    loop {
        let b = (g & 0x7f) as u8;
        g >>= 7;
        if g == 0 {
            v.push(b);
            break;
        }
        v.push(b | 0x80);
    }
    v.extend_from_slice(&[0x10, 0x01]);
    b64(&v)
}

/// Percent-encode an object name as one path segment (like GCS selfLinks).
pub fn encode_segment(s: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const SEG: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(s, SEG).to_string()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectJson {
    pub kind: &'static str,
    pub id: String,
    pub self_link: String,
    pub media_link: String,
    pub name: String,
    pub bucket: String,
    pub generation: String,
    pub metageneration: &'static str,
    pub content_type: String,
    pub storage_class: &'static str,
    pub size: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub md5_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
    pub etag: String,
    pub time_created: String,
    pub updated: String,
    pub time_storage_class_updated: String,
}

impl ObjectJson {
    pub fn new(
        base: &str,
        bucket: &str,
        o: &SourceObject,
        hashes: Option<(String, Option<String>)>,
    ) -> Self {
        let enc = encode_segment(&o.name);
        let t = rfc3339_millis(o.updated_unix);
        let (crc32c, md5_hash) = match hashes {
            Some((c, m)) => (Some(c), m),
            None => (None, None),
        };
        ObjectJson {
            kind: "storage#object",
            id: format!("{bucket}/{}/{}", o.name, o.generation),
            self_link: format!("{base}/storage/v1/b/{bucket}/o/{enc}"),
            media_link: format!(
                "{base}/download/storage/v1/b/{bucket}/o/{enc}?generation={}&alt=media",
                o.generation
            ),
            name: o.name.clone(),
            bucket: bucket.to_string(),
            generation: o.generation.to_string(),
            metageneration: "1",
            content_type: o.content_type.clone(),
            storage_class: "STANDARD",
            size: o.size.to_string(),
            md5_hash,
            crc32c,
            etag: etag(o.generation),
            time_created: t.clone(),
            updated: t.clone(),
            time_storage_class_updated: t,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListJson {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ObjectJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketJson {
    pub kind: &'static str,
    pub self_link: String,
    pub id: String,
    pub name: String,
    pub project_number: &'static str,
    pub metageneration: &'static str,
    pub location: &'static str,
    pub location_type: &'static str,
    pub storage_class: &'static str,
    pub etag: &'static str,
    pub time_created: String,
    pub updated: String,
}

impl BucketJson {
    pub fn new(base: &str, name: &str) -> Self {
        let t = rfc3339_millis(1_600_000_000);
        BucketJson {
            kind: "storage#bucket",
            self_link: format!("{base}/storage/v1/b/{name}"),
            id: name.to_string(),
            name: name.to_string(),
            project_number: "000000000000",
            metageneration: "1",
            location: "US",
            location_type: "multi-region",
            storage_class: "STANDARD",
            etag: "CAE=",
            time_created: t.clone(),
            updated: t,
        }
    }
}

/// `{"error":{"code":N,"message":"...","errors":[{"message":"...","domain":"global","reason":"..."}]}}`
pub fn error_body(code: u16, message: &str, reason: &str) -> String {
    serde_json::json!({
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}]
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(1_700_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(rfc3339_millis(951_782_400), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn etag_format() {
        // GCS: generation 1 -> "CAEQAQ=="
        assert_eq!(etag(1), "CAEQAQ==");
    }
}
