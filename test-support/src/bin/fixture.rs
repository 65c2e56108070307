//! Write a fixture model: `fixture text-detector SRC OUT` (SRC: the shared
//! efficientnet_lite0_224.onnx). See `whittle_test_support::fixtures`.

use std::path::Path;

use prost::Message;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, src, out] = args.as_slice() else {
        eprintln!("usage: fixture text-detector SRC OUT");
        std::process::exit(2);
    };
    let m = match kind.as_str() {
        "text-detector" => whittle_test_support::fixtures::text_detector(Path::new(src)),
        other => {
            eprintln!("error: unknown fixture '{other}' (text-detector)");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::write(out, m.encode_to_vec()) {
        eprintln!("error: cannot write {out}: {e}");
        std::process::exit(1);
    }
}
