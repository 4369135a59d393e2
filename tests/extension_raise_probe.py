"""Makes torch.ops.fastbert.embedding_layer_norm raise IndexError (an out-of-range id) on the CPU and,
where there is one, a CUDA device, and checks that the exception reaches Python. Exit status 0 when it
does. On one GPU image (issue 6) the process crashed instead (segmentation fault), for the CPU and CUDA
kernels alike; tests/ops/test_embeddings.py runs this first in a child process, and
benchmarks/gpu_session.sh runs it under cuda-gdb for the native backtrace."""

import torch

import fastbert._C

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and fastbert._C.with_cuda else [])
for device in devices:
    ids = torch.tensor([0, 99, 1], device=device)
    table = torch.randn(10, 8, device=device)
    try:
        torch.ops.fastbert.embedding_layer_norm(ids, ids.clamp(max=9), ids.clamp(max=1), table, table, table[:2],
                                                table[0], table[1], 1e-12)
    except IndexError as error:
        print(f"{device}: raised {error}")
    else:
        raise SystemExit(f"{device}: the out-of-range id raised nothing")
