"""What recalibrating an ONNX model costs, next to one plain onnxruntime inference pass. Prints ratios; asserts
nothing.

keras.applications MobileNetV2 (random weights, 96 x 96, depthwise convolutions: BN's share of the work is
large) written unfolded by bnrepair's emitter, or torchvision's resnet18 (64 x 64) as torch's exporter writes
it; ``--batches`` in-memory batches: ``bnrepair.recalibrate(runner, batches)`` in train mode on a loaded model
(the loop's own time: moments, merge, statistics; the runner keeps the measuring copy's session from its first
call, whose time is printed apart) / ``InferenceSession.run`` over the same batches, timed in turn, medians of
``--repeats``. Target: <= 2.0 on the CPU. ``--profile`` adds onnxruntime's own profile of one pass of each, by
op type: where the measuring copy's time goes. ``--device cuda``: both on onnxruntime's CUDA provider (target
<= 1.3).

    python bench/bench_onnx.py [--model mobilenet_v2|resnet18] [--batch-size 32] [--batches 8] [--repeats 3]
                               [--profile] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnrepair  # noqa: E402
from bench import zoo_models  # noqa: E402


def exported(name: str, path: Path, batch_size: int, batches: int) -> list[np.ndarray]:
    """``name`` written as unfolded ONNX at ``path``; the batches to run."""
    rng = np.random.default_rng(0)
    if name == "mobilenet_v2":
        bnrepair.export(zoo_models.keras_model("MobileNetV2"), path, fold=False)
        shape = (96, 96, 3)
    else:  # torchvision's, as torch's exporter writes it with its BN nodes kept
        import torch

        shape = zoo_models.torch_input_shape(name)
        torch.onnx.export(zoo_models.torch_model(name), (torch.zeros(2, *shape),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], dynamic_axes={"input": {0: "b"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return [rng.normal(0, 1, (batch_size, *shape)).astype(np.float32) for _ in range(batches)]


def by_op(model_bytes: bytes, feeds) -> dict[str, float]:
    """onnxruntime's own profile of a session over ``feeds``: kernel milliseconds by op type."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        taken = {i.name for i in session.get_inputs()}
        for feed in feeds:
            session.run(None, {k: v for k, v in feed.items() if k in taken})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e3
    return totals


def profile(path: Path, batches: list[np.ndarray]) -> None:
    """Where a train-mode pass spends its time, next to a plain one."""
    from bnrepair.frameworks.onnx.graph import measuring_copy

    runner = bnrepair.load(str(path))
    ids = [bn.id for bn in runner.graph.bn_layers]
    runner.collect(batches[0], "train", ids)  # resolves what the copy needs
    sites = list(runner._sites.values())
    copy = measuring_copy(runner.proto, sites, frozenset(ids), runner._types)
    stats = {name: value for s in sites for name, value in zip((s.mean, s.var), runner._stats[s.id])}
    feeds = [{runner._input.name: x, **stats} for x in batches]
    for label, model in (("plain", path.read_bytes()), ("train-mode measuring copy", copy.SerializeToString())):
        totals = by_op(model, feeds)
        print(f"  {label}: {sum(totals.values()):.0f} ms in kernels; "
              + ", ".join(f"{op} {ms:.0f}" for op, ms in totals.most_common(9)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mobilenet_v2", "resnet18"), default="mobilenet_v2",
                        help="keras.applications MobileNetV2 at 96x96, or torchvision's resnet18 at 64x64")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="onnxruntime's profile of both, by op type")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: both on onnxruntime's "
                        "CUDA provider (target <= 1.3; take resnet18: TensorFlow, which exports MobileNetV2, "
                        "would hold the GPU's memory)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # nothing reaches a GPU
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.onnx"
        batches = exported(args.model, path, args.batch_size, args.batches)
        session = ort.InferenceSession(str(path), providers=providers)
        name = session.get_inputs()[0].name

        def plain() -> float:
            start = time.perf_counter()
            for x in batches:
                session.run(None, {name: x})
            return time.perf_counter() - start

        runner = bnrepair.load(str(path), device=args.device)  # keeps its sessions, as the API's caller would

        def recalibrate() -> float:
            return bnrepair.recalibrate(runner, batches).seconds

        plain()
        first = recalibrate()  # the measuring copy's session is made here
        times = {"plain": [], "train": []}
        for _ in range(args.repeats):  # side by side, in turn
            times["plain"].append(plain())
            times["train"].append(recalibrate())
        inference, repair = (statistics.median(times[k]) for k in ("plain", "train"))
        print(f"{args.model} as ONNX on {args.device}, {len(batches)} batches of {args.batch_size}: plain "
              f"onnxruntime pass {inference:.3f}s, recalibration's loop {repair:.3f}s: ratio {repair / inference:.2f} "
              f"(target <= {2.0 if args.device == 'cpu' else 1.3}); the first call, which makes the measuring "
              f"session, {first:.3f}s ({first / inference:.2f})")
        if args.profile:
            profile(path, batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
