//! CityHash32 from Google's CityHash v1.1.
//!
//! goim shards a comet's `ol_` hash in Redis by `CityHash32(room) mod 64`, so a
//! Herald logic that shares Redis with goim must hash exactly the same way or a
//! room would live in two shards. No maintained crate provides the 32-bit
//! variant of v1.1 with matching output, so it is written out here and checked
//! against the reference table (§14, T14).

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// CityHash32 v1.1 of `s`.
pub fn city_hash32(s: &[u8]) -> u32 {
    let len = s.len();
    if len <= 4 {
        return hash_len_0_to_4(s);
    }
    if len <= 12 {
        return hash_len_5_to_12(s);
    }
    if len <= 24 {
        return hash_len_13_to_24(s);
    }
    // The input length is mixed in modulo 2^32, as the C++ does.
    let len32 = len as u32;
    let mut h = len32;
    let mut g = C1.wrapping_mul(len32);
    let mut f = g;
    let a0 = scramble(fetch(s, len - 4));
    let a1 = scramble(fetch(s, len - 8));
    let a2 = scramble(fetch(s, len - 16));
    let a3 = scramble(fetch(s, len - 12));
    let a4 = scramble(fetch(s, len - 20));
    h = mix(h ^ a0, 19);
    h = mix(h ^ a2, 19);
    g = mix(g ^ a1, 19);
    g = mix(g ^ a3, 19);
    f = mix(f.wrapping_add(a4), 19);
    for chunk in s.chunks_exact(20).take((len - 1) / 20) {
        let a0 = scramble(fetch(chunk, 0));
        let a1 = fetch(chunk, 4);
        let a2 = scramble(fetch(chunk, 8));
        let a3 = scramble(fetch(chunk, 12));
        let a4 = fetch(chunk, 16);
        h = mix(h ^ a0, 18);
        f = f.wrapping_add(a1).rotate_right(19).wrapping_mul(C1);
        g = mix(g.wrapping_add(a2), 18);
        h = mix(h ^ a3.wrapping_add(a1), 19);
        g = (g ^ a4).swap_bytes().wrapping_mul(5);
        h = h.wrapping_add(a4.wrapping_mul(5)).swap_bytes();
        f = f.wrapping_add(a0);
        // PERMUTE3(f, h, g): f ← g, h ← f, g ← h.
        (f, h, g) = (g, f, h);
    }
    g = g.rotate_right(11).wrapping_mul(C1);
    g = g.rotate_right(17).wrapping_mul(C1);
    f = f.rotate_right(11).wrapping_mul(C1);
    f = f.rotate_right(17).wrapping_mul(C1);
    h = mix(h.wrapping_add(g), 19);
    h = h.rotate_right(17).wrapping_mul(C1);
    h = mix(h.wrapping_add(f), 19);
    h.rotate_right(17).wrapping_mul(C1)
}

/// Little-endian 32-bit load at `at`.
fn fetch(s: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]])
}

fn scramble(a: u32) -> u32 {
    a.wrapping_mul(C1).rotate_right(17).wrapping_mul(C2)
}

