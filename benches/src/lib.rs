//! Criterion benchmarks of Tether hot paths.
