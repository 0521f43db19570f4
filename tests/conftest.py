"""Suite-wide set-up that must happen before any test module imports torch or triton."""

import os
import shutil

# Triton's CPU interpreter must be chosen before triton is first imported (torch and Lightning
# import it early): without a GPU, the FP8 Triton kernels are tested through it.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
