//! Transformer block discovery on MiniLM (post-norm, fused LayerNormalization) and on built
//! fixtures: post-norm with a decomposed LayerNorm, and pre-norm.

use whittle_compress::blocks::{self, Layout};
use whittle_core::Model;

fn minilm() -> Option<Model> {
    Some(Model::load(&whittle_test_support::minilm()?).unwrap())
}

#[test]
fn minilm_blocks_heads_and_sizes_from_the_onnx_file() {
    let Some(m) = minilm() else { return };
    let b = blocks::find_blocks(&m).unwrap();
    assert_eq!(b.len(), 6);
    for (i, blk) in b.iter().enumerate() {
        assert_eq!(blk.index, i);
        assert_eq!(blk.layout, Layout::PostNorm);
        assert_eq!(blk.heads, Some(12), "block {i}");
        assert_eq!(blk.hidden, Some(384), "block {i}");
        assert_eq!(blk.ffn, Some(1536), "block {i}");
        assert!(blk.attention.fused_norm && blk.feed_forward.fused_norm);
        assert!(blk.output.contains(&format!("layer.{i}/output/LayerNorm")) || i == 5);
    }
    assert_eq!(blocks::chains(&b), vec![(0, 6)]);
    assert!(b[0].input.contains("embeddings/LayerNorm"));
    assert_eq!(b[5].output, "last_hidden_state");
}

// ---------------------------------------------------------------------------------------------
// Built fixtures: `blocks` encoder blocks of hidden 8, 2 heads of 4, FFN 16, on x [N, S, 8]
// ---------------------------------------------------------------------------------------------

use whittle_core::onnx::{AttributeProto, GraphProto};
use whittle_core::tensor::{from_f32, from_i64};
use whittle_test_support::runtime::{
    RuntimeKind, RuntimeOptions, Value, load, probe_tensor, run_model,
};
use whittle_test_support::{
    GraphBuilder, Lcg, attr_int, attr_ints, graph, max_abs_diff, model_with, op_count, value_info,
};

pub const D: usize = 8;

struct Builder(GraphBuilder);

impl Default for Builder {
    fn default() -> Builder {
        Builder::seeded(0)
    }
}

whittle_test_support::derefs_to_graph_builder!(Builder, 0);

impl Builder {
    fn seeded(seed: u64) -> Builder {
        Builder(GraphBuilder::new("encoder", Lcg(seed)))
    }

