"""The Triton compile gate (tools/check_triton_kernels.py): its drivers reach every kernel, and its compile
path builds real sm_80 code. The full gate runs in CI (.ci/run); this is its fast smoke check."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "tools" / "check_triton_kernels.py"


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit" and isinstance(target.value, ast.Name) \
        and target.value.id == "triton"


def _kernels_in_source() -> set[str]:
    """module:name of every @triton.jit function in pykernels/triton that is launched (``name[grid](...)``)
    or named like one (``*_kernel``, which catches kernels launched through a variable), read from the
    source so that the gate's own discovery is not what is tested."""
    found = set()
    for path in sorted((ROOT / "pykernels" / "triton").glob("*.py")):
        tree = ast.parse(path.read_text())
        jit = {node.name for node in tree.body
               if isinstance(node, ast.FunctionDef) and any(map(_is_triton_jit, node.decorator_list))}
        launched = {node.func.value.id for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)}
        found |= {f"pykernels.triton.{path.stem}:{name}" for name in jit
                  if name in launched or name.endswith("_kernel")}
    return found


def test_gate_drives_every_kernel_and_compiles_for_sm80():
    expected = _kernels_in_source()
    assert len(expected) >= 20, expected  # the scan itself still finds the engine's kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(GATE), "--arch", "80", "--kernel", "_row_dot_kernel", "--limit", "1",
                           "--jobs", "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    recorded = re.search(r"^recorded kernels: (.*)$", output, re.M)
    assert recorded, output
    missing = expected - set(recorded.group(1).split())
    assert not missing, f"the gate's drivers launch no {sorted(missing)}: add them to a drive_*() in {GATE.name}"
    assert proc.returncode == 0, output
    rows = re.findall(r"^_row_dot_kernel\s+sm_80\s+(\d+)\s+\S+\s+(\d+)", output, re.M)
    assert len(rows) == 1, output
    regs, shared = map(int, rows[0])
    assert 0 < regs <= 255 and shared >= 0, output
    assert "sm_80: 1 specialisations, 0 failed" in output, output
