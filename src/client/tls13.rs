//! TLS 1.3 records protected here instead of by rustls, so a media body is decrypted where
//! it lands: in the receive buffer.
//!
//! Through rustls (tokio-rustls), every body byte is read into rustls's own buffer, 4 KiB at a
//! time, decrypted there, then copied into the receive buffer: one more copy of every byte,
//! ~5% of the mount's CPU on a sequential read over TLS (perf, README "Where the mount's CPU
//! goes"). `bench/client-probe`'s `inplace` client measured what doing it here saves. rustls
//! still makes the connection: the handshake, certificate checks and key schedule are its.
//! After the handshake, [`Tls13`] takes the traffic secrets and the rest of the key schedule
//! (`dangerous_into_kernel_connection`, the interface rustls offers for kernel TLS) and from then on reads each record's
//! ciphertext straight into the caller's buffer, opens it in place with ring, and strips the
//! record framing. Records that are not application data are handled as RFC 8446 says:
//! session tickets go to rustls (so later connections can resume), a KeyUpdate moves the
//! receiving keys on (and ours, when the server asks), close_notify ends the stream, and any
//! other alert or message is an error. A record whose authentication fails is an error:
//! nothing unauthenticated is ever handed on.
//!
//! Only TLS 1.3 with the three suites every server offers (AES-128-GCM, AES-256-GCM,
//! ChaCha20-Poly1305) takes this path; anything else stays with rustls (`media::Stream::Tls`).
//!
//! The handshake runs on rustls's unbuffered API, which leaves every byte it did not consume
//! to us, so the record stream picks up exactly where rustls left off.

use std::io;
use std::sync::Arc;

use ring::aead;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::ConnectionTrafficSecrets as Secrets;
use tokio_rustls::rustls::client::ClientConnectionData;
use tokio_rustls::rustls::kernel::KernelConnection;

/// TLS record header: type, legacy version (2), length (2).
const HEADER: usize = 5;
/// Largest plaintext of a record (RFC 8446 5.1).
const MAX_PLAIN: usize = 1 << 14;
/// Largest ciphertext of a TLS 1.3 record (RFC 8446 5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const TAG: usize = 16;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Makes a TLS connection on `tcp` with rustls's unbuffered API, and takes it over when it
/// is TLS 1.3 with one of the three suites; `Ok(None)` when it is not (TLS 1.2 from a
/// TLS-inspecting proxy, say): the caller connects again through rustls's own stream.
pub async fn connect(
    mut tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> io::Result<Option<Tls13>> {
    use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
    let tls_err = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut conn =
        rustls::client::UnbufferedClientConnection::new(config, name).map_err(tls_err)?;
    let mut incoming = vec![0u8; 16 << 10];
    let mut used = 0;
    let mut outgoing = vec![0u8; 4 << 10];
    let mut out_used = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming[..used]);
        let mut done = false;
        match state.map_err(tls_err)? {
            ConnectionState::EncodeTlsData(mut st) => loop {
                match st.encode(&mut outgoing[out_used..]) {
                    Ok(n) => {
                        out_used += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(e)) => {
                        outgoing.resize(out_used + e.required_size, 0);
                    }
                    Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
                }
            },
            ConnectionState::TransmitTlsData(st) => {
                tcp.write_all(&outgoing[..out_used]).await?;
                out_used = 0;
                st.done();
            }
            ConnectionState::BlockedHandshake => {
                if used == incoming.len() {
                    if used >= 1 << 20 {
                        return Err(bad("TLS: handshake larger than 1 MiB".into()));
                    }
                    incoming.resize(used * 2, 0);
                }
                let n = tcp.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: connection closed during the handshake",
                    ));
                }
                used += n;
            }
            ConnectionState::WriteTraffic(_) => done = true,
            _ => {
                return Err(bad(
                    "TLS: unexpected data or close during the handshake".into()
                ));
            }
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if done {
            break;
        }
    }
    if !can_take_over(&conn) {
        return Ok(None);
    }
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
    incoming.truncate(used);
    Ok(Some(Tls13 {
        tcp,
        kernel,
        rx: Keys::new(secrets.rx)?,
        tx: Keys::new(secrets.tx)?,
        // What came after the handshake's last record (the start of a ticket, say).
        ahead: incoming,
        plain: Vec::new(),
        plain_at: 0,
        closed: false,
        broken: false,
    }))
}

/// Whether a connection rustls negotiated can be taken over by [`Tls13`].
fn can_take_over(conn: &rustls::client::UnbufferedClientConnection) -> bool {
    use rustls::CipherSuite as C;
    conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
        && matches!(
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(
                C::TLS13_AES_128_GCM_SHA256
                    | C::TLS13_AES_256_GCM_SHA384
                    | C::TLS13_CHACHA20_POLY1305_SHA256
            )
        )
}

