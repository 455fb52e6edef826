"""fastopt.torch under FSDP2 (fully_shard, DTensor parameters), 2 processes on gloo/CPU:
examples/fsdp2_train.py --check trains Adam, AdamW and SGD-momentum for 50 steps with
fastopt.torch and with torch.optim, and resumes checkpoints taken through
torch.distributed.checkpoint's get/set_optimizer_state_dict."""
import json

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp")
import fastopt.torch  # noqa: E402,F401  (the module under test: an import error fails here)
import torchrun  # noqa: E402

RUN_TIMEOUT = 240  # s; a healthy run takes ~35 s on 2 busy vCPUs; gloo's own timeout is 60 s
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def run_check(tmp_path):
    """examples/fsdp2_train.py --check under torchrun (tests/torchrun.py: killed and retried
    when gloo hangs or fails); returns its report."""
    return torchrun.run_example(
        tmp_path, "fsdp2_train.py", lambda folder: ["--check", str(folder / "report.json")],
        lambda folder: json.loads((folder / "report.json").read_text()), RUN_TIMEOUT,
        finished=lambda folder: (folder / "report.json").exists())


def test_fsdp2_training_and_checkpoints_match_torch(tmp_path):
    report = run_check(tmp_path)
    assert sorted(report) == sorted(f"{name}-{dtype}" for name in ("Adam", "AdamW", "SGD")
                                    for dtype in TOLERANCE)
    for key, entry in report.items():
        tolerance = TOLERANCE[key.split("-")[1]]
        assert entry["vs_torch"] <= tolerance, (key, entry)
        assert entry["state_like_torch"], key  # DTensor states with the parameters' placements
        assert entry["resumed_vs_continued"] == 0.0, (key, entry)
        assert entry["from_torch_vs_torch_continued"] <= tolerance, (key, entry)
