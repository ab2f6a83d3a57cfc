//! Media reads over connections of our own: HTTP/1.1, plain or TLS, kept alive in a pool.
//!
//! reqwest (over hyper) costs a media read twice what it must (`bench/client-probe`, README
//! "Where the mount's CPU goes"): about 200 us of CPU per 64 KiB GET over TLS where a bare
//! HTTP/1.1 loop takes about 100, and ~10% more per GiB on 4 MiB GETs. The request goes
//! through hyper's connection task (one more task to wake) and the body is handed over in
//! chunks that are copied into the receive buffer. Here the reading task writes the request
//! itself and reads the body straight into the receive buffer. Only what a media GET needs
//! is here: one request per connection at a time, a head parsed with httparse, a body by
//! Content-Length, chunked or to the connection's end. Listings, stat, IAM, proxies and
//! HTTP/2 stay with reqwest.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::pool::Received;
use super::tls13::Tls13;

/// Connections idle longer than this are closed rather than reused (GCS's front ends drop
/// idle connections after a while; a request on one that was dropped fails at once).
const IDLE: Duration = Duration::from_secs(50);
/// The answer head, at most (GCS sends about 1 KiB).
const MAX_HEAD: usize = 64 << 10;

enum Stream {
    Plain(TcpStream),
    /// TLS through rustls: TLS 1.2, or a suite `tls13` does not take over.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS 1.3, records protected by `tls13` (decrypted in the receive buffer).
    Tls13(Box<Tls13>),
}

impl Stream {
    /// Sends `data` (a request) whole.
    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                // rustls keeps what it encrypted until flushed.
                s.flush().await
            }
            Stream::Tls13(s) => s.write_all(data).await,
        }
    }

    /// Appends up to `max` bytes to `v`; Ok(0) at the stream's end.
    async fn read_to(&mut self, v: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        use bytes::BufMut;
        match self {
            Stream::Plain(s) => s.read_buf(&mut v.limit(max)).await,
            Stream::Tls(s) => s.read_buf(&mut v.limit(max)).await,
            Stream::Tls13(s) => s.read_plain(v, max).await,
        }
    }

    /// Whether bytes beyond what was asked for wait inside the stream.
    fn has_buffered(&self) -> bool {
        match self {
            Stream::Plain(_) | Stream::Tls(_) => false,
            Stream::Tls13(s) => s.has_buffered(),
        }
    }
}

/// One connection and the bytes read from it past the last answer's head.
struct Conn {
    stream: Stream,
    /// Read but not yet consumed (`pending[at..]`).
    pending: Vec<u8>,
    at: usize,
}

impl Conn {
    fn buffered(&self) -> &[u8] {
        &self.pending[self.at..]
    }

    fn consume(&mut self, n: usize) {
        self.at += n;
        if self.at == self.pending.len() {
            self.pending.clear();
            self.at = 0;
        }
    }

    /// Reads more into `pending`; Ok(0) at the connection's end.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.at > 0 {
            self.pending.drain(..self.at);
            self.at = 0;
        }
        // Room for a whole TLS record, so `tls13` decrypts it in place.
        self.pending.reserve(32 << 10);
        let room = self.pending.capacity() - self.pending.len();
        self.stream.read_to(&mut self.pending, room).await
    }
}

/// How the media connections were made, for the metrics.
#[derive(Debug, Default)]
pub struct MediaStats {
    /// TLS 1.3 connections whose records `tls13` protects.
    pub tls_own_records: std::sync::atomic::AtomicU64,
    /// TLS connections left to rustls's stream (TLS 1.2, another suite).
    pub tls_rustls: std::sync::atomic::AtomicU64,
    /// Plain HTTP connections.
    pub plain: std::sync::atomic::AtomicU64,
}

/// Where the media connections go, and how.
pub struct MediaConns {
    /// `host[:port]` as the Host header says it.
    host: String,
    /// What to connect to.
    addr: String,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// Whether TLS connections are made for `tls13` to take over; cleared for good when the
    /// server negotiates what it does not take (TLS 1.2, another suite).
    own_records: std::sync::atomic::AtomicBool,
    idle: Mutex<Vec<(Conn, Instant)>>,
    max_idle: usize,
    connect_timeout: Duration,
    stats: Arc<MediaStats>,
}