    fn weight(&mut self, name: &str, dims: &[usize], scale: f32) -> String {
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| self.rng.symmetric(scale)).collect();
        let d: Vec<i64> = dims.iter().map(|&v| v as i64).collect();
        self.initializer(from_f32(name, &d, &vals))
    }

    fn ints(&mut self, name: &str, v: &[i64]) -> String {
        self.initializer(from_i64(name, &[v.len() as i64], v))
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.initializer(from_f32(name, &[], &[v]))
    }

    fn linear(&mut self, name: &str, x: &str, i: usize, o: usize) -> String {
        let w = self.weight(&format!("{name}.w"), &[i, o], 1.0 / (i as f32).sqrt());
        let b = self.weight(&format!("{name}.b"), &[o], 0.1);
        let y = self.node("MatMul", &format!("{name}/MatMul"), &[x, &w], vec![]);
        self.node("Add", &format!("{name}/Add"), &[&y, &b], vec![])
    }

    fn norm(&mut self, name: &str, x: &str, fused: bool) -> String {
        let g = self.weight(&format!("{name}.gamma"), &[D], 1.0);
        let b = self.weight(&format!("{name}.beta"), &[D], 0.1);
        if fused {
            return self.node(
                "LayerNormalization",
                name,
                &[x, &g, &b],
                vec![attr_int("axis", -1)],
            );
        }
        let mean = self.node("ReduceMean", &format!("{name}/mean"), &[x], vec![axes()]);
        let d = self.node("Sub", &format!("{name}/sub"), &[x, &mean], vec![]);
        let two = self.scalar(&format!("{name}.two"), 2.0);
        let sq = self.node("Pow", &format!("{name}/pow"), &[&d, &two], vec![]);
        let var = self.node("ReduceMean", &format!("{name}/var"), &[&sq], vec![axes()]);
        let eps = self.scalar(&format!("{name}.eps"), 1e-5);
        let ve = self.node("Add", &format!("{name}/eps"), &[&var, &eps], vec![]);
        let sd = self.node("Sqrt", &format!("{name}/sqrt"), &[&ve], vec![]);
        let n = self.node("Div", &format!("{name}/div"), &[&d, &sd], vec![]);
        let s = self.node("Mul", &format!("{name}/gamma"), &[&n, &g], vec![]);
        self.node("Add", &format!("{name}/beta"), &[&s, &b], vec![])
    }

    fn attention(&mut self, name: &str, h: &str) -> String {
        let heads = self.ints(&format!("{name}.heads_shape"), &[0, 0, 2, 4]);
        let flat = self.ints(&format!("{name}.flat_shape"), &[0, 0, D as i64]);
        let split = |b: &mut Builder, which: &str, perm: &[i64]| {
            let t = b.linear(&format!("{name}/{which}"), h, D, D);
            let r = b.node(
                "Reshape",
                &format!("{name}/{which}/Reshape"),
                &[&t, &heads],
                vec![],
            );
            b.node(
                "Transpose",
                &format!("{name}/{which}/Transpose"),
                &[&r],
                vec![attr_ints("perm", perm)],
            )
        };
        let q = split(self, "query", &[0, 2, 1, 3]);
        let k = split(self, "key", &[0, 2, 3, 1]);
        let v = split(self, "value", &[0, 2, 1, 3]);
        let s = self.node("MatMul", &format!("{name}/scores"), &[&q, &k], vec![]);
        let scale = self.scalar(&format!("{name}.scale"), 0.5);
        let s = self.node("Mul", &format!("{name}/scale"), &[&s, &scale], vec![]);
        let p = self.node(
            "Softmax",
            &format!("{name}/Softmax"),
            &[&s],
            vec![attr_int("axis", -1)],
        );
        let c = self.node("MatMul", &format!("{name}/context"), &[&p, &v], vec![]);
        let c = self.node(
            "Transpose",
            &format!("{name}/merge"),
            &[&c],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        );
        let c = self.node("Reshape", &format!("{name}/flat"), &[&c, &flat], vec![]);
        self.linear(&format!("{name}/output"), &c, D, D)
    }

    fn ffn(&mut self, name: &str, h: &str) -> String {
        let u = self.linear(&format!("{name}/up"), h, D, 16);
        // GELU, Erf form
        let sqrt2 = self.scalar(&format!("{name}.sqrt2"), std::f32::consts::SQRT_2);
        let one = self.scalar(&format!("{name}.one"), 1.0);
        let half = self.scalar(&format!("{name}.half"), 0.5);
        let a = self.node("Div", &format!("{name}/gelu/div"), &[&u, &sqrt2], vec![]);
        let a = self.node("Erf", &format!("{name}/gelu/erf"), &[&a], vec![]);
        let a = self.node("Add", &format!("{name}/gelu/add"), &[&a, &one], vec![]);
        let a = self.node("Mul", &format!("{name}/gelu/mul"), &[&u, &a], vec![]);
        let a = self.node("Mul", &format!("{name}/gelu/half"), &[&a, &half], vec![]);
        self.linear(&format!("{name}/down"), &a, 16, D)
    }

    fn model(self, last: &str) -> Model {
        let GraphProto {
            mut node,
            initializer,
            ..
        } = self.0.graph;
        node.push(whittle_test_support::node(
            "out",
            "Identity",
            &[last],
            &["y"],
        ));
        let io = |name: &str| vec![value_info(name, &["N", "S", &D.to_string()])];
        Model {
            proto: model_with(
                8,
                &[("", 17)],
                graph("encoder", node, io("x"), io("y"), initializer),
            ),
        }
    }
}

fn axes() -> AttributeProto {
    attr_ints("axes", &[-1])
}

