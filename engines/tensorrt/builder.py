"""ONNX graph -> serialized TensorRT engine, with the graph's optimisation profiles.

Strongly typed networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, TensorRT 10.x and 11.x,
where the weak-typing builder flags such as `BuilderFlag.FP16` are gone): the precision is the
ONNX graph's, so an fp16 bundle (fp32 kept where the export keeps it) builds an fp16 engine and
one code path serves JetPack 6's TensorRT 10.3 and TensorRT 11. The parser is given the file's
path so external data (graphs over 2 GB) is found beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.errors import BackendError
from engines.tensorrt.library import tensorrt
from engines.tensorrt.profiles import Profile


@dataclass(frozen=True)
class BuildOptions:
    workspace_gb: float = 4.0  # TensorRT's scratch memory limit while building and running
    timing_cache: Path | None = None  # reused across builds (and graphs): much faster rebuilds


def build_engine(onnx_path: Path, profiles: list[Profile], options: BuildOptions) -> bytes:
    trt = tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(
            f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}",
            hint="check the bundle with: dyvte-rt inspect --tensorrt-ready",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    cache = _timing_cache(config, options.timing_cache)
    for profile in profiles:
        optimisation = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            optimisation.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(optimisation)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(
            f"TensorRT could not build an engine for {onnx_path.name}",
            hint="see TensorRT's messages above; a larger --workspace-gb or a smaller --max-context may help",
        )
    if options.timing_cache is not None:
        options.timing_cache.write_bytes(bytes(cache.serialize()))
    return bytes(serialized)


def _timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def device_identity() -> tuple[str, str]:
    """(GPU name, compute capability) of device 0, through cuda-bindings."""
    from engines.cuda_memory import check, cudart

    props = check(cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"
