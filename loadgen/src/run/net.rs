//! Socket helpers shared by simulated devices and agents: deadlines, TLS flushing through a
//! shard-lent buffer, and error kinds for the report.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use futures_lite::io::AsyncWriteExt as _;
use futures_lite::{AsyncRead, AsyncWrite, future};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use rustls::ClientConnection;
use socket2_04::{Domain, Protocol, SockAddr, Socket, Type};

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

/// Starts a non-blocking TCP connect from `source` (any if `None`) and waits until it is
/// established. glommio 0.9 cannot bind before its own connect, so the socket is made with
/// socket2; a zero-byte send waits for writability, which a connecting socket gets once it is
/// established (or fails with the connect error).
pub async fn connect_from(source: Option<Ipv4Addr>, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        socket.bind(&SockAddr::from(SocketAddr::from((ip, 0))))?;
    }
    match socket.connect(&SockAddr::from(to)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from(socket);
    stream.write(&[]).await?;
    Ok(stream)
}

/// Shard-owned scratch buffers, lent for one synchronous step and never held across an await,
/// so a device at rest holds no buffer.
pub struct Scratch {
    /// Ciphertext read from a socket.
    pub rx: RefCell<Vec<u8>>,
    /// Plaintext taken out of rustls.
    pub plain: RefCell<Vec<u8>>,
    /// Ciphertext on its way to a socket.
    pub tx: RefCell<Vec<u8>>,
}

impl Scratch {
    /// Buffers of `size` bytes each.
    pub fn new(size: usize) -> Scratch {
        Scratch {
            rx: RefCell::new(vec![0; size]),
            plain: RefCell::new(vec![0; size]),
            tx: RefCell::new(Vec::with_capacity(size)),
        }
    }
}

/// Writes everything rustls has queued. Tries one non-blocking send through the shard buffer;
/// only what the socket did not take is copied out and awaited.
pub async fn flush_tls(
    stream: &mut TcpStream,
    tls: &mut ClientConnection,
    scratch: &Scratch,
) -> io::Result<()> {
    while tls.wants_write() {
        // One synchronous poll inside the closure, so the shard buffer is never borrowed across
        // a suspension; a `Pending` write only leaves a spurious wake-up behind.
        let rest = future::poll_fn(|cx| {
            let mut w = scratch.tx.borrow_mut();
            w.clear();
            while tls.wants_write() && w.len() < 64 * 1024 {
                if let Err(e) = tls.write_tls(&mut *w) {
                    return Poll::Ready(Err(e));
                }
            }
            Poll::Ready(match Pin::new(&mut *stream).poll_write(cx, &w) {
                Poll::Ready(Ok(n)) if n == w.len() => Ok(None),
                Poll::Ready(Ok(n)) => Ok(Some(w[n..].to_vec())),
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Ok(Some(w.to_vec())),
            })
        })
        .await?;
        let Some(rest) = rest else { continue };
        stream.write_all(&rest).await?;
    }
    Ok(())
}

/// A TLS failure as an `io::Error` (kind `InvalidData`), keeping rustls' message.
pub fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e))
}

#[derive(Debug)]
struct TlsFailure(rustls::Error);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tls: {}", self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// Polls one read of TLS records into the shard buffer, feeds them to rustls and hands every
/// plaintext byte to `on_plain`. `Ready(Ok(0))` is end of stream.
pub fn poll_read_tls(
    cx: &mut Context<'_>,
    stream: &mut TcpStream,
    tls: &mut ClientConnection,
    scratch: &Scratch,
    mut on_plain: impl FnMut(&[u8]),
) -> Poll<io::Result<usize>> {
    let mut rx = scratch.rx.borrow_mut();
    let n = ready!(Pin::new(stream).poll_read(cx, &mut rx[..]))?;
    let mut data = &rx[..n];
    let mut plain = scratch.plain.borrow_mut();
    while !data.is_empty() {
        tls.read_tls(&mut data)?;
        let state = tls.process_new_packets().map_err(tls_err)?;
        let mut left = state.plaintext_bytes_to_read();
        while left > 0 {
            let m = tls.reader().read(&mut plain[..])?;
            if m == 0 {
                break;
            }
            on_plain(&plain[..m]);
            left = left.saturating_sub(m);
        }
        if state.peer_has_closed() {
            return Poll::Ready(Ok(0));
        }
    }
    Poll::Ready(Ok(n))
}

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
