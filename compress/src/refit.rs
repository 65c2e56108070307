//! Least-squares reconstruction of pruned layers, without training ("refit").
//!
//! After channel pruning has removed input channels of a Conv, or input features of a Gemm or
//! MatMul, that layer's output drifts from the original model's. A refit solves again for the
//! layer's weights and bias so that, on calibration data, its output from the inputs it still
//! reads matches the ORIGINAL model's output of that layer as well as possible in the
//! least-squares sense (the reconstruction step of channel pruning by He et al. 2017 and of
//! ThiNet, Luo et al. 2017).
//!
//! [`collect`] runs the original model once over the calibration items and keeps, per layer, the
//! normal equations over ALL of the layer's inputs and outputs, in f64: `G = AᵀA`, `R = AᵀY` and
//! per output `ΣY²` and `ΣY`. The rows of `A` are the layer's input (for a Conv, im2col patches at
//! sampled output positions) plus a constant 1 for the bias, and `Y` is the original output.
//! [`RefitStats::apply`] then refits any kept subset of inputs and outputs without running
//! anything: it takes the sub-blocks of `G` and `R` for the kept inputs (× kernel positions, +
//! bias) and kept outputs, and solves `(G_s + λI) W = R_s` with a Cholesky factorisation,
//! `λ = ridge · trace(G_s) / d`. [`refit`] does both for one set of jobs.
//!
//! **Accepts:** Conv with 1-D or 2-D kernels and `group` 1 (any strides, pads, dilations,
//! `auto_pad`); Gemm with `transA` 0, `alpha` = `beta` = 1, `transB` 0 or 1 and a bias of shape
//! `[N]`, `[1,N]` or none; MatMul whose second input is a 2-D initializer `[K,N]` (its first input
//! 2-D or more, rows are the flattened leading dims; fitted without a bias, as MatMul has none).
//! Weights and bias must be float initializers.
//!
//! **Declines** (the report says `skipped` and why, the node is left alone): grouped or
//! depthwise Convs, 3-D Convs, other ops, computed weights or biases, non-float weights, Gemm
//! attributes other than the above, normal equations that stay singular, and a refit that does
//! not lower the error on the calibration rows.
//!
//! **Guarantees:** weight and bias keep their shapes (a Conv or Gemm without a bias gets one,
//! `[N]`); an initializer that another node (or a graph output) also reads is never changed in
//! place: the refitted node gets a copy under a new unique name; everything else is untouched.
//! A failing `apply` or `refit` leaves the pruned model unchanged. Results are deterministic for
//! a given seed, layer list, item list and runtime.

use std::collections::HashSet;
use std::fmt;

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Side};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::edit;
use whittle_core::onnx::tensor_proto::DataType;
use whittle_core::onnx::{GraphProto, NodeProto, TensorProto};
use whittle_core::tensor;

/// One layer to refit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefitJob {
    /// The name of the Conv, Gemm or MatMul node in the PRUNED model (its weights are
    /// initializers there). With [`RefitStats::apply`], also the name statistics were collected
    /// under.
    pub node: String,
    /// That layer's input tensor name in the ORIGINAL model.
    pub input: String,
    /// That layer's output tensor name in the ORIGINAL model (the target, bias included).
    pub output: String,
    /// Conv: the input channels of the original that the pruned node still reads; Gemm / MatMul:
    /// the input features kept. Strictly ascending.
    pub kept_in: Vec<usize>,
    /// The output channels / features of the original that the pruned node still produces.
    /// Strictly ascending.
    pub kept_out: Vec<usize>,
}

/// A layer to collect refit statistics for ([`collect`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRef {
    /// The Conv, Gemm or MatMul node's name in the ORIGINAL model (the pruned model's node has
    /// the same name).
    pub node: String,
    /// The layer's input tensor name in the original model.
    pub input: String,
    /// The layer's output tensor name in the original model (the target, bias included).
    pub output: String,
}

impl From<&RefitJob> for LayerRef {
    fn from(job: &RefitJob) -> Self {
        LayerRef {
            node: job.node.clone(),
            input: job.input.clone(),
            output: job.output.clone(),
        }
    }
}

/// How to refit.
#[derive(Debug, Clone, PartialEq)]
pub struct RefitOptions {
    /// Relative ridge: `λ = ridge · trace(G) / d` is added to the diagonal of the normal
    /// equations (default 1e-3). When the Cholesky factorisation still fails, λ grows.
    pub ridge: f64,
    /// Conv only: output positions sampled per calibration item (default 64; all positions when
    /// the output has fewer). Used when statistics are collected.
    pub rows_per_item: usize,
    /// Seed of the position sampling. Used when statistics are collected.
    pub seed: u64,
}

impl Default for RefitOptions {
    fn default() -> Self {
        Self {
            ridge: 1e-3,
            rows_per_item: 64,
            seed: 0,
        }
    }
}

/// What a refit did to one layer.
///
/// The relative error is `‖Y − Ŷ‖² / ‖Y − mean(Y)‖²` over the calibration rows (the mean taken
/// per output column), with `Y` the original output on the kept outputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefitReport {
    /// The node, as named in the job.
    pub node: String,
    /// Calibration rows the fit used (0 when skipped before the capture).
    pub rows: usize,
    /// The relative error of the node's weights before the refit (NaN when not measured).
    pub rel_error_before: f64,
    /// The relative error of the refitted weights (NaN when not measured).
    pub rel_error_after: f64,
    /// Why the node was left unchanged, when it was.
    pub skipped: Option<String>,
}

/// Everything that stops a refit (unsupported layers are not errors: they are reported as
/// skipped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefitError {
    /// A job or layer does not fit the models: an unknown node, bad kept lists, shapes that
    /// disagree, no statistics for the node.
    #[error("refit of node '{node}': {reason}")]
    Job {
        /// The node named in the job or layer.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// The options are out of range.
    #[error("refit options: {0}")]
    Options(String),
    /// Capturing the original model's activations failed.
    #[error("refit: {0}")]
    Capture(#[source] Box<whittle_calib::Error>),
    /// An initializer could not be read.
    #[error("refit: {0}")]
    Model(#[from] whittle_core::Error),
}

/// Refits the pruned layers named in `jobs` so that their outputs on the calibration items match
/// the original model's, and writes the new weights into `pruned`. Returns one report per job,
/// in job order. See the module documentation for what is accepted and guaranteed.
///
/// The same as [`collect`] for the jobs' layers followed by [`RefitStats::apply`], except that
/// every job is checked against the pruned model before anything runs, and a layer the pruned
/// model cannot refit is not captured. To refit many job sets over the same layers, collect once
/// and apply each set instead: the model then runs once.
pub fn refit(
    original: &Model,
    pruned: &mut Model,
    jobs: &[RefitJob],
    calib: &CaptureSpec,
    opts: &RefitOptions,
) -> Result<Vec<RefitReport>, RefitError> {
    check_options(opts)?;
    check_unique(jobs)?;
    let mut wanted = Vec::with_capacity(jobs.len());
    for (stream, job) in jobs.iter().enumerate() {
        // The pruned node's geometry is the one fitted, as the original need not name the node.
        let plan = match plan_job(pruned, job)? {
            Ok(layer) => Ok(match layer.kind {
                Kind::Conv(geom) => Geometry::Conv(geom),
                Kind::Dense { .. } => Geometry::Dense,
            }),
            Err(reason) => Err(reason),
        };
        wanted.push(Wanted {
            layer: LayerRef::from(job),
            stream,
            plan: Some(plan),
        });
    }
    collect_wanted(original, wanted, calib, opts)?.apply(pruned, jobs, opts)
}

/// Runs `original` once over the calibration items and keeps the normal equations of every layer
/// in `layers`, over all of its inputs and outputs, for [`RefitStats::apply`].
///
/// A layer the original cannot refit (a grouped Conv, another op, ...) is recorded with the
/// reason and reported as skipped by `apply`. A node listed twice with the same tensors is
/// collected once; with different tensors it is an error. Errors: a node the original lacks, a
/// capture failure, captured shapes that do not fit the layer. Conv positions are sampled per
/// layer with `opts.seed` and the layer's index in `layers`.
pub fn collect(
    original: &Model,
    layers: &[LayerRef],
    calib: &CaptureSpec,
    opts: &RefitOptions,
) -> Result<RefitStats, RefitError> {
    check_options(opts)?;
    let mut wanted: Vec<Wanted> = Vec::with_capacity(layers.len());
    for (stream, layer) in layers.iter().enumerate() {
        match wanted.iter().find(|w| w.layer.node == layer.node) {
            Some(w) if w.layer == *layer => continue,
            Some(w) => {
                return Err(layer_error(
                    layer,
                    format!(
                        "listed twice, reading '{}' -> '{}' and '{}' -> '{}'",
                        w.layer.input, w.layer.output, layer.input, layer.output
                    ),
                ));
            }
            None => wanted.push(Wanted {
                layer: layer.clone(),
                stream,
                plan: None,
            }),
        }
    }
    collect_wanted(original, wanted, calib, opts)
}

/// The normal equations of layers of the ORIGINAL model over all their inputs and outputs, from
/// one capture pass ([`collect`]); [`RefitStats::apply`] refits any kept subset from sub-blocks
/// without running the model again.
///
/// Plain data: share it by reference across any number of `apply` calls (it is `Send` and
/// `Sync`). Per layer it holds `G = AᵀA` (d × d with d = inputs · kernel elements + 1),
/// `R = AᵀY` (d × outputs), and per output `ΣY²` and `ΣY`, in f64.
#[derive(Clone)]
pub struct RefitStats {
    layers: Vec<LayerStats>,
}

impl RefitStats {
    /// Refits the layers named in `jobs` in `pruned` from the stored statistics (nothing runs),
    /// exactly as [`refit`] does with a capture: the sub-blocks of the normal equations for the
    /// kept inputs and outputs are solved with the ridge of `opts`, the new weights are written
    /// when they lower the error, and one report per job comes back, in job order. The
    /// errors before are those of the pruned node's current weights.
    ///
    /// Errors, before anything is written: a job whose node has no statistics or whose tensors
    /// differ from the collected layer's, a job that does not fit the pruned model (see
    /// [`refit`]), kept lists reaching past the original's inputs or outputs, and a pruned node
    /// whose kind or Conv attributes differ from the original's. A node the pruned model or the
    /// original cannot refit is reported as skipped.
    pub fn apply(
        &self,
        pruned: &mut Model,
        jobs: &[RefitJob],
        opts: &RefitOptions,
    ) -> Result<Vec<RefitReport>, RefitError> {
        check_options(opts)?;
        check_unique(jobs)?;
        let mut steps = Vec::with_capacity(jobs.len());
        for job in jobs {
            let plan = plan_job(pruned, job)?;
            let Some(stats) = self.layers.iter().find(|l| l.layer.node == job.node) else {
                return Err(job_error(
                    job,
                    "no refit statistics were collected for this node".into(),
                ));
            };
            if stats.layer.input != job.input || stats.layer.output != job.output {
                return Err(job_error(
                    job,
                    format!(
                        "the job reads '{}' -> '{}', the statistics were collected from '{}' -> '{}'",
                        job.input, job.output, stats.layer.input, stats.layer.output
                    ),
                ));
            }
            steps.push(match (plan, &stats.normal) {
                (Err(reason), _) => Err(reason),
                (Ok(_), Err(reason)) => Err(reason.clone()),
                (Ok(layer), Ok(normal)) => {
                    normal.check(job, &layer).map_err(|r| job_error(job, r))?;
                    Ok((layer, normal))
                }
            });
        }
        let mut reports = Vec::with_capacity(jobs.len());
        for (job, step) in jobs.iter().zip(steps) {
            let (layer, normal) = match step {
                Ok(fit) => fit,
                Err(reason) => {
                    reports.push(skipped(job, reason));
                    continue;
                }
            };
            let system = normal.select(job, &layer);
            let (report, w) = solve_system(&job.node, &system, &layer.w_before, opts.ridge);
            if let Some(w) = w {
                write_back(pruned, job, &layer, &w);
            }
            reports.push(report);
        }
        Ok(reports)
    }

    /// The second moments `G = AᵀA` of one layer's inputs (the last column of `A` is the
    /// constant 1; for a Conv, column `c · kk + k` is input channel `c` at kernel element `k`),
    /// and the number of rows; `None` when the layer was not collected or was skipped.
    pub fn gram(&self, node: &str) -> Option<(&Mat<f64>, usize)> {
        self.layers
            .iter()
            .find(|l| l.layer.node == node)
            .and_then(|l| l.normal.as_ref().ok())
            .map(|n| (&n.sys.g, n.sys.rows))
    }

    /// The nodes whose statistics are held (skipped layers included), in collection order.
    pub fn layers(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.layer.node.as_str()).collect()
    }
}

impl fmt::Debug for RefitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for l in &self.layers {
            let LayerRef {
                node,
                input,
                output,
            } = &l.layer;
            match &l.normal {
                Ok(n) => list.entry(&format_args!(
                    "{node} ({input} -> {output}): {} rows, {} inputs x {} kernel elements, {} outputs",
                    n.sys.rows, n.inputs, n.kk, n.outputs
                )),
                Err(reason) => list.entry(&format_args!(
                    "{node} ({input} -> {output}): skipped, {reason}"
                )),
            };
        }
        list.finish()
    }
}

