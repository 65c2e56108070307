//! Bad input through the binary: every case ends with exit code 2 and one `error: ...` line on
//! stderr that names the cause, never a panic, and writes nothing.

use std::path::{Path, PathBuf};

use crate::common::*;
use prost::Message;
use whittle_core::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, attribute_proto,
};

/// Run in `dir` and assert the listing of `dir` did not change.
fn run_writes_nothing(dir: &Path, args: &[String]) -> Run {
    let before = listing(dir);
    let r = run_in(Some(dir), args);
    assert_eq!(
        listing(dir),
        before,
        "the command wrote files\n{}",
        r.dump()
    );
    r
}

/// A graph `name` of `nodes` (and `weights`) from the input `x` [1,4] to the output `y` [1,4].
fn x_to_y(name: &str, nodes: Vec<NodeProto>, weights: Vec<TensorProto>) -> GraphProto {
    let (x, y) = (value_info("x", &["1", "4"]), value_info("y", &["1", "4"]));
    graph(name, nodes, vec![x], vec![y], weights)
}

/// A temp folder holding `<name>.onnx`: [`x_to_y`] of `nodes`, no weights.
fn folder_with_graph(name: &str, nodes: Vec<NodeProto>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let g = x_to_y(name, nodes, vec![]);
    write_model(&dir.path().join(format!("{name}.onnx")), &model(g, &[]));
    dir
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

/// The error's cause (an OS message) appears once, not repeated by each layer of the chain.
fn cause_stated_once(r: &Run, cause: &str) {
    assert_eq!(
        r.stderr.matches(cause).count(),
        1,
        "the cause {cause:?} is repeated in the error line\n{}",
        r.dump()
    );
}

#[test]
fn truncated_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(resnet8()).unwrap();
    let half = dir.path().join("half.onnx");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    for cmd in [
        args(&["inspect", "half.onnx"]),
        args(&["inspect", "--json", "half.onnx"]),
        args(&["bench", "half.onnx", "--iters", "1", "--warmup", "0"]),
        args(&["convert", "half.onnx", "-o", "out.onnx"]),
    ] {
        let r = run_writes_nothing(dir.path(), &cmd);
        r.error(&["half.onnx", "not a valid ONNX model", "truncated"]);
    }
}

#[test]
fn random_bytes_and_empty_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("noise.onnx"), noise(4096, 7)).unwrap();
    std::fs::write(dir.path().join("empty.onnx"), b"").unwrap();
    let r = run_writes_nothing(dir.path(), &args(&["inspect", "noise.onnx"]));
    r.error(&["noise.onnx", "not a valid ONNX model"]);
    let r = run_writes_nothing(dir.path(), &args(&["inspect", "empty.onnx"]));
    r.error(&["empty.onnx", "empty"]);
}

#[test]
fn missing_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        args(&["inspect", "nope.onnx"]),
        args(&["bench", "nope.onnx", "--iters", "1"]),
        args(&["convert", "nope.onnx", "-o", "out.onnx"]),
    ] {
        let r = run_writes_nothing(dir.path(), &cmd);
        r.error(&["nope.onnx", "no such file"]);
    }
}

#[test]
fn missing_model_file_error_states_the_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_writes_nothing(dir.path(), &args(&["inspect", "nope.onnx"]));
    r.error(&["nope.onnx"]);
    cause_stated_once(&r, "No such file or directory");
}

// ---- ops whittle does not know --------------------------------------------------------------

fn fancy_op_model(path: &Path) {
    let mut fancy = node("fancy", "FancyOp", &["a"], &["b"]);
    fancy.domain = Some("com.example".into());
    fancy.attribute.push(AttributeProto {
        name: Some("flavour".into()),
        s: Some(b"vanilla".to_vec()),
        r#type: Some(attribute_proto::AttributeType::String as i32),
        ..Default::default()
    });
    let g = x_to_y(
        "fancy",
        vec![
            node("relu_in", "Relu", &["x"], &["a"]),
            fancy,
            node("relu_out", "Relu", &["b"], &["y"]),
        ],
        vec![],
    );
    write_model(path, &model(g, &[("com.example", 1)]));
}

