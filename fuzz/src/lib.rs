//! What the fuzz targets share: the ways one input is cut into pieces.
//!
//! Every streaming parser in cubegate is fed whatever a socket read returned, so a byte
//! string may arrive cut anywhere. The targets feed each input whole and again along these
//! cut plans, and require the same outcome. Plans are derived from the input itself, so a
//! crashing input replays with the same cuts.

/// Cut plans for `data`, each a sorted list of cut offsets (0 < cut < len): no cut, a cut
/// before every byte, one cut at each offset (at 64 spread offsets for long inputs), and a
/// few many-cut plans drawn from a generator seeded by the input.
pub fn cut_plans(data: &[u8]) -> Vec<Vec<usize>> {
    let n = data.len();
    let mut plans = vec![Vec::new(), (1..n).collect()];
    if n <= 512 {
        plans.extend((1..n).map(|k| vec![k]));
    } else {
        plans.extend((1..64).map(|i| vec![i * n / 64]));
    }
    let mut seed = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    for _ in 0..4 {
        let mut cuts: Vec<usize> = (0..n.min(16))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as usize % n
            })
            .filter(|&c| c > 0)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        plans.push(cuts);
    }
    plans
}

/// The pieces of `data` between the cuts of `plan`.
pub fn pieces<'a>(data: &'a [u8], plan: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let starts = std::iter::once(0).chain(plan.iter().copied());
    let ends = plan.iter().copied().chain(std::iter::once(data.len()));
    starts.zip(ends).map(move |(a, b)| &data[a..b])
}
