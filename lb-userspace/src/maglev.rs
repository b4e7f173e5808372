//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016).
//!
//! Each backend walks its own permutation of the table's slots (offset and skip derived from
//! a stable hash of its identity); backends take turns claiming their next free preferred
//! slot until the table is full. Weights set how many turns a backend gets: every backend
//! ends with its exact share (largest-remainder rounding of `size * w / Σw`). The result
//! depends only on the backends' identities, weights and the table size, so every director
//! builds the same table, and removing one backend moves few slots of the others.

use lb_common::NO_BACKEND;

/// One entry of a table: a stable identity (hashed to its permutation), a weight, and the
/// value written into the slots it owns (the backend id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub identity: String,
    pub weight: u32,
    pub id: u32,
}

/// 64-bit FNV-1a followed by a murmur3 finaliser: fixed across Rust versions and platforms,
/// unlike `std`'s hasher, because identical directors must build identical tables.
fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Slot counts per entry: exact proportional shares, remainders to the largest fractions
/// (ties by position, so the result is deterministic).
fn shares(entries: &[Entry], size: u64) -> Vec<u64> {
    let total: u64 = entries.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return vec![0; entries.len()];
    }
    let mut counts: Vec<u64> = entries
        .iter()
        .map(|e| size * u64::from(e.weight) / total)
        .collect();
    let mut rest: Vec<(u64, usize)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| ((size * u64::from(e.weight)) % total, i))
        .collect();
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let missing = size - counts.iter().sum::<u64>();
    for &(_, i) in rest.iter().take(missing as usize) {
        counts[i] += 1;
    }
    counts
}

/// Build a table of `size` slots (`size` must be prime). Slots hold entry ids; with no
/// positive weight every slot is [`NO_BACKEND`].
pub fn build(entries: &[Entry], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} is not prime");
    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];
    let want = shares(entries, m);
    // Per entry: (offset, skip, next permutation index, slots still owed).
    let mut state: Vec<(u64, u64, u64, u64)> = entries
        .iter()
        .zip(&want)
        .map(|(e, &owed)| {
            let offset = stable_hash(e.identity.as_bytes(), 0x6f66_6673_6574) % m;
            let skip = stable_hash(e.identity.as_bytes(), 0x736b_6970) % (m - 1) + 1;
            (offset, skip, 0, owed)
        })
        .collect();
    let mut filled = 0u64;
    while filled < m {
        for (i, st) in state.iter_mut().enumerate() {
            if st.3 == 0 {
                continue;
            }
            // Next preferred slot that is still free; the permutation visits every slot
            // once in `m` steps, and a free slot exists while `filled < m`.
            loop {
                let slot = ((st.0 + st.2 * st.1) % m) as usize;
                st.2 += 1;
                if table[slot] == NO_BACKEND {
                    table[slot] = entries[i].id;
                    st.3 -= 1;
                    filled += 1;
                    break;
                }
            }
        }
        if state.iter().all(|st| st.3 == 0) {
            break;
        }
    }
    table
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights of a round-robin sequence: reduced by their gcd and, if their sum exceeds `max`,
/// scaled down proportionally (every backend keeps at least 1).
fn rr_weights(entries: &[Entry], max: usize) -> Vec<u64> {
    let mut w: Vec<u64> = entries.iter().map(|e| u64::from(e.weight)).collect();
    let g = w.iter().copied().fold(0, gcd);
    if g > 1 {
        w.iter_mut().for_each(|x| *x /= g);
    }
    let total: u64 = w.iter().sum();
    if total > max as u64 {
        w.iter_mut()
            .for_each(|x| *x = (*x * max as u64 / total).max(1));
        // The floors of max/total ≥ 1 may still overshoot by the number of entries raised
        // to 1; trim the largest until it fits.
        while w.iter().sum::<u64>() > max as u64 {
            let i = (0..w.len())
                .max_by_key(|&i| (w[i], usize::MAX - i))
                .expect("not empty");
            w[i] -= 1;
        }
    }
    w
}

/// Length of the sequence [`smooth_wrr`] writes (0 without entries).
pub fn smooth_wrr_len(entries: &[Entry], max: usize) -> usize {
    rr_weights(entries, max).iter().sum::<u64>() as usize
}