impl From<whittle_calib::Error> for RefitError {
    fn from(e: whittle_calib::Error) -> Self {
        RefitError::Capture(Box::new(e))
    }
}

fn job_error(job: &RefitJob, reason: String) -> RefitError {
    RefitError::Job {
        node: job.node.clone(),
        reason,
    }
}

fn layer_error(layer: &LayerRef, reason: String) -> RefitError {
    RefitError::Job {
        node: layer.node.clone(),
        reason,
    }
}

fn skipped(job: &RefitJob, reason: String) -> RefitReport {
    RefitReport {
        node: job.node.clone(),
        rows: 0,
        rel_error_before: f64::NAN,
        rel_error_after: f64::NAN,
        skipped: Some(reason),
    }
}

fn check_options(opts: &RefitOptions) -> Result<(), RefitError> {
    if !(opts.ridge.is_finite() && opts.ridge >= 0.0) {
        return Err(RefitError::Options(format!(
            "ridge {} is not a finite number >= 0",
            opts.ridge
        )));
    }
    if opts.rows_per_item == 0 {
        return Err(RefitError::Options(
            "rows_per_item must be at least 1".into(),
        ));
    }
    Ok(())
}

fn check_unique(jobs: &[RefitJob]) -> Result<(), RefitError> {
    let mut seen = HashSet::new();
    for job in jobs {
        if !seen.insert(job.node.as_str()) {
            return Err(job_error(job, "the node appears in two jobs".into()));
        }
    }
    Ok(())
}

/// The kind of layer and its geometry.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Conv(ConvGeom),
    /// Gemm or MatMul; `trans_b`: the weight is `[N,K]` (Gemm `transB` 1), else `[K,N]`.
    Dense {
        trans_b: bool,
    },
}

/// How a layer turns its input into rows of `A`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Geometry {
    /// im2col patches of a 1-D or 2-D Conv at sampled output positions.
    Conv(ConvGeom),
    /// The last axis holds the features; every other axis gives rows.
    Dense,
}

impl Geometry {
    /// Kernel elements per input channel.
    fn kk(&self) -> usize {
        match self {
            Geometry::Conv(g) => g.kernel[0] * g.kernel[1],
            Geometry::Dense => 1,
        }
    }
}

/// A job checked against the pruned model.
#[derive(Debug)]
struct Layer {
    kind: Kind,
    /// Kernel elements per input channel (1 for dense layers).
    kk: usize,
    /// Columns of A: kept inputs × kk, plus 1 for the bias when fitted.
    d: usize,
    bias_col: bool,
    weight: String,
    weight_dims: Vec<i64>,
    /// An existing bias initializer and its dims.
    bias: Option<(String, Vec<i64>)>,
    /// The node's current weights as a d × m matrix (the "before" solution).
    w_before: Mat<f64>,
}

/// A layer to collect: `plan` is its geometry when already known (`None`: read it from the
/// original), or why it is skipped.
struct Wanted {
    layer: LayerRef,
    /// Index of its sampling stream.
    stream: usize,
    plan: Option<Result<Geometry, String>>,
}

/// The statistics of one layer, or why it cannot be refitted.
#[derive(Clone)]
struct LayerStats {
    layer: LayerRef,
    normal: Result<Normal, String>,
}

/// Normal equations over all inputs and outputs of a layer, in f64.
#[derive(Clone)]
struct Normal {
    geometry: Geometry,
    /// Kernel elements per input channel (1 for dense layers).
    kk: usize,
    /// Input channels / features of the original.
    inputs: usize,
    /// Output channels / features of the original.
    outputs: usize,
    /// `AᵀA` (d × d with d = inputs · kk + 1; the last column of `A` is the constant 1), `AᵀY`,
    /// and the sums of `Y` and `Y²` per output.
    sys: System,
}

/// The normal equations of one job: the sub-blocks for its kept inputs and outputs.
#[derive(Clone)]
struct System {
    g: Mat<f64>,
    r: Mat<f64>,
    yty: Vec<f64>,
    ysum: Vec<f64>,
    rows: usize,
}

impl System {
    fn zeros(d: usize, outputs: usize) -> System {
        System {
            g: Mat::zeros(d, d),
            r: Mat::zeros(d, outputs),
            yty: vec![0.0; outputs],
            ysum: vec![0.0; outputs],
            rows: 0,
        }
    }

    /// Adds the rows held column-wise in `at` (d × rows) and `yt` (outputs × rows).
    fn add(&mut self, at: &Mat<f64>, yt: &Mat<f64>) {
        // A full product: faer's triangular one (half the flops) runs slower at these sizes.
        let par = faer::get_global_parallelism();
        matmul(&mut self.g, Accum::Add, at, at.transpose(), 1.0, par);
        matmul(&mut self.r, Accum::Add, at, yt.transpose(), 1.0, par);
        for j in 0..yt.ncols() {
            for (o, &v) in yt.col_as_slice(j).iter().enumerate() {
                self.yty[o] += v * v;
                self.ysum[o] += v;
            }
        }
        self.rows += at.ncols();
    }
}

/// A dense affine least-squares fit `Y ≈ [X 1] W` (W is (inputs + 1) × outputs, its last row
/// the bias), accumulated in f64 one block of rows at a time and solved with the relative ridge
/// of [`RefitOptions`]. Used where a pass replaces a part of a graph by one linear map (block
/// removal with linear replacement).
pub struct AffineFit {
    sys: System,
}

impl AffineFit {
    /// An empty fit from `inputs` to `outputs` features.
    pub fn new(inputs: usize, outputs: usize) -> AffineFit {
        AffineFit {
            sys: System::zeros(inputs + 1, outputs),
        }
    }

    /// Adds rows given column-wise: `at` is (inputs + 1) × rows with a last row of ones, `yt`
    /// is outputs × rows.
    pub fn add(&mut self, at: &Mat<f64>, yt: &Mat<f64>) {
        self.sys.add(at, yt);
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.sys.rows
    }

    /// `XᵀX` of the inputs (the bias column last), summed over the rows.
    pub fn gram(&self) -> &Mat<f64> {
        &self.sys.g
    }

    /// The same fit restricted to the inputs `keep` (the bias column stays).
    pub fn select(&self, keep: &[usize]) -> AffineFit {
        let bias = self.sys.g.nrows() - 1;
        let cols: Vec<usize> = keep.iter().copied().chain([bias]).collect();
        let d = cols.len();
        AffineFit {
            sys: System {
                g: Mat::from_fn(d, d, |i, j| self.sys.g[(cols[i], cols[j])]),
                r: Mat::from_fn(d, self.sys.r.ncols(), |i, o| self.sys.r[(cols[i], o)]),
                yty: self.sys.yty.clone(),
                ysum: self.sys.ysum.clone(),
                rows: self.sys.rows,
            },
        }
    }

    /// Solves with relative ridge `ridge`; the report's errors are those of `w_before` and of the
    /// solution, which is returned only when it is the better of the two.
    pub fn solve(
        &self,
        name: &str,
        w_before: &Mat<f64>,
        ridge: f64,
    ) -> (RefitReport, Option<Mat<f64>>) {
        solve_system(name, &self.sys, w_before, ridge)
    }
}

/// The sampling state of one layer.
struct Sampler {
    rng: u64,
    positions: Vec<usize>,
    rows_per_item: usize,
}

impl Sampler {
    fn new(seed: u64, stream: usize, rows_per_item: usize) -> Sampler {
        Sampler {
            rng: seed ^ (stream as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
            positions: Vec::new(),
            rows_per_item,
        }
    }
}

/// A layer being collected.
struct Collector {
    geometry: Geometry,
    x_slot: usize,
    y_slot: usize,
    sampler: Sampler,
    /// Allocated at the first batch, when the channel counts are known.
    normal: Option<Normal>,
}

/// Which rows and columns of a captured batch to take; `None`: all.
struct Select<'a> {
    kept_in: Option<&'a [usize]>,
    kept_out: Option<&'a [usize]>,
    /// Whether `A` gets the constant-1 column, last.
    ones: bool,
}

