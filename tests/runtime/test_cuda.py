"""The GPU path: the torch chain on CUDA (eager and as CUDA graphs) and ONNX Runtime's CUDA
provider. These need a CUDA GPU and skip without one (CI has none); they ran on the
device machine, see docs/gpu.md. The CPU-side behaviour of the same code (precision
copies, clear errors without a GPU) is tested in test_backends.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evoexport
from evoexport.inputs.images import sample_batch
from evoexport.manifest import read_manifest
from evoexport.validate.report import validate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (docs/gpu.md)")


def _photos(build, n=4):
    m = read_manifest(build, verify=False).data
    x = sample_batch(m["tower"]["image_size"], m["preprocess"])
    return np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])))


def _decisions(out):
    return [t.cpu() for t in out.merge_per_point + out.picks_per_point]


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graph_replay_equals_eager_and_takes_new_inputs(tiny_build, precision):
    eager = evoexport.load(tiny_build, backend="torch", device="cuda", precision=precision, cuda_graphs=False)
    assert eager.backend.chain.compiled, "torch.compile of the selections failed on this GPU machine"
    graphed = evoexport.load(tiny_build, backend="torch", device="cuda", precision=precision)
    x = _photos(tiny_build)
    first = graphed(x)
    ref = eager(x)
    assert all(torch.equal(a, b) for a, b in zip(_decisions(first), _decisions(ref)))
    torch.testing.assert_close(first.features, ref.features, rtol=1e-5, atol=1e-5)
    # a second replay with other pixels computes them, and leaves the first result alone
    kept = first.features.clone()
    flipped = np.ascontiguousarray(x[:, :, :, ::-1])
    second = graphed(flipped)
    torch.testing.assert_close(second.features, eager(flipped).features, rtol=1e-5, atol=1e-5)
    assert not torch.equal(second.features, kept)
    assert torch.equal(first.features, kept)
    assert first.features.device.type == "cuda"


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_chain_passes_validation_in_its_precision(tiny_build, precision):
    report = validate(tiny_build, backend="torch", device="cuda", precision=precision, write=False)
    assert report["precision"] == precision
    assert report["passed"], report["summary"]


@cuda
def test_onnxruntime_cuda_provider_keeps_tensors_on_the_gpu(tiny_build):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    runner = evoexport.load(tiny_build, backend="onnxruntime")
    assert runner.backend.device == "cuda"
    out = runner(_photos(tiny_build))
    assert out.features.device_name() == "cuda"
    report = validate(tiny_build, backend="onnxruntime", write=False)
    assert report["passed"], report["summary"]


@cuda
def test_cuda_gram_similarity_on_tensor_cores_is_the_fp32_cosine():
    from evoexport.prune.selection import cosine_similarity
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(4, 289, 1024, generator=g) * torch.linspace(0.1, 30, 1024)).to(torch.bfloat16)
    on_gpu = cosine_similarity(hidden.cuda())           # bmm with an fp32 output
    on_cpu = cosine_similarity(hidden)                  # the upcast fp32 matmul
    assert on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=2e-6)


@cuda
def test_cuda_chain_copies_out_only_what_was_asked(tiny_build):
    runner = evoexport.load(tiny_build, backend="torch", device="cuda", precision="bf16")
    chain = runner.backend.chain
    x = torch.from_numpy(_photos(tiny_build)).cuda()
    assert list(chain(x)) == ["features"]
    full = chain(x, outputs=None)
    assert full["pruned0_hidden"].dtype == torch.bfloat16      # the chain's dtype across the boundary
    assert torch.equal(chain(x, outputs=["picks_0"])["picks_0"], full["picks_0"])
