"""The convergence benchmark's CI smoke run: ``python benchmarks/convergence.py --quick``.

It trains the MLP task for a few steps with AdamW, the drop-in ``ShampooCallback`` and the Shampoo
and SOAP presets through Lightning, and exits non-zero unless every Shampoo-family loss is finite
and below its initial value. This test runs it as CI does and checks the same facts from the
results file it writes, so a script that stopped asserting would still fail here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_convergence_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "quick run OK" in done.stdout

    runs = {r["optimizer"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(runs) == {"adamw", "shampoo_callback", "shampoo", "soap"}
    for name in ("shampoo_callback", "shampoo", "soap"):
        run = runs[name]
        losses = [r["train"] for r in run["records"]]
        assert run["records"][-1]["step"] == run["steps"], name  # trained to the end
        assert all(math.isfinite(x) for x in losses) and not run["nonfinite"], name
        assert run["final_train"] < run["initial_train"], name
    shampoo = runs["shampoo_callback"]
    # The drop-in starts from the same weights as AdamW and learns at least a fifth of the way.
    assert shampoo["initial_train"] == runs["adamw"]["initial_train"]
    assert shampoo["final_train"] < 0.8 * shampoo["initial_train"]
