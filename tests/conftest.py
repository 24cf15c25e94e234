"""Shared test setup: the repo root on sys.path, deterministic CPU math."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Without a GPU, Triton kernels (ldm/optim/triton_adamw.py) run on CPU tensors in Triton's
# interpreter; it must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# LDM_TEST_THREADS=1 when several test runs share the machine: spinning OpenMP threads of
# competing processes slow each other down by orders of magnitude.
torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", min(2, os.cpu_count() or 1))))