/// A post-norm encoder (BERT layout) of `n` blocks with fused or decomposed LayerNorms.
pub fn post_norm(n: usize, fused: bool) -> Model {
    let mut b = Builder::seeded(7);
    let mut h = b.norm("embed_norm", "x", fused);
    for i in 0..n {
        let a = b.attention(&format!("l{i}/attn"), &h);
        let r = b.node("Add", &format!("l{i}/attn/residual"), &[&a, &h], vec![]);
        let h1 = b.norm(&format!("l{i}/attn_norm"), &r, fused);
        let f = b.ffn(&format!("l{i}/ffn"), &h1);
        let r = b.node("Add", &format!("l{i}/ffn/residual"), &[&h1, &f], vec![]);
        h = b.norm(&format!("l{i}/ffn_norm"), &r, fused);
    }
    b.model(&h)
}

/// A pre-norm encoder (ViT layout) of `n` blocks and a final norm.
pub fn pre_norm(n: usize) -> Model {
    let mut b = Builder::seeded(11);
    let mut h = b.linear("embed", "x", D, D);
    for i in 0..n {
        let x = b.norm(&format!("l{i}/norm1"), &h, true);
        let a = b.attention(&format!("l{i}/attn"), &x);
        let h1 = b.node("Add", &format!("l{i}/attn/residual"), &[&h, &a], vec![]);
        let x = b.norm(&format!("l{i}/norm2"), &h1, true);
        let f = b.ffn(&format!("l{i}/ffn"), &x);
        h = b.node("Add", &format!("l{i}/ffn/residual"), &[&h1, &f], vec![]);
    }
    let y = b.norm("final_norm", &h, true);
    b.model(&y)
}

fn run_ort(m: &Model, x: &Value) -> Vec<f32> {
    run_model(RuntimeKind::OrtCpu, m, std::slice::from_ref(x))[0].to_f32_vec()
}

#[test]
fn built_post_norm_with_decomposed_layernorm_and_pre_norm_are_found() {
    let x = Value::F32(probe_tensor(&[2, 5, D], -1.0, 1.0));
    for (m, layout, fused) in [
        (post_norm(3, false), Layout::PostNorm, false),
        (post_norm(2, true), Layout::PostNorm, true),
        (pre_norm(3), Layout::PreNorm, true),
    ] {
        // the fixture is a valid model
        assert_eq!(run_ort(&m, &x).len(), 2 * 5 * D);
        let b = blocks::find_blocks(&m).unwrap();
        let n = if matches!((layout, fused), (Layout::PostNorm, true)) {
            2
        } else {
            3
        };
        assert_eq!(b.len(), n, "{layout:?} fused {fused}");
        assert_eq!(blocks::chains(&b), vec![(0, n)]);
        for blk in &b {
            assert_eq!(blk.layout, layout);
            assert_eq!(blk.heads, Some(2));
            assert_eq!(blk.hidden, Some(D));
            assert_eq!(blk.ffn, Some(16));
            assert_eq!(blk.attention.fused_norm, fused);
        }
        match layout {
            Layout::PostNorm => {
                let embed = if fused {
                    "embed_norm_out"
                } else {
                    "embed_norm/beta_out"
                };
                assert_eq!(b[0].input, embed);
            }
            Layout::PreNorm => {
                assert_eq!(b[0].input, "embed/Add_out");
                assert_eq!(b[2].output, "l2/ffn/residual_out");
            }
        }
    }
}

