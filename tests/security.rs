//! A hostile or broken server, and a hostile local user, against the client and the mount.
//!
//! Each test plays the attacker: a tiny loopback server answering what no real GCS would
//! (an endless error body, a body that drips, a redirect, endless page tokens), or a local
//! user planting files where a root mount writes. Each shows the mount fails safe: memory
//! within its bound, an error within the retry budget, no token sent, nothing written
//! outside physiofs's own files.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use physiofs::client::ObjectClient;
use physiofs::client::auth::TokenSource;
use physiofs::client::gcs::{GcsClient, GcsConfig, RetryConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake server does with each request after reading its headers.
#[derive(Clone, Copy)]
enum Answer {
    /// 503 with a chunked body that never ends (stops at `LIMIT` bytes).
    EndlessError,
    /// 503 with a chunked body of one byte every 50 ms, forever.
    DrippingError,
}

/// More than any bound of the client, so a client without one is caught reading it all.
const LIMIT: u64 = 512 << 20;

/// A loopback HTTP/1.1 server; records the request heads it saw and, per connection, how
/// many body bytes it wrote before the client hung up.
struct Hostile {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    sent: Arc<Mutex<Vec<u64>>>,
}

impl Hostile {
    async fn start(answer: Answer) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (heads.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let (h, s) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let n = serve(conn, answer, &h).await;
                    s.lock().unwrap().push(n);
                });
            }
        });
        Hostile { port, heads, sent }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until `n` connections have ended, and returns their byte counts.
    async fn connections(&self, n: usize) -> Vec<u64> {
        for _ in 0..600 {
            if self.sent.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sent.lock().unwrap().clone()
    }
}

/// Reads one request head, answers it; returns the body bytes written.
async fn serve(mut conn: TcpStream, answer: Answer, heads: &Mutex<Vec<String>>) -> u64 {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut b).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    let start = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
                  transfer-encoding: chunked\r\n\r\n";
    if conn.write_all(start).await.is_err() {
        return 0;
    }
    let mut sent = 0u64;
    match answer {
        Answer::EndlessError => {
            let data = vec![b'x'; 64 << 10];
            let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            while sent < LIMIT {
                if conn.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += data.len() as u64;
            }
        }
        Answer::DrippingError => loop {
            if conn.write_all(b"1\r\nx\r\n").await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    }
    sent
}

fn client(endpoint: String, retry: RetryConfig) -> GcsClient {
    GcsClient::new(
        GcsConfig {
            endpoint,
            bucket: "b".into(),
            billing_project: None,
            retry,
            pool_size: 4,
            stall_timeout: Duration::from_secs(5),
        },
        TokenSource::Anonymous,
    )
    .unwrap()
}

fn quick_retry(deadline: Duration) -> RetryConfig {
    RetryConfig {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        deadline,
    }
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_up_to_its_cap() {
    let server = Hostile::start(Answer::EndlessError).await;
    let c = client(server.endpoint(), quick_retry(Duration::from_secs(30)));
    let err = c.stat("x").await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    let sent = server.connections(3).await;
    assert_eq!(sent.len(), 3, "one connection per attempt: {sent:?}");
    // The client reads 64 KiB of each; what else went out sat in socket buffers when it hung
    // up. A client reading the whole body would have taken all LIMIT bytes.
    for n in &sent {
        assert!(
            *n < 64 << 20,
            "server wrote {n} bytes before the client hung up"
        );
    }
}

#[tokio::test]
async fn a_dripping_error_body_ends_at_the_retry_deadline() {
    let server = Hostile::start(Answer::DrippingError).await;
    let c = client(server.endpoint(), quick_retry(Duration::from_secs(2)));
    // The body never stalls (a byte every 50 ms, the stall timeout is 5 s), so only a
    // deadline on the whole attempt can end it; the outer bound only keeps a broken client
    // from hanging the test.
    let got = tokio::time::timeout(Duration::from_secs(60), c.stat("x")).await;
    let err = got
        .expect("the request must give up at its retry deadline")
        .unwrap_err();
    assert!(err.to_string().contains("--retry-deadline"), "{err}");
}
