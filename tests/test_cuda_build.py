"""The CUDA kernels build on every machine with nvcc (no GPU needed), the header's unpacking
agrees with the Python packer, and QuantLinear sends the kernels only what they support. The build
checks are skipped, saying why, where nvcc or a C++ compiler is missing."""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from compressor import kernels
from compressor.formats import pack

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    obj = tmp_path / "qgemv.o"
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-c", str(CUDA / "qgemv.cu"), *kernels.ARCH_FLAGS, "-o", str(obj)],
                   check=True, capture_output=True, text=True)
    data = obj.read_bytes()  # the fat binary names each architecture it holds code for
    assert b"sm_80" in data and b"sm_90" in data


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_torch_binding_compiles_against_torch_headers():
    include = Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda",
             str(Path(shutil.which("nvcc") or "/nonexistent").resolve().parents[1])]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include/cuda_runtime.h").is_file()),
                        None)
    if cuda_include is None:
        pytest.skip(f"CUDA runtime headers not found in {homes}")
    subprocess.run(["g++", "-std=c++20", "-fsyntax-only", f"-I{include}", f"-I{include}/torch/csrc/api/include",
                    f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}",
                    "-DTORCH_EXTENSION_NAME=compressor_cuda", str(CUDA / "bindings.cpp")], check=True)


@pytest.fixture(scope="module")
def unpack_check(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    exe = tmp_path_factory.mktemp("bin") / "unpack_check"
    subprocess.run(["g++", "-std=c++17", "-O1", str(ROOT / "tests" / "cuda" / "unpack_check.cpp"), "-o", str(exe)],
                   check=True)
    return exe


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [7, 64, 100])
def test_header_unpacks_what_python_packs(unpack_check, bits, in_features):
    codes = torch.randint(0, 2**bits, (1, in_features), generator=torch.Generator().manual_seed(bits + in_features))
    words = (pack(codes, bits).long() & 0xFFFFFFFF)[0].tolist()
    stdin = f"{bits} {in_features} {len(words)} " + " ".join(map(str, words))
    result = subprocess.run([str(unpack_check)], input=stdin, capture_output=True, text=True)
    assert result.returncode == 0, result.returncode
    assert list(map(int, result.stdout.split())) == codes[0].tolist()


@pytest.mark.parametrize("bits,group_size,in_features,dtype,expected", [
    (4, 128, 576, torch.float16, True), (2, 64, 1536, torch.bfloat16, True),
    (4, 4, 576, torch.float16, False),  # a group smaller than one packed word
    (3, 128, 576, torch.float16, False), (8, 128, 576, torch.float16, False),  # no 3- or 8-bit kernel
    (4, 128, 600, torch.float16, False),  # in_features not a multiple of 64: x rows are read in 16-byte vectors
    (4, 128, 576, torch.float32, False),
])
def test_kernel_support_matches_the_kernels_limits(bits, group_size, in_features, dtype, expected):
    """QuantLinear sends to the kernels only what cuda/qgemv.cu's supported() accepts; the rest takes the
    reference path instead of failing in the launcher."""
    assert kernels.supports(bits, group_size, in_features, torch.empty(1, in_features, dtype=dtype)) is expected
