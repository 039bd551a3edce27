"""The core library never imports the user tools: ``import kfc_compile`` loads no ``kfc_compile.tools`` module."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_kfc_compile_loads_no_tools():
    code = ("import json, sys, kfc_compile; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kfc_compile'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "kfc_compile.transform" in loaded  # the core itself was imported
    assert [m for m in loaded if m == "kfc_compile.tools" or m.startswith("kfc_compile.tools.")] == []
