//! Runtime-changeable fault / latency / auth knobs, and `POST /_testbed/faults` updates.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The knobs in force. Serialized (durations as humantime strings) by `GET /_testbed/faults`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Knobs {
    #[serde(serialize_with = "ser_dur")]
    pub first_byte_latency: Duration,
    /// Per-connection body rate cap in bytes/s (None = unlimited).
    pub bandwidth: Option<u64>,
    pub fail_rate: f64,
    pub reset_rate: f64,
    pub truncate_rate: f64,
    pub stall_rate: f64,
    #[serde(serialize_with = "ser_dur")]
    pub stall_duration: Duration,
    pub requester_pays: bool,
    /// Accepted bearer tokens; an entry ending in `*` accepts any token with that prefix.
    pub require_tokens: Vec<String>,
    #[serde(serialize_with = "ser_opt_dur")]
    pub token_ttl: Option<Duration>,
    /// Abort every storage connection (TCP reset) without answering.
    pub unavailable: bool,
    /// Fraction of media bodies with one byte flipped (length and headers intact).
    pub corrupt_rate: f64,
    /// Extra first-byte latency, uniform in [0, this), on top of `first_byte_latency`.
    #[serde(serialize_with = "ser_dur")]
    pub latency_jitter: Duration,
    /// Every answer of the kind this names is malformed this way (see [`Malformed`]).
    pub malformed: Option<Malformed>,
    /// Buckets whose caller lacks `storage.objects.list` (listings 403, and testPermissions
    /// leaves it out), or `storage.objects.get` (object reads 403): a grant of one, not both.
    pub deny_list: Vec<String>,
    pub deny_get: Vec<String>,
    /// Tokens (an entry ending in `*`: a prefix) answered 401 Invalid Credentials, as GCS
    /// answers a revoked or expired one, though `require_tokens` accepts them. Set at run
    /// time only (`{"revoke_tokens": [...]}`), to make a client's token go bad under it.
    pub revoked_tokens: Vec<String>,
}

/// Ways to break a server answer, for testing clients against malformed responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Malformed {
    /// Listing and metadata bodies cut in half (invalid JSON).
    BadJson,
    /// Objects in listings and metadata lack `size`.
    MissingSize,
    /// `size` is not a number.
    NonNumericSize,
    /// `crc32c` is not base64 of 4 bytes.
    BadCrc,
    /// Every listing page says `nextPageToken: "loop"`, forever.
    RepeatToken,
    /// Listing pages padded past 64 MiB.
    HugePage,
    /// 206 answers without Content-Range.
    NoContentRange,
    /// 206 answers whose Content-Range starts one byte late.
    WrongContentRange,
    /// Media answers carry another x-goog-generation.
    WrongGeneration,
    /// Media answers announce 7 more bytes than they send.
    ShortBody,
}

impl Malformed {
    pub fn parse(s: &str) -> Result<Option<Malformed>, String> {
        if s.is_empty() || s == "none" {
            return Ok(None);
        }
        <Malformed as clap::ValueEnum>::from_str(s, false)
            .map(Some)
            .map_err(|_| {
                let names: Vec<String> = <Malformed as clap::ValueEnum>::value_variants()
                    .iter()
                    .filter_map(|v| {
                        clap::ValueEnum::to_possible_value(v).map(|p| p.get_name().to_string())
                    })
                    .collect();
                format!(
                    "unknown malformation {s:?} (one of: none, {})",
                    names.join(", ")
                )
            })
    }
}

fn ser_dur<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_opt_dur<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_dur(d, s),
        None => s.serialize_none(),
    }
}

/// A duration given as a humantime string (`"30ms"`) or a number of milliseconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Millis(u64),
    Text(String),
}

impl DurationValue {
    fn get(&self) -> Result<Duration, String> {
        match self {
            DurationValue::Millis(ms) => Ok(Duration::from_millis(*ms)),
            DurationValue::Text(t) => {
                humantime::parse_duration(t).map_err(|e| format!("bad duration {t:?}: {e}"))
            }
        }
    }
}

/// A rate given as `"200MB/s"` / `"unlimited"` or a number of bytes per second (0 = unlimited).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RateValue {
    BytesPerSec(u64),
    Text(String),
}

/// Parse `200MB/s`, `1.5GiB/s`, `500KB`, `unlimited`, `0` into bytes/s (None = unlimited).
pub fn parse_bandwidth(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.is_empty()
        || t.eq_ignore_ascii_case("unlimited")
        || t.eq_ignore_ascii_case("none")
        || t == "0"
    {
        return Ok(None);
    }
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t)
        .trim();
    let n = t
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("bad bandwidth {s:?}: {e}"))?
        .as_u64();
    Ok((n > 0).then_some(n))
}

