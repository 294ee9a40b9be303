import subprocess
import sys


def test_import_dinotxt_does_not_load_the_training_stack():
    code = ("import sys, dinotxt; bad = [m for m in ('lightning', 'webdataset', 'faiss') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_lists_models():
    out = subprocess.run([sys.executable, "-m", "dinotxt.cli", "models"], capture_output=True, text=True)
    assert out.returncode == 0 and "dinotxt_vitl14_reg4" in out.stdout
