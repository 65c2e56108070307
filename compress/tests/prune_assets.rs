//! Channel pruning on the real models in ../shared/assets/models.

use whittle_compress::{cleanup, groups, prune};
use whittle_core::Model;
use whittle_test_support::{CNN_MODELS, asset};

#[test]
fn every_conv_model_prunes_to_70_percent_macs() {
    for name in CNN_MODELS {
        let Some(p) = asset(&format!("models/{name}.onnx")) else {
            return;
        };
        let mut m = Model::load(&p).unwrap();
        cleanup::cleanup(&mut m).unwrap();
        let gs = groups::analyse(&m).unwrap();
        for g in &gs.groups {
            eprintln!(
                "{name} group {} size {} producers {:?} tensors {} frozen {:?}",
                g.id,
                g.size,
                g.producers(),
                g.tensors.len(),
                g.frozen
            );
        }
        let scores = prune::weight_scores(&m, &gs, prune::Importance::L2).unwrap();
        let opts = prune::PruneOptions {
            budget: prune::Budget::Macs(0.7),
            ..Default::default()
        };
        let plan =
            prune::plan(&m, &gs, &scores, None, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut pruned = m.clone();
        let changes =
            prune::apply(&mut pruned, &gs, &plan).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c =
            whittle_core::cost::count(&pruned, &whittle_core::shape::infer(&pruned, &[]).unwrap());
        eprintln!(
            "{name}: predicted macs {:?} measured {} changes {}",
            plan.macs,
            c.macs,
            changes.len()
        );
        assert_eq!(
            c.macs, plan.macs.1,
            "{name}: the cost model must predict the pruned MACs"
        );
        assert!(c.macs as f64 <= 0.7 * plan.macs.0 as f64 + 1.0, "{name}");
    }
}
