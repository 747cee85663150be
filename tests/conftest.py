"""Suite-wide setup. Without a GPU, Triton kernels run in its CPU interpreter; the variable must
be set before Triton builds any kernel."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
