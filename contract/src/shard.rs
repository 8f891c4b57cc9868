//! The shard rule: which elements of a flat buffer each rank owns. The
//! collectives' reduce-scatter leaves each rank's result there, all-gather
//! expects each rank's part there, and a checkpoint stores each rank's shard
//! as one file: all three must agree, so the rule lives here, once.

/// Elements `shard_range(len, world, rank)` of a buffer of `len` elements are
/// rank `rank`'s shard: a balanced contiguous partition where the first
/// `len % world` ranks get one extra element.
///
/// ```
/// use cohort_contract::shard_range;
///
/// assert_eq!(shard_range(7, 3, 0), 0..3);
/// assert_eq!(shard_range(7, 3, 1), 3..5);
/// assert_eq!(shard_range(7, 3, 2), 5..7);
/// ```
///
/// # Panics
/// If `world == 0` or `rank >= world`.
pub fn shard_range(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    assert!(
        rank < world,
        "shard_range: rank {rank} out of range for world {world}"
    );
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_range_partitions() {
        for len in [0, 1, 7, 10, 1000] {
            for world in 1..9 {
                let mut next = 0;
                for rank in 0..world {
                    let r = shard_range(len, world, rank);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
        assert_eq!(shard_range(7, 3, 0), 0..3);
        assert_eq!(shard_range(7, 3, 2), 5..7);
    }
}
