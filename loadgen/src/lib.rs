//! Tether's load generator.
