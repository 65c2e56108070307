//! Activation ranges for 8-bit quantization, from a histogram of calibration values.
//!
//! Four calibrators choose the range `[lo, hi]` (always containing 0, so that zero is exact) a
//! tensor is quantized over: min-max (every value representable), percentile (the tails beyond a
//! fraction of the values clipped), MSE (the range with the least expected squared quantization
//! error, clipping and rounding together) and entropy (TensorRT's KL divergence between the
//! histogram and its quantized form). A range becomes a scale and a uint8 zero point with
//! [`QParams::from_range`].

use serde::{Deserialize, Serialize};

/// Bins of a calibration histogram.
pub const BINS: usize = 2048;

/// How an activation's range is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Calibrator {
    /// Every calibration value representable.
    Minmax,
    /// The tails beyond `--percentile` of the values clipped.
    Percentile,
    /// The least expected squared error (clipping and rounding).
    Mse,
    /// The least KL divergence between the histogram and its 8-bit form (TensorRT's).
    Entropy,
}

impl Calibrator {
    /// Every calibrator.
    pub const ALL: [Calibrator; 4] = [
        Calibrator::Minmax,
        Calibrator::Percentile,
        Calibrator::Mse,
        Calibrator::Entropy,
    ];

    /// Its name in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Calibrator::Minmax => "minmax",
            Calibrator::Percentile => "percentile",
            Calibrator::Mse => "mse",
            Calibrator::Entropy => "entropy",
        }
    }
}

/// Counts of values over `[min, max]` in [`BINS`] equal bins.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// The smallest value seen.
    pub min: f32,
    /// The largest value seen.
    pub max: f32,
    /// The counts.
    pub counts: Vec<f64>,
    /// How many of the values were exactly 0 (a ReLU's output is mostly zeros, which any range
    /// holds exactly: entropy calibration leaves them out).
    pub zeros: f64,
}

impl Histogram {
    /// An empty histogram over the range the values were seen in.
    pub fn new(min: f32, max: f32) -> Histogram {
        Histogram {
            min,
            max,
            counts: vec![0.0; BINS],
            zeros: 0.0,
        }
    }

    fn width(&self) -> f64 {
        ((self.max - self.min) as f64 / BINS as f64).max(f64::MIN_POSITIVE)
    }

    /// Count `values` (values outside `[min, max]` fall in the end bins).
    pub fn add(&mut self, values: &[f32]) {
        let w = self.width();
        for &v in values {
            if !v.is_finite() {
                continue;
            }
            if v == 0.0 {
                self.zeros += 1.0;
            }
            let b = ((v - self.min) as f64 / w).floor();
            self.counts[(b.max(0.0) as usize).min(BINS - 1)] += 1.0;
        }
    }

    fn center(&self, i: usize) -> f64 {
        self.min as f64 + (i as f64 + 0.5) * self.width()
    }

    fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// The range `calibrator` chooses (`percentile` is the kept fraction for `Percentile`).
    pub fn range(&self, calibrator: Calibrator, percentile: f64) -> (f32, f32) {
        let (lo, hi) = match calibrator {
            Calibrator::Minmax => (self.min, self.max),
            Calibrator::Percentile => self.percentile(percentile),
            Calibrator::Mse => self.mse(),
            Calibrator::Entropy => self.entropy(),
        };
        (lo.min(0.0), hi.max(0.0))
    }

