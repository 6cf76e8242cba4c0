"""decode_profile.py --ops: ONNX Runtime's profile of the measured decode steps, op type by op type."""

import re

from tests.helpers import run_benchmark


def test_ops_split_the_measured_steps_and_name_the_int4_matmuls_by_graph():
    from tests.artefacts import export, shared

    bundle = shared("bundle-demo-int4", lambda out: export("demo", out, quantize="int4"))
    args = ["--bundle", str(bundle), "--steps", "4", "--repeats", "2", "--ops"]
    done = run_benchmark("decode_profile.py", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = dict(re.findall(r"^(.+?)\s+(-?\d+\.\d+)\s+-?\d+\.\d%$", done.stdout, re.MULTILINE))
    step = float(re.search(r"\(the step, Python included\)\s+(\d+\.\d+)", done.stdout)[1])
    matmuls = {name for name in rows if name.endswith(":MatMulNBits")}
    # every decoder segment and the head run int4 MatMulNBits in a decode step
    assert {"head:MatMulNBits", "segment_00:MatMulNBits"} <= matmuls
    assert "ONNX Runtime between kernels" in rows and "session calls outside runs" in rows
    kernels = sum(float(ms) for name, ms in rows.items() if name not in ("session calls outside runs",))
    # the parts are the measured steps' own time: never more than the steps took (the runtime's
    # Python between calls is the rest)
    assert 0 < kernels <= step * 1.05
