#!/usr/bin/env bash
# dyvte-rt's own runtime on an NVIDIA GPU through onnxruntime-gpu, prepared here and run on a lent
# machine that has no network (beside scripts/gpu_check.sh, which times the PyTorch reference).
#
#   bash scripts/gpu_runtime_check.sh parts [WHEEL]  # here: fetch (or take) the wheel, repack it, split it, print the calls
#   bash scripts/gpu_runtime_check.sh receive N      # on the device: part N arrived intact?
#   bash scripts/gpu_runtime_check.sh install        # on the device: reassemble, unpack, CUDA provider loads?
#   bash scripts/gpu_runtime_check.sh check [ARGS]   # on the device: benchmarks/gpu_runtime.py -> $OUT/gpu_runtime.json
#
# A device call carries at most 64 MiB and the wheel is about 244 MiB, so it is repacked first: its
# files as a tar.xz (the CUDA kernels compress to 0.81 of the wheel's deflate) without the two
# libraries the Python package never loads (libonnxruntime.so, the C API's copy of the runtime,
# and the TensorRT provider, whose libraries are not on the machine), about 190 MiB. That travels in
# parts of PART_MIB (55) MiB, one per back-to-back call, in the git-ignored .gpu-wheel/ (kept on the
# device while it stays warm). If the machine went back between calls, start again from part 0.
# GPU_WHEEL_DIR, GPU_SITE and PYTHON move the folders and the interpreter (for the CPU rehearsal:
# tests/benchmarks/test_gpu_runtime_check.py runs every stage with a small fake wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
parts_dir=${GPU_WHEEL_DIR:-.gpu-wheel}
site=${GPU_SITE:-/tmp/ort-gpu}
python=${PYTHON:-python3}
part_mib=${PART_MIB:-55}
wheel_spec=${ORT_GPU_WHEEL:-onnxruntime-gpu==1.31.1}