/// Body of `POST /_testbed/faults`: every field optional; absent = unchanged.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsUpdate {
    /// Restore the knobs the server started with (applied before the other fields).
    #[serde(default)]
    pub reset: bool,
    pub first_byte_latency: Option<DurationValue>,
    pub bandwidth: Option<RateValue>,
    pub fail_rate: Option<f64>,
    pub reset_rate: Option<f64>,
    pub truncate_rate: Option<f64>,
    pub stall_rate: Option<f64>,
    pub stall_duration: Option<DurationValue>,
    pub requester_pays: Option<bool>,
    pub require_tokens: Option<Vec<String>>,
    /// Duration, or 0 / "0s" for no expiry.
    pub token_ttl: Option<DurationValue>,
    /// Replaces [`Knobs::revoked_tokens`].
    pub revoke_tokens: Option<Vec<String>>,
    pub unavailable: Option<bool>,
    pub corrupt_rate: Option<f64>,
    pub latency_jitter: Option<DurationValue>,
    /// A [`Malformed`] name, or `"none"`.
    pub malformed: Option<String>,
    /// Forget when each token was first used (restarts their TTL).
    #[serde(default)]
    pub forget_tokens: bool,
}

impl KnobsUpdate {
    pub fn apply(&self, k: &mut Knobs, initial: &Knobs) -> Result<(), String> {
        let mut n = if self.reset {
            initial.clone()
        } else {
            k.clone()
        };
        if let Some(d) = &self.first_byte_latency {
            n.first_byte_latency = d.get()?;
        }
        if let Some(b) = &self.bandwidth {
            n.bandwidth = match b {
                RateValue::BytesPerSec(0) => None,
                RateValue::BytesPerSec(v) => Some(*v),
                RateValue::Text(t) => parse_bandwidth(t)?,
            };
        }
        for (src, dst) in [
            (self.fail_rate, &mut n.fail_rate),
            (self.reset_rate, &mut n.reset_rate),
            (self.truncate_rate, &mut n.truncate_rate),
            (self.stall_rate, &mut n.stall_rate),
            (self.corrupt_rate, &mut n.corrupt_rate),
        ] {
            if let Some(v) = src {
                if !(0.0..=1.0).contains(&v) {
                    return Err(format!("rate {v} not within 0..=1"));
                }
                *dst = v;
            }
        }
        if let Some(d) = &self.stall_duration {
            n.stall_duration = d.get()?;
        }
        if let Some(v) = self.requester_pays {
            n.requester_pays = v;
        }
        if let Some(v) = &self.require_tokens {
            n.require_tokens = v.clone();
        }
        if let Some(v) = &self.revoke_tokens {
            n.revoked_tokens = v.clone();
        }
        if let Some(d) = &self.token_ttl {
            let d = d.get()?;
            n.token_ttl = (!d.is_zero()).then_some(d);
        }
        if let Some(v) = self.unavailable {
            n.unavailable = v;
        }
        if let Some(d) = &self.latency_jitter {
            n.latency_jitter = d.get()?;
        }
        if let Some(m) = &self.malformed {
            n.malformed = Malformed::parse(m)?;
        }
        *k = n;
        Ok(())
    }
}

/// Deterministic splitmix64 RNG.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x7E57_BED0_0000_0001)
    }
    pub fn next_u64(&mut self) -> u64 {
        super::mem::splitmix64(&mut self.0)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_parse() {
        assert_eq!(parse_bandwidth("200MB/s").unwrap(), Some(200_000_000));
        assert_eq!(parse_bandwidth("1MiB/s").unwrap(), Some(1 << 20));
        assert_eq!(parse_bandwidth("unlimited").unwrap(), None);
        assert_eq!(parse_bandwidth("0").unwrap(), None);
        assert!(parse_bandwidth("fast").is_err());
    }

    #[test]
    fn update_json() {
        let mut k = Knobs::default();
        let init = Knobs::default();
        let u: KnobsUpdate = serde_json::from_str(
            r#"{"fail_rate":0.5,"first_byte_latency":"30ms","bandwidth":"1MB/s","stall_duration":250,"unavailable":true}"#,
        )
        .unwrap();
        u.apply(&mut k, &init).unwrap();
        assert_eq!(k.fail_rate, 0.5);
        assert_eq!(k.first_byte_latency, Duration::from_millis(30));
        assert_eq!(k.bandwidth, Some(1_000_000));
        assert_eq!(k.stall_duration, Duration::from_millis(250));
        assert!(k.unavailable);
        let u: KnobsUpdate = serde_json::from_str(r#"{"reset":true}"#).unwrap();
        u.apply(&mut k, &init).unwrap();
        assert!(!k.unavailable);
        assert!(serde_json::from_str::<KnobsUpdate>(r#"{"nope":1}"#).is_err());
        let u: KnobsUpdate =
            serde_json::from_str(r#"{"malformed":"bad-json","corrupt_rate":0.25}"#).unwrap();
        u.apply(&mut k, &init).unwrap();
        assert_eq!(k.malformed, Some(Malformed::BadJson));
        assert_eq!(k.corrupt_rate, 0.25);
        let u: KnobsUpdate = serde_json::from_str(r#"{"malformed":"none"}"#).unwrap();
        u.apply(&mut k, &init).unwrap();
        assert_eq!(k.malformed, None);
        let u: KnobsUpdate = serde_json::from_str(r#"{"malformed":"nonsense"}"#).unwrap();
        assert!(u.apply(&mut k, &init).unwrap_err().contains("bad-json"));
    }
}