impl MediaConns {
    /// For `endpoint` (`http(s)://host[:port]`); `tls` for https.
    pub fn new(
        endpoint: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        max_idle: usize,
        connect_timeout: Duration,
        stats: Arc<MediaStats>,
    ) -> Result<Self, String> {
        let url = url::Url::parse(endpoint).map_err(|e| format!("{endpoint}: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("{endpoint}: no host"))?
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{endpoint}: no port"))?;
        let https = url.scheme() == "https";
        let tls = match (https, tls) {
            (true, Some(cfg)) => {
                let bare = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let name = rustls::pki_types::ServerName::try_from(bare)
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                Some((cfg, name))
            }
            (true, None) => return Err(format!("{endpoint}: https without a TLS setup")),
            (false, _) => None,
        };
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        Ok(MediaConns {
            addr: format!("{host}:{port}"),
            host: host_header,
            tls,
            own_records: std::sync::atomic::AtomicBool::new(true),
            idle: Mutex::new(Vec::new()),
            max_idle,
            connect_timeout,
            stats,
        })
    }

    /// Connections opened so far, of every kind.
    pub fn opened(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        s.tls_own_records.load(Relaxed) + s.tls_rustls.load(Relaxed) + s.plain.load(Relaxed)
    }

    async fn tcp(&self) -> io::Result<TcpStream> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {} timed out", self.addr),
                )
            })??;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    async fn connect(&self) -> io::Result<Conn> {
        use std::sync::atomic::Ordering::Relaxed;
        let handshake_timeout =
            || io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out");
        let tcp = self.tcp().await?;
        let stream = match &self.tls {
            Some((cfg, name)) if self.own_records.load(Relaxed) => {
                let own = tokio::time::timeout(
                    self.connect_timeout,
                    super::tls13::connect(tcp, cfg.clone(), name.clone()),
                )
                .await
                .map_err(|_| handshake_timeout())??;
                match own {
                    Some(t) => {
                        self.stats.tls_own_records.fetch_add(1, Relaxed);
                        Stream::Tls13(Box::new(t))
                    }
                    None => {
                        tracing::info!(
                            "media reads: the server did not negotiate TLS 1.3 with AES-GCM or \
                             ChaCha20; records are left to rustls from now on"
                        );
                        self.own_records.store(false, Relaxed);
                        return Box::pin(self.connect()).await;
                    }
                }
            }
            Some((cfg, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    tokio_rustls::TlsConnector::from(cfg.clone()).connect(name.clone(), tcp),
                )
                .await
                .map_err(|_| handshake_timeout())??;
                self.stats.tls_rustls.fetch_add(1, Relaxed);
                Stream::Tls(Box::new(tls))
            }
            None => {
                self.stats.plain.fetch_add(1, Relaxed);
                Stream::Plain(tcp)
            }
        };
        Ok(Conn {
            stream,
            pending: Vec::new(),
            at: 0,
        })
    }

    fn pooled(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((c, since)) = idle.pop() {
            if since.elapsed() < IDLE {
                return Some(c);
            }
        }
        None
    }

    fn give_back(&self, c: Conn) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.max_idle {
            idle.push((c, Instant::now()));
        }
    }

    /// Sends `GET target` with `headers` and reads the answer's head. A pooled connection that
    /// fails before any byte of an answer (the server closed it while idle) is replaced by a
    /// new one once: the GET has no effect, so asking again is safe.
    pub async fn get(&self, target: &str, headers: &[(&str, &str)]) -> io::Result<Answer<'_>> {
        // A line break in the target or a header would end the request early and let the
        // rest be read as another (reqwest refuses such values too).
        let breaks = |v: &str| v.bytes().any(|b| b == b'\r' || b == b'\n');
        if breaks(target) || headers.iter().any(|(k, v)| breaks(k) || breaks(v)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a request line or header with a line break in it",
            ));
        }
        let mut req = Vec::with_capacity(256 + target.len());
        req.extend_from_slice(b"GET ");
        req.extend_from_slice(target.as_bytes());
        req.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        req.extend_from_slice(self.host.as_bytes());
        req.extend_from_slice(b"\r\n");
        for (k, v) in headers {
            req.extend_from_slice(k.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(v.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        if let Some(c) = self.pooled() {
            match self.exchange(c, &req).await {
                Ok(a) => return Ok(a),
                Err((e, answered)) if answered => return Err(e),
                Err(_) => {} // closed while idle: a new connection
            }
        }
        let c = self.connect().await?;
        self.exchange(c, &req).await.map_err(|(e, _)| e)
    }

    /// Writes the request and reads the head; the error says whether any answer byte came.
    async fn exchange(&self, mut c: Conn, req: &[u8]) -> Result<Answer<'_>, (io::Error, bool)> {
        c.stream.send(req).await.map_err(|e| (e, false))?;
        loop {
            if !c.buffered().is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(c.buffered()) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = Head::from(&resp)?;
                        c.consume(n);
                        return Ok(Answer::new(self, c, head));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => {
                        return Err((
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("unreadable answer head: {e}"),
                            ),
                            true,
                        ));
                    }
                }
                if c.buffered().len() > MAX_HEAD {
                    return Err((
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("answer head longer than {MAX_HEAD} bytes"),
                        ),
                        true,
                    ));
                }
            }
            let had = c.buffered().len();
            match c.fill().await {
                Ok(0) => {
                    return Err((
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before the answer",
                        ),
                        had > 0,
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err((e, had > 0)),
            }
        }
    }
}

