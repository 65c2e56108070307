//! Channel pruning on the real models in ../shared/assets/models.

use std::path::PathBuf;

use whittle_compress::{cleanup, groups, prune};
use whittle_core::Model;

fn asset(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/assets")).join(rel);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "missing asset {} (CI=true)",
        p.display()
    );
    eprintln!("skipped: {} not found", p.display());
    None
}

#[test]
fn every_conv_model_prunes_to_70_percent_macs() {
    for name in [
        "resnet8_cifar10",
        "resnet_large_cifar10",
        "mobilenetv1_025_vww96",
        "dscnn_kws",
        "efficientnet_lite0_224",
        "mnist-8",
    ] {
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