/// One direction's record protection.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, Secrets)) -> io::Result<Keys> {
        let (alg, key, iv) = match &secrets {
            Secrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            Secrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            Secrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => {
                return Err(io::Error::other(
                    "TLS: a cipher suite this client cannot take over",
                ));
            }
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("TLS: bad traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS: bad traffic IV"))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce: the IV XOR the sequence number (RFC 8446 5.3).
    fn nonce(&mut self) -> io::Result<aead::Nonce> {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS: record sequence number exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(n))
    }
}

/// What a read of one record gave.
enum Record {
    /// Application data, appended to the caller's buffer.
    Direct(usize),
    /// Application data, kept in `Tls13::plain`.
    Kept,
    /// A record handled here (a ticket, a key update).
    Other,
    /// The stream ended cleanly.
    End,
}

/// An opened record: application data (its length, left in the buffer), or another type's
/// content.
enum Opened {
    Data(usize),
    Control(u8, Vec<u8>),
}

/// Truncates a buffer back to where a record began unless the record was completed, so
/// that an abandoned read (a stall timeout drops the future) never leaves ciphertext in it.
struct Rollback<'a> {
    buf: &'a mut Vec<u8>,
    to: usize,
    keep: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.keep {
            self.buf.truncate(self.to);
        }
    }
}

/// A TLS 1.3 connection after its handshake.
pub struct Tls13 {
    tcp: TcpStream,
    kernel: KernelConnection<ClientConnectionData>,
    rx: Keys,
    tx: Keys,
    /// Bytes read past the last complete record (at most a header's worth, or the start of
    /// a record read before its size was known).
    ahead: Vec<u8>,
    /// Decrypted application data not yet handed out (`plain[plain_at..]`): only when a
    /// caller asked for fewer bytes than a record held.
    plain: Vec<u8>,
    plain_at: usize,
    /// close_notify came: the server sends nothing more.
    closed: bool,
    /// A read was abandoned inside a record: the stream's position is lost.
    broken: bool,
}

