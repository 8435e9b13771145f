//! The Tether server.