#[test]
fn a_graph_without_blocks_names_the_pattern_that_failed() {
    // an MLP with a residual Add but no attention
    let mut b = Builder::default();
    let h = b.linear("embed", "x", D, D);
    let f = b.ffn("ffn", &h);
    let r = b.node("Add", "residual", &[&h, &f], vec![]);
    let e = blocks::find_blocks(&b.model(&r)).unwrap_err().to_string();
    assert!(e.contains("none whose branch holds a Softmax"), "{e}");
    let mut b = Builder::default();
    let h = b.linear("embed", "x", D, D);
    let e = blocks::find_blocks(&b.model(&h)).unwrap_err().to_string();
    assert!(e.contains("no residual Add"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Block removal
// ---------------------------------------------------------------------------------------------

use whittle_calib::{CaptureSpec, Dataset, Preprocess};
use whittle_compress::drop_blocks::{self, DropOptions, DropReport};

/// Calibration data for the fixtures: `n` items of x [S, D], in a new temp folder (kept while
/// the folder lives).
fn fixture_data(n: usize, seq: usize) -> (tempfile::TempDir, Dataset) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.npy");
    let x = probe_tensor(&[n, seq, D], -2.0, 2.0);
    ndarray_npy::write_npy(&p, &x).unwrap();
    let data = Dataset::open(&p).unwrap();
    (dir, data)
}

fn drop(
    m: &mut Model,
    data: &Dataset,
    opts: DropOptions,
) -> Result<DropReport, whittle_compress::Error> {
    spec_run(data, |spec| drop_blocks::drop_blocks(m, &opts, spec))
}

/// A model's output on a probe x [2, 9, D] in [-2, 2), to measure how far a cut copy moves.
struct Probe {
    x: Value,
    want: Vec<f32>,
}

impl Probe {
    fn new(m: &Model) -> Self {
        let x = Value::F32(probe_tensor(&[2, 9, D], -2.0, 2.0));
        let want = run_ort(m, &x);
        Probe { x, want }
    }

    /// The summed squared difference of `cut`'s output on the probe from the original's.
    fn err(&self, cut: &Model) -> f64 {
        let got = run_ort(cut, &self.x);
        self.want
            .iter()
            .zip(&got)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum()
    }
}

fn opts(count: usize, linear_replace: bool) -> DropOptions {
    DropOptions {
        count,
        linear_replace,
        start: None,
        ridge: 1e-6,
    }
}

#[test]
fn a_block_that_does_nothing_is_the_one_removed_and_the_outputs_stay() {
    // pre-norm block 1 with its attention and FFN output projections zeroed adds nothing to the
    // residual stream: its importance is 0, it is chosen, and removing it changes nothing
    let mut m = pre_norm(3);
    for t in &mut m.graph_mut().initializer {
        if t.name().starts_with("l1/attn/output.") || t.name().starts_with("l1/ffn/down.") {
            let n = t
                .float_data
                .len()
                .max(t.raw_data.as_ref().map_or(0, |r| r.len() / 4));
            *t = from_f32(t.name(), &t.dims.clone(), &vec![0.0; n]);
        }
    }
    let (_dir, data) = fixture_data(24, 6);
    let x = Value::F32(probe_tensor(&[3, 7, D], -1.0, 1.0));
    let want = run_ort(&m, &x);
    for replace in [false, true] {
        let mut cut = m.clone();
        let r = drop(&mut cut, &data, opts(1, replace)).unwrap();
        assert_eq!(r.removed, vec![1], "{r:?}");
        assert!(
            r.importance[1] < 1e-9 && r.importance[0] > 1e-3,
            "{:?}",
            r.importance
        );
        assert!(r.params.1 < r.params.0);
        let got = run_ort(&cut, &x);
        assert!(
            max_abs_diff(&want, &got) < 1e-4,
            "replace {replace}: {}",
            max_abs_diff(&want, &got)
        );
        assert_eq!(blocks::find_blocks(&cut).unwrap().len(), 2);
    }
}

#[test]
fn linear_replacement_beats_plain_removal_on_a_post_norm_encoder() {
    let m = post_norm(3, false);
    let (_dir, data) = fixture_data(48, 6);
    let probe = Probe::new(&m);
    for count in [1, 2, 3] {
        let (mut plain, mut fitted) = (m.clone(), m.clone());
        let p = drop(&mut plain, &data, opts(count, false)).unwrap();
        let f = drop(&mut fitted, &data, opts(count, true)).unwrap();
        assert_eq!(p.removed, f.removed, "the same span either way");
        let fit = f.fit.as_ref().unwrap();
        assert!(f.linear_replace, "{fit:?}");
        assert!(fit.rel_error_after < fit.rel_error_before, "{fit:?}");
        // on inputs it was not fitted on too
        let (ep, ef) = (probe.err(&plain), probe.err(&fitted));
        assert!(ef < ep, "{count} blocks: fitted {ef} vs plain {ep}");
        assert_eq!(
            blocks::find_blocks(&plain).map_or(0, |b| b.len()),
            3 - count
        );
    }
}

#[test]
fn dropping_more_blocks_than_exist_is_refused() {
    let mut m = post_norm(2, true);
    let before = m.clone();
    let (_dir, data) = fixture_data(4, 3);
    let e = drop(&mut m, &data, opts(3, true)).unwrap_err().to_string();
    assert!(e.contains("asked to drop 3 blocks, the model has 2"), "{e}");
    let e = drop(&mut m, &data, opts(0, true)).unwrap_err().to_string();
    assert!(e.contains("removes nothing"), "{e}");
    let e = drop(
        &mut m,
        &data,
        DropOptions {
            start: Some(2),
            ..opts(1, true)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("starts at block 2"), "{e}");
    assert_eq!(m.to_bytes(), before.to_bytes(), "nothing changed");
}

// ---------------------------------------------------------------------------------------------
// Width: feed-forward neurons and attention heads
// ---------------------------------------------------------------------------------------------

use whittle_compress::prune_ffn::{self, WidthOptions};
use whittle_compress::prune_heads;

fn width(fraction: f64) -> WidthOptions {
    WidthOptions {
        fraction,
        round_to: 1,
        refit: true,
        ridge: 1e-6,
    }
}

fn spec_run<T>(data: &Dataset, f: impl FnOnce(&CaptureSpec) -> T) -> T {
    let idx: Vec<usize> = (0..data.len()).collect();
    let pre = Preprocess::default();
    f(&CaptureSpec {
        dataset: data,
        indices: &idx,
        pre: &pre,
        batch: 16,
        runtime: RuntimeKind::OrtCpu,
        threads: Some(2),
    })
}

fn run_with(kind: RuntimeKind, m: &Model, inputs: &[(&str, Value)]) -> Vec<f32> {
    let opts = RuntimeOptions {
        input_shapes: inputs
            .iter()
            .map(|(n, v)| (n.to_string(), v.shape().to_vec()))
            .collect(),
        ..Default::default()
    };
    let mut s = load(kind, &m.to_bytes(), &opts).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
    let feed: Vec<Value> = s
        .inputs()
        .iter()
        .map(|io| inputs.iter().find(|x| x.0 == io.name).unwrap().1.clone())
        .collect();
    s.run(&feed).unwrap()[0].to_f32_vec()
}

#[test]
fn pruned_heads_rewrite_the_shape_constants_and_run_at_any_batch_and_length() {
    // the fixture's Reshapes hold the head count as constants: [0, 0, 2, 4] and [0, 0, 8]
    let m = post_norm(2, false);
    let (_dir, data) = fixture_data(32, 6);
    let mut cut = m.clone();
    let r = spec_run(&data, |s| {
        prune_heads::prune_heads(&mut cut, &width(0.5), s)
    })
    .unwrap();
    assert!(r.layers.iter().all(|l| (l.kept, l.of) == (1, 2)), "{r:?}");
    let shapes: Vec<Vec<i64>> = cut
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type() == "Reshape")
        .map(|n| whittle_core::tensor::to_i64(cut.initializer(&n.input[1]).unwrap()).unwrap())
        .collect();
    assert!(
        shapes.iter().all(|s| s == &[0, 0, 1, 4] || s == &[0, 0, 4]),
        "{shapes:?}"
    );
    let b = blocks::find_blocks(&cut).unwrap();
    assert_eq!(b[0].heads, Some(1));
    for (n, seq) in [(1, 3), (4, 11)] {
        let x = Value::F32(probe_tensor(&[n, seq, D], -1.0, 1.0));
        let o = run_with(RuntimeKind::OrtCpu, &cut, &[("x", x.clone())]);
        let t = run_with(RuntimeKind::Tract, &cut, &[("x", x)]);
        assert!(max_abs_diff(&o, &t) < 1e-4);
    }
}

#[test]
fn ffn_pruning_keeps_the_best_neurons_and_the_refit_helps() {
    let m = post_norm(2, false);
    let (_dir, data) = fixture_data(48, 6);
    let probe = Probe::new(&m);
    let mut errs = vec![];
    for refit in [false, true] {
        let mut cut = m.clone();
        let o = WidthOptions {
            refit,
            ..width(0.25)
        };
        let r = spec_run(&data, |s| prune_ffn::prune_ffn(&mut cut, &o, s)).unwrap();
        assert!(r.layers.iter().all(|l| (l.kept, l.of) == (12, 16)), "{r:?}");
        assert_eq!(blocks::find_blocks(&cut).unwrap()[1].ffn, Some(12));
        errs.push(probe.err(&cut));
    }
    assert!(errs[1] < errs[0], "refit {} vs none {}", errs[1], errs[0]);
    // a fraction outside (0, 1) is refused
    let mut cut = m.clone();
    let e = spec_run(&data, |s| prune_ffn::prune_ffn(&mut cut, &width(1.0), s))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be in (0, 1)"), "{e}");
}

#[test]
fn minilm_with_pruned_heads_runs_for_batch_1_and_8_sequence_16_and_128() {
    let Some(m) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    // calibration: token ids from the vocabulary's ordinary range, a mask with padding
    let p = dir.path().join("c.npz");
    let (n, seq) = (16, 24);
    let mut ids = ndarray::Array2::<i64>::zeros((n, seq));
    let mut mask = ndarray::Array2::<i64>::zeros((n, seq));
    for i in 0..n {
        let len = 8 + i;
        for j in 0..len {
            ids[[i, j]] = if j == 0 {
                101
            } else if j == len - 1 {
                102
            } else {
                2000 + ((i * 131 + j * 17) % 5000) as i64
            };
            mask[[i, j]] = 1;
        }
    }
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&p).unwrap());
    w.add_array("input_ids", &ids).unwrap();
    w.add_array("attention_mask", &mask).unwrap();
    w.add_array("token_type_ids", &ndarray::Array2::<i64>::zeros((n, seq)))
        .unwrap();
    w.finish().unwrap();
    let data = Dataset::open(&p).unwrap();
    let mut cut = m.clone();
    let r = spec_run(&data, |s| {
        prune_heads::prune_heads(&mut cut, &width(0.25), s)
    })
    .unwrap();
    assert!(r.layers.iter().all(|l| (l.kept, l.of) == (9, 12)), "{r:?}");
    assert!(r.tokens < n * seq, "padding tokens are left out");
    for (b, s) in [(1, 16), (1, 128), (8, 16), (8, 128)] {
        let ids =
            ndarray::Array2::from_shape_fn((b, s), |(i, j)| (1000 + i * 7 + j * 13) as i64 % 20000);
        let inputs = [
            ("input_ids", Value::I64(ids.into_dyn())),
            (
                "attention_mask",
                Value::I64(ndarray::ArrayD::ones(vec![b, s])),
            ),
            (
                "token_type_ids",
                Value::I64(ndarray::ArrayD::zeros(vec![b, s])),
            ),
        ];
        let o = run_with(RuntimeKind::OrtCpu, &cut, &inputs);
        let t = run_with(RuntimeKind::Tract, &cut, &inputs);
        assert_eq!(o.len(), b * s * 384);
        assert!(
            max_abs_diff(&o, &t) < 1e-3,
            "batch {b} seq {s}: {}",
            max_abs_diff(&o, &t)
        );
    }
}

