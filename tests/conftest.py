"""Suite-wide setup: none is needed for the kernels. CPU tensors sent to the Triton backend run in
Triton's interpreter and CUDA tensors on the GPU, in the same process (kernels/triton_triplane.py
builds the kernels once for each), so the suite runs alike on machines with and without a GPU."""