#[test]
fn unknown_op_is_listed_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("fancy.onnx");
    fancy_op_model(&m);
    let r = run(&["inspect", "--json", &s(&m)]).ok();
    let v = r.json();
    let unknown = list(&v["unknown_ops"], |x| x.as_str());
    assert_eq!(unknown, vec!["com.example:FancyOp"], "{}", r.dump());
    assert_eq!(v["ops"]["com.example:FancyOp"].as_u64(), Some(1));
    assert_eq!(v["ops"]["Relu"].as_u64(), Some(2));
    assert_eq!(v["nodes"].as_u64(), Some(3));

    let t = run(&["inspect", &s(&m)]).ok();
    assert!(
        t.stdout.contains("unknown ops") && t.stdout.contains("FancyOp"),
        "{}",
        t.dump()
    );

    // convert keeps the op, its domain, its attribute and the opset import.
    let out = dir.path().join("out.onnx");
    run(&["convert", &s(&m), "-o", &s(&out)]).ok();
    let p = ModelProto::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    let g = p.graph.as_ref().unwrap();
    let f = g
        .node
        .iter()
        .find(|n| n.op_type() == "FancyOp")
        .expect("FancyOp survives convert");
    assert_eq!(f.domain(), "com.example");
    assert_eq!(f.attribute[0].s.as_deref(), Some(&b"vanilla"[..]));
    assert!(
        p.opset_import
            .iter()
            .any(|o| o.domain() == "com.example" && o.version() == 1)
    );
}

// ---- external data that leaves the model's folder -------------------------------------------

/// `root/model/m.onnx` with initializer `W` [4] stored externally at `location`, and a real
/// 16-byte file at `root/escape.bin` (outside the model's folder) and `root/model/inside.bin`.
fn external_model(root: &Path, location: &str) -> PathBuf {
    let md = root.join("model");
    std::fs::create_dir_all(&md).unwrap();
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(root.join("escape.bin"), &data).unwrap();
    std::fs::write(md.join("inside.bin"), &data).unwrap();
    let g = x_to_y(
        "ext",
        vec![node("add", "Add", &["x", "W"], &["y"])],
        vec![tensor_external("W", &[4], location, 16)],
    );
    let p = md.join("m.onnx");
    write_model(&p, &model(g, &[]));
    p
}

#[test]
fn external_data_inside_the_folder_loads() {
    // The control: the same fixture with a location inside the folder is fine.
    let dir = tempfile::tempdir().unwrap();
    let m = external_model(dir.path(), "inside.bin");
    let r = run(&["inspect", "--json", &s(&m)]).ok();
    assert_eq!(r.json()["params"].as_u64(), Some(4), "{}", r.dump());
}

#[test]
fn external_data_with_parent_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = external_model(dir.path(), "../escape.bin");
    let r = run_writes_nothing(dir.path(), &args(&["inspect", &s(&m)]));
    r.error(&["'W'", "../escape.bin", "model's folder"]);
    let r = run_writes_nothing(
        dir.path(),
        &args(&["convert", &s(&m), "-o", &s(&dir.path().join("out.onnx"))]),
    );
    r.error(&["'W'", "../escape.bin"]);
}

#[test]
fn external_data_with_absolute_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let abs = dir.path().join("escape.bin");
    let m = external_model(dir.path(), &s(&abs));
    let r = run_writes_nothing(dir.path(), &args(&["inspect", &s(&m)]));
    r.error(&["'W'", &s(&abs), "absolute"]);
}

#[cfg(unix)]
#[test]
fn external_data_through_a_symlink_out_of_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = external_model(dir.path(), "link.bin");
    std::os::unix::fs::symlink(
        dir.path().join("escape.bin"),
        dir.path().join("model/link.bin"),
    )
    .unwrap();
    let r = run_writes_nothing(dir.path(), &args(&["inspect", &s(&m)]));
    r.error(&["'W'", "link.bin", "outside", "symlink"]);
    // A symlinked folder is the same escape.
    let dir2 = tempfile::tempdir().unwrap();
    let m2 = external_model(dir2.path(), "sub/escape.bin");
    std::os::unix::fs::symlink(dir2.path(), dir2.path().join("model/sub")).unwrap();
    let r = run_writes_nothing(dir2.path(), &args(&["inspect", &s(&m2)]));
    r.error(&["'W'", "sub/escape.bin", "outside"]);
}

// ---- inputs that do not fit the model -------------------------------------------------------

#[test]
fn bench_wrong_input_shape_names_the_expected_shape() {
    let (dir, _m) = with_resnet8();
    for rt in ["ort-cpu", "tract"] {
        let r = run_writes_nothing(
            dir.path(),
            &args(&[
                "bench",
                "m.onnx",
                "--runtime",
                rt,
                "--input",
                "input=1x3x64x64",
                "--iters",
                "1",
                "--warmup",
                "0",
            ]),
        );
        r.error(&["'input'", "[1,3,64,64]", "[N,3,32,32]"]);
    }
    let r = run_writes_nothing(
        dir.path(),
        &args(&["bench", "m.onnx", "--input", "nosuch=1x3x32x32"]),
    );
    r.error(&["nosuch", "no such input"]);
}

