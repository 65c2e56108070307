//! Fixtures derived from the shared CNNs that look like the files users export (issue 17): no
//! one tuned whittle on them, and they exercise what the shared classifiers do not.
//!
//! - [`text_detector`]: EfficientNet-Lite0's backbone with height and width declared as -1 (as
//!   paddle2onnx writes them) and a DBNet-like neck and head: the stride-32 map reduced by a 1x1
//!   conv, upsampled by a `Resize` and concatenated with the reduced stride-16 map, then a 3x3
//!   conv and a `Sigmoid` giving a one-channel probability map at stride 16. The neck's and
//!   head's weights are seeded draws: the map is a fixture, not a detector of anything.
//!
//! `cargo run -p whittle-test-support --bin fixture -- text-detector SRC OUT` writes one (the
//! bench builds its 640x640 detector row from it).

use std::path::Path;

use prost::Message;
use whittle_core::onnx::tensor_shape_proto::dimension::Value as D;
use whittle_core::onnx::{ModelProto, type_proto};

use crate::onnx::{attr_int, attr_ints, attr_str, node, tensor_f32, value_info};
use crate::rng::Lcg;

/// EfficientNet-Lite0's stride-16 map (112 channels) and its last map (1280 channels, stride 32).
const STRIDE16: (&str, i64) = ("/_blocks.10/Add_output_0", 112);
const STRIDE32: (&str, i64) = ("/Clip_1_output_0", 1280);

/// The text-detector fixture from `efficientnet_lite0_224.onnx` at `src` (see the module doc).
pub fn text_detector(src: &Path) -> ModelProto {
    let mut m = ModelProto::decode(std::fs::read(src).expect("read model").as_slice())
        .expect("decode model");
    let g = m.graph.as_mut().expect("graph");
    // the classifier head goes: everything after the last map
    let head = g
        .node
        .iter()
        .position(|n| n.input.iter().any(|i| i == STRIDE32.0))
        .expect("the last map's consumer");
    let removed: Vec<String> = g.node[head..]
        .iter()
        .flat_map(|n| n.input.clone())
        .collect();
    g.node.truncate(head);
    g.initializer
        .retain(|t| !removed.contains(&t.name().to_string()));
    g.output.clear();
    g.value_info.clear();
    let input = g.input.first_mut().expect("an input");
    if let Some(type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        let dims = &mut t.shape.as_mut().expect("a declared shape").dim;
        dims[2].value = Some(D::DimValue(-1));
        dims[3].value = Some(D::DimValue(-1));
    }
    let mut rng = Lcg::seeded(17, 0);
    let mut conv = |name: &str, cin: i64, cout: i64, k: i64| {
        let scale = 1.0 / ((cin * k * k) as f32).sqrt();
        let w: Vec<f32> = (0..cout * cin * k * k)
            .map(|_| rng.symmetric(scale * 1.7))
            .collect();
        let b: Vec<f32> = (0..cout).map(|_| rng.symmetric(0.1)).collect();
        (
            tensor_f32(&format!("{name}.weight"), &[cout, cin, k, k], &w),
            tensor_f32(&format!("{name}.bias"), &[cout], &b),
        )
    };
    let width = 64;
    let (w5, b5) = conv("neck.lat5", STRIDE32.1, width, 1);
    let (w4, b4) = conv("neck.lat4", STRIDE16.1, width, 1);
    let (wh, bh) = conv("head.prob", 2 * width, 1, 3);
    let scales = tensor_f32("neck.up5.scales", &[4], &[1.0, 1.0, 2.0, 2.0]);
    let mut nodes = vec![
        node(
            "neck/lat5",
            "Conv",
            &[STRIDE32.0, "neck.lat5.weight", "neck.lat5.bias"],
            &["neck/lat5_out"],
        ),
        node(
            "neck/up5",
            "Resize",
            &["neck/lat5_out", "", "neck.up5.scales"],
            &["neck/up5_out"],
        ),
        node(
            "neck/lat4",
            "Conv",
            &[STRIDE16.0, "neck.lat4.weight", "neck.lat4.bias"],
            &["neck/lat4_out"],
        ),
        node(
            "neck/cat",
            "Concat",
            &["neck/up5_out", "neck/lat4_out"],
            &["neck/cat_out"],
        ),
        node("neck/relu", "Relu", &["neck/cat_out"], &["neck/relu_out"]),
        node(
            "head/conv",
            "Conv",
            &["neck/relu_out", "head.prob.weight", "head.prob.bias"],
            &["head/conv_out"],
        ),
        node("head/sigmoid", "Sigmoid", &["head/conv_out"], &["prob"]),
    ];
    nodes[1].attribute.push(attr_str("mode", "nearest"));
    nodes[3].attribute.push(attr_int("axis", 1));
    nodes[5].attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    g.node.extend(nodes);
    g.initializer.extend([w5, b5, w4, b4, wh, bh, scales]);
    g.output.push(value_info("prob", &["N", "1", "-1", "-1"]));
    g.name = Some("text_detector_fixture".into());
    m
}
