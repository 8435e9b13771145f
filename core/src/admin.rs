//! The admin endpoint: minimal HTTP/1.1 on plain std threads, off the data path (`/metrics`
//! for Prometheus, `/stats.json` for `tether stats`, POST bodies for commands such as deploy),
//! and the client side used by `tether stats`, `tether deploy` and loadgen.
//!
//! **Concurrency**: one accept thread and a thread per connection, at most
//! [`AdminOptions::max_connections`] at once (past that a connection gets `503` at once). A
//! thread per connection rather than a pool: admin requests are few and some handlers block
//! (a deploy waits for the deployer's fsyncs; `/metrics` does not: it reads what the shards
//! published, see [`crate::metrics`], and never waits for a shard), so a pool
//! would need as many threads as the cap anyway, plus a queue in front of it; threads made on
//! demand cost nothing while the endpoint is idle. One request per connection
//! (`Connection: close`); every read has a deadline, so a slow or silent client holds its
//! thread for at most [`AdminOptions::deadline`] plus its handler's time, and never the others.
//!
//! **Authentication** ([`AdminAuth`]), a layer in front of every route, so a route added later
//! is covered without doing anything: a request whose method is not `GET` or `HEAD` must carry
//! `Authorization: Bearer TOKEN` with the admin token (compared in constant time), and with
//! [`AdminAuth::reads`] so must every request; otherwise `401` with a one-line reason, decided
//! from the request head alone (an unauthenticated body is never buffered).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fsutil::from_hex;
use crate::metrics::{ErrorKind, Freshness, MetricsSnapshot, not_answering_lines};
use crate::registry::{ADMIN_TOKEN_FILE, Token};

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

/// Who may use the admin endpoint (see the module docs).
#[derive(Debug, Clone)]
pub struct AdminAuth {
    /// The admin token (`DATA_DIR/admin.token`).
    pub token: Token,
    /// Require the token for reads (`GET`, `HEAD`) too, not only for requests that change state.
    pub reads: bool,
}

/// Limits and authentication of the admin server.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Largest POST body accepted (larger gets 413).
    pub max_body: usize,
    /// Time allowed for one read.
    pub read_timeout: Duration,
    /// Time allowed for a whole request, however it trickles in.
    pub deadline: Duration,
    /// Most connections served at once; past it a connection gets `503` at once.
    pub max_connections: usize,
    /// The token check; `None` serves everyone (tests of routes only: `tether serve` always
    /// sets it).
    pub auth: Option<AdminAuth>,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            max_body: 64 * 1024 * 1024,
            read_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
            max_connections: 16,
            auth: None,
        }
    }
}

/// Serves the admin endpoint with default [`AdminOptions`] (no token check).
pub fn serve_admin(
    listener: TcpListener,
    handler: impl Fn(&AdminRequest) -> AdminResponse + Send + Sync + 'static,
) -> io::Result<JoinHandle<()>> {
    serve_admin_with(listener, AdminOptions::default(), handler)
}

/// Serves the admin endpoint: an accept thread named `tether-admin` and a `tether-admin-conn`
/// thread per connection, at most [`AdminOptions::max_connections`] at once. A panicking
/// handler answers 500 and the endpoint keeps serving.
pub fn serve_admin_with(
    listener: TcpListener,
    opts: AdminOptions,
    handler: impl Fn(&AdminRequest) -> AdminResponse + Send + Sync + 'static,
) -> io::Result<JoinHandle<()>> {
    let handler = Arc::new(handler);
    let opts = Arc::new(opts);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("tether-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let stream = match conn {
                    Ok(s) => s,
                    // Transient for us (EMFILE, a reset before accept); do not spin on it.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if active.load(Ordering::Relaxed) >= opts.max_connections {
                    refuse_busy(stream, opts.max_connections);
                    continue;
                }
                let slot = Slot::take(&active);
                let (opts, handler) = (opts.clone(), handler.clone());
                // If the thread cannot start, the closure (stream and slot) is dropped: the
                // connection closes and the slot is given back.
                let _ = std::thread::Builder::new()
                    .name("tether-admin-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        let _ = serve_one(stream, &opts, &*handler);
                    });
            }
        })
}

