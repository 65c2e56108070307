#!/usr/bin/env python3
"""whittle's INT8 quantization beside ONNX Runtime's and onnxsim 0.8.1's: same models, calibration
items and evaluation images.

Rows per model, each measured against the fp32 original:

  fp32        the original model (the reference; speedup 1 by definition)
  ort         `onnxruntime.quantization.quantize_static`, QDQ format, per_channel=True, activations
              QUInt8, weights QInt8, calibrate_method MinMax, Percentile or Entropy (three rows),
              after `onnxruntime.quantization.shape_inference.quant_pre_process` (shape inference
              and ONNX Runtime's graph optimisation, which folds BatchNormalization); where
              pre-processing fails the original is quantized as it is and the rows say so. ONNX
              Runtime's Entropy defaults (128 histogram bins, 128 quantized bins) leave its KL search
              one candidate, the full range, so Entropy reproduces MinMax; the defaults are kept
  onnxsim     `onnxsim.full_qdq.quantize_full_qdq` on the `onnxsim.simplify`d model: uint8
              activations, per-channel int8 weights, `remove_qdq_after=("Relu", "Clip")` with
              `fold_activation=True` (a Relu / ReLU6 Clip folded into its producer's output
              quantization: the best setting PEERS.md found), calibration method minmax and
              percentile (two rows)
  onnxsim     `onnxsim.quark_compat` (the Quark-API shim): preset INT8_CNN_DEFAULT with
  quark       `extra_options["PerChannel"] = True` and `BiasCorrectionConfig()`, on the original
  whittle     `whittle compress MODEL --calib CALIB --profile P --calib-items 128 --quantize int8`
              (per-channel int8 weights, uint8 activations; its calibrator chosen among minmax,
              percentile, mse and entropy on held-out calibration items; GPTQ rounding; bias
              correction; mixed precision by measurement: up to 3 of the activations whose
              quantization costs most stay float, as many as leave the model no slower than all
              int8 on ort-cpu at --threads), and once more with `--keep-float 0` (all int8)
  whittle     prune + int8 (composition): `whittle compress MODEL --calib CALIB --profile P
  prune+int8  --calib-items 128 --recipe R`, R a recipe of two steps, `prune_channels` with
              `target = "macs=F"` (least-squares reconstruction on) then `quantize` with
              `precision = "int8"`; one row per F in --compose (default 0.8 and 0.7; --quick 0.8)
  whittle     with --auto FLOOR: `whittle auto MODEL --calib CALIB --profile P --calib-items 128
  auto        --min-agreement FLOOR --threads 1`, its choice (the row says which candidate)

Calibration: whittle compress's own 128 items (`Dataset::split(128 / n, seed 0)`), preprocessed in
numpy as whittle's built-in profile does, for every peer, in batches of 16 (bench/peers/peers_bench.py's
`calibration_arrays`, and its `check_preprocessing` against whittle's own input tensors before any
row). whittle reads the same items from the image folder itself.

Per row:
  agreement, accuracy   `whittle verify ORIGINAL QUANT --data EVAL --profile P --json`: top-1
                        agreement with fp32, top-1 accuracy against the labels
  output MSE            mean over the evaluation items and output elements of (quant - fp32)^2, both
                        run in ONNX Runtime (Python, default optimisation, in a worker process) on the
                        evaluation images preprocessed in numpy (resnet8's and the VWW MobileNet's
                        outputs are a Softmax, so there it is probabilities; the others' are logits)
  ort-cpu speedup       `whittle bench --runtime ort-cpu --threads N --json` p50, fp32 / quantized,
                        for N = 1 and 2: every distinct model (ops, attributes, tensor shapes; rows
                        that share one say so) and fp32 run once per round per thread count, the order
                        rotating from round to round; the speedup is the median over --rounds rounds
                        of the per-round ratio, [min-max] its spread over rounds
  vs whittle int8       prune + int8 rows only: the plain whittle int8 row's p50 / this row's, per
                        round from the same rounds, median [min-max]; a line under the table says
                        whether a row reaches the goal: >= 1.15x the speed of int8 alone at >= 95 %
                        top-1 agreement with fp32, at 1 or 2 threads
  tool s                whittle: the `seconds` of `whittle compress --json`; ort: pre-processing +
                        quantize_static; onnxsim: simplify + quantize_full_qdq, or quantize_model;
                        time inside the tool's calls only (loading and saving excluded for the peers)

Models and data (../shared/assets beside the repo; --models picks, all by default, --quick resnet8 only):
  resnet8_cifar10         profile resnet8; calibrates on cifar10/test-b, evaluated on test-a
                          (bench/prune_bench.py's spec)
  efficientnet_lite0_224  profile efficientnet; imagenet/ split by alternating sorted class folders
                          (even calibrate, odd evaluate; prune_bench's spec)
  resnet_large_cifar10    ResNet-56, profile resnet-large; cifar10/test-b calibrates, test-a
                          evaluates (bench/lowrank_bench.py's spec, as tests/low_rank.rs)
  mobilenetv1_025_vww96   the VWW MobileNetV1 0.25, profile vww (resize to 96x96, raw 0..255); VWW's
                          own images are not in the assets, so imagenet/ split as for efficientnet
                          (bench/merge_bench.py's spec): agreement is the measure, accuracy is n/a
                          (the labels are ImageNet classes, not person / no person)
  dscnn_kws               no rows: the assets hold no KWS inputs (data/kws is missing, and there is no
                          kws profile; whittle would take .npy tensors, but there are no real ones),
                          so its one row is "failed: <that reason>"
Every peer step runs in its own process (this file with `worker` as first argument), so a crash, an
exception or a model ONNX Runtime or whittle refuses is a row saying "failed: <reason>".

Writes reports/peers-quant/<UTC time>/ (table.md, results.json). The whittle binary is copied into
the work folder first. Exit status: 0 when the bench ran (whatever it found), 1 when a whittle row's
(prune + int8 rows included) compress, verify or bench failed or the preprocessing check did not
pass, 2 when the binary, models or data are missing (DS-CNN's missing inputs are its row, not a 2).

    python bench/peers/quant_bench.py [--quick] [--json] [--models M,..] [--compose F,..|none] [--whittle PATH]
                                      [--reports DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402  (bench/benchlib.py: running whittle, work folders)
import lowrank_bench  # noqa: E402  (ResNet-56's spec)
import merge_bench  # noqa: E402  (the VWW MobileNet's spec)
import peers_bench as peers  # noqa: E402  (calibration items, preprocessing and its check)
import prune_bench as pb  # noqa: E402  (models, data, measuring defaults)
from benchlib import RUN_TIMEOUT_S, RunError, first_line, fmt, run_json  # noqa: E402

PINNED = ("onnxsim", "onnx", "onnxruntime", "numpy", "pillow")
CALIB_BATCH = 16
EVAL_BATCH = 32
THREADS = (1, 2)  # ort-cpu intra-op threads the latency is measured at
WORKER_TIMEOUT_S = 1800
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
FULL_QDQ_METHODS = ("minmax", "percentile")
COMPOSE_BUDGETS = (0.8, 0.7)  # MACs kept by the channel pruning of the "prune + int8" rows
QUICK_COMPOSE_BUDGETS = (0.8,)
GOAL_VS_INT8, GOAL_AGREEMENT = 1.15, 0.95  # a prune + int8 point this much faster than int8 alone, at least this agreement
SOFTMAX_OUTPUT = ("resnet8_cifar10", "mobilenetv1_025_vww96")  # their MSE is of probabilities


def default_whittle() -> Path:
    return benchlib.default_whittle(Path.home() / ".cache" / "whittle" / "target")


def model_specs() -> list[dict]:
    """prune_bench's two models, then ResNet-56 (lowrank_bench's spec), the VWW MobileNet
    (merge_bench's) and DS-CNN, whose inputs the assets lack (its one row says so)."""
    def spec(specs: list[dict], name: str) -> dict:
        return next(s for s in specs if s["name"] == name)
    return [
        *pb.model_specs(),
        # ~2.3 ms a call in ONNX Runtime at 1 thread: twice the timed runs
        {**spec(lowrank_bench.model_specs(), "resnet_large_cifar10"), "iters_scale": 2},
        # ImageNet photos resized to 96x96: their labels are ImageNet classes, not person / no person
        {**spec(merge_bench.model_specs(), "mobilenetv1_025_vww96"), "calib": None, "eval": None,
         "labels": False},
        {"name": "dscnn_kws", "path": benchlib.ASSETS / "models" / "dscnn_kws.onnx", "profile": None,
         "calib": None, "eval": None, "split": None, "iters_scale": 10,
         "unavailable": "no KWS inputs in the shared assets (data/kws is missing: the MLTK package ships neither "
                        "the audio nor its spectrogram front end, and whittle has no kws profile); whittle could "
                        "take [N,1,50,10] tensors as .npy (--calib, verify --data), but there are no real ones "
                        "to calibrate or evaluate on"},
    ]


# ---------------------------------------------------------------- worker: one peer step in its own process

def _input_name(model) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _batches(npy: Path, name: str) -> list[dict]:
    x = np.load(npy)
    return [{name: np.ascontiguousarray(x[i:i + CALIB_BATCH])} for i in range(0, len(x), CALIB_BATCH)]


def worker_ort_pre(a) -> dict:
    from onnxruntime.quantization.shape_inference import quant_pre_process
    t0 = time.monotonic()
    quant_pre_process(str(a.model), str(a.out))
    return {"seconds": round(time.monotonic() - t0, 3)}


def worker_ort(a) -> dict:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    reader = Reader(_batches(a.calib, _input_name(onnx.load(str(a.model)))))
    t0 = time.monotonic()
    quantize_static(str(a.model), str(a.out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, a.method))
    return {"seconds": round(time.monotonic() - t0, 3)}


def worker_full_qdq(a) -> dict:
    import onnx
    import onnxsim
    from onnxsim.full_qdq import quantize_full_qdq
    t0 = time.monotonic()
    sim, check_ok = onnxsim.simplify(onnx.load(str(a.model)))
    t_sim = time.monotonic() - t0
    batches = _batches(a.calib, _input_name(sim))
    t0 = time.monotonic()
    q = quantize_full_qdq(sim, batches, activation_dtype="uint8", per_channel=True, method=a.method,
                          remove_qdq_after=("Relu", "Clip"), fold_activation=True)
    t_q = time.monotonic() - t0
    onnx.save(q, str(a.out))
    return {"seconds": round(t_sim + t_q, 3), "simplify_seconds": round(t_sim, 3), "simplify_check": bool(check_ok)}


def worker_quark(a) -> dict:
    import onnx
    from onnxsim.quark_compat import BiasCorrectionConfig, ModelQuantizer, QConfig
    model = onnx.load(str(a.model))
    cfg = QConfig.get_default_config("INT8_CNN_DEFAULT")
    cfg.extra_options["PerChannel"] = True
    cfg.algo_config = [BiasCorrectionConfig()]
    quantizer = ModelQuantizer(cfg)
    batches = _batches(a.calib, _input_name(model))
    t0 = time.monotonic()
    q = quantizer.quantize_model(model, None, batches)
    seconds = time.monotonic() - t0
    onnx.save(q, str(a.out))
    return {"seconds": round(seconds, 3), "approximations": list(quantizer.last_approximations)}


def worker_outputs(a) -> dict:
    """The model's first output on every evaluation item (saved as .npy)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(str(a.model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.load(a.eval)
    out = np.concatenate([sess.run(None, {name: x[i:i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)])
    np.save(a.out, out.astype(np.float32))
    return {"items": len(out)}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="quant_bench.py worker", description="One peer step (JSON on stdout)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("ort-pre", "ort", "full-qdq", "quark", "outputs"):
        p = sub.add_parser(cmd)
        p.add_argument("model", type=Path)
        p.add_argument("out", type=Path)
        if cmd in ("ort", "full-qdq", "quark"):
            p.add_argument("--calib", type=Path, required=True, help="calibration items (.npy, NCHW float32)")
        if cmd in ("ort", "full-qdq"):
            p.add_argument("--method", required=True)
        if cmd == "outputs":
            p.add_argument("--eval", type=Path, required=True)
            p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    step = {"ort-pre": worker_ort_pre, "ort": worker_ort, "full-qdq": worker_full_qdq, "quark": worker_quark,
            "outputs": worker_outputs}[a.cmd]
    try:
        rep = step(a)
    except Exception as e:  # any failure of the tool is this step's one-line reason
        text = " ".join(str(e).split()) or "(no message)"
        print(f"{type(e).__name__}: {text[:500]}", file=sys.stderr)
        return 1
    print(json.dumps(rep))
    return 0


WorkerError = peers.WorkerError


def run_worker(args: list[str]) -> dict:
    """One peer step in a process of its own (this file's `worker` mode)."""
    return peers.worker_json([sys.executable, str(Path(__file__).resolve()), "worker", *args],
                             timeout_s=WORKER_TIMEOUT_S)


# ---------------------------------------------------------------- the rows

def new_row(spec: dict, tool: str, config: str) -> dict:
    return {"model": spec["name"], "tool": tool, "config": config, "label": f"{tool} {config}".strip()}


def compress(cmd: list[str], row: dict, out: Path) -> dict | None:
    """`whittle compress ... --json` writing out: the row gets the command, the tool seconds, the path
    and the report's quantize section; returns the figures, or None with the row's error set."""
    try:
        rep, figures = benchlib.compress_json(cmd)
    except (RunError, KeyError, TypeError, ValueError) as e:
        row["error"] = f"whittle compress: {first_line(str(e))}"
        return None
    row.update(command=cmd, tool_seconds=figures["seconds"], path=out, quantize=rep.get("quantize") or {})
    return figures


def whittle_row(spec: dict, calib: Path, work: Path, a, log, extra: tuple[str, ...] = ()) -> dict:
    flags = " ".join(("--quantize int8",) + extra)
    row = new_row(spec, "whittle", flags)
    row["kind"] = "all-int8" if extra else "int8"
    out = work / f"{spec['name']}_whittle{'_'.join(('',) + extra).replace('-', '')}.onnx"
    cmd = [str(a.whittle), "compress", str(spec["path"]), "-o", str(out), "--calib", str(calib),
           "--profile", spec["profile"], "--calib-items", str(a.calib_items), "--quantize", "int8",
           *extra, "--threads", str(a.threads), "--json"]
    log(f"  whittle compress {flags} ...")
    if compress(cmd, row, out) is None:
        return row
    q = row["quantize"]
    if q.get("calibrator"):
        row["config"] += (f" (calibrator chosen: {q['calibrator']}; bias corrected in {q.get('bias_corrected')} "
                          f"layers; {q.get('items')} items calibrate)")
    return row


def auto_row(spec: dict, calib: Path, work: Path, floor: float, a, log) -> dict:
    """`whittle auto --min-agreement FLOOR`: the fastest candidate over the floor, timed by whittle
    on this machine at --threads; the row is its choice, measured here like every other row."""
    row = new_row(spec, "whittle", f"auto --min-agreement {floor}")
    row["kind"] = "auto"
    out = work / f"{spec['name']}_auto.onnx"
    cmd = [str(a.whittle), "auto", str(spec["path"]), "-o", str(out), "--calib", str(calib),
           "--profile", spec["profile"], "--calib-items", str(a.calib_items), "--min-agreement", str(floor),
           "--threads", "1", "--json"]
    log(f"  whittle auto --min-agreement {floor} ...")
    try:
        rep = benchlib.run_json(cmd, benchlib.COMPRESS_TIMEOUT_S)
        chosen = rep["candidates"][rep["chosen"]]
    except (RunError, KeyError, TypeError, ValueError, IndexError) as e:
        row["error"] = f"whittle auto: {first_line(str(e))}"
        return row
    row.update(command=cmd, tool_seconds=round(rep["seconds"], 2), path=out,
               auto={"chosen": chosen["name"], "fidelity": chosen["fidelity"],
                     "speedup": chosen["latency"]["speedup"], "spread": chosen["latency"]["spread"],
                     "candidates": [(c["name"], c.get("fidelity"), (c.get("latency") or {}).get("speedup"))
                                    for c in rep["candidates"]]})
    row["config"] += (f" (chose {chosen['name']}: {chosen['fidelity']:.3f} on its held-apart calibration items, "
                      f"{chosen['latency']['speedup']:.2f}x in its own 1-thread measurement)")
    return row


def recipe_text(keep: float) -> str:
    return (f'[[step]]\nmethod = "prune_channels"\ntarget = "macs={keep}"\n\n'
            '[[step]]\nmethod = "quantize"\nprecision = "int8"\n')


def compose_row(spec: dict, calib: Path, work: Path, keep: float, int8_label: str, a, log) -> dict:
    """Channel pruning to `macs=keep`, then int8, in one recipe (one `whittle compress --recipe`)."""
    row = new_row(spec, "whittle", f"prune macs={keep} + int8")
    row.update(kind="compose", relative_to=int8_label, macs_target=keep)
    recipe = work / f"{spec['name']}_prune{keep}_int8.toml"
    recipe.write_text(recipe_text(keep))
    out = work / f"{spec['name']}_prune{keep}_int8.onnx"
    cmd = [str(a.whittle), "compress", str(spec["path"]), "--calib", str(calib), "--profile", spec["profile"],
           "--calib-items", str(a.calib_items), "--recipe", str(recipe), "-o", str(out),
           "--threads", str(a.threads), "--json"]
    log(f"  whittle compress --recipe (prune_channels macs={keep}, quantize int8) ...")
    figures = compress(cmd, row, out)
    if figures is None:
        return row
    row.update(recipe=recipe_text(keep), macs=figures["macs"], params=figures["params"],
               macs_kept=figures["macs_kept"])
    q = row["quantize"]
    row["config"] += f" (MACs kept {fmt(figures['macs_kept'], '.1%')}" + (
        f"; calibrator chosen: {q['calibrator']})" if q.get("calibrator") else ")")
    return row


def peer_rows(spec: dict, calib_npy: Path, work: Path, log) -> list[dict]:
    """The ONNX Runtime and onnxsim rows: each quantized in a worker (a failure is the row's error)."""
    rows = []
    name = spec["name"]
    log("  onnxruntime quant_pre_process ...")
    pre = work / f"{name}_ort_pre.onnx"
    try:
        pre_s = run_worker(["ort-pre", str(spec["path"]), str(pre)])["seconds"]
        src, pre_note = pre, "quant_pre_process"
    except WorkerError as e:
        pre_s, src, pre_note = 0.0, spec["path"], f"without quant_pre_process (it failed: {e})"
        log(f"    quant_pre_process failed, quantizing the original: {e}")
    for method in ORT_METHODS:
        row = new_row(spec, "ort", f"QDQ U8S8 per-channel {method}")
        row["preprocess"] = pre_note
        out = work / f"{name}_ort_{method}.onnx"
        log(f"  onnxruntime quantize_static {method} ...")
        try:
            rep = run_worker(["ort", str(src), str(out), "--calib", str(calib_npy), "--method", method])
            row.update(path=out, tool_seconds=round(pre_s + rep["seconds"], 3))
        except WorkerError as e:
            row["error"] = str(e)
        rows.append(row)
    for method in FULL_QDQ_METHODS:
        row = new_row(spec, "onnxsim", f"full_qdq {method} fold_activation")
        out = work / f"{name}_fullqdq_{method}.onnx"
        log(f"  onnxsim quantize_full_qdq {method} ...")
        try:
            rep = run_worker(["full-qdq", str(spec["path"]), str(out), "--calib", str(calib_npy), "--method", method])
            row.update(path=out, tool_seconds=rep["seconds"], simplify_seconds=rep["simplify_seconds"])
        except WorkerError as e:
            row["error"] = str(e)
        rows.append(row)
    row = new_row(spec, "onnxsim", "quark_compat INT8_CNN_DEFAULT per-channel bias correction")
    out = work / f"{name}_quark.onnx"
    log("  onnxsim quark_compat INT8_CNN_DEFAULT ...")
    try:
        rep = run_worker(["quark", str(spec["path"]), str(out), "--calib", str(calib_npy)])
        row.update(path=out, tool_seconds=rep["seconds"], approximations=rep["approximations"])
    except WorkerError as e:
        row["error"] = str(e)
    rows.append(row)
    return rows


def quality(row: dict, spec: dict, evald: Path, eval_npy: Path, ref_out: np.ndarray | None, caches: dict, work: Path,
            a, log) -> None:
    """Verify (agreement, accuracy) and output MSE of a quantized row; failures mark the row."""
    path = row["path"]
    digest = peers.sha256(path)
    if digest in caches:
        row["verify"], row["mse"], row["same_file_as"] = caches[digest]
    else:
        if not peers.verified(row, spec, evald, path, a):
            return
        row["mse"] = None
        if ref_out is not None:
            try:
                out_npy = work / f"{path.stem}_out.npy"
                run_worker(["outputs", str(path), str(out_npy), "--eval", str(eval_npy), "--threads", str(a.threads)])
                out = np.load(out_npy)
                row["mse"] = float(np.mean((out.astype(np.float64) - ref_out) ** 2))
            except (WorkerError, ValueError) as e:
                row["mse_error"] = str(e)
        caches[digest] = (row["verify"], row["mse"], row["label"])
    v = row["verify"]
    log(f"    {row['label']}: agreement {v['top1_agreement']:.3f}, accuracy {v['candidate_accuracy']:.3f}, "
        f"output MSE {fmt(row['mse'], '.3g')}" + (f" (same file as {row['same_file_as']})"
                                                  if row.get("same_file_as") else ""))


# ---------------------------------------------------------------- latency: every model, interleaved

def latency(rows: list[dict], spec: dict, a, log) -> dict:
    """Per thread count, every distinct model and fp32 once per round (order rotating); each row's
    speedup is the median of its per-round fp32 / row p50 ratios. Returns the fp32 figures."""
    archs: dict[str, str] = {}  # architecture digest -> label of the row measured for it
    contestants = {"fp32": spec["path"]}
    for r in rows:
        if r["tool"] == "fp32" or "error" in r or "path" not in r:
            continue
        arch = peers.architecture(r["path"])
        if arch in archs:
            r["latency_shared_with"] = archs[arch]
        else:
            archs[arch] = r["label"]
            contestants[r["label"]] = r["path"]
    p50 = {(c, t): [] for c in contestants for t in THREADS}
    failed: dict[str, str] = {}
    names = list(contestants)
    log(f"  latency: {len(names)} models x threads {', '.join(map(str, THREADS))}, {a.rounds} interleaved rounds, "
        f"{spec['ort_iters']} timed runs each")
    for rnd, order in benchlib.rotations(a.rounds, names):
        for t in THREADS:
            at = argparse.Namespace(**{**vars(a), "threads": t})
            for c in order:
                if c in failed:
                    continue
                try:
                    p50[(c, t)].append(benchlib.bench_once(contestants[c], "ort-cpu", spec["ort_iters"], at)["p50_ms"])
                except (RunError, KeyError, TypeError) as e:
                    failed[c] = f"whittle bench: {first_line(str(e))}"
                    log(f"    {c}: bench failed: {failed[c]}")
        log(f"    round {rnd + 1}: " + "; ".join(
            f"{c} {'/'.join(fmt(p50[(c, t)][-1] if p50[(c, t)] else None, '.3f') for t in THREADS)} ms"
            for c in names))

    def figures(c: str) -> dict:
        out = {}
        for t in THREADS:
            base, mine = p50[("fp32", t)], p50[(c, t)]
            ratios = [x / y for x, y in zip(base, mine) if y] if len(base) == len(mine) else []
            out[str(t)] = {"median_p50_ms": statistics.median(mine) if mine else None, "round_p50_ms": mine,
                           "speedup": statistics.median(ratios) if ratios else None,
                           "spread": benchlib.spread(ratios)}
        return out

    measured = {c: figures(c) for c in names if c not in failed}

    def source(r: dict) -> str:
        return "fp32" if r["tool"] == "fp32" else r.get("latency_shared_with", r["label"])

    for r in rows:
        src = source(r)
        if src in failed:
            r["error"] = failed[src]
        elif src in measured and "error" not in r:
            r["latency"] = measured[src]
    # a prune + int8 row beside the plain int8 row, round by round: int8 p50 / its p50
    by_label = {r["label"]: r for r in rows}
    for r in rows:
        ref = by_label.get(r.get("relative_to"))
        if "latency" not in r or ref is None or "latency" not in ref:
            continue
        vs = {}
        for t in THREADS:
            base, mine = p50[(source(ref), t)], p50[(source(r), t)]
            ratios = [x / y for x, y in zip(base, mine) if y] if len(base) == len(mine) else []
            vs[str(t)] = {"speedup": statistics.median(ratios) if ratios else None, "spread": benchlib.spread(ratios)}
        r["vs_int8"] = vs
    return measured.get("fp32") or {}


# ---------------------------------------------------------------- report

def ok(row: dict) -> bool:
    return "error" not in row


def speed_cell(lat: dict, t: int) -> str:
    f = (lat or {}).get(str(t)) or {}
    if f.get("speedup") is None:
        return "n/a"
    lo, hi = f["spread"]
    return f"{f['speedup']:.2f}x [{lo:.2f}-{hi:.2f}]"


def table(model: dict) -> str:
    head = ["tool", "config", "agreement", "accuracy", "output MSE", "ort-cpu speedup, 1 thread", "2 threads",
            "vs whittle int8, 1 / 2 threads", "tool s"]
    labels = model.get("labels", True)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shared = {}
    for r in model["rows"]:
        cells = [r["tool"], r["config"]]
        if "error" in r:
            cells += ["failed: " + r["error"].replace("|", "/")] + [""] * (len(head) - 3)
        else:
            v = r["verify"]
            mse = fmt(r.get("mse"), ".3g") if r["tool"] != "fp32" else "0"
            if r["tool"] == "fp32":
                speeds = [fmt(((r.get("latency") or {}).get(str(t)) or {}).get("median_p50_ms"), ".3f", " ms p50")
                          for t in THREADS]
            else:
                speeds = [speed_cell(r.get("latency"), t) for t in THREADS]
            if r.get("latency_shared_with"):
                n = shared.setdefault(r["latency_shared_with"], len(shared) + 1)
                speeds = [s + f" [{n}]" for s in speeds]
            agreement = f"{v['top1_agreement']:.3f}" + (f" (= {r['same_file_as']})" if r.get("same_file_as") else "")
            vs = " / ".join(speed_cell(r["vs_int8"], t) for t in THREADS) if r.get("vs_int8") else ""
            accuracy = fmt(v.get("candidate_accuracy"), ".3f") if labels else "n/a"
            cells += [agreement, accuracy, mse, *speeds, vs, fmt(r.get("tool_seconds"), ".1f", "", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return peers.table_end(lines, shared)


def render(result: dict) -> str:
    s = result["settings"]
    out = [f"# INT8 quantization: whittle vs ONNX Runtime {result['versions']['onnxruntime']} and onnxsim "
           f"{result['versions']['onnxsim']}", "",
           *peers.run_lines(result, ("numpy", "Pillow", "onnx")),
           f"- {s['calib_items']} calibration items (whittle compress's own split) for every tool, batches of "
           f"{CALIB_BATCH} for the peers; agreement = top-1 agreement with fp32 on the evaluation images "
           "(`whittle verify`); accuracy = top-1 vs labels; output MSE = mean (quant - fp32)^2 over the evaluation "
           "items' first output, ONNX Runtime in Python on numpy-preprocessed images",
           f"- ort-cpu speedup = fp32 p50 / quantized p50 (`whittle bench`), median over {s['rounds']} interleaved "
           f"rounds of the per-round ratio, [min-max] over rounds; warmup {s['warmup']}; \"vs whittle int8\" = "
           "whittle int8's p50 / the prune + int8 row's p50, the same rounds",
           f"- prune + int8 rows: one `whittle compress --recipe` of two steps, prune_channels (macs=F) then "
           f"quantize (int8), at {', '.join(f'macs={b}' for b in s['compose_budgets']) or 'no budget (--compose none)'}; "
           f"goal: a point >= {GOAL_VS_INT8}x the speed of whittle int8 alone at >= {GOAL_AGREEMENT:.0%} agreement",
           peers.wall_line(result)]
    for m in result["models"]:
        if m.get("unavailable"):
            out += ["", f"## {m['model']}", "", table(m)]
            continue
        fp = m.get("fp32_latency") or {}
        p50s = ", ".join(f"{t} thread{'s' if t > 1 else ''} {fmt((fp.get(str(t)) or {}).get('median_p50_ms'), '.3f')} ms"
                         for t in THREADS)
        out += ["", f"## {m['model']}", "",
                f"profile {m['profile']}; calibration {m['calib_desc']}; evaluation {m['eval_desc']}; fp32 p50 "
                f"{p50s}; ort-cpu timed runs per bench run {m['ort_iters']}", "",
                peers.check_line(m["preprocessing_check"]), ""]
        if m["model"] in SOFTMAX_OUTPUT:
            out += [f"{m['model']}'s output is a Softmax: its MSE is of probabilities.", ""]
        if not m.get("labels", True):
            out += ["The evaluation images' labels are not this model's classes: accuracy n/a; agreement is the "
                    "measure.", ""]
        out += [table(m), ""]
        notes = sorted({r["preprocess"] for r in m["rows"] if r.get("preprocess", "").startswith("without")})
        out += [f"- ort rows: {n}" for n in notes]
        out += [f"- {r['label']}: onnxsim approximations: {'; '.join(r['approximations'])}"
                for r in m["rows"] if r.get("approximations")]
        out += [f"- {r['label']}: output MSE not computed: {first_line(r['mse_error'])}"
                for r in m["rows"] if r.get("mse_error")]
        out += [compose_line(r) for r in m["rows"] if r.get("kind") == "compose"]
        w = next((r for r in m["rows"] if r["tool"] == "whittle" and r.get("kind") != "compose" and ok(r)), None)
        peers_ok = [r for r in m["rows"] if r["tool"] in ("ort", "onnxsim") and ok(r)]
        best = max(peers_ok, key=lambda r: r["verify"]["top1_agreement"], default=None)
        if w and best:
            margin = 100 * (w["verify"]["top1_agreement"] - best["verify"]["top1_agreement"])
            out.append(f"- best peer by agreement: {best['label']} {best['verify']['top1_agreement']:.3f}; whittle "
                       f"{w['verify']['top1_agreement']:.3f} ({margin:+.1f} points"
                       f"{'' if margin > 0 else ': whittle does NOT win here'})")
    return "\n".join(out)


def compose_line(r: dict) -> str:
    """Whether a prune + int8 row is the point the goal asks for, per thread count."""
    if "error" in r:
        return f"- {r['label']}: failed, no point"
    agreement = r["verify"]["top1_agreement"]
    vs = r.get("vs_int8") or {}
    speeds = {t: (vs.get(str(t)) or {}).get("speedup") for t in THREADS}
    met = [t for t, x in speeds.items() if x is not None and x >= GOAL_VS_INT8 and agreement >= GOAL_AGREEMENT]
    figures = ", ".join(f"{fmt(x, '.2f', 'x')} at {t} thread{'s' if t > 1 else ''}" for t, x in speeds.items())
    verdict = (f"meets the goal (>= {GOAL_VS_INT8}x, >= {GOAL_AGREEMENT:.0%}) at {', '.join(map(str, met))} "
               f"thread(s)" if met else f"does NOT meet the goal (>= {GOAL_VS_INT8}x, >= {GOAL_AGREEMENT:.0%})")
    return (f"- {r['label']}: agreement {agreement:.3f}, speed vs {r['relative_to']}: {figures}: {verdict}")


def printed(result: dict) -> str:
    return render(result) + f"\n\nwritten: {result['report_dir']}/table.md, results.json"


# ---------------------------------------------------------------- the run

def prepare(s: dict, work: Path, a, log) -> dict:
    """Data split, calibration arrays and the preprocessing check (peers_bench's), evaluation arrays."""
    prep = peers.prepare_calib(s, work, a, log)
    prof = peers.PROFILES[s["profile"]]
    eval_npy = work / f"{s['name']}_eval.npy"
    np.save(eval_npy, np.stack([peers.preprocess(p, prof) for p in peers.image_folder(prep["eval"])]))
    return {**prep, "eval_npy": eval_npy}


def run_model(s: dict, prep: dict, work: Path, a, log) -> tuple[list[dict], dict, int]:
    status = 0
    rows = []
    base = new_row(s, "fp32", "original")
    base["path"] = s["path"]
    ref_out = None
    try:
        ref_npy = work / f"{s['name']}_fp32_out.npy"
        run_worker(["outputs", str(s["path"]), str(ref_npy), "--eval", str(prep["eval_npy"]),
                    "--threads", str(a.threads)])
        ref_out = np.load(ref_npy).astype(np.float64)
    except WorkerError as e:
        log(f"  fp32 outputs failed (no MSE column): {e}")
    if peers.verified(base, s, prep["eval"], s["path"], a):
        base["mse"] = 0.0
    rows.append(base)
    w = whittle_row(s, prep["calib"], work, a, log)
    # every activation int8 (the default keeps a few in float where that is measured no slower)
    w2 = whittle_row(s, prep["calib"], work, a, log, ("--keep-float", "0"))
    # composition: channel pruning then int8, one recipe per MAC budget
    composed = [compose_row(s, prep["calib"], work, keep, w["label"], a, log) for keep in a.compose]
    if a.auto is not None:
        composed.append(auto_row(s, prep["calib"], work, a.auto, a, log))
    rows += peer_rows(s, prep["calib_npy"], work, log)
    rows[1:1] = [w, w2, *composed]
    caches: dict = {}
    log("  verify and output MSE:")
    for r in rows[1:]:
        if "error" not in r:
            quality(r, s, prep["eval"], prep["eval_npy"], ref_out, caches, work, a, log)
    fp32 = latency(rows, s, a, log)
    if "error" in w or "error" in w2 or "error" in base:
        status = 1
    for r in rows:
        r.pop("path", None)
    return rows, fp32, status


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    specs, why = benchlib.select(model_specs(), a.models, sort=True)
    if why:
        return {"error": why}, 2
    if a.quick and not a.models:
        specs = [s for s in specs if s["name"] == "resnet8_cifar10"]
    if a.compose is None:
        a.compose = list(QUICK_COMPOSE_BUDGETS if a.quick else COMPOSE_BUDGETS)
    why = benchlib.check(a, specs) or benchlib.counts_error(a)
    if why:
        return {"error": why}, 2
    report = peers.Report(a.reports, PINNED)
    status = 0
    models = []
    with benchlib.workdir(a.keep, "whittle-quant-bench-") as work:
        report.own_copy(a, work, log, f"quant bench: {len(specs)} model(s)")
        for s in specs:
            log(f"{s['name']}:")
            if s.get("unavailable"):
                log(f"  no rows: {s['unavailable']}")
                row = new_row(s, "(every row)", "fp32, whittle int8 (+ all-int8, prune + int8), ort, onnxsim")
                row["error"] = s["unavailable"]
                models.append({"model": s["name"], "path": str(s["path"].resolve()), "profile": s["profile"],
                               "unavailable": s["unavailable"], "rows": [row]})
                continue
            s = dict(s, ort_iters=a.iters * s["iters_scale"])
            prep = prepare(s, work, a, log)
            rows, fp32 = [], {}
            if not prep["check"]["ok"]:
                status = 1
                log("  the calibration arrays are not shown to match whittle's inputs: no rows for this model")
            else:
                rows, fp32, st = run_model(s, prep, work, a, log)
                status = max(status, st)
                if any(r["tool"] == "whittle" and "error" in r for r in rows):
                    status = 1
            models.append({"model": s["name"], "path": str(s["path"].resolve()), "profile": s["profile"],
                           "calib_desc": prep["calib_desc"], "eval_desc": prep["eval_desc"],
                           "calib_files": prep["calib_files"], "preprocessing_check": prep["check"],
                           "ort_iters": s["ort_iters"], "fp32_latency": fp32, "labels": s.get("labels", True),
                           "rows": rows})
    result = report.result({"calib_items": a.calib_items, "calib_batch": CALIB_BATCH, "threads": a.threads,
                            "latency_threads": list(THREADS), "rounds": a.rounds, "warmup": a.warmup,
                            "iters": a.iters, "compose_budgets": list(a.compose), "quick": a.quick,
                            "work": str(work) if a.keep else None}, models)
    report.write({"table.md": render(result) + "\n", "results.json": json.dumps(result, indent=1, default=str) + "\n"})
    return result, status


def compose_list(text: str) -> list[float]:
    if text.strip().lower() == "none":
        return []
    vals = benchlib.budget_list(text)
    if any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"MAC fractions kept must be in (0, 1]: {text!r}")
    return vals


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="resnet8 only, one prune + int8 budget (macs=0.8), "
                                                         "fewer bench iterations")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--whittle", type=Path, default=default_whittle(),
                    help="the whittle binary (default $CARGO_TARGET_DIR/release/whittle, else "
                         "~/.cache/whittle/target/release/whittle)")
    ap.add_argument("--models", help="comma-separated subset of: resnet8_cifar10, efficientnet_lite0_224, "
                                     "resnet_large_cifar10, mobilenetv1_025_vww96, dscnn_kws (default all; --quick "
                                     "resnet8 only)")
    ap.add_argument("--compose", type=compose_list,
                    help="MAC fractions kept by the prune + int8 rows, comma-separated, or none (default "
                         f"{','.join(map(str, COMPOSE_BUDGETS))}; --quick {','.join(map(str, QUICK_COMPOSE_BUDGETS))})")
    ap.add_argument("--auto", type=float, metavar="FLOOR",
                    help="add a row for `whittle auto --min-agreement FLOOR` (its choice, timed with the others)")
    ap.add_argument("--calib-items", type=int, default=benchlib.CALIB_ITEMS, help=f"every tool (default {benchlib.CALIB_ITEMS})")
    ap.add_argument("--threads", type=int, default=2, help="threads for whittle compress / verify and the MSE runs "
                                                           "(default 2; latency is taken at 1 and 2)")
    ap.add_argument("--rounds", type=int, help="interleaved latency rounds (default 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs per bench run (default 5; --quick 2)")
    ap.add_argument("--iters", type=int, help="timed runs per bench run (default 50; --quick 20), times 10 for resnet8 and "
                                                   "the VWW MobileNet, 2 for ResNet-56")
    ap.add_argument("--keep", type=Path, help="keep the quantized models and data here (default: a temporary folder)")
    ap.add_argument("--reports", type=Path, default=REPO / "reports" / "peers-quant",
                    help="a <UTC time>/ folder is made here (default reports/peers-quant)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    return benchlib.cli_main("quant_bench", "whittle's INT8 quantization beside ONNX Runtime's and onnxsim's on the "
                             "same calibration items and images: agreement, accuracy, output MSE, latency, time "
                             "(reports; asserts nothing)", add_args, pb.settle, run, printed, argv)


if __name__ == "__main__":
    sys.exit(main())
