//! The lossless cleanup passes on tiny built graphs: BatchNormalization folded into the Conv /
//! Gemm after it (and not into a padded Conv), constant subgraphs folded (and not random ones,
//! not overridable initializers, not tensors that would bloat the file or that whittle cannot
//! carry). Every cleaned model must give the original's outputs (same shapes, max |diff| < 1e-4)
//! in ONNX Runtime (CPU), and in tract where noted, on random inputs. The shared models in
//! ../shared/assets/models are cleaned and compared the same way.

use ndarray::{ArrayD, IxDyn};
use prost::Message;
use whittle_compress::cleanup::{self, CleanupReport};
use whittle_core::Model;
use whittle_core::onnx::{AttributeProto, ModelProto};
use whittle_core::tensor::{from_f32, from_i64, to_i64};
use whittle_test_support::runtime::{RuntimeKind, Value, load, synthetic_inputs};
use whittle_test_support::{
    CNN_MODELS, GraphBuilder, Lcg, assert_same_outputs, asset, attr_int, attr_ints, attr_str,
    load_fixture, value_info,
};

// ---------------------------------------------------------------------------------------------
// A tiny graph builder
// ---------------------------------------------------------------------------------------------

struct Net(GraphBuilder);

whittle_test_support::derefs_to_graph_builder!(Net, 0);

impl Net {
    fn new(seed: u64) -> Net {
        Net(GraphBuilder::new("cleanup", Lcg::seeded(seed, 0x5EED)))
    }

    /// A float input `[N, dims...]`.
    fn input(&mut self, name: &str, dims: &[i64]) -> String {
        let mut d = vec![None];
        d.extend(dims.iter().map(|&v| Some(v)));
        self.0.input(name, &d)
    }

    /// A float input of fixed dims.
    fn fixed_input(&mut self, name: &str, dims: &[i64]) -> String {
        self.0.input(name, dims)
    }

    /// A float output; `None` dims are the symbol `N`.
    fn output(&mut self, name: &str, dims: &[Option<i64>]) {
        self.0.output(name, dims);
    }

    /// A random float initializer with values in [lo, hi).
    fn param(&mut self, name: &str, dims: &[i64], lo: f32, hi: f32) -> String {
        let n: i64 = dims.iter().product();
        let v = self.rng.values(n as usize, lo, hi);
        self.initializer(from_f32(name, dims, &v))
    }

    fn int_param(&mut self, name: &str, dims: &[i64], v: &[i64]) -> String {
        self.initializer(from_i64(name, dims, v))
    }

    /// BatchNormalization over `c` channels with random (non-trivial) parameters.
    fn batchnorm(&mut self, name: &str, x: &str, c: i64) -> String {
        let scale = self.param(&format!("{name}.scale"), &[c], 0.5, 1.5);
        let beta = self.param(&format!("{name}.beta"), &[c], -0.5, 0.5);
        let mean = self.param(&format!("{name}.mean"), &[c], -0.5, 0.5);
        let var = self.param(&format!("{name}.var"), &[c], 0.3, 1.5);
        self.node(
            "BatchNormalization",
            name,
            &[x, &scale, &beta, &mean, &var],
            vec![],
        )
    }

    /// Conv `cin -> cout` with a `k x k` kernel and the given extra attributes.
    fn conv(
        &mut self,
        name: &str,
        x: &str,
        (cin, cout, k): (i64, i64, i64),
        bias: bool,
        mut attrs: Vec<AttributeProto>,
    ) -> String {
        let s = 1.0 / ((cin * k * k) as f32).sqrt();
        let w = self.param(&format!("{name}.w"), &[cout, cin, k, k], -s, s);
        let mut ins = vec![x.to_string(), w];
        if bias {
            ins.push(self.param(&format!("{name}.b"), &[cout], -0.3, 0.3));
        }
        attrs.push(attr_ints("kernel_shape", &[k, k]));
        let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
        self.node("Conv", name, &ins, attrs)
    }

    /// The model with this IR version and default-domain opset.
    fn proto_with(self, ir_version: i64, opset: i64) -> ModelProto {
        self.0.model(ir_version, &[("", opset)])
    }

    fn model(self) -> Model {
        load_fixture(self.proto_with(8, 13))
    }

