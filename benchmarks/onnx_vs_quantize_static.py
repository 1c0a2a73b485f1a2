"""slimkit's QDQ export against onnxruntime's ``quantize_static`` of the same model, closely.

    .venv/bin/python benchmarks/onnx_vs_quantize_static.py --models digits_cnn mobilenetv2_050

``int8_speed.py`` times a dozen variants over 5 rounds, where two graphs that onnxruntime runs
alike can still read 5-8% apart. This script builds only the two (the same PTQ calibration
images for both), reports the node types of each graph as onnxruntime optimizes it (written
with ``optimized_model_filepath``), and times the two sessions interleaved over many rounds.
Writes ``benchmarks/results/onnx_vs_quantize_static.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as int8_speed.py: no spinning OpenMP threads

import argparse  # noqa: E402
import collections  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_common import (  # noqa: E402
    interleaved,
    machine_info,
    ort_runner,
    ort_session,
    ort_static_quantize,
    setup_machine,
    write_json,
)
from int8_speed import SMALL_MODELS, _image_inputs, build_image_model  # noqa: E402

import slimkit  # noqa: E402


def optimized_ops(path: Path) -> dict[str, int]:
    """Node types of the graph onnxruntime runs (after its fusions: QLinearConv, QLinearAdd...)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return dict(sorted(collections.Counter(node.op_type for node in graph.node).items()))


def compare(name: str, batches: list[int], rounds: int) -> dict:
    fp32, calibration, channels, size = build_image_model(name)  # int8_speed.py's, same calibration
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = copy.deepcopy(fp32)
        slimkit.prepare(prepared, {"quant": {"mode": "ptq"}}, example_inputs=calibration[0])
        slimkit.calibrate(prepared, calibration)
        ours = slimkit.export_onnx(slimkit.convert(prepared), tmp / "slimkit.onnx", calibration[0])
        fp32_onnx = slimkit.export_onnx(copy.deepcopy(fp32), tmp / "fp32.onnx", calibration[0])
        theirs = ort_static_quantize(fp32_onnx, tmp / "ort_static.onnx", calibration)
        ops = {"slimkit_onnx": optimized_ops(Path(ours)), "ort_static_int8": optimized_ops(Path(theirs))}
        sessions = {"slimkit_onnx": ort_session(ours), "ort_static_int8": ort_session(theirs)}
        result = {"optimized_ops": ops, "same_optimized_op_counts": ops["slimkit_onnx"] == ops["ort_static_int8"]}
        for batch in batches:
            inputs = _image_inputs(batch, size, channels)
            iters = 100 if (batch == 1 and name in SMALL_MODELS) else (20 if batch == 1 else 2)
            timings = interleaved({k: ort_runner(s, inputs) for k, s in sessions.items()}, rounds, iters)
            ratio = {
                stat: round(timings["slimkit_onnx"][stat] / timings["ort_static_int8"][stat], 3)
                for stat in ("median_s", "min_s")
            }
            result[f"batch_{batch}"] = {"timings": timings, "slimkit_time_over_ort_static": ratio}
            median, least = ratio["median_s"], ratio["min_s"]
            print(f"  {name:18s} b{batch:<3d} slimkit / quantize_static time: median {median:.3f}, min {least:.3f}")
    ours_ops, theirs_ops = ops["slimkit_onnx"], ops["ort_static_int8"]
    differ = {k: (ours_ops.get(k, 0), theirs_ops.get(k, 0)) for k in {*ours_ops, *theirs_ops}}
    differ = {k: v for k, v in sorted(differ.items()) if v[0] != v[1]}
    result["optimized_ops_differ"] = differ  # node type: (slimkit, quantize_static)
    print(f"  {name:18s} optimized graphs: {ours_ops}; differ in (slimkit, quantize_static): {differ or 'nothing'}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["digits_cnn", "tutorial_smallcnn", "mobilenetv2_050", "resnet18", "efficientnet_b0"],
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--output", default="onnx_vs_quantize_static.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    setup_machine()
    report = {"machine": machine_info(), "settings": vars(args), "models": {}}
    for name in args.models:
        report["models"][name] = compare(name, args.batches, args.rounds)
        write_json(args.output, report)
    print(f"wrote {write_json(args.output, report)}")


if __name__ == "__main__":
    main()
