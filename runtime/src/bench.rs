//! Latency benchmarking of a [`Session`], and deterministic synthetic inputs to feed it.

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use serde::Serialize;
use whittle_core::Value;

use crate::error::Error;
use crate::session::{Dim, IoInfo, ProviderInfo, RuntimeKind, Session, resolve_shapes};

/// How long to benchmark.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchConfig {
    /// Untimed runs first (caches, allocators, lazy initialisation).
    pub warmup: usize,
    /// Timed runs; at least 1.
    pub iters: usize,
    /// Stop the timed runs early once this many seconds have passed (at least one timed run is
    /// always made). `None`: run all `iters`.
    pub max_seconds: Option<f64>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            warmup: 5,
            iters: 50,
            max_seconds: None,
        }
    }
}

/// One benchmark of one model in one runtime: what `whittle bench --json` prints, and a row of a
/// deployment report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// The model file.
    pub model: String,
    /// The runtime.
    pub runtime: RuntimeKind,
    /// The execution provider asked for and the one that ran.
    pub provider: ProviderInfo,
    /// The input shapes used.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Latency statistics.
    pub stats: BenchStats,
}

/// Latency statistics over the timed runs, in milliseconds per `run` call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchStats {
    /// Timed runs actually made (fewer than asked when `max_seconds` stopped early).
    pub iters: usize,
    /// Mean latency.
    pub mean_ms: f64,
    /// Median latency (nearest rank).
    pub p50_ms: f64,
    /// 90th percentile latency (nearest rank).
    pub p90_ms: f64,
    /// 99th percentile latency (nearest rank).
    pub p99_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Slowest run.
    pub max_ms: f64,
    /// `run` calls per second, `1000 / mean_ms`. This counts calls, not samples: multiply by the
    /// batch size for samples per second.
    pub fps: f64,
    /// The calling thread's CPU time per timed run, mean (where the platform tells it): with one
    /// intra-op thread the run's own compute, which time spent waiting for the CPU on a busy
    /// machine does not inflate; with more threads only the calling thread's share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<f64>,
}

impl BenchStats {
    /// Statistics over latency samples in milliseconds; `None` when there are none.
    /// Percentiles use the nearest-rank method on the sorted samples.
    pub fn from_samples(samples_ms: &[f64]) -> Option<BenchStats> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let rank = |p: f64| {
            // Nearest rank: the smallest sample with at least p% of the samples at or below it.
            let r = ((p / 100.0) * n as f64).ceil() as usize;
            sorted[r.clamp(1, n) - 1]
        };
        let mean_ms = sorted.iter().sum::<f64>() / n as f64;
        Some(BenchStats {
            iters: n,
            mean_ms,
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            min_ms: sorted[0],
            max_ms: sorted[n - 1],
            fps: if mean_ms > 0.0 {
                1000.0 / mean_ms
            } else {
                f64::INFINITY
            },
            cpu_ms: None,
        })
    }
}

/// The calling thread's CPU time so far, ms (`None` where the platform does not tell it).
pub fn thread_cpu_ms() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which `t` is, and reads nothing else.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        (rc == 0).then(|| t.tv_sec as f64 * 1000.0 + t.tv_nsec as f64 / 1e6)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Runs `session` on `inputs` `cfg.warmup` times untimed, then up to `cfg.iters` times timed.
///
/// `on_progress(done, total)` is called after every run, warmup included, with
/// `total = warmup + iters` (a person sees a bar; an early stop jumps to the end). The first failing
/// run stops the benchmark and returns its error.
pub fn bench(
    session: &mut dyn Session,
    inputs: &[Value],
    cfg: &BenchConfig,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<BenchStats, Error> {
    if cfg.iters == 0 {
        return Err(Error::InvalidBenchConfig("iters must be at least 1".into()));
    }
    if let Some(s) = cfg.max_seconds
        && !(s >= 0.0 && s.is_finite())
    {
        return Err(Error::InvalidBenchConfig(format!(
            "max_seconds must be a finite number >= 0, got {s}"
        )));
    }
    let total = cfg.warmup + cfg.iters;
    for i in 0..cfg.warmup {
        session.run(inputs)?;
        on_progress(i + 1, total);
    }
    let mut samples = Vec::with_capacity(cfg.iters);
    let cpu0 = thread_cpu_ms();
    let started = Instant::now();
    for i in 0..cfg.iters {
        let t0 = Instant::now();
        let outputs = session.run(inputs)?;
        let elapsed = t0.elapsed();
        drop(outputs);
        samples.push(elapsed.as_secs_f64() * 1000.0);
        on_progress(cfg.warmup + i + 1, total);
        if cfg
            .max_seconds
            .is_some_and(|s| started.elapsed().as_secs_f64() >= s)
        {
            if i + 1 < cfg.iters {
                on_progress(total, total);
            }
            break;
        }
    }
    let cpu = cpu0
        .zip(thread_cpu_ms())
        .map(|(a, b)| (b - a) / samples.len().max(1) as f64);
    let mut stats = BenchStats::from_samples(&samples)
        .ok_or_else(|| Error::InvalidBenchConfig("no timed run was made".into()))?;
    stats.cpu_ms = cpu;
    Ok(stats)
}

/// The probe value at flat index `i` over `[lo, hi)`: `lo + ((i mod 251) / 251) * (hi - lo)`.
///
/// This is the framework-free input the shared assets' reference outputs were computed with.
pub fn probe_value(i: usize, lo: f32, hi: f32) -> f32 {
    lo + ((i % 251) as f32 / 251.0) * (hi - lo)
}

/// A float tensor of the given shape filled with [`probe_value`] in row-major order.
pub fn probe_tensor(shape: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| probe_value(i, lo, hi)).collect();
    ArrayD::from_shape_vec(IxDyn(shape), data)
        .unwrap_or_else(|_| unreachable!("length is the shape's product"))
}

