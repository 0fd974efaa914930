"""When no plan fits, ours returns the plan that needs the least memory, so that the "needs X" the CLI prints (and
"give --vram X or more") is a budget at which a plan fits. Ours' search returned its own best plan at the KV dtype
asked for: tiny at --vram 7MiB showed a BF16 plan needing 10.1 MiB (6.3 of them dequant scratch) where a 7.4 MiB
budget fitted, lucid-500m on the RTX 4090 at 300 MiB said 484.7 MiB where 375 fitted (its KV cache at bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.catalog import catalog_paths
from policies import PlanRequest, fits_memory, get_policy
from policies.peers import PEERS
from residency.device import load_profile
from residency.plan import Budget
from residency.workload import load_workload_file

CPU_PROFILE = Path(__file__).parent / "data" / "measured-cpu-2-cores.json"
CASES = [("tiny", str(CPU_PROFILE), "fp32"), ("lucid-500m", "rtx-4090", "bf16"), ("tiny", "rx-7800-xt", "bf16")]


@pytest.mark.parametrize(("model", "profile", "dtype"), CASES, ids=[f"{m}-{Path(p).stem}" for m, p, _ in CASES])
def test_the_memory_a_no_fit_plan_needs_is_a_budget_some_plan_fits(model, profile, dtype):
    workload, prof = load_workload_file(catalog_paths()[model]), load_profile(profile)
    ours = get_policy("ours")
    starved = PlanRequest(workload, prof, Budget(1024), compute_dtype=dtype)
    least = ours(starved)
    assert not fits_memory(least)
    need = least.prediction.peak_total_bytes
    # no peer's plan (each the least its own rule makes) needs less
    assert all(peer(starved).prediction.peak_total_bytes >= need for peer in PEERS.values())
    again = ours(PlanRequest(workload, prof, Budget(need), compute_dtype=dtype))
    assert fits_memory(again) and again.prediction.peak_total_bytes <= need


def test_the_vram_a_peer_is_told_to_give_is_one_its_plan_fits(tmp_path, monkeypatch, capsys):
    """A peer keeps more resident when given more: `plan default --policy forge --vram 60%` said "give --vram
    20.3MiB", where forge then needed 25.8 MiB (and the next hint 25.9)."""
    import re

    from residency.cli import main
    from residency.units import parse_size

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = ["plan", "default", "--profile", "rx-7800-xt", "--exec-mode", "eager", "--policy", "forge"]
    assert main([*args, "--vram", "60%"]) == 3
    said = capsys.readouterr().out
    need, give = re.search(r"needs ([\d.]+ [KMG]iB), budget .*give --vram (\S+) or more", " ".join(said.split())).groups()
    assert parse_size(give) > parse_size(need.replace(" ", ""))  # the plan's own peak does not fit: more is asked
    assert main([*args, "--vram", give]) == 0
