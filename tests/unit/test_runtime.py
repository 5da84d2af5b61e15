"""Keeping Ray's process exits quiet without hiding real errors."""


def test_a_stopped_process_exits_without_a_traceback_but_other_callback_errors_print():
    import subprocess
    import sys

    code = """
import gc, weakref
from pipeline.runtime import quiet_stopped_process
quiet_stopped_process()
class A: pass
def stop(_): raise SystemExit(1)
def bug(_): raise ValueError("a real error")
a, b = A(), A()
ra, rb = weakref.ref(a, stop), weakref.ref(b, bug)
del a, b
gc.collect()
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "SystemExit" not in run.stderr
    assert "ValueError: a real error" in run.stderr