    /// The values below which `(1 - kept) / 2` and above which `(1 - kept) / 2` of the counts
    /// lie (one-sided for a tensor without negative values).
    fn percentile(&self, kept: f64) -> (f32, f32) {
        let total = self.total();
        if total == 0.0 {
            return (self.min, self.max);
        }
        let tail = if self.min >= 0.0 || self.max <= 0.0 {
            1.0 - kept
        } else {
            (1.0 - kept) / 2.0
        };
        let w = self.width();
        let mut acc = 0.0;
        let mut lo = self.min;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc > tail * total {
                lo = (self.min as f64 + i as f64 * w) as f32;
                break;
            }
        }
        acc = 0.0;
        let mut hi = self.max;
        for (i, c) in self.counts.iter().enumerate().rev() {
            acc += c;
            if acc > tail * total {
                hi = (self.min as f64 + (i + 1) as f64 * w) as f32;
                break;
            }
        }
        if self.min >= 0.0 {
            lo = self.min;
        }
        if self.max <= 0.0 {
            hi = self.max;
        }
        (lo, hi)
    }

    /// The range with the least expected squared error: values outside are clipped to its
    /// ends, values inside are off by the rounding error, `scale² / 12` on average.
    fn mse(&self) -> (f32, f32) {
        // prefix sums of c, c x, c x² over the bin centres: each candidate costs O(1)
        let n = BINS;
        let (mut s0, mut s1, mut s2) = (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n + 1]);
        for i in 0..n {
            let (c, x) = (self.counts[i], self.center(i));
            s0[i + 1] = s0[i] + c;
            s1[i + 1] = s1[i] + c * x;
            s2[i + 1] = s2[i] + c * x * x;
        }
        let w = self.width();
        let bin = |v: f64| (((v - self.min as f64) / w).floor().max(0.0) as usize).min(n);
        let (min, max) = (self.min.min(0.0) as f64, self.max.max(0.0) as f64);
        let steps = 100;
        let cost = |lo: f64, hi: f64| {
            let (a, b) = (bin(lo), bin(hi));
            let below = s2[a] - 2.0 * lo * s1[a] + lo * lo * s0[a];
            let above = (s2[n] - s2[b]) - 2.0 * hi * (s1[n] - s1[b]) + hi * hi * (s0[n] - s0[b]);
            let scale = (hi - lo) / 255.0;
            below + above + (s0[b] - s0[a]) * scale * scale / 12.0
        };
        let mut best = (cost(min, max), min, max);
        for i in 1..=steps {
            let lo = min * i as f64 / steps as f64;
            for j in 1..=steps {
                let hi = max * j as f64 / steps as f64;
                if hi - lo <= 0.0 {
                    continue;
                }
                let c = cost(lo, hi);
                if c < best.0 {
                    best = (c, lo, hi);
                }
            }
        }
        (best.1 as f32, best.2 as f32)
    }

    /// TensorRT's entropy calibration: the threshold whose 8-bit quantized histogram is closest
    /// (KL divergence) to the clipped one; over `[0, t]` with 256 levels for a tensor without
    /// negative values, over `[-t, t]` of |x| with 128 levels otherwise.
    fn entropy(&self) -> (f32, f32) {
        let one_sided = self.min >= 0.0;
        let span = self.min.abs().max(self.max.abs()) as f64;
        if span == 0.0 {
            return (self.min, self.max);
        }
        // the histogram of |x| over [0, span], exact zeros left out
        let mut h = vec![0.0; BINS];
        let zero_bin = ((-self.min as f64 / self.width()).floor().max(0.0) as usize).min(BINS - 1);
        for (i, c) in self.counts.iter().enumerate() {
            let c = if i == zero_bin {
                (c - self.zeros).max(0.0)
            } else {
                *c
            };
            let b = (self.center(i).abs() / span * BINS as f64) as usize;
            h[b.min(BINS - 1)] += c;
        }
        let levels = if one_sided { 256 } else { 128 };
        let mut best = (f64::INFINITY, BINS);
        let mut i = levels;
        while i <= BINS {
            let kl = kl_clipped(&h, i, levels);
            if kl < best.0 {
                best = (kl, i);
            }
            i += 8;
        }
        let t = (best.1 as f64 / BINS as f64 * span) as f32;
        if one_sided {
            (self.min, t.min(self.max))
        } else {
            ((-t).max(self.min), t.min(self.max))
        }
    }
}

/// KL(P || Q): P the first `i` bins of `h` with the rest added to the last, Q its quantization
/// to `levels` levels spread back over P's non-empty bins.
fn kl_clipped(h: &[f64], i: usize, levels: usize) -> f64 {
    let mut p: Vec<f64> = h[..i].to_vec();
    p[i - 1] += h[i..].iter().sum::<f64>();
    let mut q = vec![0.0; i];
    let per = i as f64 / levels as f64;
    for l in 0..levels {
        let (a, b) = (
            (l as f64 * per) as usize,
            (((l + 1) as f64 * per) as usize).min(i),
        );
        let sum: f64 = h[a..b].iter().sum();
        let nonzero = h[a..b].iter().filter(|&&c| c > 0.0).count();
        if nonzero > 0 {
            for k in a..b {
                if h[k] > 0.0 {
                    q[k] = sum / nonzero as f64;
                }
            }
        }
    }
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    p.iter()
        .zip(&q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| {
            let (a, b) = (a / sp, (b / sq).max(1e-12));
            a * (a / b).ln()
        })
        .sum()
}

/// A per-tensor 8-bit quantization: `x ≈ scale · (q − zero_point)`, uint8 codes, or int8
/// codes with zero point 0 (`signed`, TensorRT's symmetric form).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    /// The step.
    pub scale: f32,
    /// The uint8 code of 0 (0 when `signed`).
    pub zero_point: u8,
    /// int8 codes, symmetric around 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signed: bool,
}

impl QParams {
    /// The parameters covering `[lo, hi]` (which contains 0); a degenerate range (a constant
    /// activation) gets a small positive scale.
    pub fn from_range(lo: f32, hi: f32) -> QParams {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = ((hi - lo) / 255.0).max(1e-8);
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        QParams {
            scale,
            zero_point,
            signed: false,
        }
    }

    /// Symmetric int8 parameters (zero point 0) covering `[lo, hi]`.
    pub fn symmetric(lo: f32, hi: f32) -> QParams {
        QParams {
            scale: (lo.abs().max(hi.abs()) / 127.0).max(1e-8),
            zero_point: 0,
            signed: true,
        }
    }

    /// `from_range` or `symmetric`.
    pub fn new(lo: f32, hi: f32, signed: bool) -> QParams {
        if signed {
            QParams::symmetric(lo, hi)
        } else {
            QParams::from_range(lo, hi)
        }
    }

