"""TensorRT: one engine per bundle graph, with optimisation profiles for prefill with and without
visual tokens and for decoding (docs/tensorrt.md: written against TensorRT's real API, 10.3 as on
JetPack 6 and 11.x, strongly typed networks; TensorRT itself runs on none of the machines this
project is developed on, so everything that does not need it is tested without it).

- `profiles`: which shapes each graph's profiles cover (pure; `--plan` prints them);
- `buffers`: the device memory a request needs (pure);
- `library`: importing TensorRT, or one line saying what to install;
- `builder`: ONNX -> serialized engine; `record`: what engines were built for, checked on load;
- `backend`: engines behind the `engines.Session` interface, on device buffers (`cuda_memory`).
"""
