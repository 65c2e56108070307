//! The IR on every real model in ../shared/assets/models.

use std::path::PathBuf;

use whittle_core::{Model, cost, shape};
use whittle_test_support::{minilm, shared_models, weight_elements};

fn models() -> Vec<PathBuf> {
    let Some(v) = shared_models() else {
        return vec![];
    };
    assert!(v.len() >= 6, "expected the shared models, found {v:?}");
    v
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
        assert_eq!(c.params, weight_elements(&p), "{}", p.display());
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

#[test]
fn minilm_shapes_follow_the_sequence_length() {
    let Some(p) = minilm() else { return };
    let m = Model::load(&p).unwrap();
    assert_eq!(
        cost::count(&m, &shape::infer(&m, &[]).unwrap()).params,
        weight_elements(&p)
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
