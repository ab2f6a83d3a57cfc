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
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::pool::Received;

/// Connections idle longer than this are closed rather than reused (GCS's front ends drop
/// idle connections after a while; a request on one that was dropped fails at once).
const IDLE: Duration = Duration::from_secs(50);
/// The answer head, at most (GCS sends about 1 KiB).
const MAX_HEAD: usize = 64 << 10;

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
        self.pending.reserve(16 << 10);
        self.stream.read_buf(&mut self.pending).await
    }
}

/// Where the media connections go, and how.
pub struct MediaConns {
    /// `host[:port]` as the Host header says it.
    host: String,
    /// What to connect to.
    addr: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    idle: Mutex<Vec<(Conn, Instant)>>,
    max_idle: usize,
    connect_timeout: Duration,
    /// Connections opened so far.
    pub opened: std::sync::atomic::AtomicU64,
}

impl MediaConns {
    /// For `endpoint` (`http(s)://host[:port]`); `tls` for https.
    pub fn new(
        endpoint: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        max_idle: usize,
        connect_timeout: Duration,
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
                Some((tokio_rustls::TlsConnector::from(cfg), name))
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
            idle: Mutex::new(Vec::new()),
            max_idle,
            connect_timeout,
            opened: Default::default(),
        })
    }

    async fn connect(&self) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {} timed out", self.addr),
                )
            })??;
        tcp.set_nodelay(true)?;
        let stream = match &self.tls {
            Some((connector, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), tcp),
                )
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
                Stream::Tls(Box::new(tls))
            }
            None => Stream::Plain(tcp),
        };
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        let sent = async {
            c.stream.write_all(req).await?;
            // rustls keeps what it encrypted until flushed.
            c.stream.flush().await
        };
        sent.await.map_err(|e| (e, false))?;
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
            out.read_from(&mut c.stream, want).await?
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
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5)).unwrap();
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
        assert_eq!(
            m.opened.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one connection"
        );
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
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5)).unwrap();
        let mut a = m.get("/a", &[]).await.unwrap();
        assert_eq!(body(&mut a).await.unwrap(), b"ok");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut a = m.get("/b", &[]).await.unwrap();
        let e = body(&mut a).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(m.opened.load(std::sync::atomic::Ordering::Relaxed), 2);
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
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5)).unwrap();
        let a = m.get("/a", &[]).await.unwrap();
        assert_eq!(a.head.status, 404);
        let (b, whole) = a.read_capped(12).await.unwrap();
        assert_eq!((&b[..], whole), (&b"{\"error\":{}}"[..], false));
        let (ep, _) = server(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n".to_vec()],
            1,
        )
        .await;
        let m = MediaConns::new(&ep, None, 4, Duration::from_secs(5)).unwrap();
        let e = m
            .get("/a", &[("authorization", "Bearer x\r\nhost: evil")])
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = m.get("/a", &[]).await.err().unwrap();
        assert!(e.to_string().contains("Content-Length"), "{e}");
    }
}