/// What an answer's head says, in the form the media read needs.
pub struct Head {
    pub status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Body,
    close: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
    UntilClose,
}

impl Head {
    fn from(r: &httparse::Response<'_, '_>) -> Result<Head, (io::Error, bool)> {
        let bad = |m: String| (io::Error::new(io::ErrorKind::InvalidData, m), true);
        let status = r
            .code
            .ok_or_else(|| bad("answer without a status".into()))?;
        let mut headers = Vec::with_capacity(r.headers.len());
        let mut body = None;
        let mut close = r.version == Some(0);
        for h in r.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            if name == "content-length" {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| bad(format!("bad Content-Length {:?}", h.value)))?;
                if matches!(body, Some(Body::Length(m)) if m != n) {
                    return Err(bad("two different Content-Lengths".into()));
                }
                body = body.or(Some(Body::Length(n)));
            } else if name == "transfer-encoding" {
                if h.value.to_ascii_lowercase().ends_with(b"chunked") {
                    body = Some(Body::Chunked);
                } else {
                    return Err(bad(format!("unsupported Transfer-Encoding {:?}", h.value)));
                }
            } else if name == "connection" && h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            }
            headers.push((name, h.value.to_vec()));
        }
        // No body for these, whatever the head says.
        let body = if status == 204 || status == 304 || (100..200).contains(&status) {
            Body::Length(0)
        } else {
            body.unwrap_or(Body::UntilClose)
        };
        Ok(Head {
            status,
            headers,
            body,
            close: close || body == Body::UntilClose,
        })
    }
}

/// An answer being read. Its connection goes back to the pool once the body was read to its
/// end (and the server did not say it closes); dropped earlier, it is closed.
pub struct Answer<'a> {
    conns: &'a MediaConns,
    conn: Option<Conn>,
    pub head: Head,
    /// Body bytes left: of the whole body (Length) or of the current chunk (Chunked).
    left: u64,
    /// Chunked: the last chunk was read.
    done: bool,
}

impl<'a> Answer<'a> {
    fn new(conns: &'a MediaConns, conn: Conn, head: Head) -> Self {
        let (left, done) = match head.body {
            Body::Length(n) => (n, n == 0),
            Body::Chunked | Body::UntilClose => (0, false),
        };
        let mut a = Answer {
            conns,
            conn: Some(conn),
            head,
            left,
            done,
        };
        a.maybe_release();
        a
    }

    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The announced body length, if the body has one.
    pub fn content_length(&self) -> Option<u64> {
        match self.head.body {
            Body::Length(n) => Some(n),
            _ => None,
        }
    }

