//! Helpers shared by the fuzz targets in `fuzz_targets/`.

/// Where a stream of `len` bytes ends each read: the input's `cuts` taken modulo `len + 1`,
/// sorted, then `len` itself, so that feeding `bytes[previous..end]` for each `end` in turn
/// delivers the whole stream in pieces (some possibly empty).
pub fn read_ends(cuts: &[u16], len: usize) -> Vec<usize> {
    let mut ends: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (len + 1)).collect();
    ends.sort_unstable();
    ends.push(len);
    ends
}
