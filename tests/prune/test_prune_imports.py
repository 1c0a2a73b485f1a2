import subprocess
import sys


def test_the_pruning_package_imports_torch_only():
    code = (
        "import sys, slimkit, slimkit.prune, slimkit.hub, slimkit.methods\n"
        "from slimkit.methods import resolve\n"
        "blocks = {b.name: [resolve(b.describe), resolve(b.rebuild)] for b in slimkit.methods.hub_blocks()}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'timm', 'transformers', 'accelerate', 'torch_pruning', 'torchao', 'onnx'})\n"
        "assert 'pruning' in blocks\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