    fn maybe_release(&mut self) {
        if self.done
            && !self.head.close
            && let Some(c) = self.conn.take()
            && c.buffered().is_empty()
            && !c.stream.has_buffered()
        {
            self.conns.give_back(c);
        }
    }

    fn conn(&mut self) -> io::Result<&mut Conn> {
        self.conn
            .as_mut()
            .ok_or_else(|| io::Error::other("answer already read"))
    }

    /// At a chunk's start: reads its size line (and the end of the body after the last).
    async fn next_chunk(&mut self) -> io::Result<()> {
        loop {
            let c = self.conn()?;
            let line_end = c.buffered().windows(2).position(|w| w == b"\r\n");
            if let Some(i) = line_end {
                let line = std::str::from_utf8(&c.buffered()[..i])
                    .ok()
                    .and_then(|l| l.split(';').next())
                    .and_then(|l| u64::from_str_radix(l.trim(), 16).ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                c.consume(i + 2);
                if line == 0 {
                    // Trailers (none expected) up to the empty line.
                    loop {
                        let c = self.conn()?;
                        if let Some(j) = c.buffered().windows(2).position(|w| w == b"\r\n") {
                            c.consume(j + 2);
                            if j == 0 {
                                self.done = true;
                                self.maybe_release();
                                return Ok(());
                            }
                            continue;
                        }
                        if c.fill().await? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                }
                self.left = line;
                return Ok(());
            }
            if c.buffered().len() > 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad chunk size line",
                ));
            }
            if c.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The chunk's closing CRLF.
    async fn end_chunk(&mut self) -> io::Result<()> {
        loop {
            let c = self.conn()?;
            if c.buffered().len() >= 2 {
                if &c.buffered()[..2] != b"\r\n" {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk end"));
                }
                c.consume(2);
                return Ok(());
            }
            if c.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads up to `max` body bytes into `out` (straight from the connection when none are
    /// buffered); Ok(0) at the body's end.
    pub async fn read_into(&mut self, out: &mut Received, max: usize) -> io::Result<usize> {
        if self.done || max == 0 {
            return Ok(0);
        }
        if self.head.body == Body::Chunked && self.left == 0 {
            self.next_chunk().await?;
            if self.done {
                return Ok(0);
            }
        }
        let want = match self.head.body {
            Body::UntilClose => max,
            _ => (self.left.min(max as u64)) as usize,
        };
        let c = self.conn()?;
        let n = if !c.buffered().is_empty() {
            let n = want.min(c.buffered().len());
            out.extend_from_slice(&c.buffered()[..n]);
            c.consume(n);
            n
        } else {
            let start = out.len();
            let n = c.stream.read_to(out.vec_mut(), want).await?;
            out.checksum_from(start);
            n
        };
        match self.head.body {
            Body::UntilClose => {
                if n == 0 {
                    self.done = true;
                }
            }
            _ if n == 0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            Body::Length(_) => {
                self.left -= n as u64;
                if self.left == 0 {
                    self.done = true;
                    self.maybe_release();
                }
            }
            Body::Chunked => {
                self.left -= n as u64;
                if self.left == 0 {
                    self.end_chunk().await?;
                }
            }
        }
        Ok(n)
    }

    /// The body, at most `cap` bytes of it (an error answer's message), and whether that was
    /// all of it; the rest is left unread and the connection closed.
    pub async fn read_capped(mut self, cap: usize) -> io::Result<(bytes::Bytes, bool)> {
        let pool = super::pool::BufferPool::new(0, 0);
        let mut r = Received::new(pool.take(cap.min(64 << 10)), 0);
        loop {
            let room = cap - r.len();
            if room == 0 {
                return Ok((r.finish().0, false));
            }
            if self.read_into(&mut r, room).await? == 0 {
                return Ok((r.finish().0, true));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::pool::BufferPool;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A server that answers each request on a connection with the next of `answers` (raw
    /// bytes), then, after the last, closes. Returns its endpoint and the requests it saw.
    async fn server(answers: Vec<Vec<u8>>, per_conn: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let mut next = 0;
            while next < answers.len() {
                let (mut s, _) = l.accept().await.unwrap();
                for _ in 0..per_conn {
                    if next >= answers.len() {
                        break;
                    }
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut b).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        req.extend_from_slice(&b[..n]);
                    }
                    log.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&req).into_owned());
                    s.write_all(&answers[next]).await.unwrap();
                    next += 1;
                }
            }
        });
        (format!("http://{addr}"), seen)
    }

    async fn body(a: &mut Answer<'_>) -> io::Result<Vec<u8>> {
        let pool = BufferPool::new(0, 0);
        let mut r = Received::new(pool.take(16), 0);
        while a.read_into(&mut r, 7).await? > 0 {}
        Ok(r.finish().0.to_vec())
    }

    #[tokio::test]
    async fn length_and_chunked_bodies_and_the_connection_is_reused() {
        let (ep, seen) = server(
            vec![
                b"HTTP/1.1 206 Partial Content\r\nContent-Length: 11\r\nx-goog-generation: 7\r\n\r\nhello world"
                    .to_vec(),
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"
                    .to_vec(),
            ],
            2,
        )
        .await;
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5), Default::default()).unwrap();
        let mut a = m
            .get("/o/x?alt=media", &[("range", "bytes=0-10")])
            .await
            .unwrap();
        assert_eq!(a.head.status, 206);
        assert_eq!(a.header("x-goog-generation"), Some("7"));
        assert_eq!(a.content_length(), Some(11));
        assert_eq!(body(&mut a).await.unwrap(), b"hello world");
        drop(a);
        let mut a = m.get("/o/y", &[]).await.unwrap();
        assert_eq!(a.content_length(), None);
        assert_eq!(body(&mut a).await.unwrap(), b"hello world");
        drop(a);
        assert_eq!(m.opened(), 1, "one connection");
        let seen = seen.lock().unwrap();
        assert!(seen[0].starts_with("GET /o/x?alt=media HTTP/1.1\r\nhost: 127.0.0.1:"));
        assert!(seen[0].contains("\r\nrange: bytes=0-10\r\n"));
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_and_a_short_body_fails() {
        // One answer per connection: the second request finds its pooled connection closed.
        let (ep, _) = server(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec(),
            ],
            1,
        )
        .await;
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5), Default::default()).unwrap();
        let mut a = m.get("/a", &[]).await.unwrap();
        assert_eq!(body(&mut a).await.unwrap(), b"ok");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut a = m.get("/b", &[]).await.unwrap();
        let e = body(&mut a).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(m.opened(), 2);
    }

    #[tokio::test]
    async fn error_bodies_are_capped_and_bad_heads_refused() {
        let (ep, _) = server(
            vec![
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\n\r\n{\"error\":{}}12345678"
                    .to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n".to_vec(),
            ],
            2,
        )
        .await;
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5), Default::default()).unwrap();
        let a = m.get("/a", &[]).await.unwrap();
        assert_eq!(a.head.status, 404);
        let (b, whole) = a.read_capped(12).await.unwrap();
        assert_eq!((&b[..], whole), (&b"{\"error\":{}}"[..], false));
        let (ep, _) = server(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n".to_vec()],
            1,
        )
        .await;
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5), Default::default()).unwrap();
        let e = m
            .get("/a", &[("authorization", "Bearer x\r\nhost: evil")])
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = m.get("/a", &[]).await.err().unwrap();
        assert!(e.to_string().contains("Content-Length"), "{e}");
    }

    /// How the TLS test server behaves.
    #[derive(Clone, Copy, Default)]
    struct TlsServer {
        /// Offer TLS 1.2 only.
        tls12: bool,
        /// The one TLS 1.3 suite offered (default: all).
        suite: Option<rustls::CipherSuite>,
        /// Send a KeyUpdate (asking for ours) half way through each body.
        key_update: bool,
        /// Answer without a length and end the body with close_notify.
        close_notify: bool,
        /// After each answer (with its length), close the connection as an idle front end
        /// does: close_notify, then FIN.
        close_when_idle: bool,
        /// Flip this byte of what the server writes (counted from the connection's start).
        flip: Option<u64>,
    }

    /// Body bytes of the TLS tests: 300,000 of them, many records.
    fn tls_body() -> Vec<u8> {
        (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect()
    }

    /// A stream that flips one byte of what is written through it.
    struct Flip {
        tcp: tokio::net::TcpStream,
        at: Option<u64>,
        written: u64,
    }

    impl tokio::io::AsyncRead for Flip {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Flip {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let me = self.get_mut();
            let mut data = buf.to_vec();
            if let Some(at) = me.at
                && (me.written..me.written + data.len() as u64).contains(&at)
            {
                data[(at - me.written) as usize] ^= 0x20;
            }
            let r = std::pin::Pin::new(&mut me.tcp).poll_write(cx, &data);
            if let std::task::Poll::Ready(Ok(n)) = &r {
                me.written += *n as u64;
            }
            r
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
        }
    }

    /// A rustls server for `localhost` answering every GET with [`tls_body`]; the media
    /// connections to it, trusting its certificate, and the server's count of handshakes
    /// that resumed a session.
    async fn tls_pair(opts: TlsServer) -> (MediaConns, Arc<std::sync::atomic::AtomicU64>) {
        use tokio_rustls::rustls::crypto::ring as provider;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let mut p = provider::default_provider();
        if let Some(suite) = opts.suite {
            p.cipher_suites.retain(|s| s.suite() == suite);
        }
        let versions: &[&rustls::SupportedProtocolVersion] = if opts.tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let resumed: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let resumed_count = resumed.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let resumed = resumed_count.clone();
                tokio::spawn(async move {
                    let io = Flip {
                        tcp,
                        at: opts.flip,
                        written: 0,
                    };
                    let Ok(mut s) = acceptor.accept(io).await else {
                        return;
                    };
                    if s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let body = tls_body();
                    loop {
                        let mut req = Vec::new();
                        let mut b = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&b[..n]),
                            }
                        }
                        let head = if opts.close_notify {
                            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_string()
                        } else {
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                        };
                        let half = body.len() / 2;
                        let w = async {
                            s.write_all(head.as_bytes()).await?;
                            s.write_all(&body[..half]).await?;
                            if opts.key_update {
                                s.get_mut().1.refresh_traffic_keys().unwrap();
                            }
                            s.write_all(&body[half..]).await?;
                            s.flush().await
                        };
                        if w.await.is_err() {
                            return;
                        }
                        if opts.close_notify || opts.close_when_idle {
                            let _ = s.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client =
            rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        client.enable_secret_extraction = true;
        let m = MediaConns::new(
            &format!("https://localhost:{port}"),
            Some(Arc::new(client)),
            4,
            Duration::from_secs(5),
            Default::default(),
        )
        .unwrap();
        (m, resumed)
    }

    /// One GET's body, read `max` bytes at a time into a buffer of exactly the body's size
    /// (as the read path does), checksums checked.
    async fn tls_get(m: &MediaConns, max: usize) -> io::Result<Vec<u8>> {
        let mut a = m.get("/o", &[]).await?;
        let pool = BufferPool::new(0, 0);
        let mut r = Received::new(pool.take(300_000), 64 << 10);
        loop {
            let room = 300_000 - r.len();
            if room == 0 {
                // A body longer than promised shows as more bytes here.
                let mut extra = Received::new(pool.take(1), 0);
                if a.read_into(&mut extra, 1).await? > 0 {
                    return Err(io::Error::other("body longer than expected"));
                }
                break;
            }
            if a.read_into(&mut r, room.min(max)).await? == 0 {
                break;
            }
        }
        let (bytes, crcs) = r.finish();
        let want: Vec<u32> = bytes.chunks(64 << 10).map(crc32c::crc32c).collect();
        assert_eq!(crcs, want, "checksums taken as the bytes landed");
        Ok(bytes.to_vec())
    }

    fn own(m: &MediaConns) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            m.stats.tls_own_records.load(Relaxed),
            m.stats.tls_rustls.load(Relaxed),
        )
    }

    #[tokio::test]
    async fn tls13_bodies_are_decrypted_in_the_receive_buffer_on_every_suite() {
        for suite in [
            None,
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
        ] {
            let (m, _) = tls_pair(TlsServer {
                suite,
                ..Default::default()
            })
            .await;
            // Big reads (records opened in place), small ones (records opened aside and
            // handed out in pieces), and the session tickets rustls servers send after the
            // handshake, all on one kept-alive connection.
            for max in [usize::MAX, 7, 20_000, usize::MAX] {
                assert_eq!(
                    tls_get(&m, max).await.unwrap(),
                    tls_body(),
                    "{suite:?} {max}"
                );
            }
            assert_eq!(own(&m), (1, 0), "{suite:?}: one connection, records ours");
        }
    }

    #[tokio::test]
    async fn tickets_read_from_our_records_let_later_connections_resume() {
        let (m, resumed) = tls_pair(TlsServer::default()).await;
        assert_eq!(tls_get(&m, usize::MAX).await.unwrap(), tls_body());
        // One answer held open while another GET is made: a second connection, which can
        // only resume with a ticket the first one read (rustls never saw its records).
        let held = m.get("/o", &[]).await.unwrap();
        assert_eq!(tls_get(&m, usize::MAX).await.unwrap(), tls_body());
        drop(held);
        assert_eq!(own(&m), (2, 0));
        assert_eq!(resumed.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_with_close_notify_is_replaced() {
        let (m, _) = tls_pair(TlsServer {
            close_when_idle: true,
            ..Default::default()
        })
        .await;
        for _ in 0..3 {
            assert_eq!(tls_get(&m, usize::MAX).await.unwrap(), tls_body());
            // Let the close reach the pooled connection before it is used again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            own(&m),
            (3, 0),
            "each GET after a close on a new connection"
        );
    }

    #[tokio::test]
    async fn a_key_update_mid_body_is_followed_both_ways() {
        let (m, _) = tls_pair(TlsServer {
            key_update: true,
            ..Default::default()
        })
        .await;
        // The server asks for our update too: the second and third requests are sealed with
        // our new keys, or the server could not read them.
        for _ in 0..3 {
            assert_eq!(tls_get(&m, usize::MAX).await.unwrap(), tls_body());
        }
        assert_eq!(own(&m), (1, 0));
    }

    #[tokio::test]
    async fn tls12_is_left_to_rustls() {
        let (m, _) = tls_pair(TlsServer {
            tls12: true,
            ..Default::default()
        })
        .await;
        for max in [usize::MAX, 7] {
            assert_eq!(tls_get(&m, max).await.unwrap(), tls_body());
        }
        assert_eq!(
            own(&m),
            (0, 1),
            "TLS 1.2: rustls's stream, and once decided, kept"
        );
    }

    #[tokio::test]
    async fn close_notify_ends_a_body_read_to_the_end() {
        let (m, _) = tls_pair(TlsServer {
            close_notify: true,
            ..Default::default()
        })
        .await;
        let mut a = m.get("/o", &[]).await.unwrap();
        assert_eq!(a.content_length(), None);
        let pool = BufferPool::new(0, 0);
        let mut r = Received::new(pool.take(400_000), 0);
        loop {
            let room = 400_000 - r.len();
            if a.read_into(&mut r, room).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(r.finish().0.to_vec(), tls_body());
    }

    #[tokio::test]
    async fn a_damaged_record_fails_the_read_and_nothing_of_it_is_returned() {
        // Past the handshake (a few KiB), inside the body.
        for at in [150_000u64, 150_007, 299_000] {
            let (m, _) = tls_pair(TlsServer {
                flip: Some(at),
                ..Default::default()
            })
            .await;
            let body = tls_body();
            let mut a = m.get("/o", &[]).await.unwrap();
            let pool = BufferPool::new(0, 0);
            let mut r = Received::new(pool.take(300_000), 0);
            let e = loop {
                let room = 300_000 - r.len();
                match a.read_into(&mut r, room).await {
                    Ok(0) => panic!("{at}: the body ended without an error"),
                    Ok(_) => {}
                    Err(e) => break e,
                }
            };
            assert!(e.to_string().contains("authentication"), "{at}: {e}");
            let got = r.finish().0;
            assert!(got.len() < body.len(), "{at}");
            assert_eq!(
                &got[..],
                &body[..got.len()],
                "{at}: only authenticated bytes"
            );
        }
    }
}