/// The rows of one captured batch, held column-wise: `at` is d × rows, `yt` m × rows.
struct Batch {
    at: Mat<f64>,
    yt: Mat<f64>,
    /// Input channels / features of the captured input.
    inputs: usize,
    /// Output channels / features of the captured output.
    outputs: usize,
}

fn collect_wanted(
    original: &Model,
    wanted: Vec<Wanted>,
    calib: &CaptureSpec,
    opts: &RefitOptions,
) -> Result<RefitStats, RefitError> {
    let mut tensors: Vec<String> = Vec::new();
    let mut slot = |name: &str| match tensors.iter().position(|t| t == name) {
        Some(i) => i,
        None => {
            tensors.push(name.to_string());
            tensors.len() - 1
        }
    };
    let mut collectors = Vec::with_capacity(wanted.len());
    for w in &wanted {
        let plan = match &w.plan {
            Some(plan) => plan.clone(),
            None => plan_original(original, &w.layer)?,
        };
        collectors.push(plan.map(|geometry| Collector {
            geometry,
            x_slot: slot(&w.layer.input),
            y_slot: slot(&w.layer.output),
            sampler: Sampler::new(opts.seed, w.stream, opts.rows_per_item),
            normal: None,
        }));
    }

    if !tensors.is_empty() {
        let mut failure: Option<RefitError> = None;
        let result = capture(original, &tensors, calib, &mut |values, count| {
            for (w, c) in wanted.iter().zip(collectors.iter_mut()) {
                let Ok(c) = c else { continue };
                let (x, y) = (&values[c.x_slot], &values[c.y_slot]);
                if let Err(reason) = c.add(&w.layer, x, y, count) {
                    failure = Some(layer_error(&w.layer, reason));
                    return Err(whittle_calib::Error::Capture("stopped by refit".into()));
                }
            }
            Ok(())
        });
        if let Some(e) = failure {
            return Err(e);
        }
        result?;
    }

    let layers = wanted
        .into_iter()
        .zip(collectors)
        .map(|(w, c)| LayerStats {
            layer: w.layer,
            normal: c.and_then(Collector::finish),
        })
        .collect();
    Ok(RefitStats { layers })
}

/// The most inputs (channels x kernel positions, + 1 for the bias) a layer may have to be refitted:
/// its normal equations are d x d in f64 (12,288: 1.2 GB), and a solve holds a few copies.
pub const MAX_FEATURES: usize = 12_288;

/// Reads a layer's geometry from the original model. `Ok(Err(reason))`: it is skipped.
fn plan_original(
    original: &Model,
    layer: &LayerRef,
) -> Result<Result<Geometry, String>, RefitError> {
    let graph = original.graph();
    let mut matches = graph.node.iter().filter(|n| n.name() == layer.node);
    let Some(node) = matches.next() else {
        return Err(layer_error(
            layer,
            "the original model has no node of that name".into(),
        ));
    };
    if matches.next().is_some() {
        return Err(layer_error(
            layer,
            "the original model has several nodes of that name".into(),
        ));
    }
    Ok(match node.op_type() {
        "Conv" => {
            let group = node.attr_int("group").unwrap_or(1);
            if group != 1 {
                return Ok(Err(format!(
                    "it is a grouped Conv (group {group}); refit needs group 1"
                )));
            }
            let weight = node.input.get(1).and_then(|w| original.initializer(w));
            let kernel: Vec<usize> = match (weight, node.attr_ints("kernel_shape")) {
                (Some(w), _) => w.dims.iter().skip(2).map(|&v| v.max(0) as usize).collect(),
                (None, Some(k)) => k.iter().map(|&v| v.max(0) as usize).collect(),
                (None, None) => {
                    return Ok(Err(
                        "its weight is not an initializer and it has no kernel_shape".into(),
                    ));
                }
            };
            if !(1..=2).contains(&kernel.len()) {
                return Ok(Err(format!(
                    "its weight has rank {}; refit handles 1-D and 2-D Convs",
                    kernel.len() + 2
                )));
            }
            ConvGeom::from_node(node, &kernel).map(Geometry::Conv)
        }
        "Gemm" => {
            let trans_a = node.attr_int("transA").unwrap_or(0);
            let alpha = node.attr_float("alpha").unwrap_or(1.0);
            let beta = node.attr_float("beta").unwrap_or(1.0);
            if trans_a != 0 || alpha != 1.0 || beta != 1.0 {
                Err(format!(
                    "Gemm with transA {trans_a}, alpha {alpha}, beta {beta}; refit needs transA 0, alpha = beta = 1"
                ))
            } else {
                Ok(Geometry::Dense)
            }
        }
        "MatMul" => Ok(Geometry::Dense),
        other => Err(format!(
            "op {other} is not refitted (Conv, Gemm and MatMul are)"
        )),
    })
}

/// Checks a job against the pruned model. `Ok(Err(reason))`: the job is skipped.
fn plan_job(pruned: &Model, job: &RefitJob) -> Result<Result<Layer, String>, RefitError> {
    let fail = |reason: String| Err(job_error(job, reason));
    for (what, list) in [("kept_in", &job.kept_in), ("kept_out", &job.kept_out)] {
        if list.is_empty() {
            return fail(format!("{what} is empty"));
        }
        if list.windows(2).any(|w| w[0] >= w[1]) {
            return fail(format!("{what} is not strictly ascending"));
        }
    }
    let graph = pruned.graph();
    let mut matches = graph.node.iter().filter(|n| n.name() == job.node);
    let Some(node) = matches.next() else {
        return fail("the pruned model has no node of that name".into());
    };
    if matches.next().is_some() {
        return fail("the pruned model has several nodes of that name".into());
    }
    let (n_in, m) = (job.kept_in.len(), job.kept_out.len());
    let op = node.op_type();
    let weight_name = node.input.get(1).cloned().unwrap_or_default();
    let Some(weight) = pruned.initializer(&weight_name) else {
        return Ok(Err(format!(
            "its weight '{weight_name}' is not an initializer"
        )));
    };
    if weight.data_type() != DataType::Float as i32 {
        return Ok(Err(format!(
            "its weight is {}, refit writes float weights only",
            tensor::dtype_name(weight.data_type())
        )));
    }
    let wdims: Vec<usize> = weight.dims.iter().map(|&v| v.max(0) as usize).collect();
    let values = tensor::to_f32(weight)?;
    let bias_name = node.input.get(2).filter(|s| !s.is_empty());
    let bias = match bias_name {
        None => None,
        Some(name) => match pruned.initializer(name) {
            None => return Ok(Err(format!("its bias '{name}' is not an initializer"))),
            Some(t) if t.data_type() != DataType::Float as i32 => {
                return Ok(Err(format!(
                    "its bias is {}, refit writes float biases only",
                    tensor::dtype_name(t.data_type())
                )));
            }
            Some(t) => Some(t),
        },
    };

    let (kind, kk) = match op {
        "Conv" => {
            let group = node.attr_int("group").unwrap_or(1);
            if group != 1 {
                return Ok(Err(format!(
                    "it is a grouped Conv (group {group}); refit needs group 1"
                )));
            }
            if !(3..=4).contains(&wdims.len()) {
                return Ok(Err(format!(
                    "its weight has rank {}; refit handles 1-D and 2-D Convs",
                    wdims.len()
                )));
            }
            if wdims[0] != m || wdims[1] != n_in {
                return fail(format!(
                    "its weight is {:?}, the job keeps {m} outputs and {n_in} inputs",
                    wdims
                ));
            }
            let geom = match ConvGeom::from_node(node, &wdims[2..]) {
                Ok(g) => g,
                Err(reason) => return Ok(Err(reason)),
            };
            (Kind::Conv(geom), wdims[2..].iter().product::<usize>())
        }
        "Gemm" => {
            let trans_a = node.attr_int("transA").unwrap_or(0);
            let alpha = node.attr_float("alpha").unwrap_or(1.0);
            let beta = node.attr_float("beta").unwrap_or(1.0);
            if trans_a != 0 || alpha != 1.0 || beta != 1.0 {
                return Ok(Err(format!(
                    "Gemm with transA {trans_a}, alpha {alpha}, beta {beta}; refit needs transA 0, alpha = beta = 1"
                )));
            }
            let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
            let want = if trans_b { [m, n_in] } else { [n_in, m] };
            if wdims != want {
                return fail(format!(
                    "its weight is {wdims:?}, the job keeps {m} outputs and {n_in} inputs (transB {})",
                    trans_b as u8
                ));
            }
            (Kind::Dense { trans_b }, 1)
        }
        "MatMul" => {
            if wdims.len() != 2 {
                return Ok(Err(format!(
                    "its weight has rank {}; refit handles a 2-D MatMul weight [K,N]",
                    wdims.len()
                )));
            }
            if wdims != [n_in, m] {
                return fail(format!(
                    "its weight is {wdims:?}, the job keeps {n_in} inputs and {m} outputs"
                ));
            }
            (Kind::Dense { trans_b: false }, 1)
        }
        other => {
            return Ok(Err(format!(
                "op {other} is not refitted (Conv, Gemm and MatMul are)"
            )));
        }
    };
    let bias_col = op != "MatMul";
    let bias_values = match bias {
        Some(t) => {
            let dims: Vec<i64> = t.dims.clone();
            let ok = match dims.as_slice() {
                [n] => *n as usize == m,
                [1, n] => op == "Gemm" && *n as usize == m,
                _ => false,
            };
            if !ok {
                return Ok(Err(format!(
                    "its bias has shape {dims:?}; refit handles [{m}]{}",
                    if op == "Gemm" {
                        format!(" or [1,{m}]")
                    } else {
                        String::new()
                    }
                )));
            }
            Some((t.name().to_string(), dims, tensor::to_f32(t)?))
        }
        None => None,
    };

    let d = n_in * kk + bias_col as usize;
    if d > MAX_FEATURES {
        // a merged 5x5 conv over 1152 channels has 28,800: a 6.6 GB matrix per copy
        return Ok(Err(format!(
            "its {d} inputs (channels x kernel positions) make normal equations of {:.1} GB, over the {MAX_FEATURES}-input limit",
            (d * d * 8) as f64 / 1e9
        )));
    }
    let mut w_before = Mat::<f64>::zeros(d, m);
    for o in 0..m {
        for i in 0..n_in * kk {
            w_before[(i, o)] = match kind {
                Kind::Conv(_) => values[o * n_in * kk + i],
                Kind::Dense { trans_b: true } => values[o * n_in + i],
                Kind::Dense { trans_b: false } => values[i * m + o],
            } as f64;
        }
        if let Some((_, _, b)) = &bias_values {
            w_before[(d - 1, o)] = b[o] as f64;
        }
    }
    Ok(Ok(Layer {
        kind,
        kk,
        d,
        bias_col,
        weight: weight_name,
        weight_dims: weight.dims.clone(),
        bias: bias_values.map(|(name, dims, _)| (name, dims)),
        w_before,
    }))
}