    /// The model, what cleanup makes of it (see [`clean`]) and cleanup's report.
    fn model_and_cleaned(self) -> (Model, Model, CleanupReport) {
        let m = self.model();
        let (cleaned, report) = clean(&m);
        (m, cleaned, report)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn clean(m: &Model) -> (Model, CleanupReport) {
    let mut c = m.clone();
    let r = cleanup::cleanup(&mut c).expect("cleanup");
    eprintln!("{r:?}");
    (c, r)
}

/// The BatchNormalizations cleanup folded: (into the node before, into the node after).
fn bn_folds(r: &CleanupReport) -> (usize, usize) {
    (r.folded_batchnorms, r.folded_batchnorms_forward)
}

fn ops(m: &Model) -> Vec<String> {
    m.graph()
        .node
        .iter()
        .map(|n| n.op_type().to_string())
        .collect()
}

fn count(m: &Model, op: &str) -> usize {
    ops(m).iter().filter(|o| *o == op).count()
}

fn random_input(shape: &[usize], seed: u64) -> Value {
    let mut rng = Lcg(seed);
    let n = shape.iter().product();
    Value::F32(ArrayD::from_shape_vec(IxDyn(shape), rng.values(n, -2.0, 2.0)).expect("shape"))
}

const BOTH: &[RuntimeKind] = &[RuntimeKind::OrtCpu, RuntimeKind::Tract];
const ORT: &[RuntimeKind] = &[RuntimeKind::OrtCpu];

// ---------------------------------------------------------------------------------------------
// BatchNormalization folded forward
// ---------------------------------------------------------------------------------------------

#[test]
fn batchnorm_folds_into_the_unpadded_conv_after_it() {
    // x -> BN -> Conv 3x3 (no padding, stride 2, dilation 1) -> BN' -> ... the first BN has no
    // producer to fold into, so it folds forward; a second chain BN -> Conv 1x1 without bias and
    // with auto_pad SAME_UPPER (pads nothing) folds too.
    let mut n = Net::new(1);
    let x = n.input("x", &[4, 9, 9]);
    let b = n.batchnorm("bn0", &x, 4);
    let c = n.conv(
        "conv0",
        &b,
        (4, 6, 3),
        true,
        vec![
            attr_ints("strides", &[2, 2]),
            attr_ints("pads", &[0, 0, 0, 0]),
        ],
    );
    let r = n.node("Relu", "relu0", &[&c], vec![]);
    let b1 = n.batchnorm("bn1", &r, 6);
    let c1 = n.conv(
        "conv1",
        &b1,
        (6, 5, 1),
        false,
        vec![attr_str("auto_pad", "SAME_UPPER")],
    );
    n.output(&c1, &[None, Some(5), Some(4), Some(4)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(bn_folds(&report), (0, 2), "{report:?}");
    assert_eq!(
        count(&cleaned, "BatchNormalization"),
        0,
        "{:?}",
        ops(&cleaned)
    );
    assert!(
        cleaned.initializer("bn0.scale").is_none(),
        "the BN parameters are dropped"
    );
    let conv1 = &cleaned.graph().node[2];
    assert_eq!(conv1.input.len(), 3, "conv1 got a bias: {conv1:?}");
    for seed in [1, 2, 3] {
        let x = random_input(&[2, 4, 9, 9], seed);
        assert_same_outputs(&m, &cleaned, &[x], BOTH);
    }
}

#[test]
fn batchnorm_folds_into_the_gemm_after_it() {
    for trans_b in [0, 1] {
        let mut n = Net::new(2 + trans_b as u64);
        let x = n.input("x", &[5]);
        let b = n.batchnorm("bn", &x, 5);
        let w = if trans_b == 1 {
            n.param("fc.w", &[3, 5], -0.5, 0.5)
        } else {
            n.param("fc.w", &[5, 3], -0.5, 0.5)
        };
        let bias = n.param("fc.b", &[1, 3], -0.3, 0.3);
        let y = n.node(
            "Gemm",
            "fc",
            &[&b, &w, &bias],
            vec![attr_int("transB", trans_b)],
        );
        n.output(&y, &[None, Some(3)]);
        let (m, cleaned, report) = n.model_and_cleaned();
        assert_eq!(report.folded_batchnorms_forward, 1, "transB {trans_b}");
        assert_eq!(ops(&cleaned), ["Gemm"]);
        for seed in [4, 5] {
            let x = random_input(&[3, 5], seed);
            assert_same_outputs(&m, &cleaned, &[x], BOTH);
        }
    }
}

#[test]
fn batchnorm_before_a_padded_conv_is_left_alone() {
    for attrs in [
        vec![attr_ints("pads", &[1, 1, 1, 1])],
        vec![attr_str("auto_pad", "SAME_UPPER")],
    ] {
        let mut n = Net::new(6);
        let x = n.input("x", &[3, 6, 6]);
        let b = n.batchnorm("bn", &x, 3);
        let c = n.conv("conv", &b, (3, 4, 3), true, attrs);
        n.output(&c, &[None, Some(4), Some(6), Some(6)]);
        let (m, cleaned, report) = n.model_and_cleaned();
        assert_eq!(bn_folds(&report), (0, 0));
        assert_eq!(ops(&cleaned), ["BatchNormalization", "Conv"]);
        assert_same_outputs(&m, &cleaned, &[random_input(&[1, 3, 6, 6], 7)], ORT);
    }
}

#[test]
fn batchnorm_after_a_conv_still_folds_backwards_first() {
    // Conv -> BN -> Conv (no padding): the BN could go either way; the backward fold wins.
    let mut n = Net::new(8);
    let x = n.input("x", &[3, 7, 7]);
    let c0 = n.conv("conv0", &x, (3, 4, 3), true, vec![]);
    let b = n.batchnorm("bn", &c0, 4);
    let c1 = n.conv("conv1", &b, (4, 2, 3), true, vec![]);
    n.output(&c1, &[None, Some(2), Some(3), Some(3)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(bn_folds(&report), (1, 0));
    assert_eq!(ops(&cleaned), ["Conv", "Conv"]);
    assert_same_outputs(&m, &cleaned, &[random_input(&[2, 3, 7, 7], 9)], BOTH);
}

#[test]
fn batchnorm_read_twice_or_before_a_grouped_conv_is_left_alone() {
    // BN output read by a Conv and a graph output; another BN before a depthwise conv.
    let mut n = Net::new(10);
    let x = n.input("x", &[4, 5, 5]);
    let b = n.batchnorm("bn", &x, 4);
    let c = n.conv("conv", &b, (4, 2, 1), true, vec![]);
    n.output(&c, &[None, Some(2), Some(5), Some(5)]);
    n.output(&b, &[None, Some(4), Some(5), Some(5)]);
    let b2 = n.batchnorm("bn2", &x, 4);
    let w = n.param("dw.w", &[4, 1, 1, 1], -1.0, 1.0);
    let dw = n.node(
        "Conv",
        "dw",
        &[&b2, &w],
        vec![attr_int("group", 4), attr_ints("kernel_shape", &[1, 1])],
    );
    n.output(&dw, &[None, Some(4), Some(5), Some(5)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_batchnorms_forward, 0, "{:?}", ops(&cleaned));
    assert_eq!(count(&cleaned, "BatchNormalization"), 2);
    assert_same_outputs(&m, &cleaned, &[random_input(&[1, 4, 5, 5], 11)], ORT);
}

// ---------------------------------------------------------------------------------------------
// Constant folding
// ---------------------------------------------------------------------------------------------

/// y = Reshape(MatMul(x, Transpose(Mul(W, s))), Concat([-1], [2, 3])), x: [N, 4].
fn constant_subgraph() -> Net {
    let mut n = Net::new(12);
    let x = n.input("x", &[4]);
    let w = n.param("W", &[6, 4], -1.0, 1.0);
    let s = n.param("s", &[1], 0.5, 1.5);
    let ws = n.node("Mul", "scale_w", &[&w, &s], vec![]);
    let wt = n.node("Transpose", "transpose_w", &[&ws], vec![]);
    let mm = n.node("MatMul", "mm", &[&x, &wt], vec![]);
    let a = n.int_param("shape_head", &[1], &[-1]);
    let b = n.int_param("shape_tail", &[2], &[2, 3]);
    let shape = n.node("Concat", "shape", &[&a, &b], vec![attr_int("axis", 0)]);
    let y = n.node("Reshape", "reshape", &[&mm, &shape], vec![]);
    n.output(&y, &[None, Some(2), Some(3)]);
    n
}

#[test]
fn constant_weight_and_reshape_shape_are_folded_exactly() {
    let (m, cleaned, report) = constant_subgraph().model_and_cleaned();
    assert_eq!(report.folded_constants, 3, "{report:?}");
    assert_eq!(report.constant_folding_skipped, None);
    assert_eq!(ops(&cleaned), ["MatMul", "Reshape"]);
    let wt = cleaned
        .initializer("transpose_w_out")
        .expect("folded weight");
    assert_eq!(wt.dims, [4, 6]);
    let shape = cleaned.initializer("shape_out").expect("folded shape");
    assert_eq!(to_i64(shape).unwrap(), [-1, 2, 3]);
    for gone in ["W", "s", "shape_head", "shape_tail"] {
        assert!(cleaned.initializer(gone).is_none(), "{gone} is dropped");
    }
    for seed in [13, 14] {
        assert_same_outputs(&m, &cleaned, &[random_input(&[3, 4], seed)], BOTH);
    }
}

#[test]
fn constants_fold_in_an_ir3_model_too() {
    // Before IR 4 every initializer is also listed as a graph input when saved.
    let bytes = constant_subgraph().proto_with(3, 8).encode_to_vec();
    let m = Model::from_bytes(&bytes, None, "ir3", &Default::default()).unwrap();
    let (cleaned, report) = clean(&m);
    assert_eq!(report.folded_constants, 3, "{report:?}");
    assert_eq!(ops(&cleaned), ["MatMul", "Reshape"]);
    assert_same_outputs(&m, &cleaned, &[random_input(&[2, 4], 23)], ORT);
}

#[test]
fn random_nodes_and_what_they_feed_are_not_folded() {
    let mut n = Net::new(15);
    let x = n.input("x", &[3]);
    let r = n.node(
        "RandomNormal",
        "noise",
        &[],
        vec![attr_ints("shape", &[1, 3]), attr_int("dtype", 1)],
    );
    let k = n.param("k", &[1, 3], 0.5, 1.0);
    let rk = n.node("Mul", "scaled_noise", &[&r, &k], vec![]);
    let y = n.node("Add", "add", &[&x, &rk], vec![]);
    n.output(&y, &[None, Some(3)]);
    let (_, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_constants, 0);
    assert_eq!(report.constant_folding_skipped, None);
    assert_eq!(ops(&cleaned), ["RandomNormal", "Mul", "Add"]);
}

#[test]
fn overridable_initializers_are_not_constants() {
    // An initializer also listed as a graph input can be fed at run time: not a constant. (The
    // loader drops such listings, so the model is built directly.)
    let mut n = Net::new(16);
    let x = n.input("x", &[3]);
    let k = n.param("k", &[3], 0.5, 1.0);
    n.graph.input.push(value_info("k", &[Some(3)]));
    let k2 = n.node("Mul", "double_k", &[&k, &k], vec![]);
    let y = n.node("Add", "add", &[&x, &k2], vec![]);
    n.output(&y, &[None, Some(3)]);
    let mut m = Model {
        proto: n.proto_with(8, 13),
    };
    let report = cleanup::cleanup(&mut m).expect("cleanup");
    assert_eq!(report.folded_constants, 0);
    assert_eq!(ops(&m), ["Mul", "Add"]);
}

#[test]
fn expand_that_would_bloat_the_file_is_not_folded() {
    // E = Expand(0.5, Shape(k) * [1000, 1000]) is 2M floats computed from a few bytes: the shape
    // computation folds, the Expand stays.
    let mut n = Net::new(17);
    let x = n.fixed_input("x", &[2000, 1000]);
    let k = n.param("k", &[2, 1], 0.0, 1.0);
    let sh = n.node("Shape", "shape_k", &[&k], vec![]);
    let m1000 = n.int_param("m1000", &[2], &[1000, 1000]);
    let big = n.node("Mul", "big_shape", &[&sh, &m1000], vec![]);
    let half = n.param("half", &[1], 0.5, 0.5);
    let e = n.node("Expand", "expand", &[&half, &big], vec![]);
    let y = n.node("Add", "add", &[&x, &e], vec![]);
    n.output(&y, &[Some(2000), Some(1000)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_constants, 2, "{report:?}");
    assert_eq!(ops(&cleaned), ["Expand", "Add"]);
    let shape = cleaned.initializer("big_shape_out").expect("folded shape");
    assert_eq!(to_i64(shape).unwrap(), [2000, 1000]);
    assert!(cleaned.initializer("k").is_none());
    assert_same_outputs(&m, &cleaned, &[random_input(&[2000, 1000], 18)], ORT);
}

#[test]
fn constant_of_shape_that_would_bloat_the_file_is_not_folded() {
    // Shape inference does not evaluate Abs, so the size of ConstantOfShape(Abs([2000, 1000]))
    // is only known once ONNX Runtime has computed it: the check after the run declines it.
    let mut n = Net::new(24);
    let x = n.fixed_input("x", &[2000, 1000]);
    let dims = n.int_param("dims", &[2], &[-2000, 1000]);
    let abs = n.node("Abs", "abs_dims", &[&dims], vec![]);
    let zeros = n.node("ConstantOfShape", "zeros", &[&abs], vec![]);
    let y = n.node("Add", "add", &[&x, &zeros], vec![]);
    n.output(&y, &[Some(2000), Some(1000)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_constants, 1, "{report:?}");
    assert_eq!(ops(&cleaned), ["ConstantOfShape", "Add"]);
    let dims = cleaned.initializer("abs_dims_out").expect("folded dims");
    assert_eq!(to_i64(dims).unwrap(), [2000, 1000]);
    assert_same_outputs(&m, &cleaned, &[random_input(&[2000, 1000], 25)], ORT);
}

#[test]
fn tensors_whittle_cannot_carry_are_not_folded_but_their_inputs_are() {
    // Cast(Mul(w, 2), DOUBLE) is read by a double Add: the Mul folds, the Cast to double stays.
    let mut n = Net::new(19);
    let x = n.input("x", &[3]);
    let xd = n.node("Cast", "x_double", &[&x], vec![attr_int("to", 11)]);
    let w = n.param("w", &[3], -1.0, 1.0);
    let two = n.param("two", &[1], 2.0, 2.0);
    let w2 = n.node("Mul", "w2", &[&w, &two], vec![]);
    let wd = n.node("Cast", "w_double", &[&w2], vec![attr_int("to", 11)]);
    let s = n.node("Add", "add", &[&xd, &wd], vec![]);
    let y = n.node("Cast", "back", &[&s], vec![attr_int("to", 1)]);
    n.output(&y, &[None, Some(3)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_constants, 1, "{report:?}");
    assert_eq!(ops(&cleaned), ["Cast", "Cast", "Add", "Cast"]);
    assert!(cleaned.initializer("w2_out").is_some());
    assert_same_outputs(&m, &cleaned, &[random_input(&[2, 3], 20)], ORT);
}

#[test]
fn constants_that_feed_only_graph_outputs_or_nothing() {
    // A constant node producing a graph output is kept; a dead constant node is removed.
    let mut n = Net::new(21);
    let x = n.input("x", &[2]);
    let a = n.param("a", &[2], -1.0, 1.0);
    let neg = n.node("Neg", "neg_a", &[&a], vec![]);
    let _dead = n.node("Abs", "dead", &[&a], vec![]);
    let y = n.node("Add", "add", &[&x, &a], vec![]);
    n.output(&y, &[None, Some(2)]);
    n.output(&neg, &[Some(2)]);
    let (m, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_constants, 1, "{report:?}");
    assert_eq!(ops(&cleaned), ["Neg", "Add"]);
    assert!(cleaned.initializer("a").is_some());
    assert_same_outputs(&m, &cleaned, &[random_input(&[2, 2], 22)], ORT);
}

#[test]
fn constants_onnx_runtime_cannot_evaluate_are_left_with_a_reason() {
    let mut n = Net::new(26);
    let x = n.input("x", &[2]);
    let a = n.param("a", &[2], -1.0, 1.0);
    let b = n.node("NoSuchOp", "mystery", &[&a], vec![]);
    let y = n.node("Add", "add", &[&x, &b], vec![]);
    n.output(&y, &[None, Some(2)]);
    let (_, cleaned, report) = n.model_and_cleaned();
    assert_eq!(report.folded_constants, 0);
    let reason = report.constant_folding_skipped.expect("a reason");
    assert!(reason.contains("could not load"), "{reason}");
    assert_eq!(ops(&cleaned), ["NoSuchOp", "Add"]);
}

// ---------------------------------------------------------------------------------------------
// The shared models
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_models_clean_to_the_same_outputs() {
    for name in CNN_MODELS {
        let Some(p) = asset(&format!("models/{name}.onnx")) else {
            return;
        };
        let m = Model::load(&p).unwrap();
        let (cleaned, report) = clean(&m);
        eprintln!(
            "{name}: {} -> {} nodes, {}",
            m.graph().node.len(),
            cleaned.graph().node.len(),
            counts(&report)
        );
        assert_eq!(report.constant_folding_skipped, None, "{name}");
        let s = load(RuntimeKind::OrtCpu, &m.to_bytes(), &Default::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let inputs = synthetic_inputs(s.inputs(), &[]).unwrap();
        let inputs: Vec<Value> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(a) => random_input(a.shape(), 100 + i as u64),
                other => other,
            })
            .collect();
        assert_same_outputs(&m, &cleaned, &inputs, ORT);
    }
}

/// The report's counts on one line.
fn counts(r: &CleanupReport) -> String {
    format!(
        "batchnorms folded back {} / forward {}, constants folded {}, identities {}, reshapes {}",
        r.folded_batchnorms,
        r.folded_batchnorms_forward,
        r.folded_constants,
        r.removed_identities,
        r.removed_reshapes
    )
}
