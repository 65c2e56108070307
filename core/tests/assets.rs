//! The IR on every real model in ../shared/assets/models.

use std::path::PathBuf;

use prost::Message;
use whittle_core::onnx::ModelProto;
use whittle_core::{Model, cost, shape};

fn assets() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/assets"));
    if p.is_dir() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "shared assets missing at {} (CI=true: a missing asset is a failure)",
        p.display()
    );
    eprintln!("skipped: shared assets not found at {}", p.display());
    None
}

fn models() -> Vec<PathBuf> {
    let Some(a) = assets() else { return vec![] };
    let mut v: Vec<PathBuf> = std::fs::read_dir(a.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "onnx") && !p.to_string_lossy().contains("noweights")
        })
        .collect();
    v.sort();
    assert!(v.len() >= 6, "expected the shared models, found {v:?}");
    v
}

/// Element count of every weight in the file as stored: initializers plus Constant-node tensors.
fn raw_weight_elements(path: &PathBuf) -> u64 {
    let m = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    let g = m.graph.unwrap();
    let mut n: u64 = g
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>() as u64)
        .sum();
    for node in &g.node {
        if node.op_type() == "Constant" {
            for a in &node.attribute {
                if let Some(t) = &a.t {
                    n += t.dims.iter().product::<i64>() as u64;
                }
                n += (a.floats.len() + a.ints.len()) as u64;
                n += (a.f.is_some() && a.name() == "value_float") as u64;
                n += (a.i.is_some() && a.name() == "value_int") as u64;
            }
        }
    }
    n
}

#[test]
fn every_model_loads_round_trips_and_counts() {
    for p in models() {
        let m = Model::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let again = Model::from_bytes(&m.to_bytes(), p.parent(), "round trip", &Default::default())
            .unwrap();
        assert_eq!(m, again, "{}: save/load is not a fixpoint", p.display());
        let shapes = shape::infer(&m, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let c = cost::count(&m, &shapes);
        assert_eq!(c.params, raw_weight_elements(&p), "{}", p.display());
        assert!(c.macs > 0, "{}", p.display());
        for o in &m.graph().output {
            assert!(
                shapes.shape(o.name()).is_some(),
                "{}: output {} has no shape",
                p.display(),
                o.name()
            );
        }
        eprintln!(
            "{}: params {} macs {} unknown {:?}",
            p.display(),
            c.params,
            c.macs,
            shapes.unknown_ops
        );
    }
}

/// MiniLM is rebuilt into a cache by ../shared/assets/fetch.sh (`just setup` runs it).
pub fn minilm() -> Option<PathBuf> {
    let cache = std::env::var("WHITTLE_ASSETS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/whittle/assets")
        });
    let p = cache.join("minilm-l6-v2.opset17.onnx");
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "MiniLM missing at {} (run ../shared/assets/fetch.sh; CI=true: a missing asset is a failure)",
        p.display()
    );
    eprintln!("skipped: MiniLM not found at {}", p.display());
    None
}

#[test]
fn minilm_shapes_follow_the_sequence_length() {
    let Some(p) = minilm() else { return };
    let m = Model::load(&p).unwrap();
    assert_eq!(
        cost::count(&m, &shape::infer(&m, &[]).unwrap()).params,
        raw_weight_elements(&p)
    );
    let ov: Vec<(String, Vec<i64>)> = ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|n| (n.to_string(), vec![1, 128]))
        .collect();
    let shapes = shape::infer(&m, &ov).unwrap();
    assert!(shapes.unknown_ops.is_empty(), "{:?}", shapes.unknown_ops);
    let dims = |n: &str| {
        shapes
            .shape(n)
            .map(|s| s.iter().map(|d| d.known()).collect::<Vec<_>>())
    };
    assert_eq!(
        dims("last_hidden_state"),
        Some(vec![Some(1), Some(128), Some(384)])
    );
    assert_eq!(dims("sentence_embedding"), Some(vec![Some(1), Some(384)]));
    let c = cost::count(&m, &shapes);
    // 6 layers x 128 tokens x (4 x 384^2 + 2 x 384 x 1536) + attention 6 x 2 x 128^2 x 384
    let expected = 6 * 128 * (4 * 384 * 384 + 2 * 384 * 1536) + 6 * 2 * 128 * 128 * 384;
    assert_eq!(c.macs, expected as u64);
    // symbolic: every dim of the outputs is known or named
    let sym = shape::infer(&m, &[]).unwrap();
    assert_eq!(sym.shape("last_hidden_state").map(|s| s.len()), Some(3));
}
