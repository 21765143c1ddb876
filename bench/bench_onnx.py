"""What recalibrating an ONNX model costs, next to one plain onnxruntime inference pass. Prints ratios; asserts
nothing.

keras.applications MobileNetV2 (random weights, 96 x 96) written unfolded to ONNX by bnrepair's emitter, N
in-memory samples in batches: ``recalibrate --mode train`` (the loop's own time: measuring copy, moments,
statistics) / ``InferenceSession.run`` over the same batches, each the median of ``--repeats`` after a warm-up.
Target: <= 1.3. Also against a session with graph optimisations off, which is what a graph whose every BN
input is observed can have.

    python bench/bench_onnx.py [--samples 256] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # a CPU figure

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnrepair  # noqa: E402
from bench import zoo_models  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mobilenet_v2.onnx"
        bnrepair.export(zoo_models.keras_model("MobileNetV2"), path, fold=False)
        rng = np.random.default_rng(0)
        batches = [rng.normal(0, 1, (args.batch_size, 96, 96, 3)).astype(np.float32)
                   for _ in range(args.samples // args.batch_size)]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        unoptimised = ort.SessionOptions()
        unoptimised.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        bare = ort.InferenceSession(str(path), unoptimised, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def plain(which=session) -> float:
            start = time.perf_counter()
            for x in batches:
                which.run(None, {name: x})
            return time.perf_counter() - start

        def recalibrate() -> float:
            return bnrepair.recalibrate(path, batches, output=Path(tmp) / "r.onnx").seconds

        plain(), plain(bare), recalibrate()  # warm-up
        inference = statistics.median(plain() for _ in range(args.repeats))
        floor = statistics.median(plain(bare) for _ in range(args.repeats))
        repair = statistics.median(recalibrate() for _ in range(args.repeats))
    print(f"MobileNetV2 as ONNX, {args.samples} samples, batch {args.batch_size}: plain onnxruntime pass "
          f"{inference:.2f}s, recalibrate --mode train {repair:.2f}s: ratio {repair / inference:.2f} (target <= 1.3); "
          f"against a pass without graph optimisations ({floor:.2f}s, which the measured layers cannot have: "
          f"their inputs are outputs, so no Conv+BN fusion or blocked layouts) {repair / floor:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
