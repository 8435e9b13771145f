//! The admin endpoint: minimal HTTP/1.1 on a plain std thread, off the data path (`/metrics`
//! for Prometheus, `/stats.json` for `tether stats`, POST bodies for commands such as deploy),
//! and the client side used by `tether stats`.
//!
//! One connection at a time, one request per connection (`Connection: close`). Every read has
//! a deadline, so a slow or silent client holds the endpoint for at most [`AdminOptions::deadline`].

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::{ErrorKind, MetricsSnapshot};

/// Longest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    /// `GET`, `POST`, … as sent.
    pub method: String,
    /// The path without the query, e.g. `/metrics`.
    pub path: String,
    /// The query string after `?`, if any.
    pub query: Option<String>,
    /// The body (empty unless the request had `Content-Length`).
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl AdminResponse {
    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> AdminResponse {
        AdminResponse {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }

    /// A JSON response (500 if `value` cannot be serialised).
    pub fn json<T: serde::Serialize>(value: &T) -> AdminResponse {
        match serde_json::to_vec(value) {
            Ok(body) => AdminResponse {
                status: 200,
                content_type: "application/json",
                body,
            },
            Err(e) => AdminResponse::text(500, format!("cannot serialise the response: {e}\n")),
        }
    }

    /// 404 naming the path.
    pub fn not_found(req: &AdminRequest) -> AdminResponse {
        AdminResponse::text(
            404,
            format!("no such endpoint: {} {}\n", req.method, req.path),
        )
    }
}

/// Answers `GET /metrics` (Prometheus text) and `GET /stats.json` from `snapshot()`; `None` for
/// other paths, so a handler can chain its own routes:
/// `metrics_routes(req, || snap()).unwrap_or_else(|| AdminResponse::not_found(req))`.
pub fn metrics_routes(
    req: &AdminRequest,
    snapshot: impl FnOnce() -> MetricsSnapshot,
) -> Option<AdminResponse> {
    let is_get = req.method == "GET";
    match req.path.as_str() {
        "/metrics" if is_get => Some(AdminResponse {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: snapshot().to_prometheus().into_bytes(),
        }),
        "/stats.json" if is_get => Some(AdminResponse::json(&snapshot())),
        "/metrics" | "/stats.json" => Some(AdminResponse::text(
            405,
            format!("{} only answers GET\n", req.path),
        )),
        _ => None,
    }
}

/// Limits of the admin server.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Largest POST body accepted (larger gets 413).
    pub max_body: usize,
    /// Time allowed for one read.
    pub read_timeout: Duration,
    /// Time allowed for a whole request, however it trickles in.
    pub deadline: Duration,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            max_body: 64 * 1024 * 1024,
            read_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
        }
    }
}

/// Serves the admin endpoint on its own thread with default [`AdminOptions`].
pub fn serve_admin(
    listener: TcpListener,
    handler: impl Fn(&AdminRequest) -> AdminResponse + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    serve_admin_with(listener, AdminOptions::default(), handler)
}

/// Serves the admin endpoint on a thread named `tether-admin`. A panicking handler answers 500
/// and the endpoint keeps serving.
pub fn serve_admin_with(
    listener: TcpListener,
    opts: AdminOptions,
    handler: impl Fn(&AdminRequest) -> AdminResponse + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tether-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                // Accept errors (EMFILE, a reset before accept) are transient for us.
                let Ok(stream) = conn else { continue };
                let _ = serve_one(stream, &opts, &handler);
            }
        })
}