die() { echo "gpu_runtime_check: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

stage_parts() {
    local wheel=${1:-}
    local tree_bytes=0
    if git rev-parse --git-dir > /dev/null 2>&1; then  # a call carries the working tree too
        tree_bytes=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u \
            | xargs -d '\n' du -cb 2> /dev/null | tail -1 | cut -f1 || true)
    fi
    if [ $((tree_bytes + part_mib * 1048576 + 4096)) -gt $((64 * 1048576)) ]; then
        die "a part of $part_mib MiB and the working tree ($((tree_bytes / 1048576)) MiB) exceed a call's 64 MiB: lower PART_MIB"
    fi
    mkdir -p "$parts_dir"
    if [ -z "$wheel" ]; then
        "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 -d "$parts_dir/download" "$wheel_spec" \
            || die "pip could not download $wheel_spec for cp312 manylinux x86_64"
        wheel=$(ls "$parts_dir"/download/*.whl | head -1)
    fi
    [ -f "$wheel" ] || die "no wheel at $wheel"
    rm -f "$parts_dir"/part-* "$parts_dir"/SHA256SUMS  # the parts of an earlier wheel, once this one is here
    local archive unpacked
    archive="$parts_dir/$(basename "$wheel" .whl).tar.xz"
    unpacked=$(mktemp -d)
    "$python" -m zipfile -e "$wheel" "$unpacked" || die "$wheel is not a readable wheel"
    find "$unpacked" \( -name 'libonnxruntime.so*' -o -name 'libonnxruntime_providers_tensorrt.so' \) -delete
    echo "repacking $(basename "$wheel") as $(basename "$archive") (xz, a minute or two) ..."
    tar -C "$unpacked" -cf - . | xz -T0 -6 > "$archive"
    rm -rf "$unpacked"
    split -b "${part_mib}M" -d -a 2 "$archive" "$parts_dir/part-"
    {
        echo "archive $(basename "$archive") $(sha "$archive") $(stat -c %s "$archive")"
        for part in "$parts_dir"/part-*; do echo "part $(basename "$part") $(sha "$part")"; done
    } > "$parts_dir/SHA256SUMS"
    local names=("$parts_dir"/part-*) count last
    count=${#names[@]}
    last=$((count - 1))
    echo "wrote $count parts of $(basename "$wheel") to $parts_dir/ (manifest: $parts_dir/SHA256SUMS)"
    echo "device calls, back to back (each carries the manifest and one part):"
    for i in $(seq 0 "$last"); do
        local part
        part=$(printf 'part-%02d' "$i")
        local command="bash scripts/gpu_runtime_check.sh receive $i" timeout=120
        local carry="'$parts_dir/SHA256SUMS', '$parts_dir/$part'"
        if [ "$i" -eq "$last" ]; then  # the last part, the install and the check in one call: one start-up fewer
            command="$command && bash scripts/gpu_runtime_check.sh install && bash scripts/gpu_runtime_check.sh check"
            timeout=600
            if [ -f runs/gpur/demo-fp16-inplace/manifest.json ]; then  # demo bundles exported here travel too
                command="$command --work runs/gpur"
                for bundle in runs/gpur/demo-*; do carry="$carry, '$bundle'"; done
            fi
        fi
        echo "  run(command='$command', carry=[$carry], timeout_s=$timeout)"
    done
    echo "then give_back; the report is \$OUT/gpu_runtime.json (commit it under benchmarks/results/)"
}

expected() {  # expected sha256 of a part, from the manifest
    awk -v name="$1" '$1 == "part" && $2 == name { print $3 }' "$parts_dir/SHA256SUMS"
}

stage_receive() {
    local index=${1:?receive needs a part number}
    local name
    name=$(printf 'part-%02d' "$index")
    [ -f "$parts_dir/SHA256SUMS" ] || die "no $parts_dir/SHA256SUMS: carry it with every part"
    [ -f "$parts_dir/$name" ] || die "$name has not arrived: carry $parts_dir/$name"
    [ "$(sha "$parts_dir/$name")" = "$(expected "$name")" ] || die "$name is damaged (sha256 differs): carry it again"
    local have=0 total
    total=$(grep -c '^part ' "$parts_dir/SHA256SUMS")
    for part in $(awk '$1 == "part" { print $2 }' "$parts_dir/SHA256SUMS"); do
        [ -f "$parts_dir/$part" ] && [ "$(sha "$parts_dir/$part")" = "$(expected "$part")" ] && have=$((have + 1))
    done
    echo "$name ok; $have of $total parts here"
}

with_cuda_libraries() {  # the nvidia-* pip packages' lib folders on LD_LIBRARY_PATH, for the provider's dlopen
    local folders
    folders=$("$python" -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for s in site.getsitepackages()
                       for p in glob.glob(s + "/nvidia/**/lib*.so*", recursive=True)})))' 2> /dev/null || true)
    [ -z "$folders" ] || export LD_LIBRARY_PATH=$folders${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

stage_install() {
    [ -f "$parts_dir/SHA256SUMS" ] || die "no $parts_dir/SHA256SUMS: run the receive calls first"
    local archive_name archive_sha missing=()
    read -r _ archive_name archive_sha _ < <(grep '^archive ' "$parts_dir/SHA256SUMS")
    for part in $(awk '$1 == "part" { print $2 }' "$parts_dir/SHA256SUMS"); do
        [ -f "$parts_dir/$part" ] && [ "$(sha "$parts_dir/$part")" = "$(expected "$part")" ] || missing+=("$part")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing or damaged: ${missing[*]} (the machine went back? start again from part 0)"
    mkdir -p "$parts_dir/whole"
    cat "$parts_dir"/part-* > "$parts_dir/whole/$archive_name"
    [ "$(sha "$parts_dir/whole/$archive_name")" = "$archive_sha" ] || die "the reassembled archive's sha256 differs"
    rm -rf "$site" && mkdir -p "$site"
    # Python's tarfile reads xz itself: the device image need not have the xz program
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$parts_dir/whole/$archive_name" "$site" || die "could not unpack $archive_name into $site"
    rm -rf "$parts_dir/whole"
    with_cuda_libraries
    PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$python" benchmarks/gpu_providers.py
}

stage_check() {
    [ -d "$site/onnxruntime" ] || die "onnxruntime-gpu is not installed in $site: run the install stage first"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    with_cuda_libraries
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$python" benchmarks/gpu_providers.py >&2 || true
    PYTHONUNBUFFERED=1 exec "$python" benchmarks/gpu_runtime.py "$@"
}

stage=${1:-}
shift || true
case "$stage" in
    parts) stage_parts "$@" ;;
    receive) stage_receive "$@" ;;
    install) stage_install ;;
    check) stage_check "$@" ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$stage" ] || die "unknown stage '$stage'"; exit 2 ;;
esac
