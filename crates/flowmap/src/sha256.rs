//! SHA-256 and base64, evaluated at compile time, for the Content Security Policy hashes of the
//! page's own inline style and script (`'sha256-…'`): they cannot go stale when `html/page.css`
//! or `html/page.js` change. Not for anything secret or large.

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The SHA-256 digest of `data`.
pub(crate) const fn digest(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    // The message, a 1 bit, zeros, and the length in bits: a whole number of 64-byte blocks.
    let blocks = (data.len() + 9).div_ceil(64);
    let bits = (data.len() as u64).wrapping_mul(8);
    let mut block = 0;
    while block < blocks {
        let mut w = [0u32; 64];
        let mut i = 0;
        while i < 64 {
            let at = block * 64 + i;
            let byte = if at < data.len() {
                data[at]
            } else if at == data.len() {
                0x80
            } else if at >= blocks * 64 - 8 {
                (bits >> (8 * (blocks * 64 - 1 - at))) as u8
            } else {
                0
            };
            w[i / 4] |= (byte as u32) << (24 - 8 * (i % 4));
            i += 1;
        }
        let mut t = 16;
        while t < 64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16]
                .wrapping_add(s0)
                .wrapping_add(w[t - 7])
                .wrapping_add(s1);
            t += 1;
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        let mut t = 0;
        while t < 64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[t])
                .wrapping_add(w[t]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
            t += 1;
        }
        let add = [a, b, c, d, e, f, g, hh];
        let mut k = 0;
        while k < 8 {
            h[k] = h[k].wrapping_add(add[k]);
            k += 1;
        }
        block += 1;
    }
    let mut out = [0u8; 32];
    let mut k = 0;
    while k < 32 {
        out[k] = (h[k / 4] >> (24 - 8 * (k % 4))) as u8;
        k += 1;
    }
    out
}

/// A 32-byte digest in standard base64 with padding (44 characters), as CSP hash sources
/// spell it.
pub(crate) const fn base64(digest: &[u8; 32]) -> [u8; 44] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = [b'='; 44];
    let mut i = 0;
    let mut o = 0;
    while i < 32 {
        let b0 = digest[i] as u32;
        let b1 = if i + 1 < 32 { digest[i + 1] as u32 } else { 0 };
        let b2 = if i + 2 < 32 { digest[i + 2] as u32 } else { 0 };
        let n = (b0 << 16) | (b1 << 8) | b2;
        out[o] = ALPHABET[(n >> 18) as usize & 63];
        out[o + 1] = ALPHABET[(n >> 12) as usize & 63];
        if i + 1 < 32 {
            out[o + 2] = ALPHABET[(n >> 6) as usize & 63];
        }
        if i + 2 < 32 {
            out[o + 3] = ALPHABET[n as usize & 63];
        }
        i += 3;
        o += 4;
    }
    out
}
