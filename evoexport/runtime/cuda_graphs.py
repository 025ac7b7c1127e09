"""One CUDA graph for one call at one set of input shapes.

The chain launches hundreds of small kernels (24 layers, the selections' compares,
top-k, gathers); at small batches a GPU finishes them faster than Python can launch them.
Captured once per batch size, a replay is one launch. What makes capture legal here:
every shape is static once the batch is, and nothing in the chain reads a tensor back to
the host (no .item(), no data-dependent shapes).
"""
from __future__ import annotations


class GraphedCall:
    """`fn(*inputs)` captured at the inputs' shapes; call it with new inputs of those shapes.

    By default outputs are copied out of the graph's static buffers, so a result stays
    valid after the next replay."""

    def __init__(self, fn, *examples, warmup: int = 3):
        import torch

        self.static_inputs = [e.clone() for e in examples]
        # warm-up on a side stream (cuBLAS handles, SDPA kernel choice, allocator pools),
        # as torch.cuda.graphs asks, before capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_outputs = fn(*self.static_inputs)

    def replay(self):
        """Run the graph on whatever the static inputs hold now (timing)."""
        self.graph.replay()
        return self.static_outputs

    def __call__(self, *inputs, copy_out: bool = True, keys=None):
        """Replay on `inputs`. `keys` (dict outputs): copy out only these (None: all)."""
        for static, x in zip(self.static_inputs, inputs):
            if tuple(x.shape) != tuple(static.shape):
                raise ValueError(f"graph captured for shape {tuple(static.shape)}, got {tuple(x.shape)}")
            static.copy_(x)
        self.graph.replay()
        out = self.static_outputs
        if isinstance(out, dict) and keys is not None:
            out = {k: out[k] for k in keys}
        if not copy_out:
            return out
        if isinstance(out, dict):
            return {k: v.clone() for k, v in out.items()}
        return tuple(v.clone() for v in out)
