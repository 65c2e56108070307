//! Weight rounding with error feedback (GPTQ, Frantar et al. 2023; OBQ's column-by-column form):
//! the columns of a layer's weight are rounded one at a time, and each column's rounding error is
//! spread over the columns not yet rounded so that the layer's output on the calibration inputs,
//! `W X`, moves as little as possible. The inputs enter only through their second moments
//! `H = X Xᵀ` (what refit already collects); columns go in order of decreasing `H` diagonal
//! (GPTQ's "act order": the inputs that matter most are rounded first, while the others can
//! still absorb their error).

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// Damping added to `H`'s diagonal, relative to its mean (GPTQ's 1%).
const DAMP: f64 = 0.01;

/// Int8 codes (in `-127..=127`) of `w` (`rows` output channels of `cols` inputs, row-major)
/// with each row's `scale`, rounded with error feedback through `h` (`cols` × `cols` or larger:
/// its top-left block is used). `None` when `h` is not positive definite even damped.
pub fn round(w: &[f32], rows: usize, cols: usize, scale: &[f32], h: &Mat<f64>) -> Option<Vec<i8>> {
    if rows == 0 || cols == 0 || w.len() != rows * cols || scale.len() != rows || h.nrows() < cols {
        return None;
    }
    // act order
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]));
    let mean_diag = (0..cols).map(|i| h[(i, i)]).sum::<f64>() / cols as f64;
    let damp = DAMP * mean_diag.max(f64::MIN_POSITIVE);
    let hp = Mat::<f64>::from_fn(cols, cols, |i, j| {
        let (a, b) = (order[i], order[j]);
        let dead = h[(a, a)] <= 0.0;
        match (i == j, dead || h[(b, b)] <= 0.0) {
            (true, _) => h[(a, a)].max(0.0) + damp + if dead { 1.0 } else { 0.0 },
            (false, true) => 0.0,
            (false, false) => h[(a, b)],
        }
    });
    // H⁻¹ = Uᵀ U with U upper triangular: U is the transpose of H⁻¹'s lower Cholesky factor
    let inv = hp
        .llt(Side::Lower)
        .ok()?
        .solve(Mat::<f64>::identity(cols, cols));
    let sym = Mat::<f64>::from_fn(cols, cols, |i, j| 0.5 * (inv[(i, j)] + inv[(j, i)]));
    let l = sym.llt(Side::Lower).ok()?;
    let l = l.L();
    let u = |i: usize, j: usize| l[(j, i)];
    let mut codes = vec![0i8; rows * cols];
    let mut row = vec![0f64; cols];
    for r in 0..rows {
        let s = scale[r] as f64;
        for (k, &c) in order.iter().enumerate() {
            row[k] = w[r * cols + c] as f64;
        }
        for i in 0..cols {
            let q = (row[i] / s).round().clamp(-127.0, 127.0);
            codes[r * cols + order[i]] = q as i8;
            let err = (row[i] - q * s) / u(i, i);
            for (j, v) in row.iter_mut().enumerate().skip(i + 1) {
                *v -= err * u(i, j);
            }
        }
    }
    Some(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `‖(W − s·Q) X‖²` over the rows of X (samples × cols).
    fn output_error(w: &[f32], q: &[i8], scale: &[f32], x: &[Vec<f64>], cols: usize) -> f64 {
        let rows = scale.len();
        let mut e = 0.0;
        for xs in x {
            for r in 0..rows {
                let d: f64 = (0..cols)
                    .map(|c| {
                        (w[r * cols + c] as f64 - scale[r] as f64 * q[r * cols + c] as f64) * xs[c]
                    })
                    .sum();
                e += d * d;
            }
        }
        e
    }

    #[test]
    fn error_feedback_beats_rounding_to_nearest_on_correlated_inputs() {
        let (rows, cols, n) = (8, 24, 400);
        let mut state = 7u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        // inputs with shared factors: strongly correlated columns
        let x: Vec<Vec<f64>> = (0..n)
            .map(|_| {
                let f = [rnd(), rnd(), rnd()];
                (0..cols).map(|c| f[c % 3] + 0.1 * rnd()).collect()
            })
            .collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| rnd() as f32).collect();
        let scale: Vec<f32> = (0..rows)
            .map(|r| {
                w[r * cols..(r + 1) * cols]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()))
                    / 127.0
                    * 16.0
            })
            .collect();
        let h = Mat::<f64>::from_fn(cols, cols, |i, j| x.iter().map(|v| v[i] * v[j]).sum());
        let gptq = round(&w, rows, cols, &scale, &h).unwrap();
        let nearest: Vec<i8> = (0..rows * cols)
            .map(|i| (w[i] / scale[i / cols]).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let (eg, en) = (
            output_error(&w, &gptq, &scale, &x, cols),
            output_error(&w, &nearest, &scale, &x, cols),
        );
        assert!(eg < 0.5 * en, "gptq {eg} vs nearest {en}");
    }

    #[test]
    fn a_dead_input_and_bad_shapes_are_handled() {
        let h = Mat::<f64>::from_fn(2, 2, |i, j| if i == 0 && j == 0 { 4.0 } else { 0.0 });
        let q = round(&[0.5, -0.25], 1, 2, &[0.5 / 127.0], &h).unwrap();
        assert_eq!(q, vec![127, -64]);
        assert!(round(&[0.5], 1, 2, &[1.0], &h).is_none());
    }
}
