"""``benchmarks.gpu_table`` reads what ``benchmarks.generation`` writes (the GPU run has one try: a key typo costs it)."""

from __future__ import annotations

import json

from benchmarks.gpu_table import rows


def test_the_table_reads_the_generation_results_as_the_benchmark_writes_them(tmp_path):
    generation = {
        "1b": {"engine": {"cuda_graphs": "(False, False)", "first_pass_tokens_per_s": 100.0,
                          "engine_streaming_tokens_per_s": 900.0, "passes_tokens_per_s": [400.0, 420.0]},
               "continuous": {"short_ttft_s": 0.2, "first_short_ttft_s": 0.9, "tokens_per_s": 380.0, "first_pass_tokens_per_s": 90.0,
                              "passes_tokens_per_s": [380.0]},
               "ratio": {"fleet_continuous_to_engine": 0.927, "engine_tokens_per_s_median": 410.0}}}
    (tmp_path / "generation.json").write_text(json.dumps(generation))
    table = dict(rows(tmp_path))
    assert table["fleet-to-engine ratio"] == "0.927"
    assert table["short job TTFT among 8 long ones (continuous): warm / fresh worker"] == "0.2 / 0.9 s"
    assert table["engine alone, streaming off (median of its passes)"] == "410.0 tokens/s"
    assert table["engine alone, streaming on"] == "900.0 tokens/s"
    assert table["first passes (new batch shapes): fleet / engine alone"] == "90.0 / 100.0 tokens/s"
    assert table["prefix-sharing benchmark"] == "did not finish"