#[test]
fn an_attention_that_adds_nothing_is_the_one_removed() {
    use whittle_compress::drop_attention;
    // pre-norm block 2's attention output projection zeroed: removing that attention is exact
    let mut m = pre_norm(3);
    for t in &mut m.graph_mut().initializer {
        if t.name().starts_with("l2/attn/output.") {
            let n = t.dims.iter().product::<i64>() as usize;
            *t = from_f32(t.name(), &t.dims.clone(), &vec![0.0; n]);
        }
    }
    let (_dir, data) = fixture_data(24, 6);
    let x = Value::F32(probe_tensor(&[3, 7, D], -1.0, 1.0));
    let want = run_ort(&m, &x);
    let mut cut = m.clone();
    let r = spec_run(&data, |s| drop_attention::drop_attention(&mut cut, 1, s)).unwrap();
    assert_eq!(r.removed, vec![2], "{r:?}");
    assert!(
        r.importance[2] < 1e-9 && r.importance[0] > 1e-3,
        "{:?}",
        r.importance
    );
    assert!(max_abs_diff(&want, &run_ort(&cut, &x)) < 1e-4);
    assert_eq!(op_count(&cut, "Softmax"), 2, "the branch is gone");
    // (a block without attention is no longer a block: ask the original)
    let e = spec_run(&data, |s| {
        drop_attention::drop_attention(&mut m.clone(), 4, s)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("the model has 3 blocks"), "{e}");
}
