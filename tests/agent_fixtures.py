"""Small real ONNX models packed as bundles, for the agent tests.

The models are built with ``onnx.helper`` and their self-test outputs computed with NumPy,
so a bundle is ready in milliseconds and needs no download.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeopt.agent.bundle import pack_bundle, write_manifest
from edgeopt.devices.probe import match_profiles, probe_host

CPU = "CPUExecutionProvider"


def host_device() -> str:
    """Return the id of a device profile that matches this machine (the most specific one)."""
    matches = match_profiles(probe_host())
    if not matches:
        raise RuntimeError("no device profile matches this machine; the agent tests need one")
    return matches[0].id


def other_device() -> str:
    """Return a profile id that does not match this machine."""
    matched = {p.id for p in match_profiles(probe_host())}
    return next(d for d in ("rpi5", "jetson-orin", "x86-avx2") if d not in matched)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def classifier_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)


def classifier_reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The classifier's output computed with NumPy: softmax(x @ W + b)."""
    weight, bias = classifier_weights(seed)
    logits = x.astype(np.float32) @ weight + bias
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_classifier_onnx(path: Path, seed: int = 0) -> None:
    """Write x: FP32[-1,4] -> probs: FP32[-1,3], a linear layer followed by softmax."""
    weight, bias = classifier_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def write_adder_onnx(path: Path) -> None:
    """Write a: INT32[-1,2], b: INT32[-1,2] -> sum: INT32[-1,2], twice: INT64[-1,2]."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Cast", ["a"], ["a64"], to=TensorProto.INT64),
            helper.make_node("Add", ["a64", "a64"], ["twice"]),
        ],
        "adder",
        [
            helper.make_tensor_value_info("a", TensorProto.INT32, ["batch", 2]),
            helper.make_tensor_value_info("b", TensorProto.INT32, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.INT32, ["batch", 2]),
            helper.make_tensor_value_info("twice", TensorProto.INT64, ["batch", 2]),
        ],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _artifact(path: str, precision: str = "fp32") -> dict:
    # write_manifest fills "files"; the artifact's sha256 and size must match that entry.
    return {"path": path, "format": "onnx", "precision": precision, "runtimes": [CPU]}


def _finish(bundle_dir: Path, manifest: dict, tar: bool) -> Path:
    from edgeopt.agent.bundle import sha256_file

    for artifact in manifest["artifacts"]:
        file = bundle_dir / artifact["path"]
        artifact.setdefault("sha256", sha256_file(file))
        artifact.setdefault("size", file.stat().st_size)
    write_manifest(bundle_dir, manifest)
    if not tar:
        return bundle_dir
    tar_path = bundle_dir.with_suffix(".tar")
    pack_bundle(bundle_dir, tar_path)
    return tar_path


def make_classifier_bundle(
    root: Path,
    name: str = "tiny",
    version: str = "1",
    device: str | None = None,
    seed: int = 0,
    broken_first: bool = False,
    tar: bool = False,
) -> Path:
    """Write the classifier bundle under ``root``; return its directory (or tar with ``tar``).

    ``broken_first`` adds a best-first artifact with other weights, which fails the self-test.
    """
    bundle_dir = Path(root) / f"{name}-v{version}"
    (bundle_dir / "selftest").mkdir(parents=True)
    write_classifier_onnx(bundle_dir / "model.onnx", seed)

    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    artifacts = [_artifact("model.onnx")]
    if broken_first:
        # Other weights whose top-1 class for the self-test input differs, too.
        broken_seed = seed + 100
        while classifier_reference(x, broken_seed).argmax() == classifier_reference(x, seed).argmax():
            broken_seed += 1
        write_classifier_onnx(bundle_dir / "model.broken.onnx", broken_seed)
        artifacts.insert(0, _artifact("model.broken.onnx", "int8"))

    np.savez(bundle_dir / "selftest/inputs.npz", x=x)
    np.savez(bundle_dir / "selftest/expected.npz", probs=classifier_reference(x, seed))
    (bundle_dir / "labels.txt").write_text("cat\ndog\nbird\n", encoding="utf-8")

    manifest = {
        "name": name,
        "version": version,
        "device": device or host_device(),
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}],
        "artifacts": artifacts,
        "labels": "labels.txt",
        "selftest": {
            "inputs": "selftest/inputs.npz",
            "expected": "selftest/expected.npz",
            "atol": 1e-5,
            "rtol": 1e-4,
            "check_top1": True,
        },
    }
    return _finish(bundle_dir, manifest, tar)


def make_adder_bundle(root: Path, name: str = "adder", version: str = "1", device: str | None = None) -> Path:
    """Write a two-input integer bundle; return its directory."""
    bundle_dir = Path(root) / f"{name}-v{version}"
    (bundle_dir / "selftest").mkdir(parents=True)
    write_adder_onnx(bundle_dir / "model.onnx")

    a = np.array([[1, 2]], dtype=np.int32)
    b = np.array([[10, -20]], dtype=np.int32)
    np.savez(bundle_dir / "selftest/inputs.npz", a=a, b=b)
    np.savez(bundle_dir / "selftest/expected.npz", sum=a + b, twice=2 * a.astype(np.int64))

    manifest = {
        "name": name,
        "version": version,
        "device": device or host_device(),
        "inputs": [{"name": "a", "datatype": "INT32", "shape": [-1, 2]}, {"name": "b", "datatype": "INT32", "shape": [-1, 2]}],
        "outputs": [{"name": "sum", "datatype": "INT32", "shape": [-1, 2]}, {"name": "twice", "datatype": "INT64", "shape": [-1, 2]}],
        "artifacts": [_artifact("model.onnx")],
        "selftest": {"inputs": "selftest/inputs.npz", "expected": "selftest/expected.npz", "atol": 0, "rtol": 0},
    }
    return _finish(bundle_dir, manifest, tar=False)


SLOW_WIDTH = 256
SLOW_LAYERS = 64


def slow_reference(x: np.ndarray) -> np.ndarray:
    """The slow model's output computed with NumPy: 64 times y = tanh(y @ W)."""
    weight = np.random.default_rng(7).normal(scale=1.0 / np.sqrt(SLOW_WIDTH), size=(SLOW_WIDTH, SLOW_WIDTH)).astype(np.float32)
    y = x.astype(np.float32)
    for _ in range(SLOW_LAYERS):
        y = np.tanh(y @ weight)
    return y


