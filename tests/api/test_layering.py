"""The api package never imports torch or kdiga_core (its image stays small and CPU-only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_imports_no_torch_or_kdiga_core():
    code = (
        "import sys\n"
        "import api.main, api.db, api.models, api.storage, api.crud, api.queue, api.admin, api.settings\n"
        "api.main.create_app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kdiga_core', 'worker'))\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules and 'kdiga_core' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