impl Tls13 {
    /// Encrypts `data` as application data records and sends them.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let records = data.len() / MAX_PLAIN + 1;
        let mut wire = Vec::with_capacity(data.len() + records * (HEADER + 1 + TAG));
        for chunk in data.chunks(MAX_PLAIN) {
            self.seal(APPLICATION_DATA, chunk, &mut wire)?;
        }
        self.tcp.write_all(&wire).await
    }

    fn seal(&mut self, kind: u8, content: &[u8], wire: &mut Vec<u8>) -> io::Result<()> {
        let len = content.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        wire.extend_from_slice(&header);
        let start = wire.len();
        wire.extend_from_slice(content);
        wire.push(kind);
        let nonce = self.tx.nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut wire[start..])
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        wire.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends up to `max` (> 0) bytes of application data to `out`; Ok(0) at the stream's
    /// end (close_notify, or the connection closed between records). `out` grows only by
    /// plaintext, also when this future is dropped part way, and never beyond its capacity
    /// when it has some: a record is decrypted in `out` itself when its ciphertext fits in
    /// `out`'s spare capacity and its content within `max`, else in a buffer of ours and
    /// handed out from there.
    pub async fn read_plain(&mut self, out: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other(
                "TLS: connection abandoned inside a record",
            ));
        }
        loop {
            if self.plain_at < self.plain.len() {
                let n = max.min(self.plain.len() - self.plain_at);
                out.extend_from_slice(&self.plain[self.plain_at..self.plain_at + n]);
                self.plain_at += n;
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            self.broken = true;
            let got = self.record(out, max).await?;
            self.broken = false;
            match got {
                Record::End => return Ok(0),
                Record::Direct(0) | Record::Other | Record::Kept => continue,
                Record::Direct(n) => return Ok(n),
            }
        }
    }

    /// Whether anything the server sent waits here unread: decrypted application data, or
    /// bytes of a record after the last one read (a connection with either is not reused).
    pub fn has_buffered(&self) -> bool {
        self.plain_at < self.plain.len() || !self.ahead.is_empty()
    }

    /// Reads one record. Application data goes to `out` (Direct) or to `self.plain` (Kept).
    async fn record(&mut self, out: &mut Vec<u8>, max: usize) -> io::Result<Record> {
        // The header.
        while self.ahead.len() < HEADER {
            let want = HEADER - self.ahead.len();
            let n = read_some(&mut self.tcp, &mut self.ahead, want).await?;
            if n == 0 {
                if self.ahead.is_empty() {
                    // Closed between records without close_notify: the end, as for a plain
                    // connection (the HTTP layer checks the body's length).
                    return Ok(Record::End);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS: connection closed inside a record header",
                ));
            }
        }
        let header: [u8; HEADER] = self.ahead[..HEADER].try_into().unwrap();
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != APPLICATION_DATA || header[1] != 3 || !(TAG + 1..=MAX_CIPHER).contains(&len)
        {
            return Err(bad(format!(
                "TLS: unexpected record header {header:02x?} after the handshake"
            )));
        }
        let direct = max >= len - TAG - 1 && out.capacity() - out.len() >= len + HEADER;
        let opened = if direct {
            self.open_record(out, header, len).await?
        } else {
            let mut plain = std::mem::take(&mut self.plain);
            plain.clear();
            self.plain_at = 0;
            let r = self.open_record(&mut plain, header, len).await;
            self.plain = plain;
            r?
        };
        match opened {
            Opened::Data(n) if direct => Ok(Record::Direct(n)),
            Opened::Data(_) => Ok(Record::Kept),
            Opened::Control(HANDSHAKE, content) => {
                self.handshake_messages(&content).await?;
                Ok(Record::Other)
            }
            Opened::Control(ALERT, content) if content == [1, 0] || content == [2, 0] => {
                self.closed = true;
                Ok(Record::End)
            }
            Opened::Control(ALERT, content) if content.len() == 2 => Err(bad(format!(
                "TLS: the server sent alert {} (RFC 8446 6)",
                content[1]
            ))),
            Opened::Control(k, _) => Err(bad(format!("TLS: unexpected record content type {k}"))),
        }
    }

    /// Reads the body of the record whose header is at the front of `ahead` onto the end of
    /// `dest` and opens it there: application data stays in `dest`; anything else is taken
    /// back out of it.
    async fn open_record(
        &mut self,
        dest: &mut Vec<u8>,
        header: [u8; HEADER],
        len: usize,
    ) -> io::Result<Opened> {
        let start = dest.len();
        let mut guard = Rollback {
            buf: dest,
            to: start,
            keep: false,
        };
        // What came with the header, then the rest straight into `dest`, with the next
        // record's header when it is already there (one read per record).
        let have = (self.ahead.len() - HEADER).min(len);
        guard.buf.reserve(len + HEADER);
        guard
            .buf
            .extend_from_slice(&self.ahead[HEADER..HEADER + have]);
        self.ahead.drain(..HEADER + have);
        while guard.buf.len() < start + len {
            let want = start + len - guard.buf.len() + HEADER;
            if read_some(&mut self.tcp, guard.buf, want).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS: connection closed inside a record",
                ));
            }
        }
        if guard.buf.len() > start + len {
            self.ahead.extend_from_slice(&guard.buf[start + len..]);
            guard.buf.truncate(start + len);
        }
        let nonce = self.rx.nonce()?;
        let opened = self
            .rx
            .key
            .open_in_place(nonce, aead::Aad::from(header), &mut guard.buf[start..])
            .map_err(|_| bad("TLS: a record failed its authentication".into()))?
            .len();
        // TLSInnerPlaintext: content, the real type, zero padding.
        let mut end = start + opened;
        while end > start && guard.buf[end - 1] == 0 {
            end -= 1;
        }
        if end == start {
            return Err(bad("TLS: a record without a content type".into()));
        }
        let kind = guard.buf[end - 1];
        if kind == APPLICATION_DATA {
            guard.buf.truncate(end - 1);
            guard.keep = true;
            return Ok(Opened::Data(end - 1 - start));
        }
        Ok(Opened::Control(kind, guard.buf[start..end - 1].to_vec()))
    }

    /// Post-handshake messages: session tickets and key updates.
    async fn handshake_messages(&mut self, mut msgs: &[u8]) -> io::Result<()> {
        while !msgs.is_empty() {
            if msgs.len() < 4 {
                return Err(bad("TLS: a handshake message split across records".into()));
            }
            let kind = msgs[0];
            let len = u32::from_be_bytes([0, msgs[1], msgs[2], msgs[3]]) as usize;
            let Some(body) = msgs.get(4..4 + len) else {
                return Err(bad("TLS: a handshake message split across records".into()));
            };
            match kind {
                // NewSessionTicket: rustls keeps it for resuming later connections. A ticket
                // it cannot use costs nothing but the resumption.
                4 => {
                    if let Err(e) = self.kernel.handle_new_session_ticket(body) {
                        tracing::debug!("TLS: session ticket not kept: {e}");
                    }
                }
                // KeyUpdate (RFC 8446 4.6.3).
                24 => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(bad("TLS: malformed KeyUpdate".into())),
                    };
                    self.rx = Keys::new(
                        self.kernel
                            .update_rx_secret()
                            .map_err(|e| io::Error::other(format!("TLS: {e}")))?,
                    )?;
                    if requested {
                        // Ours, under the old keys, then ours move on too.
                        let mut wire = Vec::with_capacity(32);
                        self.seal(HANDSHAKE, &[24, 0, 0, 1, 0], &mut wire)?;
                        self.tcp.write_all(&wire).await?;
                        self.tx = Keys::new(
                            self.kernel
                                .update_tx_secret()
                                .map_err(|e| io::Error::other(format!("TLS: {e}")))?,
                        )?;
                    }
                }
                k => {
                    return Err(bad(format!(
                        "TLS: unexpected handshake message {k} after the handshake"
                    )));
                }
            }
            msgs = &msgs[4 + len..];
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes onto the end of `v`.
async fn read_some(tcp: &mut TcpStream, v: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    use bytes::BufMut;
    v.reserve(limit);
    tcp.read_buf(&mut v.limit(limit)).await
}