impl Collector {
    /// Adds one captured batch (`count` real items) to the layer's normal equations.
    fn add(
        &mut self,
        layer: &LayerRef,
        x: &ArrayD<f32>,
        y: &ArrayD<f32>,
        count: usize,
    ) -> Result<(), String> {
        let all = Select {
            kept_in: None,
            kept_out: None,
            ones: true,
        };
        let batch = batch_rows(&self.geometry, layer, x, y, count, &all, &mut self.sampler)?;
        let geometry = self.geometry;
        let normal = self.normal.get_or_insert_with(|| {
            let d = batch.at.nrows();
            Normal {
                geometry,
                kk: geometry.kk(),
                inputs: batch.inputs,
                outputs: batch.outputs,
                sys: System::zeros(d, batch.outputs),
            }
        });
        if (normal.inputs, normal.outputs) != (batch.inputs, batch.outputs) {
            return Err(format!(
                "the captured '{}' and '{}' have {} and {} channels in one batch, {} and {} in another",
                layer.input,
                layer.output,
                normal.inputs,
                normal.outputs,
                batch.inputs,
                batch.outputs
            ));
        }
        normal.add(&batch.at, &batch.yt);
        Ok(())
    }

    /// The finished normal equations, or why there are none.
    fn finish(self) -> Result<Normal, String> {
        self.normal.ok_or_else(|| "no calibration rows".into())
    }
}

impl Normal {
    /// Adds the rows held column-wise in `at` (d × rows) and `yt` (outputs × rows).
    fn add(&mut self, at: &Mat<f64>, yt: &Mat<f64>) {
        self.sys.add(at, yt);
    }

    /// Checks a job, planned against the pruned model, against these statistics.
    fn check(&self, job: &RefitJob, layer: &Layer) -> Result<(), String> {
        match (&self.geometry, &layer.kind) {
            (Geometry::Conv(a), Kind::Conv(b)) if a != b => {
                return Err(format!(
                    "its Conv attributes or kernel ({b:?}) differ from the original's ({a:?})"
                ));
            }
            (Geometry::Conv(_), Kind::Dense { .. }) => {
                return Err("it is a Gemm or MatMul, the original is a Conv".into());
            }
            (Geometry::Dense, Kind::Conv(_)) => {
                return Err("it is a Conv, the original is a Gemm or MatMul".into());
            }
            _ => {}
        }
        for (what, list, len) in [
            ("kept_in", &job.kept_in, self.inputs),
            ("kept_out", &job.kept_out, self.outputs),
        ] {
            if let Some(&last) = list.last()
                && last >= len
            {
                return Err(format!(
                    "{what} reaches index {last}, the original tensor has {len}"
                ));
            }
        }
        Ok(())
    }

    /// The sub-blocks for a job's kept inputs (× kernel elements, + the bias when fitted) and
    /// kept outputs.
    fn select(&self, job: &RefitJob, layer: &Layer) -> System {
        let kk = self.kk;
        let mut cols: Vec<usize> = job
            .kept_in
            .iter()
            .flat_map(|&c| c * kk..(c + 1) * kk)
            .collect();
        if layer.bias_col {
            cols.push(self.sys.g.nrows() - 1);
        }
        debug_assert_eq!(cols.len(), layer.d);
        let d = cols.len();
        System {
            g: Mat::from_fn(d, d, |i, j| self.sys.g[(cols[i], cols[j])]),
            r: Mat::from_fn(d, job.kept_out.len(), |i, j| {
                self.sys.r[(cols[i], job.kept_out[j])]
            }),
            yty: job.kept_out.iter().map(|&o| self.sys.yty[o]).collect(),
            ysum: job.kept_out.iter().map(|&o| self.sys.ysum[o]).collect(),
            rows: self.sys.rows,
        }
    }
}

/// Turns one captured batch of input `x` and target `y` (`count` real items) into rows of `A`
/// and `Y`, for the selected inputs and outputs. An error is a layer that does not fit the
/// captured shapes.
fn batch_rows(
    geometry: &Geometry,
    layer: &LayerRef,
    x: &ArrayD<f32>,
    y: &ArrayD<f32>,
    count: usize,
    select: &Select,
    sampler: &mut Sampler,
) -> Result<Batch, String> {
    let xs = x.as_standard_layout();
    let ys = y.as_standard_layout();
    let xv = xs.as_slice().expect("standard layout is contiguous");
    let yv = ys.as_slice().expect("standard layout is contiguous");
    let (xd, yd) = (x.shape(), y.shape());
    let pick = |what: &str, list: Option<&[usize]>, len: usize| -> Result<Vec<usize>, String> {
        match list {
            None => Ok((0..len).collect()),
            Some(list) => match list.last() {
                Some(&last) if last >= len => Err(format!(
                    "{what} reaches index {last}, the original tensor has {len}"
                )),
                _ => Ok(list.to_vec()),
            },
        }
    };
    let ones = select.ones as usize;
    match geometry {
        Geometry::Conv(geom) => {
            let spatial = geom.kernel[0] == 1 && xd.len() == 3;
            if !(xd.len() == 4 || spatial) || yd.len() != xd.len() {
                return Err(format!(
                    "captured input '{}' is {xd:?} and output '{}' is {yd:?}, not a Conv's",
                    layer.input, layer.output
                ));
            }
            let (c, h, w) = if xd.len() == 4 {
                (xd[1], xd[2], xd[3])
            } else {
                (xd[1], 1, xd[2])
            };
            let (mo, ho, wo) = if yd.len() == 4 {
                (yd[1], yd[2], yd[3])
            } else {
                (yd[1], 1, yd[2])
            };
            let kept_in = pick("kept_in", select.kept_in, c)?;
            let kept_out = pick("kept_out", select.kept_out, mo)?;
            let (begin, out) = geom.resolve(h, w).ok_or_else(|| {
                format!(
                    "the kernel does not fit the {h}x{w} input '{}'",
                    layer.input
                )
            })?;
            if out != [ho, wo] || xd[0] != yd[0] || count > xd[0] {
                return Err(format!(
                    "input '{}' {xd:?} gives a {}x{} output, but '{}' is {yd:?}",
                    layer.input, out[0], out[1], layer.output
                ));
            }
            let width = kept_in.len() * geom.kernel[0] * geom.kernel[1];
            let positions = ho * wo;
            let k = sampler.rows_per_item.min(positions);
            let rows = count * k;
            let mut at = Mat::<f64>::zeros(width + ones, rows);
            let mut yt = Mat::<f64>::zeros(kept_out.len(), rows);
            let mut r = 0;
            for item in 0..count {
                let xi = &xv[item * c * h * w..(item + 1) * c * h * w];
                sample_positions(&mut sampler.positions, positions, k, &mut sampler.rng);
                for &p in &sampler.positions[..k] {
                    let (oy, ox) = (p / wo, p % wo);
                    let col = at.col_as_slice_mut(r);
                    conv_patch(xi, h, w, &kept_in, geom, begin, oy, ox, &mut col[..width]);
                    if select.ones {
                        col[width] = 1.0;
                    }
                    for (v, &o) in yt.col_as_slice_mut(r).iter_mut().zip(&kept_out) {
                        *v = yv[((item * mo + o) * ho + oy) * wo + ox] as f64;
                    }
                    r += 1;
                }
            }
            Ok(Batch {
                at,
                yt,
                inputs: c,
                outputs: mo,
            })
        }
        Geometry::Dense => {
            let (Some(&kin), Some(&nout)) = (xd.last(), yd.last()) else {
                return Err("a captured tensor is a scalar".into());
            };
            if xd.len() < 2 || xd[..xd.len() - 1] != yd[..yd.len() - 1] || count > xd[0] {
                return Err(format!(
                    "captured input '{}' is {xd:?} and output '{}' is {yd:?}: their leading dims differ",
                    layer.input, layer.output
                ));
            }
            let kept_in = pick("kept_in", select.kept_in, kin)?;
            let kept_out = pick("kept_out", select.kept_out, nout)?;
            let inner: usize = xd[1..xd.len() - 1].iter().product();
            let rows = count * inner;
            let width = kept_in.len();
            let mut at = Mat::<f64>::zeros(width + ones, rows);
            let mut yt = Mat::<f64>::zeros(kept_out.len(), rows);
            for r in 0..rows {
                let xr = &xv[r * kin..(r + 1) * kin];
                let col = at.col_as_slice_mut(r);
                for (v, &f) in col.iter_mut().zip(&kept_in) {
                    *v = xr[f] as f64;
                }
                if select.ones {
                    col[width] = 1.0;
                }
                let yr = &yv[r * nout..(r + 1) * nout];
                for (v, &o) in yt.col_as_slice_mut(r).iter_mut().zip(&kept_out) {
                    *v = yr[o] as f64;
                }
            }
            Ok(Batch {
                at,
                yt,
                inputs: kin,
                outputs: nout,
            })
        }
    }
}

/// Puts `k` distinct positions out of `0..n` at the front of `buf` (a partial Fisher–Yates
/// shuffle driven by splitmix64).
fn sample_positions(buf: &mut Vec<usize>, n: usize, k: usize, rng: &mut u64) {
    buf.clear();
    buf.extend(0..n);
    if k >= n {
        return;
    }
    for i in 0..k {
        let j = i + (splitmix64(rng) % (n - i) as u64) as usize;
        buf.swap(i, j);
    }
}

