//! whittle's compression passes. Each pass is one file with a doc comment stating what it
//! accepts, what it declines and what it guarantees:
//!
//! | pass | file |
//! |---|---|
//! | lossless cleanup (BatchNormalization folding into the Conv / Gemm before or after it, constant folding, Identity / Dropout / no-op Reshape removal) | `cleanup.rs` |
//! | channel dependency groups | `groups.rs` |
//! | channel pruning: importance, budget, plan, apply | `prune.rs` |
//! | least-squares reconstruction of pruned layers | `refit.rs` |
//! | low-rank factorisation (channel / spatial SVD, data-aware) | `lowrank.rs` |
//! | depth merging: exact Conv-Conv merges, residual folds, activation removal | `merge.rs` |
//! | per-layer latency tables and the latency model of `latency=` budgets | `latency.rs` |
//! | transformer block discovery (attention / feed-forward residuals, heads, sizes) | `blocks.rs` |
//! | transformer block removal, with a least-squares linear replacement (ReplaceMe) | `drop_blocks.rs` |
//! | attention sub-module removal (2SSP stage 2) | `drop_attention.rs` |
//! | feed-forward neuron pruning with a refit of the down projection (2SSP) | `prune_ffn.rs` |
//! | attention head pruning with a refit of the output projection (Minitron) | `prune_heads.rs` |
//! | INT8 quantization (QDQ), calibrated, bias-corrected | `quantize.rs` (ranges: `ranges.rs`) |
//!
//! The methods a recipe step names (`prune_channels.rs`, `lowrank.rs`, `merging.rs`,
//! `drop_blocks.rs`, `prune_ffn.rs`, `prune_heads.rs`, `drop_attention.rs`, `quantize.rs`) implement
//! [`pipeline::Method`] and are listed in [`pipeline::METHODS`]; `pipeline.rs` runs them in order
//! and checks the model after each; `job.rs` runs a whole compression as `whittle compress` and
//! `deploy` do (cleanup, shapes, the calibration split, the steps, the speed and fidelity checks).

pub mod auto;
pub mod blocks;
pub mod cleanup;
pub mod drop_attention;
pub mod drop_blocks;
pub mod gptq;
pub mod groups;
pub mod index;
pub mod job;
pub mod latency;
pub mod lowrank;
pub mod merge;
pub mod merging;
pub mod pipeline;
pub mod prune;
pub mod prune_channels;
pub mod prune_ffn;
pub mod prune_heads;
pub mod quantize;
pub mod ranges;
pub mod refit;
pub mod report;

/// Errors of the compression passes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model itself is at fault.
    #[error(transparent)]
    Model(#[from] whittle_core::Error),
    /// A pass could not do its work; nothing was changed.
    #[error("{pass}: {reason}")]
    Pass {
        /// The pass.
        pass: String,
        /// Why.
        reason: String,
    },
    /// The budget cannot be met.
    #[error("{0}")]
    Budget(String),
    /// Nothing in the model can be pruned.
    #[error("nothing to prune: {0}")]
    NothingToPrune(String),
    /// A step of the pipeline failed; nothing was written.
    #[error("step {step} ({method}): {cause}")]
    Step {
        /// The step, from 1.
        step: usize,
        /// Its method.
        method: String,
        /// What failed (in the message, not a `source`: the CLI would print it twice).
        cause: Box<Error>,
    },
    /// The model after a step fails a check (graph, shapes, numbers, a run in the runtime).
    #[error("the result fails a check: {0}")]
    Check(String),
    /// A recipe cannot be read.
    #[error("{0}")]
    Recipe(String),
    /// Latencies could not be measured (on a board, through its runner).
    #[error("measuring: {0}")]
    Measure(String),
    /// A recipe in the old form (a section per method); `new_form` is the same recipe as steps.
    #[error(
        "recipe {path}: {sections} is the old form of a recipe; each method is now a [[step]] with method = \"...\", run in the order listed (the recipe in the new form is printed above; see recipes/README.md)"
    )]
    OldRecipe {
        /// The recipe.
        path: String,
        /// Its method sections.
        sections: String,
        /// The same recipe written as steps.
        new_form: String,
    },
    /// A plan file cannot be read or replayed.
    #[error("{0}")]
    Plan(String),
    /// A runtime failed (loading, running, measuring).
    #[error(transparent)]
    Runtime(#[from] whittle_runtime::Error),
    /// Calibration data could not be read or captured.
    #[error(transparent)]
    Calib(#[from] whittle_calib::Error),
    /// A least-squares refit failed.
    #[error(transparent)]
    Refit(#[from] refit::RefitError),
}
