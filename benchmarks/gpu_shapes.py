"""The shapes the GPU runs use, in one place: bench_kernels, bench_inference, kernel_check,
and compile_check, which compiles every kernel variant they launch."""

HEADS, KNN, HALF = 4, 32, 256  # heads, knn and k_dim / 2 of every GPU memory layer
TRAINING = {  # bench_kernels
    "small": dict(tokens=8192, n_keys=512, v_dim=1024),
    "1.3B": dict(tokens=16384, n_keys=1024, v_dim=2048),
}
INFERENCE = dict(d_model=2048, n_keys=1024)  # bench_inference, Memory+ with v_dim = d_model
INFERENCE_TOKENS = (1, 8, 64, 512, 4096)
# kernel_check on a GPU
# n, picks, rows, v_dim; v_dim 2048 runs the backward over two column blocks, as at 1.3B
CHECK_BAG = [(4096, 128, 65536, 1024), (1000, 128, 4096, 320), (512, 128, 4096, 2048)]
CHECK_TOPK = [(4096, 4, 512, 512, 32), (777, 4, 1024, 256, 16)]  # n, heads, n_keys, k_dim, knn
CHECK_GATE = [(16384, 2048), (777, 320)]  # n, v_dim: the 1.3B-like step's, and a ragged one
CHECK_LINEARS = [(1, 2048, (2048, 2048)), (8, 2048, (2048,)), (16, 1000, (300, 77))]  # n, d_in
CHECK_LOOKUP = [  # n, heads, n_keys, k_dim, knn, v_dim
    (1, 4, 1024, 512, 32, 2048),
    (8, 4, 1024, 512, 32, 2048),
    (64, 4, 512, 256, 16, 1000),
]
