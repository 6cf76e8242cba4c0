"""The GPU runtime check's stages rehearsed on the CPU with a small fake wheel: the wheel repacked
without the libraries the package never loads and split into parts with a manifest, parts checked
on arrival, a damaged or missing part refused in one line, the archive reassembled and unpacked
into its own folder, and the provider probe's one-line verdict."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/gpu_runtime_check.sh"


def fake_wheel(folder: Path) -> Path:
    """A valid wheel of a package `dyvte_fake_probe` padded to about 2.5 MiB (three 1 MiB parts)."""
    wheel = folder / "dyvte_fake_probe-0.1-py3-none-any.whl"
    files = {
        "dyvte_fake_probe/__init__.py": b"VALUE = 42\n",
        "dyvte_fake_probe/padding.bin": os.urandom(5 * 2**19),
        # the two libraries the repack leaves out (the Python package never loads them)
        "dyvte_fake_probe/capi/libonnxruntime.so.0.1": b"C API copy",
        "dyvte_fake_probe/capi/libonnxruntime_providers_tensorrt.so": b"TensorRT provider",
        "dyvte_fake_probe/capi/libonnxruntime_providers_cuda.so": b"CUDA provider",
        "dyvte_fake_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: dyvte-fake-probe\n"
        b"Version: 0.1\n",
        "dyvte_fake_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{name},sha256={hashlib.sha256(data).hexdigest()},{len(data)}\n" for name, data in files.items()
        )
        + "dyvte_fake_probe-0.1.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("dyvte_fake_probe-0.1.dist-info/RECORD", record)
    return wheel


def stage(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_every_stage_runs_here_with_a_fake_wheel(tmp_path):
    here, device = tmp_path / "here", tmp_path / "device"
    here.mkdir()
    env = {**os.environ, "GPU_WHEEL_DIR": str(here), "PART_MIB": "1", "PYTHON": sys.executable,
           "GPU_SITE": str(tmp_path / "site")}  # fmt: skip

    done = stage(env, "parts", str(fake_wheel(tmp_path)))
    assert done.returncode == 0, done.stderr
    parts = sorted(p.name for p in here.glob("part-*"))
    assert parts == ["part-00", "part-01", "part-02"]
    assert done.stdout.count("run(command=") == 3 and (
        "receive 2 && bash scripts/gpu_runtime_check.sh install && bash scripts/gpu_runtime_check.sh check"
        in done.stdout
    )
    manifest = (here / "SHA256SUMS").read_text().splitlines()
    assert manifest[0].startswith("archive dyvte_fake_probe-0.1-py3-none-any.tar.xz ") and len(manifest) == 4
    wrong = stage(env, "parts", str(tmp_path / "missing.whl"))  # a wrong path keeps the parts made before
    assert wrong.returncode == 1 and "no wheel at" in wrong.stderr
    assert sorted(p.name for p in here.glob("part-*")) == parts and (here / "SHA256SUMS").is_file()

    # the device receives the manifest and one part per call
    env["GPU_WHEEL_DIR"] = str(device)
    device.mkdir()
    shutil.copy(here / "SHA256SUMS", device)
    missing = stage(env, "receive", "0")
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"gpu_runtime_check: part-00 has not arrived: carry {device}/part-00"
    )
    for index, name in enumerate(parts[:2]):
        shutil.copy(here / name, device)
        done = stage(env, "receive", str(index))
        assert done.returncode == 0 and done.stdout.strip() == f"{name} ok; {index + 1} of 3 parts here"
    early = stage(env, "install")
    assert early.returncode == 1 and "missing or damaged: part-02" in early.stderr
    (device / "part-02").write_bytes((here / "part-02").read_bytes()[:-1] + b"x")
    damaged = stage(env, "receive", "2")
    assert damaged.returncode == 1 and "part-02 is damaged" in damaged.stderr
    shutil.copy(here / "part-02", device)
    assert stage(env, "receive", "2").returncode == 0

    # reassembled and installed into its own folder; this CPU build has no CUDA provider: one line
    installed = stage(env, "install")
    assert (tmp_path / "site/dyvte_fake_probe/__init__.py").is_file(), installed.stderr
    assert (tmp_path / "site/dyvte_fake_probe-0.1.dist-info/METADATA").is_file()
    assert sorted(p.name for p in (tmp_path / "site/dyvte_fake_probe/capi").iterdir()) == [
        "libonnxruntime_providers_cuda.so"
    ]
    assert installed.returncode == 1
    assert (
        installed.stdout.strip()
        .splitlines()[-1]
        .startswith("gpu_providers: this ONNX Runtime has no CUDAExecutionProvider")
    )
    assert "Traceback" not in installed.stdout + installed.stderr
    refused = stage({**env, "GPU_SITE": str(tmp_path / "nowhere")}, "check")
    assert refused.returncode == 1 and "run the install stage first" in refused.stderr


def test_a_missing_library_is_named_in_one_line(monkeypatch, capsys):
    """The probe's verdict when the CUDA provider's libraries are not found (ONNX Runtime logs the
    dlopen error and falls back to the CPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_providers
    import onnxruntime

    log = "[E:onnxruntime:Default] Failed to load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file: No such file or directory\n"  # noqa: E501
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, "CPUExecutionProvider [2.0, 2.0]\n", log),
    )
    assert gpu_providers.main() == 1
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "gpu_providers: the CUDA provider does not load: missing libcudnn.so.9"
    )
