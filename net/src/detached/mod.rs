//! Detached TLS: a TLS 1.3 connection that, once its handshake is done, keeps only its
//! traffic keys, sequence numbers and rustls' key schedule — ≈ 1.4 KB instead of a
//! `ServerConnection`'s ≈ 7.7 KB — and (server side) can move to another shard or process.
//! One record layer ([`DetachedTls`], generic over the [`Side`]) serves both ends: the server
//! ([`Handshake`]) and the load generator's simulated devices ([`ClientHandshake`]).
//!
//! No home-made cryptography: the handshake is rustls' [`UnbufferedServerConnection`], the
//! secrets come from its `dangerous_into_kernel_connection`, the AEADs are the suite's own
//! `aead_alg` encrypter and decrypter from the crypto provider (aws-lc-rs), and key updates
//! come from rustls' [`KernelConnection`]. This module only frames records (header, inner
//! content type, alerts, KeyUpdate messages) and counts them. Sans-IO: no sockets, no clock.
//!
//! # Flow
//! Server: [`Handshake::feed`] until complete → [`Handshake::detach`] → [`DetachedTls`]
//! (`decrypt_in_place` / `encrypt` / `poll_transmit` / `close_notify`) →
//! optionally [`DetachedTls::to_bytes`] / [`DetachedTls::from_bytes`] to hand it over.
//! Client: [`ClientHandshake::feed`] until complete → [`ClientHandshake::detach`] →
//! [`DetachedClientTls`], which hands the server's session tickets to rustls' key schedule
//! (resumption keeps working) until it is forgotten.
//!
//! # Memory per connection (measured, AES-256-GCM; ChaCha20 within 20 B)
//! `size_of::<DetachedTls>()` = 208 B. RSS per idle state over 10,000 real handshakes
//! (`examples/tls_state_rss.rs`, glibc malloc, aws-lc's C contexts included): with rustls'
//! key schedule ≈ 2.45 KB; after [`DetachedTls::forget_key_schedule`] or
//! [`DetachedTls::from_bytes`] ≈ 1.6 KB; for comparison the finished
//! `UnbufferedServerConnection` ≈ 3.5 KB and `ServerConnection` ≈ 7.8 KB. Of the Rust heap
//! (`tests/tls_detached_memory.rs`): the `KernelConnection` holds ≈ 0.8 KB, the two AEAD
//! objects ≈ 100 B; the rest (≈ 1.3 KB) is aws-lc's two `EVP_AEAD_CTX`s in C.
//!
//! Client side, same example (`client-*` modes, ChaCha20-Poly1305, 5,000 states):
//! [`DetachedClientTls`] after its ticket, key schedule forgotten ≈ 1.5 KB; key schedule kept
//! ≈ 3.0 KB; rustls' buffered `ClientConnection` ≈ 8.3 KB.
//!
//! # AES-GCM and the first sequence number (aws-lc-rs)
//! aws-lc-rs seals AES-GCM with aws-lc's TLS 1.3 AEAD (`EVP_aead_aes_*_gcm_tls13`), which
//! enforces strictly rising nonces: on the *first* seal it takes the nonce's low 64 bits as
//! the IV mask (assuming sequence 0), then requires `(nonce ^ mask)` to rise. A fresh
//! encrypter whose first record is at sequence N > 0 computes mask = IV ⊕ N and sees
//! `seq ⊕ N`, which stops rising: for N = 3, 3⊕3 = 0, 4⊕3 = 7, 5⊕3 = 6 < 8 → the third
//! record fails with `EncryptError`. With rustls 0.23.46 the server sends the half-RTT
//! `Challenge` and one record holding both tickets before detaching, so N = 2 and sealing
//! fails at sequence 6 (the fifth record: 2→0, 3→1, 4→6, 5→7, 6→4). Opening is
//! stateless, so only the sending side is affected, and ChaCha20-Poly1305 (a plain AEAD) never.
//! The fix used here: for every suite but ChaCha20-Poly1305, [`Handshake::detach`] seals a
//! KeyUpdate (update_not_requested) as the fresh encrypter's only record under the handshake
//! key, then switches to the next key from rustls at sequence 0 — one 27-byte record and one
//! HKDF per connection. A move has the same problem (a fresh encrypter mid-stream), hence
//! [`MoveError::TxNotFresh`] and [`DetachedTls::rekey_tx`] before [`DetachedTls::to_bytes`].
//!
//! [`UnbufferedServerConnection`]: rustls::server::UnbufferedServerConnection
//! [`KernelConnection`]: rustls::kernel::KernelConnection

mod client;
mod error;
mod handshake;
mod record;
mod serialise;

pub use client::{ClientHandshake, DetachedClientTls};
pub use error::{DetachedError, HandshakeError, MoveError};
pub use handshake::{Handshake, Progress};
pub use record::{DetachedTls, HEADER_LEN, MAX_CIPHERTEXT, MAX_PLAINTEXT, Opened, Side};
