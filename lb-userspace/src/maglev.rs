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
}
