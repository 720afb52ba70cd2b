//! `lb_policy: sticky` and `weight` (see the affinity guide): candidates ordered by weighted rendezvous
//! hashing of an affinity key, so the same key prefers the same upstream (its prompt cache stays
//! warm) on every replica, with no shared state, and removing an upstream moves only the keys
//! that preferred it.
//!
//! The hash is fixed and documented, not std's per-process `RandomState`: FNV-1a (64-bit) over
//! the key, one 0xFF separator byte and the upstream's name, finished with the splitmix64 mixer.
//! Its top 53 bits give `u` in (0, 1); the upstream's score is `-ln(u) / weight` and the smallest
//! score goes first. Each upstream's score depends only on the key and its own name, which is
//! what makes adding or removing one move nothing else; `-ln(u)/w` is an exponential variable of
//! rate `w`, so an upstream is first for a share `w / Σw` of the keys.

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `parts`, one 0xFF byte between them (a byte no UTF-8 text holds, so `("ab","c")`
/// and `("a","bc")` differ), then splitmix64's finalizer: FNV alone mixes its last bytes weakly.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xFF;
            h = h.wrapping_mul(FNV_PRIME);
        }
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    mix(h)
}

/// splitmix64's output mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `bits` as a number strictly between 0 and 1 (its top 53 bits, centred in their interval).
fn unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// The rendezvous score of one upstream for a uniform `u`: smaller goes first.
fn score(u: f64, weight: f64) -> f64 {
    let w = if weight.is_finite() && weight > 0.0 {
        weight
    } else {
        1.0
    };
    -u.ln() / w
}

/// Sorts `order` (upstream indices) by score, smallest first; `u_of(i)` gives upstream `i`'s
/// uniform number and `weight_of(i)` its weight. Ties keep their order (stable sort).
fn sort_by_scores(
    order: &mut [usize],
    u_of: impl Fn(usize) -> f64,
    weight_of: impl Fn(usize) -> f64,
) {
    if order.len() < 2 {
        return;
    }
    // Scores computed once per upstream, not once per comparison.
    let mut scored: Vec<(f64, usize)> = order
        .iter()
        .map(|&i| (score(u_of(i), weight_of(i)), i))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (slot, (_, i)) in order.iter_mut().zip(scored) {
        *slot = i;
    }
}

/// Orders `order` for the affinity `key` (`sticky`): `name_of(i)` and `weight_of(i)` give
/// upstream `i`'s name and weight.
pub fn rendezvous<'a>(
    order: &mut [usize],
    key: &[u8],
    name_of: impl Fn(usize) -> &'a str,
    weight_of: impl Fn(usize) -> f64,
) {
    sort_by_scores(
        order,
        |i| unit(stable_hash(&[key, name_of(i).as_bytes()])),
        weight_of,
    );
}

/// A weighted shuffle (`random` honours `weight`): the same scores with fresh random numbers, so
/// an upstream comes first for a share `weight / Σweight` of the requests.
pub fn weighted_shuffle(
    order: &mut [usize],
    mut random: impl FnMut() -> u64,
    weight_of: impl Fn(usize) -> f64,
) {
    let us: Vec<(usize, f64)> = order.iter().map(|&i| (i, unit(random()))).collect();
    let u_of = |i: usize| us.iter().find(|(j, _)| *j == i).map_or(0.5, |(_, u)| *u);
    sort_by_scores(order, u_of, weight_of);
}

/// The affinity key's source, in the affinity guide's order: the body's `prompt_cache_key`, else
/// its `user` (both read by the one parse of the body, as `body_key`), else the client token's
/// label, else the client address.
pub fn affinity_key(
    body_key: Option<&str>,
    token_label: Option<&str>,
    ip: Option<std::net::IpAddr>,
) -> Vec<u8> {
    if let Some(k) = body_key {
        return k.as_bytes().to_vec();
    }
    if let Some(t) = token_label {
        let mut k = b"token:".to_vec();
        k.extend_from_slice(t.as_bytes());
        return k;
    }
    match ip {
        Some(ip) => format!("ip:{ip}").into_bytes(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_for(key: &str, names: &[&str], weights: &[f64]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..names.len()).collect();
        rendezvous(&mut order, key.as_bytes(), |i| names[i], |i| weights[i]);
        order
    }

    #[test]
    fn the_hash_is_fixed() {
        // Every replica, every build: these values must never change (the docs name the hash).
        assert_eq!(stable_hash(&[b""]), mix(FNV_OFFSET));
        assert_eq!(stable_hash(&[b"a", b"bc"]), stable_hash(&[b"a", b"bc"]));
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        assert_eq!(stable_hash(&[b"key-1", b"a"]), 0x80b5_8d36_0a85_5b6b);
    }

    #[test]
    fn spread_follows_the_weights() {
        let names = ["a", "b", "c"];
        let weights = [1.0, 2.0, 1.0];
        let mut firsts = [0usize; 3];
        for k in 0..10_000 {
            firsts[order_for(&format!("key-{k}"), &names, &weights)[0]] += 1;
        }
        let share = |n: usize| n as f64 / 10_000.0;
        assert!((share(firsts[0]) - 0.25).abs() < 0.02, "{firsts:?}");
        assert!((share(firsts[1]) - 0.50).abs() < 0.02, "{firsts:?}");
        assert!((share(firsts[2]) - 0.25).abs() < 0.02, "{firsts:?}");
    }

    #[test]
    fn removing_an_upstream_moves_only_its_keys() {
        let all = ["a", "b", "c"];
        let two = ["a", "c"];
        for k in 0..2_000 {
            let key = format!("key-{k}");
            let before = all[order_for(&key, &all, &[1.0; 3])[0]];
            let after = two[order_for(&key, &two, &[1.0; 2])[0]];
            if before != "b" {
                assert_eq!(before, after, "{key}");
            }
        }
    }

    #[test]
    fn weighted_shuffle_follows_the_weights() {
        let mut x = 0x1234_5678_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut firsts = [0usize; 2];
        for _ in 0..10_000 {
            let mut order = vec![0, 1];
            weighted_shuffle(&mut order, &mut next, |i| [1.0, 3.0][i]);
            firsts[order[0]] += 1;
        }
        assert!(
            (firsts[1] as f64 / 10_000.0 - 0.75).abs() < 0.02,
            "{firsts:?}"
        );
    }

    #[test]
    fn key_sources_in_order() {
        let ip = Some("10.0.0.1".parse().unwrap());
        assert_eq!(affinity_key(Some("pck:p"), Some("t"), ip), b"pck:p");
        assert_eq!(affinity_key(Some("user:u"), Some("t"), ip), b"user:u");
        assert_eq!(affinity_key(None, Some("t"), ip), b"token:t");
        assert_eq!(affinity_key(None, None, ip), b"ip:10.0.0.1");
    }
}
