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


def test_the_modules_do_not_import_dynamo():
    """torch._dynamo takes over a second to import (and holds the interpreter meanwhile): pkmem's
    modules, the layer and the training loop leave it to torch.compile (a forked training child's
    timers fired a second late when the dispatch module imported it)."""
    code = (
        "import sys, torch, pkmem.ops.dispatch, pkmem.metrics, pkmem.layer, pkmem.train.loop, pkmem.cli\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_import_and_cli_help_do_not_import_torch():
    """`pkmem --help` stays fast: neither `import pkmem` nor the command's parser imports torch."""
    code = (
        "import sys, pkmem, pkmem.cli\n"
        "pkmem.cli.build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from pkmem import ProductKeyMemory, make_optimizer\n"  # the public names still import
        "assert 'torch' in sys.modules and pkmem.optim.make_optimizer is make_optimizer\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_py_typed_is_shipped():
    from importlib import resources

    assert resources.files("pkmem").joinpath("py.typed").is_file()


def test_lazy_names_are_all_of_all():
    import pkmem

    assert sorted(pkmem.__all__) == sorted([*pkmem._WHERE, "__version__"])
