"""The quickstart example runs end to end at reduced size, and forgets."""

import importlib.util
import json
from pathlib import Path

import pytest

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


# The whole example (~70 s on 2 cores); its pieces are covered by
# test_unlearn_resnet.py and the CLI round trip.
@pytest.mark.slow
def test_quickstart_reduced(tmp_path):
  spec = importlib.util.spec_from_file_location("quickstart", _EXAMPLE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = tmp_path / "q.json"
  rows = mod.main(["--ipc", "20", "--test-ipc", "10", "--epochs", "15",
                   "--json", str(out)])
  before = rows["Before (fine-tuned on D)"][0]
  after = rows["Fast-NTK"][0]
  retrain = rows["Retrain (on D_r)"][0]
  assert before["forget"] >= 0.5          # fine-tuning learned class 0
  assert retrain["forget"] <= 0.2         # retraining never saw it
  assert after["forget"] < before["forget"]  # Fast-NTK forgot
  assert after["retain"] >= 0.5           # ... and kept the rest
  saved = json.loads(out.read_text())
  # 200 samples x 10 logits vs 2,026 parameters: the cost model's choice.
  from fastntk_jax.core.solvers import choose_solver
  assert saved["unlearn"]["solver"] == choose_solver(200, 10, 2026)
  assert saved["unlearn"]["num_params"] == 2026
  assert saved["write_back_max_logit_gap"] < 1e-4
