"""Does ONNX Runtime's CUDA provider load here? One line either way (scripts/gpu_runtime_check.sh).

Prints the version and `get_available_providers()`, then opens a one-node graph on the CUDA
provider in a child process: ONNX Runtime falls back to the CPU with only a logged warning when a
CUDA or cuDNN library is missing, so the child's log is searched for the library it could not open.
Exit status 0 when the graph ran on CUDA, else 1 with the reason.
"""

from __future__ import annotations

import re
import subprocess
import sys

PROBE = """
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* packages
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
model.ir_version = 9
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
print(session.get_providers()[0], session.run(None, {"x": np.ones(2, np.float32)})[0].tolist())
"""
MISSING = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")


def main() -> int:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    print(f"onnxruntime {onnxruntime.__version__} from {onnxruntime.__file__}: providers {providers}")
    if "CUDAExecutionProvider" not in providers:
        print(f"gpu_providers: this ONNX Runtime has no CUDAExecutionProvider (providers: {providers})")
        return 1
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    if done.returncode == 0 and done.stdout.startswith("CUDAExecutionProvider"):
        print(f"gpu_providers: the CUDA provider loads and runs a graph ({done.stdout.strip()})")
        return 0
    missing = sorted(set(MISSING.findall(log)))
    if missing:
        print(f"gpu_providers: the CUDA provider does not load: missing {', '.join(missing)}")
    else:
        last = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
        print(f"gpu_providers: the CUDA provider does not run a graph: {last[0][:300]}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