/// One connection's place under [`AdminOptions::max_connections`], given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::Relaxed);
        Slot(active.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers `503` without reading the request and closes, from the accept thread: the write is
/// non-blocking (the answer fits any socket buffer), so a client that reads nothing cannot
/// hold the accept thread.
fn refuse_busy(mut stream: TcpStream, cap: usize) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = write_response(
            &mut stream,
            &AdminResponse::text(
                503,
                format!("the admin endpoint is busy ({cap} requests in flight); try again\n"),
            ),
        );
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
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
    let mut authorization = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("authorization") {
            if authorization.replace(value).is_some() {
                return Err(bad("more than one Authorization header"));
            }
        } else if name.eq_ignore_ascii_case("content-length") {
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
    if let Some(auth) = &opts.auth {
        check_auth(auth, method, authorization)?;
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

/// The token layer: decided on the request head, before any body is read.
fn check_auth(auth: &AdminAuth, method: &str, header: Option<&str>) -> Result<(), RequestError> {
    if !auth.reads && matches!(method, "GET" | "HEAD") {
        return Ok(());
    }
    let refuse = |why: String| Err(RequestError::Reject(401, why));
    let Some(value) = header else {
        return refuse(format!(
            "{method} needs the admin token: send `Authorization: Bearer TOKEN` with the token \
             from {ADMIN_TOKEN_FILE} in the server's data directory"
        ));
    };
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            if auth.token.verify(token.trim().as_bytes()) {
                Ok(())
            } else {
                refuse(format!(
                    "admin token rejected (compare with {ADMIN_TOKEN_FILE})"
                ))
            }
        }
        _ => refuse("the Authorization header must be `Bearer TOKEN`".into()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
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
    let challenge = if r.status == 401 {
        "WWW-Authenticate: Bearer realm=\"tether admin\"\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{challenge}Connection: close\r\n\r\n",
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
    #[error(
        "cannot use the admin token {}: {reason} (`tether serve` makes it in its data \
         directory: pass that directory with --data-dir)",
        path.display()
    )]
    Token { path: PathBuf, reason: String },
}

/// Reads the admin token that a server keeps in `data_dir/admin.token`, for the client calls;
/// the error names the file when it is missing, unreadable or not a token.
pub fn read_admin_token(data_dir: &Path) -> Result<String, AdminError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let err = |reason: String| AdminError::Token {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if from_hex::<32>(token.as_bytes()).is_none() {
        return Err(err("expected 64 hex digits".into()));
    }
    Ok(token.to_owned())
}

/// Sends one request to the admin endpoint and returns the status and body of the answer.
/// `token` (the admin token's hex, see [`read_admin_token`]) goes in `Authorization: Bearer`.
/// The answer must come within 10 s.
pub fn admin_request(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), AdminError> {
    admin_request_within(addr, token, method, path, body, Duration::from_secs(10))
}

/// [`admin_request`] for a request that takes longer (an upgrade): the answer must come
/// within `wait`.
pub fn admin_request_within(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    wait: Duration,
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
    stream.set_read_timeout(Some(wait)).map_err(io_err)?;
    // A token with a line break would add headers of its own: refuse it rather than send it.
    let auth = match token {
        Some(t) if t.bytes().any(|b| b.is_ascii_control()) => {
            return Err(AdminError::BadResponse {
                addr: name,
                reason: "the admin token has control characters; not sent".into(),
            });
        }
        Some(t) => format!("Authorization: Bearer {t}\r\n"),
        None => String::new(),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {name}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
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
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<T, AdminError> {
    let name = addr.to_string();
    let (status, body) = admin_request(addr, token, method, path, body)?;
    if status != 200 {
        return Err(AdminError::Status {
            addr: name,
            status,
            message: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| AdminError::Json { addr: name, source })
}

/// Fetches `/stats.json` from the admin endpoint at `addr`: each shard's latest published
/// counters (up to a tick old).
pub fn fetch_stats(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
) -> Result<MetricsSnapshot, AdminError> {
    admin_json(addr, token, "GET", "/stats.json", b"")
}

/// Fetches `/stats.json` until every shard's counters were published after this call began
/// (see [`until_current`]): what `tether stats` shows, so that it reflects what was done
/// before it ran, such as a deploy.
pub fn fetch_stats_current(
    addr: impl ToSocketAddrs + std::fmt::Display + Copy,
    token: Option<&str>,
) -> Result<MetricsSnapshot, AdminError> {
    until_current(
        || fetch_stats(addr, token),
        |s| s.shards.iter().map(|m| m.fresh).collect(),
    )
}

/// The longest [`until_current`] waits.
pub const CURRENT_WAIT: Duration = Duration::from_secs(3);

/// Calls `fetch` until every shard's snapshot in its answer (`fresh`, index = shard number)
/// was taken in a tick that began after the first call, or is stale (that shard is not
/// answering: waiting would not help), but for at most [`CURRENT_WAIT`]; the last answer.
/// Shards publish every tick, so this takes two or three ticks. The server never waits for a
/// shard; a client that wants an answer as of now does, here.
pub fn until_current<T, E>(
    mut fetch: impl FnMut() -> Result<T, E>,
    fresh: impl Fn(&T) -> Vec<Freshness>,
) -> Result<T, E> {
    let end = Instant::now() + CURRENT_WAIT;
    let mut answer = fetch()?;
    // The snapshot after the one first seen may come from a tick that began before the first
    // call read it: two publishes later, a whole tick ran after it.
    let want: Vec<u64> = fresh(&answer).iter().map(|f| f.seq + 2).collect();
    loop {
        let f = fresh(&answer);
        let current =
            f.len() == want.len() && f.iter().zip(&want).all(|(f, &w)| f.seq >= w || f.stale);
        if current || Instant::now() >= end {
            return Ok(answer);
        }
        std::thread::sleep(Duration::from_millis(20));
        answer = fetch()?;
    }
}

/// Renders a snapshot as a table: one row per counter, one column per shard, then the total.
/// Error kinds that are zero everywhere are left out. A shard that is not answering gets a
/// line above the table (its column shows its last values, which the totals include).
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
    let mut out = not_answering_lines(s.shards.iter().map(|m| &m.fresh));
    if !s.stale_shards.is_empty() {
        let _ = writeln!(
            out,
            "totals include the last values of {} shard(s) not answering",
            s.stale_shards.len()
        );
    }
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
        assert_eq!(fetch_stats(addr, None).unwrap(), snapshot());
        let (status, body) = admin_request(addr, None, "GET", "/metrics", b"").unwrap();
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
            admin_request(addr, None, "POST", "/echo", b"hello").unwrap(),
            (200, b"hello".to_vec())
        );
        let (status, body) =
            admin_request(addr, None, "POST", "/echo", b"far too long a body").unwrap();
        assert_eq!(status, 413);
        assert!(String::from_utf8_lossy(&body).contains("over the limit of 10 bytes"));
        assert_eq!(
            admin_request(addr, None, "GET", "/nope", b"").unwrap().0,
            404
        );
        assert_eq!(
            admin_request(addr, None, "POST", "/metrics", b"")
                .unwrap()
                .0,
            405
        );
        assert_eq!(
            admin_request(addr, None, "GET", "/panic", b"").unwrap().0,
            500
        );
        // Still serving after a panic.
        assert!(fetch_stats(addr, None).is_ok());
    }

    fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Everything the server sends on `s` until it closes (within 5 s).
    fn answer(s: &mut TcpStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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
        assert!(fetch_stats(addr, None).is_ok());
    }

    /// A server whose token check is on, its token's hex, and the directory holding it.
    fn start_with_token(reads: bool) -> (SocketAddr, String, crate::testdir::TestDir) {
        let dir = crate::testdir::TestDir::new("admin-auth");
        let token = Token::admin(dir.path()).unwrap();
        let hex = token.to_hex();
        let addr = start(AdminOptions {
            auth: Some(AdminAuth { token, reads }),
            ..AdminOptions::default()
        });
        (addr, hex, dir)
    }

    #[test]
    fn changes_need_the_admin_token_and_reads_stay_open_on_request() {
        let (addr, token, dir) = start_with_token(false);
        let (status, body) = admin_request(addr, None, "POST", "/echo", b"hi").unwrap();
        let body = String::from_utf8(body).unwrap();
        assert_eq!(status, 401, "{body}");
        assert!(
            body.starts_with("POST needs the admin token: send `Authorization: Bearer TOKEN`"),
            "{body}"
        );
        assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
        let wrong = "0".repeat(64);
        let (status, body) = admin_request(addr, Some(&wrong), "POST", "/echo", b"hi").unwrap();
        assert_eq!(status, 401);
        assert!(String::from_utf8_lossy(&body).starts_with("admin token rejected"));
        assert_eq!(
            admin_request(addr, Some("not hex"), "POST", "/echo", b"hi")
                .unwrap()
                .0,
            401
        );
        // Every method that is not a read, on any route (also ones that do not exist).
        for (method, path) in [("PUT", "/echo"), ("DELETE", "/metrics"), ("POST", "/nope")] {
            assert_eq!(
                admin_request(addr, None, method, path, b"").unwrap().0,
                401,
                "{method} {path}"
            );
        }
        assert_eq!(
            admin_request(addr, Some(&token), "POST", "/echo", b"hi").unwrap(),
            (200, b"hi".to_vec())
        );
        // The scheme is case-insensitive; the token read from the file works the same.
        let r = raw(
            addr,
            format!("POST /echo HTTP/1.1\r\nauthorization: bearer {token}\r\nContent-Length: 2\r\n\r\nok")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("ok"), "{r}");
        let from_file = read_admin_token(dir.path()).unwrap();
        assert_eq!(from_file, token);
        // Reads are open without the flag.
        assert_eq!(
            admin_request(addr, None, "GET", "/metrics", b"").unwrap().0,
            200
        );
        assert!(fetch_stats(addr, None).is_ok());
    }

    #[test]
    fn auth_reads_closes_get_too() {
        let (addr, token, _dir) = start_with_token(true);
        let (status, body) = admin_request(addr, None, "GET", "/metrics", b"").unwrap();
        assert_eq!(status, 401);
        assert!(String::from_utf8_lossy(&body).starts_with("GET needs the admin token"));
        let r = raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.contains("\r\nWWW-Authenticate: Bearer realm=\"tether admin\"\r\n"),
            "{r}"
        );
        assert_eq!(
            admin_request(addr, Some(&token), "GET", "/metrics", b"")
                .unwrap()
                .0,
            200
        );
        assert_eq!(fetch_stats(addr, Some(&token)).unwrap(), snapshot());
    }

    #[test]
    fn an_unauthenticated_body_is_refused_before_it_is_read() {
        let (addr, _token, _dir) = start_with_token(false);
        // Announces 1 MiB but sends none of it: the 401 comes from the head alone.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n")
            .unwrap();
        let out = answer(&mut s);
        assert!(out.starts_with("HTTP/1.1 401 "), "{out}");
    }

    #[test]
    fn read_admin_token_names_the_file() {
        let dir = crate::testdir::TestDir::new("admin-token-file");
        let e = read_admin_token(dir.path()).unwrap_err().to_string();
        let want = format!(
            "cannot use the admin token {}",
            dir.path().join("admin.token").display()
        );
        assert!(e.starts_with(&want), "{e}");
        assert!(e.contains("--data-dir"), "{e}");
        std::fs::write(dir.path().join("admin.token"), "nope\n").unwrap();
        let e = read_admin_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("expected 64 hex digits"), "{e}");
    }

    #[test]
    fn a_stalled_upload_does_not_stall_metrics() {
        let addr = start(AdminOptions::default());
        // Half a body, then silence: its thread waits for the rest.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled
            .write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\nhalf of it")
            .unwrap();
        let mut slow_head = TcpStream::connect(addr).unwrap();
        slow_head.write_all(b"GET /metr").unwrap();
        // Answered while both are open (the read deadline is 10 s; the client waits up to 10 s
        // too, so a serialised endpoint would fail here with a timeout, not pass late).
        let (status, _) = admin_request(addr, None, "GET", "/metrics", b"").unwrap();
        assert_eq!(status, 200);
        assert_eq!(fetch_stats(addr, None).unwrap(), snapshot());
        // The stalled upload completes normally afterwards.
        stalled.write_all(&[b'x'; 990]).unwrap();
        let out = answer(&mut stalled);
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.ends_with(&format!("half of it{}", "x".repeat(990))));
    }

    #[test]
    fn connections_past_the_cap_get_503_at_once() {
        let addr = start(AdminOptions {
            max_connections: 2,
            ..AdminOptions::default()
        });
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metr").unwrap();
            held.push(s);
        }
        // The accept thread counts a connection before it takes the next one, so the third is
        // over the cap.
        let mut third = TcpStream::connect(addr).unwrap();
        let out = answer(&mut third);
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(
            out.contains("the admin endpoint is busy (2 requests in flight)"),
            "{out}"
        );
        // Once the held connections end, their slots are free again.
        drop(held);
        let end = Instant::now() + Duration::from_secs(5);
        let ok = loop {
            match admin_request(addr, None, "GET", "/metrics", b"") {
                Ok((200, _)) => break true,
                _ if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => break false,
            }
        };
        assert!(ok, "slots were not given back");
    }

    #[test]
    fn connect_errors_say_where() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = fetch_stats(addr, None).unwrap_err().to_string();
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
        assert!(!t.contains("NOT ANSWERING"), "{t}");
    }

    #[test]
    fn until_current_waits_two_publishes_per_shard_but_not_for_a_stale_one() {
        use crate::metrics::Freshness;
        let f = |seq, stale| Freshness {
            seq,
            age_ms: 0,
            stale,
        };
        // Shard 0 publishes every call; shard 1 is stuck, then reads as stale.
        let answers = [
            vec![f(10, false), f(4, false)],
            vec![f(11, false), f(4, false)],
            vec![f(12, false), f(4, false)],
            vec![f(13, false), f(4, true)],
            vec![f(14, false), f(4, true)],
        ];
        let mut calls = 0;
        let got = until_current(
            || {
                calls += 1;
                Ok::<_, ()>(answers[calls - 1].clone())
            },
            |a| a.clone(),
        )
        .unwrap();
        assert_eq!((calls, got[0].seq, got[1].stale), (4, 13, true));
        // Both up: done once each is two publishes past the first answer.
        let mut seq = 0;
        let got = until_current(
            || {
                seq += 1;
                Ok::<_, ()>(vec![f(seq, false), f(seq + 5, false)])
            },
            |a| a.clone(),
        )
        .unwrap();
        assert_eq!((got[0].seq, got[1].seq), (3, 8));
    }

    #[test]
    fn table_names_a_stale_shard_and_keeps_its_values() {
        let mut s = snapshot();
        s.shards[1].fresh = crate::metrics::Freshness::of(5, Duration::from_millis(3_200));
        s.stale_shards = vec![1];
        let t = format_stats_table(&s);
        let mut lines = t.lines();
        assert_eq!(
            lines.next(),
            Some("shard 1: NOT ANSWERING for 3.2 s, last values shown")
        );
        assert_eq!(
            lines.next(),
            Some("totals include the last values of 1 shard(s) not answering")
        );
        let open = t
            .lines()
            .find(|l| l.starts_with("connections_open"))
            .unwrap();
        let cols: Vec<&str> = open.split_whitespace().collect();
        assert_eq!(cols, ["connections_open", "12", "3", "15"]);
    }
}