/// The splitmix64 generator: advances `state` and returns the next value.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Solves a job's normal equations and measures the error of `w_before` and of the solution.
/// Returns the report and, when the solution lowers the error, the weights to write (d × m).
fn solve_system(
    node: &str,
    acc: &System,
    w_before: &Mat<f64>,
    ridge: f64,
) -> (RefitReport, Option<Mat<f64>>) {
    let d = acc.g.nrows();
    let n = acc.rows;
    let mut report = RefitReport {
        node: node.to_string(),
        rows: n,
        rel_error_before: f64::NAN,
        rel_error_after: f64::NAN,
        skipped: None,
    };
    if n == 0 {
        report.skipped = Some("no calibration rows".into());
        return (report, None);
    }
    let yty: f64 = acc.yty.iter().sum();
    let var: f64 = acc
        .yty
        .iter()
        .zip(&acc.ysum)
        .map(|(q, s)| q - s * s / n as f64)
        .sum();
    let denom = if var > 0.0 {
        var
    } else {
        yty.max(f64::MIN_POSITIVE)
    };
    let rel = |w: &Mat<f64>| -> f64 {
        let gw = &acc.g * w;
        let (mut wr, mut wgw) = (0.0, 0.0);
        for o in 0..w.ncols() {
            for i in 0..d {
                wr += w[(i, o)] * acc.r[(i, o)];
                wgw += w[(i, o)] * gw[(i, o)];
            }
        }
        (yty - 2.0 * wr + wgw).max(0.0) / denom
    };
    report.rel_error_before = rel(w_before);

    let trace: f64 = (0..d).map(|i| acc.g[(i, i)]).sum();
    let scale = (trace / d as f64).max(f64::MIN_POSITIVE);
    let mut lambda = ridge * scale;
    let mut solution = None;
    for _ in 0..8 {
        let mut a = acc.g.clone();
        for i in 0..d {
            a[(i, i)] += lambda;
        }
        if let Ok(llt) = a.llt(Side::Lower) {
            let w = llt.solve(&acc.r);
            if (0..w.ncols()).all(|o| (0..d).all(|i| w[(i, o)].is_finite())) {
                solution = Some(w);
                break;
            }
        }
        lambda = if lambda > 0.0 {
            lambda * 100.0
        } else {
            1e-12 * scale
        };
    }
    let Some(w) = solution else {
        report.skipped = Some("the normal equations stay singular with a larger ridge".into());
        return (report, None);
    };
    report.rel_error_after = rel(&w);
    if report.rel_error_after.partial_cmp(&report.rel_error_before)
        != Some(std::cmp::Ordering::Less)
    {
        report.skipped = Some(format!(
            "kept the current weights: the refit did not lower the error ({:.3e} -> {:.3e})",
            report.rel_error_before, report.rel_error_after
        ));
        return (report, None);
    }
    (report, Some(w))
}

/// Writes the solution `w` (d × m) into the node's weight and bias initializers.
fn write_back(pruned: &mut Model, job: &RefitJob, layer: &Layer, w: &Mat<f64>) {
    let (n_in, m, kk) = (job.kept_in.len(), job.kept_out.len(), layer.kk);
    let mut weight = vec![0f32; n_in * kk * m];
    for o in 0..m {
        for i in 0..n_in * kk {
            let at = match layer.kind {
                Kind::Conv(_) => o * n_in * kk + i,
                Kind::Dense { trans_b: true } => o * n_in + i,
                Kind::Dense { trans_b: false } => i * m + o,
            };
            weight[at] = w[(i, o)] as f32;
        }
    }
    let node_index = pruned
        .graph()
        .node
        .iter()
        .position(|n| n.name() == job.node)
        .expect("the node was found when the job was planned");
    put_initializer(
        pruned,
        node_index,
        1,
        &layer.weight,
        &layer.weight_dims,
        &weight,
    );
    if layer.bias_col {
        let bias: Vec<f32> = (0..m).map(|o| w[(layer.d - 1, o)] as f32).collect();
        match &layer.bias {
            Some((name, dims)) => put_initializer(pruned, node_index, 2, name, dims, &bias),
            None => {
                let name = edit::unique_name(pruned.graph(), &format!("{}.bias", job.node));
                let graph = pruned.graph_mut();
                graph
                    .initializer
                    .push(tensor::from_f32(&name, &[m as i64], &bias));
                let inputs = &mut graph.node[node_index].input;
                if inputs.len() > 2 {
                    inputs[2] = name;
                } else {
                    inputs.push(name);
                }
            }
        }
    }
}

/// Replaces the initializer `name` read by input `slot` of node `node_index` with `values`:
/// in place when that is its only reader, else as a copy under a new name that only this node
/// reads.
fn put_initializer(
    pruned: &mut Model,
    node_index: usize,
    slot: usize,
    name: &str,
    dims: &[i64],
    values: &[f32],
) {
    let shared = references(pruned.graph(), name) > 1;
    let target = if shared {
        edit::unique_name(pruned.graph(), &format!("{name}.refit"))
    } else {
        name.to_string()
    };
    let fresh = tensor::from_f32(&target, dims, values);
    let graph = pruned.graph_mut();
    if shared {
        graph.initializer.push(fresh);
        graph.node[node_index].input[slot] = target;
    } else if let Some(t) = graph.initializer.iter_mut().find(|t| t.name() == name) {
        let doc = t.doc_string.take();
        *t = TensorProto {
            doc_string: doc,
            ..fresh
        };
    }
}

/// How many times `name` is read: node inputs (in subgraphs too) and graph outputs.
fn references(graph: &GraphProto, name: &str) -> usize {
    let mut count = graph.output.iter().filter(|v| v.name() == name).count();
    for node in &graph.node {
        count += node.input.iter().filter(|i| *i == name).count();
        count += subgraphs(node).map(|g| references(g, name)).sum::<usize>();
    }
    count
}

fn subgraphs(node: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    node.attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
}

/// How a Conv pads its input.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PadMode {
    /// Explicit pads, (rows, cols) at the beginning and at the end.
    Explicit {
        begin: [usize; 2],
        end: [usize; 2],
    },
    SameUpper,
    SameLower,
    Valid,
}

/// The geometry of a 1-D or 2-D Conv, with a 1-D one seen as 2-D of height 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ConvGeom {
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: PadMode,
}

impl ConvGeom {
    /// Reads the attributes; `kernel` is the weight's spatial dims. `Err`: a reason to skip.
    fn from_node(node: &NodeProto, kernel: &[usize]) -> Result<ConvGeom, String> {
        let rank = kernel.len();
        let two = |v: &[usize]| -> [usize; 2] { if rank == 1 { [1, v[0]] } else { [v[0], v[1]] } };
        let ints = |name: &str, default: usize, len: usize| -> Result<Vec<usize>, String> {
            match node.attr_ints(name) {
                None => Ok(vec![default; len]),
                Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => {
                    Ok(v.iter().map(|&x| x as usize).collect())
                }
                Some(v) => Err(format!("its {name} {v:?} do not fit a {rank}-D kernel")),
            }
        };
        if let Some(k) = node.attr_ints("kernel_shape")
            && k.iter()
                .map(|&x| x.max(0) as usize)
                .ne(kernel.iter().copied())
        {
            return Err(format!(
                "its kernel_shape {k:?} disagrees with its weight's {kernel:?}"
            ));
        }
        let strides = ints("strides", 1, rank)?;
        let dilations = ints("dilations", 1, rank)?;
        if strides.contains(&0) || dilations.contains(&0) {
            return Err("it has a zero stride or dilation".into());
        }
        let pads = match node.attr_str("auto_pad").as_deref() {
            None | Some("NOTSET") | Some("") => {
                let p = ints("pads", 0, 2 * rank)?;
                let (b, e) = p.split_at(rank);
                PadMode::Explicit {
                    begin: two(b),
                    end: two(e),
                }
            }
            Some("SAME_UPPER") => PadMode::SameUpper,
            Some("SAME_LOWER") => PadMode::SameLower,
            Some("VALID") => PadMode::Valid,
            Some(other) => return Err(format!("its auto_pad '{other}' is unknown")),
        };
        let pads = match pads {
            PadMode::Explicit { begin, end } if rank == 1 => PadMode::Explicit {
                begin: [0, begin[1]],
                end: [0, end[1]],
            },
            other => other,
        };
        Ok(ConvGeom {
            kernel: two(kernel),
            strides: two(&strides),
            dilations: two(&dilations),
            pads,
        })
    }

    /// The padding before the first row and column, and the output size, for an `h` × `w`
    /// input; `None` when the kernel does not fit.
    fn resolve(&self, h: usize, w: usize) -> Option<([usize; 2], [usize; 2])> {
        let size = [h, w];
        let mut begin = [0; 2];
        let mut out = [0; 2];
        for a in 0..2 {
            let (s, eff) = (
                self.strides[a],
                self.dilations[a] * (self.kernel[a] - 1) + 1,
            );
            match self.pads {
                PadMode::Explicit { begin: b, end: e } => {
                    let total = size[a] + b[a] + e[a];
                    out[a] = total.checked_sub(eff)? / s + 1;
                    begin[a] = b[a];
                }
                PadMode::Valid => {
                    out[a] = size[a].checked_sub(eff)? / s + 1;
                }
                PadMode::SameUpper | PadMode::SameLower => {
                    out[a] = size[a].div_ceil(s);
                    let pad = ((out[a].max(1) - 1) * s + eff).saturating_sub(size[a]);
                    begin[a] = if self.pads == PadMode::SameUpper {
                        pad / 2
                    } else {
                        pad - pad / 2
                    };
                }
            }
        }
        Some((begin, out))
    }
}

