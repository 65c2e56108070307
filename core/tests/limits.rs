//! Resource limits on untrusted models (issue 8, point 2): each a clear error, no panic,
//! bounded memory.

use prost::Message;
use whittle_core::onnx::tensor_proto::DataType;
use whittle_core::onnx::{NodeProto, TensorProto};
use whittle_core::{LoadOptions, Model, shape};
use whittle_test_support::{Lcg, graph, model as model_proto, node, value_info};

fn relu(name: &str, x: &str, y: &str) -> NodeProto {
    node(name, "Relu", &[x], &[y])
}

fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, out: &str) -> Vec<u8> {
    let io = |name: &str| vec![value_info(name, &[1, 4])];
    model_proto(graph("g", nodes, io("x"), io(out), inits), &[]).encode_to_vec()
}

/// A float tensor `w` of `dims` whose data is 16 bytes (of zeros), whatever the dims say.
fn w_holding_16_bytes(dims: Vec<i64>) -> TensorProto {
    TensorProto {
        name: Some("w".into()),
        dims,
        data_type: Some(DataType::Float as i32),
        raw_data: Some(vec![0; 16]),
        ..Default::default()
    }
}

fn load(bytes: &[u8]) -> Result<Model, whittle_core::Error> {
    Model::from_bytes(bytes, None, "test model", &LoadOptions::default())
}

#[test]
fn r8_a_10000_node_chain_loads_and_infers_quickly() {
    let n = 10_000;
    let nodes: Vec<NodeProto> = (0..n)
        .map(|i| {
            relu(
                &format!("r{i}"),
                &if i == 0 {
                    "x".to_string()
                } else {
                    format!("t{}", i - 1)
                },
                &format!("t{i}"),
            )
        })
        .collect();
    let bytes = model(nodes.clone(), vec![], &format!("t{}", n - 1));
    let t = std::time::Instant::now();
    let m = load(&bytes).unwrap();
    let s = shape::infer(&m, &[]).unwrap();
    assert_eq!(s.shape(&format!("t{}", n - 1)).map(|d| d.len()), Some(2));
    // the same chain stored backwards is sorted, not refused, and not quadratic
    let mut rev = nodes;
    rev.reverse();
    let m2 = load(&model(rev, vec![], &format!("t{}", n - 1))).unwrap();
    assert_eq!(m2.graph().node[0].name(), "r0");
    assert!(t.elapsed().as_secs_f64() < 20.0, "took {:?}", t.elapsed());
}

#[test]
fn r8_a_cycle_is_an_error_naming_a_node() {
    let nodes = vec![
        relu("a", "x", "p"),
        NodeProto {
            input: vec!["p".into(), "q".into()],
            ..relu("b", "p", "q")
        },
    ];
    let mut nodes = nodes;
    nodes[0].input.push("q".into());
    let e = load(&model(nodes, vec![], "q")).unwrap_err().to_string();
    assert!(e.contains("cycle"), "{e}");
}

#[test]
fn r8_an_input_nothing_produces_is_an_error() {
    let e = load(&model(vec![relu("a", "ghost", "y")], vec![], "y"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'ghost'") && e.contains("nothing produces"),
        "{e}"
    );
}

#[test]
fn r8_dims_that_overflow_are_an_error() {
    let t = w_holding_16_bytes(vec![i64::MAX / 2, 4, 4]);
    let e = load(&model(vec![relu("a", "x", "y")], vec![t], "y"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflow"), "{e}");
}

#[test]
fn r8_a_tensor_larger_than_its_data_or_the_cap_is_an_error() {
    // declares 1M floats, holds 16 bytes: refused before anything is allocated for it
    let t = w_holding_16_bytes(vec![1024, 1024]);
    let e = load(&model(vec![relu("a", "x", "y")], vec![t.clone()], "y"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("'w'") && e.contains("4194304 bytes"), "{e}");
    // a configurable cap
    let small = LoadOptions {
        max_tensor_bytes: 1024,
    };
    let e = Model::from_bytes(
        &model(vec![relu("a", "x", "y")], vec![t], "y"),
        None,
        "m",
        &small,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("over the limit of 1024 bytes"), "{e}");
}

#[test]
fn r8_truncated_and_random_bytes_are_errors() {
    let bytes = model(vec![relu("a", "x", "y")], vec![], "y");
    for cut in [1, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        assert!(load(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut rng = Lcg(0x9e3779b97f4a7c15);
    for _ in 0..200 {
        let _ = load(&rng.bytes(256)); // must not panic
    }
}