fn serve_one(
    mut stream: TcpStream,
    opts: &AdminOptions,
    handler: &dyn Fn(&AdminRequest) -> AdminResponse,
) -> io::Result<()> {
    stream.set_write_timeout(Some(opts.read_timeout))?;
    let response = match read_request(&mut stream, opts) {
        Ok(req) => catch_unwind(AssertUnwindSafe(|| handler(&req)))
            .unwrap_or_else(|_| AdminResponse::text(500, "internal error: the handler panicked\n")),
        Err(RequestError::Io(e)) => return Err(e),
        Err(RequestError::Reject(status, msg)) => {
            write_response(
                &mut stream,
                &AdminResponse::text(status, format!("{msg}\n")),
            )?;
            // The client may still be sending the body we refused: read and drop a bounded
            // amount of it, so closing does not reset the connection before the client has read
            // our answer.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            stream.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut sink = [0u8; 16 * 1024];
            let mut drained = 0;
            while drained < 4 * 1024 * 1024 {
                match stream.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
            return Ok(());
        }
    };
    write_response(&mut stream, &response)
}

enum RequestError {
    Io(io::Error),
    Reject(u16, String),
}

impl From<io::Error> for RequestError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                RequestError::Reject(408, "request timed out".into())
            }
            _ => RequestError::Io(e),
        }
    }
}

fn bad(msg: impl Into<String>) -> RequestError {
    RequestError::Reject(400, msg.into())
}

/// Reads into `buf` once, within the request deadline.
fn read_some(
    stream: &mut TcpStream,
    buf: &mut [u8],
    opts: &AdminOptions,
    start: Instant,
) -> Result<usize, RequestError> {
    let left = opts.deadline.saturating_sub(start.elapsed());
    if left.is_zero() {
        return Err(RequestError::Reject(408, "request timed out".into()));
    }
    stream.set_read_timeout(Some(left.min(opts.read_timeout)))?;
    Ok(stream.read(buf)?)
}

