/* One quantized matrix product in ggml (llama.cpp's tensor library), timed: the kernel edgeseq's
 * MatMulNBits is compared with (benchmarks/kernels/matmul.py builds and runs this).
 *
 *   ggml_matmul TYPE K N M NMAT THREADS REPS  ->  prints "ms_per_matmul <median>"
 *
 * TYPE q8_0 | q4_0 | f32. NMAT distinct random K x N matrices (llama.cpp's row-major: N rows of K), all
 * multiplied by the same M x K activations and summed (an Add chain, as matmul.py's ONNX graph does), so
 * that NMAT > 1 streams the weights from memory as a model's layers do. The median of REPS runs of the
 * whole graph, divided by NMAT. Threads: a ggml threadpool made once (as llama.cpp keeps one). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ggml.h"
#include "ggml-cpu.h"

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s q8_0|q4_0|f32 K N M NMAT THREADS REPS\n", argv[0]);
        return 2;
    }
    enum ggml_type type = !strcmp(argv[1], "q8_0") ? GGML_TYPE_Q8_0 : !strcmp(argv[1], "q4_0") ? GGML_TYPE_Q4_0
                        : GGML_TYPE_F32;
    int64_t K = atoll(argv[2]), N = atoll(argv[3]), M = atoll(argv[4]);
    int nmat = atoi(argv[5]), threads = atoi(argv[6]), reps = atoi(argv[7]);
    size_t wbytes = ggml_row_size(type, K) * N;
    struct ggml_init_params ip = {(size_t)nmat * wbytes + (size_t)(nmat + 2) * 4 * (M * N + M * K) + (64 << 20),
                                  NULL, false};
    struct ggml_context *ctx = ggml_init(ip);
    float *src = malloc(sizeof(float) * K * N);
    srand(1);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, M), *y = NULL;
    for (int64_t i = 0; i < K * M; i++) ((float *)x->data)[i] = (float)rand() / RAND_MAX - 0.5f;
    for (int m = 0; m < nmat; m++) {
        struct ggml_tensor *w = ggml_new_tensor_2d(ctx, type, K, N);
        for (int64_t i = 0; i < K * N; i++) src[i] = ((float)rand() / RAND_MAX - 0.5f) * 0.1f;
        if (type == GGML_TYPE_F32) memcpy(w->data, src, sizeof(float) * K * N);
        else ggml_quantize_chunk(type, src, w->data, 0, N, K, NULL);
        struct ggml_tensor *p = ggml_mul_mat(ctx, w, x); /* N x M */
        y = y ? ggml_add(ctx, y, p) : p;
    }
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    struct ggml_threadpool *tp = ggml_threadpool_new(&tpp);
    struct ggml_cplan plan = ggml_graph_plan(gf, threads, tp);
    plan.work_data = malloc(plan.work_size + 1);
    double *t = malloc(sizeof(double) * reps);
    for (int r = 0; r < 3; r++) ggml_graph_compute(gf, &plan);
    for (int r = 0; r < reps; r++) {
        double a = now_ms();
        ggml_graph_compute(gf, &plan);
        t[r] = now_ms() - a;
    }
    qsort(t, reps, sizeof(double), cmp);
    printf("ms_per_matmul %.5f\n", t[reps / 2] / nmat);
    ggml_threadpool_free(tp);
    ggml_free(ctx);
    return 0;
}
