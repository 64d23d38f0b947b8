"""petald's own C kernels (int4 matmul, decode-step attention), built into one library on first use."""
