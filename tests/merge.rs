//! `whittle compress --merge` end to end: the budget is a latency fraction, a budget no plan
//! reaches names the best reachable latency, a graph with nothing to merge says so, and nothing
//! is written in either case; a reachable budget on the VWW MobileNetV1 writes a model that runs.

mod common;

use common::*;

#[test]
fn merge_refusals_name_the_cause_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let r8 = resnet8();
    let calib = repo_root().join("data/cifar10");
    let base = |extra: &[&str]| {
        let mut v = vec![
            "compress".to_string(),
            s(&r8),
            "-o".into(),
            s(&out),
            "--merge".into(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        run(&v)
    };
    base(&["--target", "latency=0.9"]).error(&["--calib"]);
    base(&["--calib", &s(&calib), "--target", "macs=0.8"])
        .error(&["--merge takes --target latency="]);
    // ResNet-8's 3x3 + 3x3 merges make bigger, slower 5x5 convs: no plan saves anything
    base(&[
        "--calib",
        &s(&calib),
        "--profile",
        "resnet8",
        "--target",
        "latency=0.9",
    ])
    .error(&["unreachable by merging", "best reachable is latency="]);
    base(&["--low-rank", "--target", "latency=0.9"]).error(&["need a recipe"]);
    if let Some(m) = asset("models/mnist-8.onnx") {
        run(&[
            "compress",
            &s(&m),
            "-o",
            &s(&out),
            "--calib",
            &s(&asset("data/mnist/test").unwrap()),
            "--profile",
            "mnist",
            "--merge",
            "--target",
            "latency=0.9",
        ])
        .error(&["nothing to merge"]);
    }
    assert!(listing(dir.path()).is_empty(), "nothing written");
}
