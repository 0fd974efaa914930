"""Decision layer: policies that turn (workload, device profile, budget) into a Plan.

Ours and the peers' reproduced behaviours, all scored by the same simulator.
"""