/// One deterministic value per graph input, in graph-input order, for benchmarks and smoke runs.
///
/// Shapes: an override gives an input's shape (and pins the symbols it sets in every input, so
/// `input_ids` [1,16] makes `attention_mask` [batch,seq] [1,16] too); remaining symbolic dims are 1.
/// Contents: floats are the probe pattern over [-1, 1); int64 and int32 are all 1 (a valid token id
/// and an all-ones mask); bool is all true. Fails when an override names no input or contradicts a
/// fixed dim, or an input has a type [`Value`] cannot hold.
pub fn synthetic_inputs(
    infos: &[IoInfo],
    overrides: &[(String, Vec<usize>)],
) -> Result<Vec<Value>, Error> {
    let (resolved, _) = resolve_shapes(infos, &[], overrides)?;
    resolved
        .iter()
        .map(|info| {
            let shape: Vec<usize> = info
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Symbolic(_) => 1,
                })
                .collect();
            let value = match info.dtype.as_str() {
                "float" => Value::F32(probe_tensor(&shape, -1.0, 1.0)),
                "int64" => Value::I64(ArrayD::from_elem(IxDyn(&shape), 1)),
                "int32" => Value::I32(ArrayD::from_elem(IxDyn(&shape), 1)),
                "bool" => Value::Bool(ArrayD::from_elem(IxDyn(&shape), true)),
                other => {
                    return Err(Error::UnsupportedType {
                        io: "input",
                        name: info.name.clone(),
                        dtype: other.to_string(),
                        action: "synthesise (float, int64, int32 and bool only)",
                    });
                }
            };
            Ok(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = BenchStats::from_samples(&samples).expect("stats");
        assert_eq!(
            (s.iters, s.p50_ms, s.p90_ms, s.p99_ms),
            (100, 50.0, 90.0, 99.0)
        );
        assert_eq!((s.min_ms, s.max_ms, s.mean_ms), (1.0, 100.0, 50.5));
        assert!((s.fps - 1000.0 / 50.5).abs() < 1e-9);

        let s = BenchStats::from_samples(&[3.0]).expect("stats");
        assert_eq!((s.p50_ms, s.p99_ms, s.fps), (3.0, 3.0, 1000.0 / 3.0));
        // 4 samples: p50 is the 2nd, p90 and p99 the 4th.
        let s = BenchStats::from_samples(&[4.0, 1.0, 3.0, 2.0]).expect("stats");
        assert_eq!((s.p50_ms, s.p90_ms, s.p99_ms), (2.0, 4.0, 4.0));
        assert!(BenchStats::from_samples(&[]).is_none());
    }

    #[test]
    fn synthetic_inputs_follow_shapes_and_overrides() {
        let infos = vec![
            IoInfo {
                name: "input_ids".into(),
                dtype: "int64".into(),
                dims: vec![Dim::Symbolic("batch".into()), Dim::Symbolic("seq".into())],
            },
            IoInfo {
                name: "attention_mask".into(),
                dtype: "int64".into(),
                dims: vec![Dim::Symbolic("batch".into()), Dim::Symbolic("seq".into())],
            },
            IoInfo {
                name: "image".into(),
                dtype: "float".into(),
                dims: vec![
                    Dim::Symbolic("N".into()),
                    Dim::Fixed(3),
                    Dim::Fixed(2),
                    Dim::Fixed(2),
                ],
            },
        ];
        let v = synthetic_inputs(&infos, &[]).expect("inputs");
        assert_eq!(v[0].shape(), &[1, 1]);
        assert_eq!(v[2].shape(), &[1, 3, 2, 2]);
        assert_eq!(v[0].to_f32_vec(), vec![1.0]);
        let img = v[2].to_f32_vec();
        assert_eq!(img[0], -1.0);
        assert!((img[1] - (-1.0 + 2.0 / 251.0)).abs() < 1e-7);

        let v = synthetic_inputs(&infos, &[("input_ids".into(), vec![2, 16])]).expect("inputs");
        assert_eq!(v[1].shape(), &[2, 16]);

        let err = synthetic_inputs(&infos, &[("pixels".into(), vec![1])]).unwrap_err();
        assert!(matches!(err, Error::ShapeOverride { .. }), "{err}");
        let err = synthetic_inputs(&infos, &[("image".into(), vec![1, 3, 4, 4])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape for input 'image': [1,3,4,4] does not fit the declared float [N,3,2,2]"
        );

        let f16 = [IoInfo {
            name: "h".into(),
            dtype: "float16".into(),
            dims: vec![Dim::Fixed(1)],
        }];
        assert!(matches!(
            synthetic_inputs(&f16, &[]),
            Err(Error::UnsupportedType { .. })
        ));
    }
}
