import subprocess
import sys


def test_the_pruning_package_imports_torch_only():
    code = (
        "import sys, slimkit, slimkit.prune, slimkit.hub\n"
        "slimkit.hub._load_method_blocks()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'timm', 'transformers', 'accelerate', 'torch_pruning', 'torchao', 'onnx'})\n"
        "assert 'pruning' in slimkit.hub._BLOCKS\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