    /// The code of `x` (QuantizeLinear: round half to even, saturate).
    pub fn code(&self, x: f32) -> i32 {
        let (lo, hi) = if self.signed {
            (-128.0, 127.0)
        } else {
            (0.0, 255.0)
        };
        ((x / self.scale).round_ties_even() + self.zero_point as f32).clamp(lo, hi) as i32
    }

    /// `x` quantized and dequantized (QuantizeLinear then DequantizeLinear).
    pub fn fake(&self, x: f32) -> f32 {
        (self.code(x) - self.zero_point as i32) as f32 * self.scale
    }

    /// The largest value representable.
    pub fn max(&self) -> f32 {
        let top = if self.signed { 127.0 } else { 255.0 };
        (top - self.zero_point as f32) * self.scale
    }

    /// The parameters narrowed (by the last bits of the scale) until every representable value
    /// is at most `bound`: a Clip or Relu in front of the quantization is then redundant, which
    /// ONNX Runtime needs to fuse it away.
    pub fn within(mut self, bound: f32) -> QParams {
        while self.max() > bound && self.scale > 1e-8 {
            self.scale = f32::from_bits(self.scale.to_bits() - 1);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[f32]) -> Histogram {
        let (lo, hi) = values
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let mut h = Histogram::new(lo, hi);
        h.add(values);
        h
    }

    /// Mostly small values and one far outlier.
    fn outlier() -> Vec<f32> {
        let mut v: Vec<f32> = (0..10_000).map(|i| (i % 100) as f32 / 100.0).collect();
        v.push(100.0);
        v
    }

    #[test]
    fn minmax_covers_everything_and_contains_zero() {
        let h = hist(&[1.0, 2.0, 3.0]);
        assert_eq!(h.range(Calibrator::Minmax, 0.0), (0.0, 3.0));
        let h = hist(&[-2.0, 0.5]);
        assert_eq!(h.range(Calibrator::Minmax, 0.0), (-2.0, 0.5));
    }

    #[test]
    fn clipping_calibrators_cut_an_outlier() {
        let h = hist(&outlier());
        for c in [Calibrator::Percentile, Calibrator::Entropy] {
            let (lo, hi) = h.range(c, 0.999);
            assert_eq!(lo, 0.0, "{c:?}");
            // entropy's least threshold is 256 of the 2048 bins: 12.5 here
            assert!(hi < 15.0 && hi > 0.5, "{c:?}: {hi}");
        }
    }

    #[test]
    fn mse_clips_a_long_tail_where_rounding_costs_more() {
        // exponential: the squared-error optimum for 8 bits lies well inside the largest value
        // (one far outlier alone is cheaper to keep: its clipping error would outweigh the
        // rounding error of everything else)
        let v: Vec<f32> = (1..100_000)
            .map(|i| -((i as f64 / 100_000.0).ln()) as f32)
            .collect();
        let max = v.iter().fold(0f32, |a, b| a.max(*b));
        let (lo, hi) = hist(&v).range(Calibrator::Mse, 0.0);
        assert_eq!(lo, 0.0);
        assert!(hi < 0.95 * max && hi > 0.4 * max, "{hi} of {max}");
    }

    #[test]
    fn a_constant_activation_gets_a_range_that_holds_it() {
        for v in [3.0f32, -2.0, 0.0] {
            let h = hist(&[v; 50]);
            for c in Calibrator::ALL {
                let (lo, hi) = h.range(c, 0.999);
                let q = QParams::from_range(lo, hi);
                assert!(q.scale.is_finite() && q.scale > 0.0, "{c:?} {v}");
                let code = (v / q.scale + q.zero_point as f32)
                    .round()
                    .clamp(0.0, 255.0);
                let back = (code - q.zero_point as f32) * q.scale;
                assert!((back - v).abs() <= q.scale, "{c:?} {v}: {back}");
            }
        }
    }

    #[test]
    fn entropy_keeps_most_of_a_bell_curve() {
        // a deterministic bell curve (sum of uniforms), signed and after a ReLU
        let mut x = 1u64;
        let mut uniform = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        let bell: Vec<f32> = (0..50_000)
            .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
            .collect();
        let relu: Vec<f32> = bell.iter().map(|v| v.max(0.0)).collect();
        for (v, one_sided) in [(bell, false), (relu, true)] {
            let h = hist(&v);
            let (lo, hi) = h.range(Calibrator::Entropy, 0.0);
            let max = v.iter().fold(0f32, |a, b| a.max(*b));
            assert!(
                hi > 0.5 * max && hi <= max,
                "{one_sided}: {lo} {hi} of {max}"
            );
            if !one_sided {
                assert!(lo < -0.5 * max, "{lo} {hi}");
            }
        }
    }

    #[test]
    fn a_range_gives_exact_zero_and_a_clip_bound() {
        let q = QParams::from_range(-1.0, 3.0);
        assert_eq!(q.zero_point, 64);
        let q = QParams::from_range(0.0, 6.0).within(6.0);
        assert_eq!(q.zero_point, 0);
        assert!(q.max() <= 6.0);
        let q = QParams::from_range(0.0, 0.0);
        assert!(q.scale > 0.0);
    }
}
