//! One seeded random number generator for fixtures: a 64-bit LCG (Knuth's MMIX constants), so
//! random weights, inputs and bytes are the same on every run and need no dependency.

/// The golden-ratio multiplier that spreads small seeds over the state.
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

/// A 64-bit LCG; the field is the raw state.
#[derive(Clone, Debug)]
pub struct Lcg(pub u64);

impl Lcg {
    /// Seeded from a small number: `seed` spread over the 64 bits, xor `salt` (each fixture file
    /// has its own salt, so equal seeds give different fixtures).
    pub fn seeded(seed: u64, salt: u64) -> Lcg {
        Lcg(seed.wrapping_mul(SPREAD) ^ salt)
    }

    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in [-scale, scale), computed as `(unit - 0.5) * 2 * scale`.
    pub fn symmetric(&mut self, scale: f32) -> f32 {
        (self.unit() - 0.5) * 2.0 * scale
    }

    /// A value with magnitude in [0.1, 1) times `scale` and a random sign: never 0.
    pub fn nonzero(&mut self, scale: f32) -> f32 {
        let m = self.uniform(0.1, 1.0) * scale;
        if self.unit() < 0.5 { -m } else { m }
    }

    /// `n` values uniform in [lo, hi).
    pub fn values(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// `n` bytes (the top byte of each state).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 56) as u8).collect()
    }
}

/// `n` values uniform in [-1, 1) from `seed`.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    Lcg(seed.wrapping_mul(SPREAD) | 1).values(n, -1.0, 1.0)
}

/// `len` pseudo-random bytes from `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    Lcg(seed.wrapping_mul(SPREAD) | 1).bytes(len)
}