/// `h = rotate(h, r) * 5 + 0xe6546b64`, the step CityHash repeats everywhere.
fn mix(h: u32, r: u32) -> u32 {
    h.rotate_right(r).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn mur(a: u32, h: u32) -> u32 {
    mix(h ^ scramble(a), 19)
}

fn hash_len_0_to_4(s: &[u8]) -> u32 {
    let mut b: u32 = 0;
    let mut c: u32 = 9;
    for &byte in s {
        // The reference reads bytes as `signed char`.
        let v = byte as i8 as i32 as u32;
        b = b.wrapping_mul(C1).wrapping_add(v);
        c ^= b;
    }
    fmix(mur(b, mur(s.len() as u32, c)))
}

fn hash_len_5_to_12(s: &[u8]) -> u32 {
    let len = s.len();
    let mut a = len as u32;
    let mut b = a.wrapping_mul(5);
    let mut c: u32 = 9;
    let d = b;
    a = a.wrapping_add(fetch(s, 0));
    b = b.wrapping_add(fetch(s, len - 4));
    c = c.wrapping_add(fetch(s, (len >> 1) & 4));
    fmix(mur(c, mur(b, mur(a, d))))
}

fn hash_len_13_to_24(s: &[u8]) -> u32 {
    let len = s.len();
    let a = fetch(s, (len >> 1) - 4);
    let b = fetch(s, 4);
    let c = fetch(s, len - 8);
    let d = fetch(s, len >> 1);
    let e = fetch(s, 0);
    let f = fetch(s, len - 4);
    let h = len as u32;
    fmix(mur(f, mur(e, mur(d, mur(c, mur(b, mur(a, h)))))))
}

#[cfg(test)]
mod tests {
    use super::city_hash32;

    /// §14's T14, with the shard (mod 64) and bucket (mod 32) columns.
    const T14: &[(&str, u32, u32, u32)] = &[
        ("", 0xdc56_d17a, 58, 26),
        ("a", 0x3c97_3d4d, 13, 13),
        ("test://1", 0xfec6_329c, 28, 28),
        ("test_key", 0x4c98_b52a, 42, 10),
        ("live://1000", 0x431f_9d2b, 43, 11),
        ("live://1001", 0x529e_84c7, 7, 7),
        ("e8b2c1f0-1111-4222-8333-944455556666", 0x2f1e_e764, 36, 4),
    ];

    #[test]
    fn t14_reference_values() {
        for &(input, hash, shard, bucket) in T14 {
            let got = city_hash32(input.as_bytes());
            assert_eq!(got, hash, "CityHash32({input:?})");
            assert_eq!(got % 64, shard, "shard of {input:?}");
            assert_eq!(got % 32, bucket, "bucket of {input:?}");
        }
    }

    #[test]
    fn every_length_path_is_deterministic_and_distinct() {
        // 0..=4, 5..=12, 13..=24 and the long loop (several chunk counts).
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        let hashes: Vec<u32> = (0..=data.len()).map(|n| city_hash32(&data[..n])).collect();
        let again: Vec<u32> = (0..=data.len()).map(|n| city_hash32(&data[..n])).collect();
        assert_eq!(hashes, again);
        let mut unique = hashes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), hashes.len(), "prefixes should not collide");
    }

    /// Prefixes of a fixed byte pattern, hashed by an independent Go port of
    /// CityHash v1.1 (go-faster/city `Hash32`), covering every length path and
    /// several iteration counts of the long loop.
    #[test]
    fn matches_independent_port_on_every_length_path() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        let expected: &[(usize, u32)] = &[
            (0, 0xdc56_d17a),
            (1, 0x5b14_b733),
            (3, 0x86f2_1699),
            (4, 0x75ca_f8a8),
            (5, 0x6aa7_ff24),
            (7, 0x355a_f5d3),
            (12, 0x1947_1641),
            (13, 0x7b7b_4285),
            (17, 0xb955_71b2),
            (24, 0xa3ae_63c0),
            (25, 0x0443_bd5b),
            (40, 0x3262_f765),
            (41, 0x0968_0a9a),
            (60, 0x2c82_fa74),
            (61, 0x4c06_17c9),
            (100, 0x9c86_23bf),
            (200, 0xb265_25a2),
        ];
        for &(len, hash) in expected {
            assert_eq!(city_hash32(&data[..len]), hash, "prefix of {len} bytes");
        }
    }

    #[test]
    fn short_inputs_read_bytes_as_signed() {
        // The reference reads `signed char`; an unsigned read changes these.
        assert_eq!(city_hash32(&[0x80]), 0x2fc8_696b);
        assert_eq!(city_hash32(&[0xff, 0x01, 0xc3]), 0xc02c_e439);
    }
}