def make_slow_bundle(root: Path, name: str = "slow") -> Path:
    """Write x: FP32[-1,256] -> y: FP32[-1,256], whose run time grows with the batch size.

    A batch of a few thousand rows keeps a request in flight for a second or so, which the
    shutdown and overload tests need.
    """
    bundle_dir = Path(root) / f"{name}-v1"
    (bundle_dir / "selftest").mkdir(parents=True)
    weight = np.random.default_rng(7).normal(scale=1.0 / np.sqrt(SLOW_WIDTH), size=(SLOW_WIDTH, SLOW_WIDTH)).astype(np.float32)
    nodes = []
    previous = "x"
    for layer in range(SLOW_LAYERS):
        output = "y" if layer == SLOW_LAYERS - 1 else f"h{layer}"
        nodes.append(helper.make_node("MatMul", [previous, "W"], [f"m{layer}"]))
        nodes.append(helper.make_node("Tanh", [f"m{layer}"], [output]))
        previous = output
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bundle_dir / "model.onnx")

    x = np.random.default_rng(1).normal(size=(1, SLOW_WIDTH)).astype(np.float32)
    np.savez(bundle_dir / "selftest/inputs.npz", x=x)
    np.savez(bundle_dir / "selftest/expected.npz", y=slow_reference(x))
    manifest = {
        "name": name,
        "version": "1",
        "device": host_device(),
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, SLOW_WIDTH]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, SLOW_WIDTH]}],
        "artifacts": [_artifact("model.onnx")],
        "selftest": {"inputs": "selftest/inputs.npz", "expected": "selftest/expected.npz", "atol": 1e-4, "rtol": 1e-4},
    }
    return _finish(bundle_dir, manifest, tar=False)


REPO = Path(__file__).resolve().parents[1]


def start_agent(*args: str, cache: Path, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str, str]:
    """Start ``edgeopt agent run`` on a free loopback port.

    Return the process, its address and its stdout up to the "listening on" line.
    """
    port = free_port()
    command = [sys.executable, "-m", "edgeopt", "-v", "agent", "run", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache), *args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            return process, f"127.0.0.1:{port}", "".join(lines)
    process.kill()
    raise AssertionError(f"agent did not start: {''.join(lines)}{process.stderr.read()}")