#[test]
fn verify_wrong_dtype_names_the_dtypes() {
    let (dir, _m) = with_resnet8();
    let a = ndarray::Array4::<i64>::zeros((4, 3, 32, 32));
    ndarray_npy::write_npy(dir.path().join("ids.npy"), &a).unwrap();
    let r = run_writes_nothing(
        dir.path(),
        &args(&["verify", "m.onnx", "m.onnx", "--data", "ids.npy"]),
    );
    r.error(&["ids.npy", "int64", "float"]);
}

#[test]
fn verify_undecodable_image_names_the_file() {
    let (dir, _m) = with_resnet8();
    let cls = dir.path().join("imgs/cat");
    std::fs::create_dir_all(&cls).unwrap();
    std::fs::write(cls.join("broken.png"), noise(600, 3)).unwrap();
    let r = run_writes_nothing(
        dir.path(),
        &args(&[
            "verify",
            "m.onnx",
            "m.onnx",
            "--data",
            "imgs",
            "--profile",
            "resnet8",
        ]),
    );
    r.error(&["broken.png", "decode"]);
}

// ---- convert never overwrites its input, and fails cleanly ----------------------------------

#[test]
fn convert_onto_its_input_is_refused() {
    let (dir, m) = with_resnet8();
    let original = std::fs::read(&m).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&m, dir.path().join("alias.onnx")).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mut outs = vec!["m.onnx", "./m.onnx", "sub/../m.onnx"];
    if cfg!(unix) {
        outs.push("alias.onnx");
    }
    for out in outs {
        for ext in [false, true] {
            let mut a = args(&["convert", "m.onnx", "-o", out]);
            if ext {
                a.push("--external-data".into());
            }
            let r = run_writes_nothing(dir.path(), &a);
            r.error(&[out, "input"]);
            assert_eq!(std::fs::read(&m).unwrap(), original, "input changed");
        }
    }
}

#[test]
fn convert_never_overwrites_its_input_with_the_side_file() {
    // With --external-data the weights go to `<output>.data`; when that is the input file, the
    // input is overwritten just the same.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("m.onnx.data");
    std::fs::copy(resnet8(), &input).unwrap();
    let original = std::fs::read(&input).unwrap();
    let r = run_in(
        Some(dir.path()),
        &args(&["convert", "m.onnx.data", "-o", "m.onnx", "--external-data"]),
    );
    assert!(
        std::fs::read(&input).unwrap() == original,
        "the input model was overwritten by the side file\n{}",
        r.dump()
    );
    r.error(&["m.onnx.data", "input"]);
    assert_eq!(listing(dir.path()), vec!["m.onnx.data".to_string()]);
}

#[test]
fn convert_into_a_missing_folder_leaves_nothing() {
    let (dir, _m) = with_resnet8();
    for ext in [false, true] {
        let mut a = args(&["convert", "m.onnx", "-o", "no/such/dir/out.onnx"]);
        if ext {
            a.push("--external-data".into());
        }
        let r = run_writes_nothing(dir.path(), &a);
        r.error(&["no/such/dir/out.onnx", "cannot write"]);
        assert!(!dir.path().join("no").exists());
    }
}

#[test]
fn convert_into_a_missing_folder_states_the_cause_once() {
    let (dir, _m) = with_resnet8();
    let r = run_writes_nothing(
        dir.path(),
        &args(&["convert", "m.onnx", "-o", "no/out.onnx"]),
    );
    r.error(&["no/out.onnx"]);
    cause_stated_once(&r, "No such file or directory");
}

// ---- graphs that are not DAGs ----------------------------------------------------------------

#[test]
fn graph_with_a_cycle_names_a_node_on_it() {
    let dir = folder_with_graph(
        "cycle",
        vec![
            node("loop_a", "Add", &["x", "t2"], &["t1"]),
            node("loop_b", "Relu", &["t1"], &["t2"]),
            node("tail", "Relu", &["t2"], &["y"]),
        ],
    );
    for cmd in [
        args(&["inspect", "cycle.onnx"]),
        args(&["convert", "cycle.onnx", "-o", "out.onnx"]),
    ] {
        let r = run_writes_nothing(dir.path(), &cmd);
        let line = r.error(&["cycle"]);
        assert!(
            line.contains("'loop_a'") || line.contains("'loop_b'"),
            "the error should name a node on the cycle\n{}",
            r.dump()
        );
    }
}

#[test]
fn node_reading_a_tensor_nothing_produces_is_named() {
    let dir = folder_with_graph(
        "dangling",
        vec![
            node("first", "Relu", &["x"], &["a"]),
            node("reader", "Add", &["a", "ghost"], &["y"]),
        ],
    );
    let r = run_writes_nothing(dir.path(), &args(&["inspect", "dangling.onnx"]));
    r.error(&["'reader'", "'ghost'", "nothing produces"]);
}