/// A smooth weighted round-robin sequence (nginx's algorithm: every step each entry gains
/// its weight, the richest is chosen and pays the total), so 3:1 gives a a b a, not a a a b.
/// The sequence fills the first [`smooth_wrr_len`] slots of a `size`-slot table, the rest
/// holds [`NO_BACKEND`]. Deterministic (ties go to the earlier entry).
pub fn smooth_wrr(entries: &[Entry], size: usize) -> Vec<u32> {
    let w = rr_weights(entries, size);
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = vec![NO_BACKEND; size];
    for slot in out.iter_mut().take(total as usize) {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        *slot = entries[best].id;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::RING_SIZE;

    fn backends(n: u32) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                identity: format!("198.18.1.{}", i + 10),
                weight: 100,
                id: i,
            })
            .collect()
    }

    fn count(table: &[u32], id: u32) -> usize {
        table.iter().filter(|&&s| s == id).count()
    }

    #[test]
    fn same_input_same_table() {
        assert_eq!(
            build(&backends(7), RING_SIZE),
            build(&backends(7), RING_SIZE)
        );
    }

    #[test]
    fn ten_equal_backends_share_evenly() {
        let table = build(&backends(10), RING_SIZE);
        assert!(table.iter().all(|&s| s < 10), "every slot is owned");
        for id in 0..10 {
            let share = count(&table, id) as f64 / f64::from(RING_SIZE);
            assert!(
                (share - 0.1).abs() <= 0.001,
                "backend {id} share {share} not within 1% of 1/10"
            );
        }
    }

    #[test]
    fn removing_one_of_ten_moves_few_slots() {
        let before = build(&backends(10), RING_SIZE);
        let mut nine = backends(10);
        nine.remove(4);
        let after = build(&nine, RING_SIZE);
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let frac = changed as f64 / f64::from(RING_SIZE);
        // The removed backend's own 10 % must move; Maglev keeps the rest nearly in place.
        assert!(frac <= 0.12, "{:.2} % of slots changed owner", frac * 100.0);
        let collateral = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b && **a != 4)
            .count();
        let collateral = collateral as f64 / f64::from(RING_SIZE);
        assert!(
            collateral <= 0.02,
            "{:.2} % of surviving backends' slots moved",
            collateral * 100.0
        );
    }

    #[test]
    fn weights_set_the_share() {
        let mut e = backends(2);
        e[0].weight = 300;
        let table = build(&e, RING_SIZE);
        let share = count(&table, 0) as f64 / f64::from(RING_SIZE);
        assert!((share - 0.75).abs() < 0.0001, "share {share}");
    }

    #[test]
    fn zero_weight_gets_nothing_and_all_zero_is_empty() {
        let mut e = backends(3);
        e[1].weight = 0;
        let table = build(&e, RING_SIZE);
        assert_eq!(count(&table, 1), 0);
        e.iter_mut().for_each(|b| b.weight = 0);
        assert!(build(&e, 13).iter().all(|&s| s == NO_BACKEND));
    }

    #[test]
    fn ring_size_is_prime() {
        assert!(is_prime(RING_SIZE));
        assert!(!is_prime(65536));
    }

    #[test]
    fn smooth_wrr_interleaves_and_keeps_exact_shares() {
        let e = |id: u32, weight: u32| Entry {
            identity: format!("b{id}"),
            weight,
            id,
        };
        let seq = smooth_wrr(&[e(0, 3), e(1, 1)], 11);
        assert_eq!(&seq[..4], &[0, 0, 1, 0], "smooth, not blocks: {seq:?}");
        assert_eq!(&seq[4..], &[NO_BACKEND; 7]);
        assert_eq!(
            smooth_wrr_len(&[e(0, 300), e(1, 100)], 11),
            4,
            "reduced by gcd"
        );
        // 5:3:2 — exact counts per period and no backend twice in a row more than needed.
        let seq = smooth_wrr(&[e(0, 5), e(1, 3), e(2, 2)], 10);
        let count = |id| seq.iter().filter(|&&x| x == id).count();
        assert_eq!((count(0), count(1), count(2)), (5, 3, 2));
        assert!(
            !seq.windows(3).any(|w| w[0] == w[1] && w[1] == w[2]),
            "{seq:?}"
        );
    }

    #[test]
    fn smooth_wrr_property_shares_within_one_per_prefix() {
        // For random weights, every prefix of the sequence is within one pick of the exact
        // proportional share of each entry (the property that makes it "smooth").
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..50 {
            let n = 1 + (next() % 6) as usize;
            let entries: Vec<Entry> = (0..n)
                .map(|i| Entry {
                    identity: format!("b{i}"),
                    weight: 1 + (next() % 20) as u32,
                    id: i as u32,
                })
                .collect();
            let len = smooth_wrr_len(&entries, 65537);
            let seq = smooth_wrr(&entries, 65537);
            let total: f64 = entries.iter().map(|e| f64::from(e.weight)).sum();
            let mut counts = vec![0f64; n];
            for (k, &id) in seq[..len].iter().enumerate() {
                counts[id as usize] += 1.0;
                for (i, e) in entries.iter().enumerate() {
                    let ideal = (k + 1) as f64 * f64::from(e.weight) / total;
                    assert!(
                        (counts[i] - ideal).abs() <= 1.0 + 1e-9,
                        "entry {i} after {} picks: {} vs {ideal:.2} ({entries:?})",
                        k + 1,
                        counts[i]
                    );
                }
            }
        }
    }

    #[test]
    fn smooth_wrr_scales_huge_weights_into_the_table() {
        let entries: Vec<Entry> = (0..10)
            .map(|i| Entry {
                identity: format!("b{i}"),
                weight: 65_535 - i,
                id: i,
            })
            .collect();
        let len = smooth_wrr_len(&entries, 65537);
        assert!(len <= 65537 && len > 60_000, "{len}");
        let seq = smooth_wrr(&entries, 65537);
        for id in 0..10 {
            let c = seq[..len].iter().filter(|&&x| x == id).count() as f64;
            assert!((c / len as f64 - 0.1).abs() < 0.001, "{id}: {c}");
        }
    }
}
