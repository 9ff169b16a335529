"""`import pkmem` stays light: no triton, no CUDA initialisation, no heavy optional packages."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, torch, pkmem\n"
        "heavy = [m for m in ('triton', 'transformers', 'matplotlib', 'tokenizers', 'safetensors', 'yaml')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(pkmem.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