/// The im2col patch of output position (`oy`, `ox`): for each kept input channel (in `kept`
/// order), its kernel window in row-major kernel order, zero where the window lies in the
/// padding. `x` is one item, `[C, h, w]`; `out` has `kept.len() · kh · kw` entries, laid out like
/// a row of the weight `[M, C', kh, kw]`.
#[allow(clippy::too_many_arguments)]
fn conv_patch(
    x: &[f32],
    h: usize,
    w: usize,
    kept: &[usize],
    geom: &ConvGeom,
    begin: [usize; 2],
    oy: usize,
    ox: usize,
    out: &mut [f64],
) {
    let [kh, kw] = geom.kernel;
    let mut i = 0;
    for &c in kept {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ki in 0..kh {
            let iy = (oy * geom.strides[0] + ki * geom.dilations[0]) as isize - begin[0] as isize;
            for kj in 0..kw {
                let ix =
                    (ox * geom.strides[1] + kj * geom.dilations[1]) as isize - begin[1] as isize;
                out[i] = if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                    plane[iy as usize * w + ix as usize] as f64
                } else {
                    0.0
                };
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;
    use whittle_calib::{Dataset, Preprocess};
    use whittle_core::onnx::{AttributeProto, ValueInfoProto, attribute_proto};

    /// Deterministic values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| (splitmix64(&mut s) >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0)
            .collect()
    }

    fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            ints: v.to_vec(),
            r#type: Some(attribute_proto::AttributeType::Ints as i32),
            ..Default::default()
        }
    }

    fn conv_node(name: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            name: Some(name.into()),
            op_type: Some("Conv".into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.into()],
            attribute: attrs,
            ..Default::default()
        }
    }

    fn value_info(name: &str, dims: &[&str]) -> ValueInfoProto {
        whittle_core::model::float_value_info(name, dims)
    }

    #[test]
    fn im2col_patches_reproduce_a_direct_convolution() {
        // 3 channels of 7x6, a 3x2 kernel, stride 2, dilation (2,1), pads top 1 left 2 bottom 0
        // right 1; channels 0 and 2 kept.
        let (c, h, w, m) = (3usize, 7usize, 6usize, 2usize);
        let (kh, kw) = (3usize, 2usize);
        let x = noise(c * h * w, 1);
        let weights = noise(m * c * kh * kw, 2);
        let bias = [0.25f32, -0.5];
        let node = conv_node(
            "c",
            &["x", "w", "b"],
            vec![
                ints_attr("strides", &[2, 2]),
                ints_attr("dilations", &[2, 1]),
                ints_attr("pads", &[1, 2, 0, 1]),
            ],
        );
        let geom = ConvGeom::from_node(&node, &[kh, kw]).expect("a plain Conv");
        let (begin, out) = geom.resolve(h, w).expect("kernel fits");
        // rows: (7 + 1 + 0 - 5) / 2 + 1 = 2; cols: (6 + 2 + 1 - 2) / 2 + 1 = 4.
        assert_eq!(out, [2, 4]);
        let kept = [0usize, 2];
        let mut patch = vec![0.0; kept.len() * kh * kw];
        for oy in 0..out[0] {
            for ox in 0..out[1] {
                conv_patch(&x, h, w, &kept, &geom, begin, oy, ox, &mut patch);
                for o in 0..m {
                    let mut direct = bias[o] as f64;
                    for &ch in &kept {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let iy = (oy * 2 + ki * 2) as isize - 1;
                                let ix = (ox * 2 + kj) as isize - 2;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[(ch * h + iy as usize) * w + ix as usize];
                                let wv = weights[((o * c + ch) * kh + ki) * kw + kj];
                                direct += xv as f64 * wv as f64;
                            }
                        }
                    }
                    let mut via_patch = bias[o] as f64;
                    for (ci, &ch) in kept.iter().enumerate() {
                        for k in 0..kh * kw {
                            via_patch += patch[ci * kh * kw + k]
                                * weights[(o * c + ch) * kh * kw + k] as f64;
                        }
                    }
                    assert!(
                        (direct - via_patch).abs() < 1e-9,
                        "({oy},{ox}) out {o}: {direct} vs {via_patch}"
                    );
                }
            }
        }
        // A window that starts in the padding reads zeros there.
        conv_patch(&x, h, w, &[1], &geom, begin, 0, 1, &mut patch[..kh * kw]);
        assert_eq!(patch[0], 0.0);
        assert_eq!(patch[1], 0.0);
        assert_eq!(patch[2], x[(h + 1) * w] as f64);
    }

    #[test]
    fn same_padding_resolves_like_onnx() {
        let mut node = conv_node("c", &["x", "w"], vec![ints_attr("strides", &[2, 2])]);
        node.attribute.push(AttributeProto {
            name: Some("auto_pad".into()),
            s: Some(b"SAME_UPPER".to_vec()),
            r#type: Some(attribute_proto::AttributeType::String as i32),
            ..Default::default()
        });
        let geom = ConvGeom::from_node(&node, &[3, 3]).expect("a plain Conv");
        // 8 -> 4 outputs, total pad (4-1)*2 + 3 - 8 = 1, all of it at the end.
        assert_eq!(geom.resolve(8, 8), Some(([0, 0], [4, 4])));
        let lower = ConvGeom {
            pads: PadMode::SameLower,
            ..geom
        };
        assert_eq!(lower.resolve(8, 8), Some(([1, 1], [4, 4])));
    }

    /// x [N,2,5,5] -> Conv "pre" (1x1, 2 -> 3, channel 2 = 0.5·ch0 − 2·ch1) -> h -> Conv "c"
    /// (3x3, 3 -> 4, pads 1) -> y. The pruned copy drops h's channel 2 from both convs.
    fn linear_combination_models() -> (Model, Model) {
        let (a, b) = (0.5f32, -2.0f32);
        let pre_w0 = noise(2, 10);
        let pre_w1 = noise(2, 11);
        let pre_w2: Vec<f32> = (0..2).map(|i| a * pre_w0[i] + b * pre_w1[i]).collect();
        let pre_b = [0.3f32, -0.1, a * 0.3 + b * -0.1];
        let pre_w: Vec<f32> = [pre_w0, pre_w1, pre_w2].concat();
        let c_w = noise(4 * 3 * 9, 12);
        let c_b = noise(4, 13);
        let attrs = || {
            vec![
                ints_attr("kernel_shape", &[3, 3]),
                ints_attr("pads", &[1, 1, 1, 1]),
            ]
        };
        let model = |kept: usize, c_w: &[f32]| {
            let graph = GraphProto {
                name: Some("g".into()),
                node: vec![
                    NodeProto {
                        output: vec!["h".into()],
                        ..conv_node("pre", &["x", "pre.w", "pre.b"], vec![])
                    },
                    conv_node("c", &["h", "c.w", "c.b"], attrs()),
                ],
                input: vec![value_info("x", &["N", "2", "5", "5"])],
                output: vec![value_info("c", &["N", "4", "5", "5"])],
                initializer: vec![
                    tensor::from_f32("pre.w", &[kept as i64, 2, 1, 1], &pre_w[..kept * 2]),
                    tensor::from_f32("pre.b", &[kept as i64], &pre_b[..kept]),
                    tensor::from_f32("c.w", &[4, kept as i64, 3, 3], c_w),
                    tensor::from_f32("c.b", &[4], &c_b),
                ],
                ..Default::default()
            };
            opset13(graph)
        };
        let sliced: Vec<f32> = (0..4)
            .flat_map(|o| c_w[(o * 3) * 9..(o * 3 + 2) * 9].to_vec())
            .collect();
        (model(3, &c_w), model(2, &sliced))
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn a_dropped_channel_that_is_a_linear_combination_is_recovered_exactly() {
        let (original, mut pruned) = linear_combination_models();
        let items = 24;
        let calib = Calib::new(&[items, 2, 5, 5], 20);
        let spec = calib.spec(5);
        let job = job_for(&layer_ref("c", "h", "c"), vec![0, 1], vec![0, 1, 2, 3]);
        let opts = RefitOptions {
            ridge: 1e-10,
            rows_per_item: 16,
            seed: 7,
        };
        let before = pruned.clone();
        let reports = refit(
            &original,
            &mut pruned,
            std::slice::from_ref(&job),
            &spec,
            &opts,
        )
        .expect("refits");
        let r = &reports[0];
        eprintln!("{r:?}");
        assert_eq!(r.skipped, None);
        assert_eq!(r.rows, items * 16);
        assert!(r.rel_error_before > 1e-2, "{r:?}");
        assert!(r.rel_error_after < 1e-6, "{r:?}");
        assert!(r.rel_error_after < r.rel_error_before);
        // The bias and the weights changed in place, with their shapes.
        let w = pruned.initializer("c.w").expect("weight kept its name");
        assert_eq!(w.dims, vec![4, 2, 3, 3]);
        assert_ne!(w, before.initializer("c.w").expect("weight"));
        assert_eq!(pruned.initializer("c.b").expect("bias").dims, vec![4]);

        // The written weights reproduce the original layer when run: compare both models'
        // outputs of "c" over every position of every item.
        let (mut sse, mut sum, mut sq, mut n) = (0f64, 0f64, 0f64, 0usize);
        let outputs = |model: &Model| {
            let mut all = Vec::new();
            capture(model, &["c".to_string()], &spec, &mut |v, _| {
                all.extend(v[0].iter().map(|&x| x as f64));
                Ok(())
            })
            .expect("runs");
            all
        };
        for (y, yhat) in outputs(&original).iter().zip(outputs(&pruned)) {
            sse += (y - yhat).powi(2);
            sum += y;
            sq += y * y;
            n += 1;
        }
        let run_rel = sse / (sq - sum * sum / n as f64);
        eprintln!("rel error of the refitted model, run end to end: {run_rel:e}");
        assert!(run_rel < 1e-6, "{run_rel}");

        // The same job again is deterministic.
        let mut again = before.clone();
        let reports2 = refit(&original, &mut again, &[job], &spec, &opts).expect("refits");
        assert_eq!(reports2[0].rel_error_after, r.rel_error_after);
        assert_eq!(again, pruned);
    }

    #[test]
    fn grouped_convs_are_skipped_and_bad_jobs_refused() {
        let (original, mut pruned) = linear_combination_models();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.npy");
        let data = ArrayD::from_shape_vec(IxDyn(&[2, 2, 5, 5]), noise(100, 3)).expect("shape");
        ndarray_npy::write_npy(&path, &data).expect("writes npy");
        let dataset = Dataset::open(&path).expect("opens npy");
        let pre = Preprocess::default();
        let spec = CaptureSpec::ort_cpu(&dataset, &[0, 1], &pre, 2, 1);
        let job = |kept_in: Vec<usize>| RefitJob {
            node: "c".into(),
            input: "h".into(),
            output: "c".into(),
            kept_in,
            kept_out: vec![0, 1, 2, 3],
        };
        let opts = RefitOptions::default();
        let err = refit(&original, &mut pruned, &[job(vec![0, 1, 2])], &spec, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refit of node 'c'") && err.contains("[4, 2, 3, 3]"),
            "{err}"
        );
        let err = refit(&original, &mut pruned, &[job(vec![1, 0])], &spec, &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not strictly ascending"), "{err}");

        let node = pruned
            .graph_mut()
            .node
            .iter_mut()
            .find(|n| n.name() == "c")
            .expect("node c");
        node.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(2),
            r#type: Some(attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        });
        let grouped = pruned.clone();
        let reports = refit(&original, &mut pruned, &[job(vec![0, 1])], &spec, &opts)
            .expect("a skip is not an error");
        assert!(
            reports[0]
                .skipped
                .as_deref()
                .unwrap_or("")
                .contains("group 2"),
            "{reports:?}"
        );
        assert_eq!(pruned, grouped);
    }

    #[test]
    fn a_shared_weight_is_copied_not_changed_in_place() {
        let (original, mut pruned) = linear_combination_models();
        // A second reader of c.w (a graph output) makes it shared.
        pruned
            .graph_mut()
            .output
            .push(value_info("c.w", &["4", "2", "3", "3"]));
        let old = pruned.initializer("c.w").expect("weight").clone();
        let calib = Calib::new(&[8, 2, 5, 5], 4);
        let spec = calib.spec(4);
        let job = job_for(&layer_ref("c", "h", "c"), vec![0, 1], vec![0, 1, 2, 3]);
        let reports = refit(
            &original,
            &mut pruned,
            &[job],
            &spec,
            &RefitOptions::default(),
        )
        .expect("refits");
        assert_eq!(reports[0].skipped, None, "{reports:?}");
        assert_eq!(pruned.initializer("c.w"), Some(&old));
        let node = pruned
            .graph()
            .node
            .iter()
            .find(|n| n.name() == "c")
            .expect("c");
        assert_eq!(node.input[1], "c.w.refit");
        assert_eq!(
            pruned.initializer("c.w.refit").expect("the copy").dims,
            vec![4, 2, 3, 3]
        );
    }

    fn int_attr(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            i: Some(v),
            r#type: Some(attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        }
    }

    fn opset13(graph: GraphProto) -> Model {
        Model {
            proto: whittle_test_support::model(graph, &[]),
        }
    }

    /// x [N,3,6] -> MatMul "mm" ([6,5]) -> [N,3,5] -> Flatten "flat" -> [N,15] -> Gemm "g"
    /// (transB 1, [4,15], bias [4]) -> g [N,4].
    fn dense_model() -> Model {
        let node =
            |name: &str, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>| NodeProto {
                name: Some(name.into()),
                op_type: Some(op.into()),
                input: inputs.iter().map(|s| s.to_string()).collect(),
                output: vec![name.into()],
                attribute,
                ..Default::default()
            };
        opset13(GraphProto {
            name: Some("g".into()),
            node: vec![
                node("mm", "MatMul", &["x", "mm.w"], vec![]),
                node("flat", "Flatten", &["mm"], vec![int_attr("axis", 1)]),
                node(
                    "g",
                    "Gemm",
                    &["flat", "g.w", "g.b"],
                    vec![int_attr("transB", 1)],
                ),
            ],
            input: vec![value_info("x", &["N", "3", "6"])],
            output: vec![value_info("g", &["N", "4"])],
            initializer: vec![
                tensor::from_f32("mm.w", &[6, 5], &noise(30, 30)),
                tensor::from_f32("g.w", &[4, 15], &noise(60, 31)),
                tensor::from_f32("g.b", &[4], &noise(4, 32)),
            ],
            ..Default::default()
        })
    }

    /// Random calibration items in an .npy file.
    struct Calib {
        _dir: tempfile::TempDir,
        dataset: Dataset,
        indices: Vec<usize>,
        pre: Preprocess,
    }

    impl Calib {
        fn new(shape: &[usize], seed: u64) -> Calib {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("x.npy");
            let n = shape.iter().product();
            let data = ArrayD::from_shape_vec(IxDyn(shape), noise(n, seed)).expect("shape fits");
            ndarray_npy::write_npy(&path, &data).expect("writes npy");
            Calib {
                dataset: Dataset::open(&path).expect("opens npy"),
                _dir: dir,
                indices: (0..shape[0]).collect(),
                pre: Preprocess::default(),
            }
        }

        fn spec(&self, batch: usize) -> CaptureSpec<'_> {
            CaptureSpec::ort_cpu(&self.dataset, &self.indices, &self.pre, batch, 1)
        }
    }

    /// A job for `layer` keeping `kept_in` and `kept_out`.
    fn job_for(layer: &LayerRef, kept_in: Vec<usize>, kept_out: Vec<usize>) -> RefitJob {
        RefitJob {
            node: layer.node.clone(),
            input: layer.input.clone(),
            output: layer.output.clone(),
            kept_in,
            kept_out,
        }
    }

    fn put(model: &mut Model, name: &str, dims: &[i64], values: &[f32]) {
        whittle_core::edit::set_initializer(
            model.graph_mut(),
            tensor::from_f32(name, dims, values),
        );
    }

    /// Slices the weight and bias of the job's layer in `model` (a copy of `original`) down to
    /// the job's inputs and outputs. The rest of the graph is left alone: refit never runs the
    /// pruned model.
    fn slice_layer(model: &mut Model, original: &Model, job: &RefitJob) {
        let node = original
            .graph()
            .node
            .iter()
            .find(|n| n.name() == job.node)
            .expect("node")
            .clone();
        let w = original.initializer(&node.input[1]).expect("weight");
        let dims: Vec<usize> = w.dims.iter().map(|&d| d as usize).collect();
        let values = tensor::to_f32(w).expect("floats");
        let inner: usize = dims[2..].iter().product();
        // Conv [M,C,...] and Gemm transB [N,K] keep outputs along rows, MatMul [K,N] inputs.
        let (rows, cols) = if node.op_type() == "MatMul" {
            (&job.kept_in, &job.kept_out)
        } else {
            (&job.kept_out, &job.kept_in)
        };
        let mut sliced = Vec::new();
        for &r in rows {
            for &c in cols {
                let at = (r * dims[1] + c) * inner;
                sliced.extend_from_slice(&values[at..at + inner]);
            }
        }
        let mut new_dims = w.dims.clone();
        new_dims[0] = rows.len() as i64;
        new_dims[1] = cols.len() as i64;
        put(model, &node.input[1], &new_dims, &sliced);
        if let Some(b) = node.input.get(2).and_then(|b| original.initializer(b)) {
            let bias = tensor::to_f32(b).expect("floats");
            let kept: Vec<f32> = job.kept_out.iter().map(|&o| bias[o]).collect();
            put(model, b.name(), &[kept.len() as i64], &kept);
        }
    }

    /// `original` with the layers of `jobs` sliced.
    fn pruned_for(original: &Model, jobs: &[RefitJob]) -> Model {
        let mut pruned = original.clone();
        for job in jobs {
            slice_layer(&mut pruned, original, job);
        }
        pruned
    }

    /// The per-job path `refit` took before statistics were shared: a capture, and normal
    /// equations over the job's kept inputs and outputs only, solved like `apply` solves.
    /// `layers` are those the statistics were collected for (the job's is in there): the
    /// capture asks for all their tensors, as the runtime's rounding depends on which tensors
    /// are graph outputs, and the job's layer samples with its stream there. Returns the report
    /// and the weights to write.
    fn one_shot(
        original: &Model,
        pruned: &Model,
        job: &RefitJob,
        layers: &[LayerRef],
        spec: &CaptureSpec,
        opts: &RefitOptions,
    ) -> (RefitReport, Option<Mat<f64>>) {
        let stream = layers
            .iter()
            .position(|l| l.node == job.node)
            .expect("the job's layer is listed");
        let mut tensors: Vec<String> = Vec::new();
        for l in layers {
            for t in [&l.input, &l.output] {
                if !tensors.contains(t) {
                    tensors.push(t.clone());
                }
            }
        }
        let slot = |name: &str| tensors.iter().position(|t| t == name).expect("listed");
        let (x_slot, y_slot) = (slot(&job.input), slot(&job.output));
        let layer = plan_job(pruned, job)
            .expect("the job fits")
            .expect("the layer is refitted");
        let geometry = match layer.kind {
            Kind::Conv(g) => Geometry::Conv(g),
            Kind::Dense { .. } => Geometry::Dense,
        };
        let names = LayerRef::from(job);
        let select = Select {
            kept_in: Some(&job.kept_in),
            kept_out: Some(&job.kept_out),
            ones: layer.bias_col,
        };
        let mut sampler = Sampler::new(opts.seed, stream, opts.rows_per_item);
        let (d, m) = (layer.d, job.kept_out.len());
        let mut sys = System {
            g: Mat::zeros(d, d),
            r: Mat::zeros(d, m),
            yty: vec![0.0; m],
            ysum: vec![0.0; m],
            rows: 0,
        };
        capture(original, &tensors, spec, &mut |v, count| {
            let (x, y) = (&v[x_slot], &v[y_slot]);
            let b = batch_rows(&geometry, &names, x, y, count, &select, &mut sampler)
                .expect("the captured shapes fit");
            let par = faer::get_global_parallelism();
            matmul(&mut sys.g, Accum::Add, &b.at, b.at.transpose(), 1.0, par);
            matmul(&mut sys.r, Accum::Add, &b.at, b.yt.transpose(), 1.0, par);
            for j in 0..b.yt.ncols() {
                for o in 0..m {
                    sys.yty[o] += b.yt[(o, j)] * b.yt[(o, j)];
                    sys.ysum[o] += b.yt[(o, j)];
                }
            }
            sys.rows += b.at.ncols();
            Ok(())
        })
        .expect("captures");
        solve_system(&job.node, &sys, &layer.w_before, opts.ridge)
    }

    fn layer_ref(node: &str, input: &str, output: &str) -> LayerRef {
        LayerRef {
            node: node.into(),
            input: input.into(),
            output: output.into(),
        }
    }

    /// [`check_against_one_shot`] for each set of jobs, each on its own copy; jobs that wrote.
    fn check_sets(
        original: &Model,
        stats: &RefitStats,
        layers: &[LayerRef],
        sets: &[Vec<RefitJob>],
        spec: &CaptureSpec,
        opts: &RefitOptions,
    ) -> usize {
        sets.iter()
            .map(|jobs| {
                let pruned = pruned_for(original, jobs);
                check_against_one_shot(original, &pruned, stats, layers, jobs, spec, opts)
            })
            .sum()
    }

    fn close(a: f64, b: f64) -> bool {
        (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-13
    }

    /// Applies `jobs` from `stats` (collected for `layers`) to a copy of `pruned` and checks every
    /// job's solution, report and written weights against the per-job path. Returns how many
    /// jobs wrote weights.
    fn check_against_one_shot(
        original: &Model,
        pruned: &Model,
        stats: &RefitStats,
        layers: &[LayerRef],
        jobs: &[RefitJob],
        spec: &CaptureSpec,
        opts: &RefitOptions,
    ) -> usize {
        let mut applied = pruned.clone();
        let reports = stats.apply(&mut applied, jobs, opts).expect("applies");
        assert_eq!(reports.len(), jobs.len());
        let mut expected = pruned.clone();
        let mut written = 0;
        for (job, report) in jobs.iter().zip(&reports) {
            let (want, w_want) = one_shot(original, pruned, job, layers, spec, opts);
            let layer = plan_job(pruned, job).expect("fits").expect("refitted");
            let normal = stats
                .layers
                .iter()
                .find(|l| l.layer.node == job.node)
                .and_then(|l| l.normal.as_ref().ok())
                .expect("statistics");
            let system = normal.select(job, &layer);
            let (_, w_got) = solve_system(&job.node, &system, &layer.w_before, opts.ridge);
            eprintln!(
                "{} in {:?} out {:?}: {report:?}",
                job.node, job.kept_in, job.kept_out
            );
            assert_eq!(report.node, want.node);
            assert_eq!(report.rows, want.rows, "{report:?} vs {want:?}");
            assert_eq!(
                report.skipped.is_some(),
                want.skipped.is_some(),
                "{report:?} vs {want:?}"
            );
            assert!(
                close(report.rel_error_before, want.rel_error_before)
                    && close(report.rel_error_after, want.rel_error_after),
                "{report:?} vs {want:?}"
            );
            match (w_got, w_want) {
                (Some(got), Some(want)) => {
                    let rel = (&got - &want).norm_l2() / want.norm_l2();
                    assert!(rel <= 1e-9, "{}: solutions differ by {rel:e}", job.node);
                    write_back(&mut expected, job, &layer, &want);
                    written += 1;
                }
                (None, None) => {}
                (got, want) => panic!(
                    "{}: written {} by apply, {} by the per-job path",
                    job.node,
                    got.is_some(),
                    want.is_some()
                ),
            }
        }
        // What apply wrote is what the per-job path writes, up to f32 rounding.
        assert_eq!(applied.graph().node, expected.graph().node);
        let (got, want) = (&applied.graph().initializer, &expected.graph().initializer);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.name(), &g.dims), (w.name(), &w.dims));
            let (g, w) = (tensor::to_f32(g).expect("f"), tensor::to_f32(w).expect("f"));
            let scale = w
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            for (a, b) in g.iter().zip(&w) {
                assert!((a - b).abs() <= 1e-6 * scale, "{a} vs {b}");
            }
        }
        written
    }

    #[test]
    fn collected_statistics_refit_conv_subsets_like_the_per_job_path() {
        let (original, _) = linear_combination_models();
        let items = 24;
        let calib = Calib::new(&[items, 2, 5, 5], 20);
        let spec = calib.spec(5);
        let opts = RefitOptions {
            ridge: 1e-4,
            rows_per_item: 16,
            seed: 7,
        };
        let layer = layer_ref;
        let layers = [layer("pre", "x", "h"), layer("c", "h", "c")];
        let stats = collect(&original, &layers, &spec, &opts).expect("collects");
        assert_eq!(stats.layers(), ["pre", "c"]);
        eprintln!("{stats:?}");
        let (pre, c) = (&layers[0], &layers[1]);
        let sets = [
            // The dropped channel of the linear-combination model: kept inputs only.
            vec![job_for(c, vec![0, 1], vec![0, 1, 2, 3])],
            // Subsets of inputs and of outputs, on both layers.
            vec![
                job_for(pre, vec![1], vec![0, 2]),
                job_for(c, vec![0, 2], vec![1, 3]),
            ],
            // Kept outputs only.
            vec![job_for(c, vec![0, 1, 2], vec![1, 2])],
        ];
        // Each set from the ONE collection, on its own copy.
        let written = check_sets(&original, &stats, &layers, &sets, &spec, &opts);
        assert!(written >= 3, "{written}");

        // refit is one collection plus apply: with the layers in the same order it writes the
        // same weights.
        let mut applied = pruned_for(&original, &sets[1]);
        let mut refitted = applied.clone();
        let r1 = stats.apply(&mut applied, &sets[1], &opts).expect("applies");
        let r2 = refit(&original, &mut refitted, &sets[1], &spec, &opts).expect("refits");
        assert_eq!(format!("{r1:?}"), format!("{r2:?}"));
        assert_eq!(applied, refitted);
    }

    #[test]
    fn collected_statistics_refit_dense_subsets_like_the_per_job_path() {
        let original = dense_model();
        let calib = Calib::new(&[20, 3, 6], 40);
        let spec = calib.spec(8);
        let opts = RefitOptions::default();
        let layer = |node: &str, input: &str| layer_ref(node, input, node);
        let layers = [layer("mm", "x"), layer("flat", "mm"), layer("g", "flat")];
        let stats = collect(&original, &layers, &spec, &opts).expect("collects");
        assert_eq!(stats.layers(), ["mm", "flat", "g"]);
        let shown = format!("{stats:?}");
        assert!(shown.contains("60 rows"), "{shown}");
        assert!(shown.contains("op Flatten is not refitted"), "{shown}");
        let (mm, g) = (&layers[0], &layers[2]);
        let sets = [
            vec![
                job_for(mm, vec![0, 2, 3, 5], vec![0, 1, 2, 3, 4]),
                job_for(g, vec![0, 1, 4, 7, 8, 11, 14], vec![1, 3]),
            ],
            vec![
                job_for(g, (0..15).step_by(2).collect(), vec![0, 1, 2, 3]),
                job_for(mm, vec![1, 2, 3, 4, 5], vec![0, 4]),
            ],
        ];
        let written = check_sets(&original, &stats, &layers, &sets, &spec, &opts);
        assert!(written >= 3, "{written}");
    }

    #[test]
    fn apply_refuses_what_the_statistics_do_not_cover() {
        fn is_plain_shared_data<T: Send + Sync + Clone + 'static>() {}
        is_plain_shared_data::<RefitStats>();

        let (original, pruned) = linear_combination_models();
        let calib = Calib::new(&[4, 2, 5, 5], 5);
        let spec = calib.spec(4);
        let opts = RefitOptions::default();
        let c = layer_ref("c", "h", "c");
        // An identical duplicate is collected once; a conflicting one and an unknown node are
        // errors.
        let stats = collect(&original, &[c.clone(), c.clone()], &spec, &opts).expect("collects");
        assert_eq!(stats.layers(), ["c"]);
        let other = LayerRef {
            input: "x".into(),
            ..c.clone()
        };
        let err = collect(&original, &[c.clone(), other], &spec, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refit of node 'c'") && err.contains("listed twice"),
            "{err}"
        );
        let nope = LayerRef {
            node: "nope".into(),
            ..c.clone()
        };
        let err = collect(&original, &[nope], &spec, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'nope'") && err.contains("no node of that name"),
            "{err}"
        );

        let good = job_for(&c, vec![0, 1], vec![0, 1, 2, 3]);
        let mut model = pruned.clone();
        // A node without statistics fails the whole call, before anything is written.
        let pre = RefitJob {
            node: "pre".into(),
            input: "x".into(),
            output: "h".into(),
            kept_in: vec![0, 1],
            kept_out: vec![0, 1],
        };
        let err = stats
            .apply(&mut model, &[good.clone(), pre], &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refit of node 'pre'") && err.contains("no refit statistics"),
            "{err}"
        );
        assert_eq!(model, pruned);
        let moved = RefitJob {
            input: "x".into(),
            ..good.clone()
        };
        let err = stats
            .apply(&mut model, &[moved], &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("collected from 'h' -> 'c'"), "{err}");
        let beyond = job_for(&c, vec![1, 3], vec![0, 1, 2, 3]);
        let err = stats
            .apply(&mut model, &[beyond], &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kept_in reaches index 3, the original tensor has 3"),
            "{err}"
        );
        assert_eq!(model, pruned);
        let reports = stats.apply(&mut model, &[good], &opts).expect("applies");
        assert_eq!(reports[0].skipped, None, "{reports:?}");
        assert_ne!(model, pruned);
    }

    #[test]
    fn matches_the_per_job_path_on_resnet8_and_collects_once() {
        let test = "matches_the_per_job_path_on_resnet8_and_collects_once";
        let dir =
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/assets"));
        if !dir.is_dir() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: test assets not found at {} (CI=true)",
                dir.display()
            );
            eprintln!(
                "{test}: skipped, test assets not found at {}",
                dir.display()
            );
            return;
        }
        let original =
            Model::load(&dir.join("models/resnet8_cifar10.onnx")).expect("loads resnet8");
        let data = Dataset::open(&dir.join("data/cifar10/test-b")).expect("opens test-b");
        let pre = Preprocess::from_name_or_path("resnet8").expect("built-in profile");
        let (calib, _) = data.split(0.6, 0).expect("splits");
        let spec = CaptureSpec::ort_cpu(&data, &calib[..100], &pre, 50, 2);
        let opts = RefitOptions::default();
        let layer = layer_ref;
        let layers = [
            layer("conv2d_1", "activation", "conv2d_1"),
            layer("conv2d_4", "activation_3", "conv2d_4"),
            layer("conv2d_7", "activation_5", "conv2d_7"),
            layer("conv2d_8", "activation_4", "conv2d_8"),
            layer("dense", "flatten", "dense_logits"),
        ];
        let r = |a: usize, b: usize, step: usize| (a..b).step_by(step).collect::<Vec<usize>>();
        let kept = [
            [
                (r(0, 16, 2), r(0, 16, 1)),
                (r(0, 32, 1), r(0, 32, 3)),
                (r(0, 40, 1), r(0, 64, 1)),
                (r(0, 24, 1), r(0, 64, 2)),
                (r(0, 64, 2), r(0, 10, 1)),
            ],
            [
                (r(0, 12, 1), r(4, 16, 1)),
                (r(0, 32, 2), r(0, 32, 1)),
                (r(20, 64, 1), r(0, 64, 4)),
                (r(8, 32, 1), r(0, 64, 1)),
                (r(0, 48, 1), vec![0, 1, 2, 4, 5, 6, 7, 8, 9]),
            ],
        ];
        let sets: Vec<Vec<RefitJob>> = kept
            .iter()
            .map(|set| {
                set.iter()
                    .zip(&layers)
                    .map(|((i, o), l)| job_for(l, i.clone(), o.clone()))
                    .collect()
            })
            .collect();
        let pruned: Vec<Model> = sets.iter().map(|s| pruned_for(&original, s)).collect();

        // Timing: the per-job path captures once per job (the sensitivity trials called refit
        // once per trial); the statistics are collected once for every job.
        let t = std::time::Instant::now();
        for (jobs, model) in sets.iter().zip(&pruned) {
            for job in jobs {
                let alone = [LayerRef::from(job)];
                one_shot(&original, model, job, &alone, &spec, &opts);
            }
        }
        let per_job = t.elapsed();
        let t = std::time::Instant::now();
        let stats = collect(&original, &layers, &spec, &opts).expect("collects");
        let collected = t.elapsed();
        let t = std::time::Instant::now();
        for (jobs, model) in sets.iter().zip(&pruned) {
            stats
                .apply(&mut model.clone(), jobs, &opts)
                .expect("applies");
        }
        let applied = t.elapsed();
        eprintln!(
            "resnet8, 100 items, 5 layers x 2 kept subsets: per-job path (10 captures) {per_job:?}; collect once {collected:?} + 10 applies {applied:?}"
        );

        let mut written = 0;
        for (jobs, model) in sets.iter().zip(&pruned) {
            written +=
                check_against_one_shot(&original, model, &stats, &layers, jobs, &spec, &opts);
        }
        assert!(written >= 8, "{written}");
    }
}
