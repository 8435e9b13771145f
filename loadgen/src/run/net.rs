//! Helpers shared by simulated devices and agents: deadlines, TLS failures as `io::Error`s, and
//! error kinds for the report.

use std::future::Future;
use std::io;
use std::time::Instant;

use futures_lite::future;
use glommio::timer::Timer;

/// Sleeps until `at` (returns at once if it has passed).
pub async fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        Timer::new(at - now).await;
    }
}

/// Runs `fut` until `deadline`; `None` if the deadline came first.
pub async fn until<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    future::or(async { Some(fut.await) }, async {
        sleep_until(deadline).await;
        None
    })
    .await
}

/// A TLS failure as an `io::Error` (kind `InvalidData`), keeping rustls' message.
pub fn tls_err(e: rustls::Error) -> io::Error {
    lean_tls_err(e)
}

/// A failure of the detached TLS state (handshake or record layer) as an `io::Error`,
/// counted like rustls' own (`<stage>_tls_error`).
pub fn lean_tls_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure(Box::new(e)))
}

#[derive(Debug)]
struct TlsFailure(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tls: {}", self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// A short, stable name for an I/O failure, for the error counts.
pub fn kind_of(e: &io::Error, stage: &str) -> String {
    use io::ErrorKind as K;
    if e.get_ref().is_some_and(|i| i.is::<TlsFailure>()) {
        return format!("{stage}_tls_error");
    }
    let what = match e.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset => "reset",
        K::ConnectionAborted => "aborted",
        K::BrokenPipe => "broken_pipe",
        K::TimedOut => "timeout",
        K::AddrNotAvailable => "addr_not_available",
        K::AddrInUse => "addr_in_use",
        K::UnexpectedEof => "eof",
        _ if e.raw_os_error() == Some(libc::EMFILE) => "too_many_open_files",
        _ => "io_error",
    };
    format!("{stage}_{what}")
}
