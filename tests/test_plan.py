import json
import subprocess
import sys

import pytest

from omnilm.config import get_preset
from omnilm.errors import ConfigError
from omnilm.plan import count_params, plan_preset


def test_llama_1b_count_matches_the_published_size():
    # Llama-3.2-1B has 1,235,814,400 parameters (tied embeddings counted once)
    assert count_params(get_preset("llama-3.2-1b"))["total"] == 1_235_814_400


def test_design_88b_exact_count_and_notes():
    p = plan_preset("design-88b")
    L, D, V, hd = 110, 8192, 50257, 128
    F = 26624  # SwiGLU width chosen so that the MQA model has the 88B its name says
    per_layer = 2 * D * D + 2 * D * hd + 3 * D * F + 2 * D  # q,o + MQA k,v + SwiGLU FFN + two RMSNorms
    assert p["params"] == L * per_layer + 2 * V * D + D
    assert abs(p["params"] - 88e9) / 88e9 < 0.01
    assert p["kv_bytes_per_token"] == 2 * L * 1 * hd * 2
    assert p["weight_bytes"]["bf16"] == 2 * p["params"]
    notes = " ".join(p["notes"])
    assert "88.58B" in notes and "multi-query" in notes and "1.06e24" in notes
    assert 1.2e24 < p["train_flops"] < 1.25e24  # 6*N*D = 1.05e24 plus 1.77e23 of attention


def test_unified_8b_breakdown_adds_up():
    p = plan_preset("unified-8b")
    b = p["params_breakdown"]
    assert sum(v for k, v in b.items() if k != "total") == b["total"] == p["params"]
    assert 7e9 < p["params"] < 9e9


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'llama-9b'"):
        get_preset("llama-9b")


def test_cli_plan_json_and_errors():
    out = subprocess.run(
        [sys.executable, "-m", "omnilm", "plan", "--preset", "design-88b", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    for key in ("params", "kv_bytes_per_token", "weight_bytes", "train_flops", "gpu_days"):
        assert key in p
    bad = subprocess.run(
        [sys.executable, "-m", "omnilm", "plan", "--preset", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: unknown preset 'nope'")
    assert "Traceback" not in bad.stderr


def test_count_cache_is_current_and_plan_imports_no_torch():
    """omnilm/assets/plan_counts.json holds every preset's counts so `omnilm plan` starts without
    torch; recounted here on the meta device, it must be exactly current."""
    import json
    import subprocess
    import sys

    from omnilm import plan as P
    from omnilm.config import PRESETS, get_preset

    cache = json.loads(P.COUNT_CACHE.read_text())
    for name in PRESETS:
        cfg = get_preset(name)
        entry = cache.get(P.fingerprint(cfg))
        assert entry is not None, f"{name}: not in {P.COUNT_CACHE.name}; run plan.write_count_cache()"
        assert entry["params"] == P.count_params(cfg, cached=False), name
        assert entry["schemes"] == P.scheme_bytes(cfg, cached=False), name
    code = "import sys, omnilm.cli as c; c.main(['plan', '--preset', 'design-88b', '--gpu-mem', '141GB']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