fn read_request(stream: &mut TcpStream, opts: &AdminOptions) -> Result<AdminRequest, RequestError> {
    let start = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(RequestError::Reject(431, "request head too large".into()));
        }
        let n = read_some(stream, &mut chunk, opts, start)?;
        if n == 0 {
            return Err(bad("connection closed before the end of the request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut body = buf.split_off(head_end + 4);
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("bad request line {request_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!(
            "unsupported protocol {version:?}; use HTTP/1.1"
        )));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad(format!("bad method {method:?}")));
    }
    if !target.starts_with('/') {
        return Err(bad(format!("bad request target {target:?}")));
    }
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {value:?}")))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::Reject(
                411,
                "chunked bodies are not supported; send Content-Length".into(),
            ));
        }
    }
    if content_length > opts.max_body {
        return Err(RequestError::Reject(
            413,
            format!(
                "body of {content_length} bytes is over the limit of {} bytes",
                opts.max_body
            ),
        ));
    }
    if body.len() > content_length {
        return Err(bad(
            "more bytes than Content-Length (pipelining is not supported)",
        ));
    }
    body.reserve_exact(content_length - body.len());
    while body.len() < content_length {
        let want = (content_length - body.len()).min(chunk.len());
        let n = read_some(stream, &mut chunk[..want], opts, start)?;
        if n == 0 {
            return Err(bad(format!(
                "connection closed after {} of {content_length} body bytes",
                body.len()
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    Ok(AdminRequest {
        method: method.to_owned(),
        path,
        query,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(stream: &mut TcpStream, r: &AdminResponse) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&r.body)?;
    stream.flush()
}

/// Why an admin request from the command line failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("cannot resolve admin address {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("cannot connect to the admin endpoint at {addr}: {source} (is the server running?)")]
    Connect { addr: String, source: io::Error },
    #[error("admin endpoint at {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("admin endpoint at {addr} sent a bad response: {reason}")]
    BadResponse { addr: String, reason: String },
    #[error("admin endpoint at {addr} answered {status}: {message}")]
    Status {
        addr: String,
        status: u16,
        message: String,
    },
    #[error("admin endpoint at {addr} sent stats that do not parse: {source}")]
    Json {
        addr: String,
        source: serde_json::Error,
    },
}

/// Sends one request to the admin endpoint and returns the status and body of the answer.
pub fn admin_request(
    addr: impl ToSocketAddrs + std::fmt::Display,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), AdminError> {
    let name = addr.to_string();
    let io_err = |source| AdminError::Io {
        addr: name.clone(),
        source,
    };
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| AdminError::Resolve {
            addr: name.clone(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or_else(|| AdminError::Connect {
        addr: name.clone(),
        source: last,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {name}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io_err)?;
    stream.write_all(body).map_err(io_err)?;
    let mut resp = Vec::new();
    stream
        .take(256 * 1024 * 1024)
        .read_to_end(&mut resp)
        .map_err(io_err)?;
    let bad = |reason: &str| AdminError::BadResponse {
        addr: name.clone(),
        reason: reason.to_owned(),
    };
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status_line = resp[..head_end]
        .split(|&b| b == b'\r')
        .next()
        .unwrap_or_default();
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    Ok((status, resp.split_off(head_end + 4)))
}

/// Sends one request to the admin endpoint at `addr` and decodes a 200 answer's JSON body;
/// any other status is an error carrying the server's message.
pub fn admin_json<T: serde::de::DeserializeOwned>(
    addr: impl ToSocketAddrs + std::fmt::Display,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<T, AdminError> {
    let name = addr.to_string();
    let (status, body) = admin_request(addr, method, path, body)?;
    if status != 200 {
        return Err(AdminError::Status {
            addr: name,
            status,
            message: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| AdminError::Json { addr: name, source })
}

/// Fetches `/stats.json` from the admin endpoint at `addr`.
pub fn fetch_stats(
    addr: impl ToSocketAddrs + std::fmt::Display,
) -> Result<MetricsSnapshot, AdminError> {
    admin_json(addr, "GET", "/stats.json", b"")
}

/// Renders a snapshot as a table: one row per counter, one column per shard, then the total.
/// Error kinds that are zero everywhere are left out.
pub fn format_stats_table(s: &MetricsSnapshot) -> String {
    let mut rows: Vec<(String, Vec<u64>, u64)> = s
        .total
        .fields()
        .iter()
        .enumerate()
        .map(|(i, (name, _, _, total))| {
            let per: Vec<u64> = s.shards.iter().map(|m| m.fields()[i].3).collect();
            (name.to_string(), per, *total)
        })
        .collect();
    for &k in ErrorKind::ALL {
        let total = s.total.errors_of(k);
        let per: Vec<u64> = s.shards.iter().map(|m| m.errors_of(k)).collect();
        if total != 0 || per.iter().any(|&v| v != 0) {
            rows.push((format!("errors.{k}"), per, total));
        }
    }
    let name_w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let num_w = rows
        .iter()
        .flat_map(|r| r.1.iter().chain(std::iter::once(&r.2)))
        .map(|v| v.to_string().len())
        .max()
        .unwrap_or(1)
        .max(7);
    let mut out = String::new();
    let _ = write!(out, "{:<name_w$}", "metric");
    for i in 0..s.shards.len() {
        let _ = write!(out, "  {:>num_w$}", format!("shard {i}"));
    }
    let _ = writeln!(out, "  {:>num_w$}", "total");
    for (name, per, total) in &rows {
        let _ = write!(out, "{name:<name_w$}");
        for v in per {
            let _ = write!(out, "  {v:>num_w$}");
        }
        let _ = writeln!(out, "  {total:>num_w$}");
    }
    if let Some(rss) = s.rss_bytes {
        let _ = writeln!(out, "resident memory: {:.1} MiB", rss as f64 / 1048576.0);
    }
    out
}

/// Prints [`format_stats_table`] to stdout (for `tether stats`).
pub fn print_stats_table(s: &MetricsSnapshot) {
    print!("{}", format_stats_table(s));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ShardMetrics;

    fn snapshot() -> MetricsSnapshot {
        let mut a = ShardMetrics {
            connections_open: 12,
            msgs_in: 1000,
            ..Default::default()
        };
        a.error(ErrorKind::BadProof);
        let b = ShardMetrics {
            connections_open: 3,
            ..Default::default()
        };
        let mut s = MetricsSnapshot::from_shards(vec![a, b]);
        s.rss_bytes = Some(64 << 20);
        s
    }

    fn start(opts: AdminOptions) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        serve_admin_with(listener, opts, |req| {
            metrics_routes(req, snapshot).unwrap_or_else(|| match (&*req.method, &*req.path) {
                ("POST", "/echo") => AdminResponse::text(200, String::from_utf8_lossy(&req.body)),
                ("GET", "/panic") => panic!("boom"),
                _ => AdminResponse::not_found(req),
            })
        })
        .unwrap();
        addr
    }

    #[test]
    fn fetch_stats_returns_the_served_snapshot() {
        let addr = start(AdminOptions::default());
        assert_eq!(fetch_stats(addr).unwrap(), snapshot());
        let (status, body) = admin_request(addr, "GET", "/metrics", b"").unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("tether_connections_open{shard=\"0\"} 12\n"),
            "{text}"
        );
    }

    #[test]
    fn post_bodies_404_405_and_panics() {
        let opts = AdminOptions {
            max_body: 10,
            ..Default::default()
        };
        let addr = start(opts);
        assert_eq!(
            admin_request(addr, "POST", "/echo", b"hello").unwrap(),
            (200, b"hello".to_vec())
        );
        let (status, body) = admin_request(addr, "POST", "/echo", b"far too long a body").unwrap();
        assert_eq!(status, 413);
        assert!(String::from_utf8_lossy(&body).contains("over the limit of 10 bytes"));
        assert_eq!(admin_request(addr, "GET", "/nope", b"").unwrap().0, 404);
        assert_eq!(admin_request(addr, "POST", "/metrics", b"").unwrap().0, 405);
        assert_eq!(admin_request(addr, "GET", "/panic", b"").unwrap().0, 500);
        // Still serving after a panic.
        assert!(fetch_stats(addr).is_ok());
    }

    fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn bad_requests_get_400_with_a_reason() {
        let addr = start(AdminOptions::default());
        let r = raw(addr, b"GARBAGE\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        assert!(r.contains("bad request line"), "{r}");
        let r = raw(addr, b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n");
        assert!(r.contains("bad Content-Length"), "{r}");
        let r = raw(addr, b"GET /metrics SPDY/3\r\n\r\n");
        assert!(r.contains("unsupported protocol"), "{r}");
        let r = raw(addr, b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nab");
        assert!(
            r.contains("connection closed after 2 of 5 body bytes"),
            "{r}"
        );
    }

    #[test]
    fn a_silent_client_times_out() {
        let opts = AdminOptions {
            read_timeout: Duration::from_millis(50),
            deadline: Duration::from_millis(200),
            ..Default::default()
        };
        let addr = start(opts);
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metr").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        assert!(fetch_stats(addr).is_ok());
    }

    #[test]
    fn connect_errors_say_where() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = fetch_stats(addr).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot connect to the admin endpoint at {addr}")),
            "{e}"
        );
    }

    #[test]
    fn table_has_a_column_per_shard_and_a_total() {
        let t = format_stats_table(&snapshot());
        let header = t.lines().next().unwrap();
        assert!(
            header.contains("shard 0") && header.contains("shard 1") && header.ends_with("total")
        );
        let open = t
            .lines()
            .find(|l| l.starts_with("connections_open"))
            .unwrap();
        let cols: Vec<&str> = open.split_whitespace().collect();
        assert_eq!(cols, ["connections_open", "12", "3", "15"]);
        assert!(t.contains("errors.bad_proof"));
        assert!(!t.contains("errors.tls"));
        assert!(t.contains("resident memory: 64.0 MiB"));
    }
}
