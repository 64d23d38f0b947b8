/* The CPU features petald's kernels are chosen by (kernels/native/native_library.py decides which
 * kernel runs; this only reports). One bit per feature, in the order of native_library.FEATURE_BITS. */
int petald_cpu_features(void) {
    __builtin_cpu_init();
    return (__builtin_cpu_supports("avx2") ? 1 : 0) | (__builtin_cpu_supports("fma") ? 2 : 0)
        | (__builtin_cpu_supports("avx512f") ? 4 : 0) | (__builtin_cpu_supports("avx512bw") ? 8 : 0)
        | (__builtin_cpu_supports("avx512bf16") ? 16 : 0);
}
