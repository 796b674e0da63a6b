"""The throughput map (`python -m bench --map`) on a tiny model: its rates, ratios and skipped cells are what they
say."""
import time

import pytest

from bench import throughput_map
from jaxlmc import memory


def test_chunk_rate_counts_steps_over_wall_time():
    class Loss:
        def block_until_ready(self):
            return self

    def slow_chunk(state, consts, data, n):  # 20 ms per chunk of 5 steps: 250 steps/s
        time.sleep(0.02)
        return state, Loss(), None

    assert throughput_map.chunk_rate(slow_chunk, None, None, None, 5, 0.2) == pytest.approx(250, rel=0.2)


@pytest.mark.slow
def test_map_cells_on_a_tiny_model(monkeypatch):
    width = 8
    per_member = 16 * (40 * width + width + width * width + width + width * 10 + 10)  # params, grads, 2 moments
    assert throughput_map.state_bytes_per_member(
        throughput_map.models.build(throughput_map.ModelConfig(kind="mlp", width=width, depth=2), (40,), 10)
    ) == per_member
    # A budget of 3 members' state: N = 1 and 2 run, N = 4 is skipped and says why.
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device=None: 3 * per_member)
    torch_step = 0.01
    rows = throughput_map.throughput_map([width], [1, 2, 4], peak=1e12, chunk=2, min_seconds=0.05,
                                         memory_fraction=1.0, torch_seconds=lambda n, steps, w, b, s: torch_step)
    assert [(r["width"], r["members"]) for r in rows] == [(8, 1), (8, 2), (8, 4)]
    assert "skipped" in rows[2] and "vmapped_member_steps_per_s" not in rows[2]
    for row in rows[:2]:
        assert row["vmapped_member_steps_per_s"] > 0 and row["loop_member_steps_per_s"] > 0
        assert row["ratio_vs_loop"] == pytest.approx(row["vmapped_member_steps_per_s"] / row["loop_member_steps_per_s"])
        assert row["torch_func_member_steps_per_s"] == pytest.approx(row["members"] / torch_step)
        assert row["ratio_vs_torch_func"] == pytest.approx(
            row["vmapped_member_steps_per_s"] / row["torch_func_member_steps_per_s"])
        assert 0 < row["fraction_of_matmul_peak"] < 1
    assert rows[0]["loop_member_steps_per_s"] == rows[1]["loop_member_steps_per_s"]  # one member's rate, per width
