"""One table of what ``benchmarks/gpu.sh`` measured: ``python -m benchmarks.gpu_table OUT_DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(out: Path) -> list[tuple[str, str]]:
    """(what, figure) pairs from the JSON files the GPU run wrote; a step that did not finish says so."""
    found: list[tuple[str, str]] = []

    def load(name: str) -> dict | None:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    generation = load("generation.json")
    if generation and "1b" in generation:
        r = generation["1b"]
        found += [("short job TTFT among 8 long ones (continuous): warm / fresh worker",
                   f"{r['continuous']['short_ttft_s']} / {r['continuous'].get('first_short_ttft_s')} s"),
                  ("fleet continuous, 64 jobs 16-256 tokens", f"{r['continuous']['tokens_per_s']} tokens/s"),
                  ("engine alone, streaming off (median of its passes)",
                   f"{r['ratio']['engine_tokens_per_s_median']} tokens/s"),
                  ("fleet-to-engine ratio", str(r["ratio"]["fleet_continuous_to_engine"])),
                  ("engine alone, streaming on", f"{r['engine'].get('engine_streaming_tokens_per_s')} tokens/s")]
        if "first_pass_tokens_per_s" in r["continuous"]:
            found.append(("first passes (new batch shapes): fleet / engine alone",
                          f"{r['continuous']['first_pass_tokens_per_s']} / "
                          f"{r['engine'].get('first_pass_tokens_per_s')} tokens/s"))
    else:
        found.append(("generation benchmark", "did not finish"))
    prefix = load("prefix.json")
    if prefix and "no_sharing" in prefix:
        for key in ("sharing", "no_sharing"):
            found.append((f"prefix sharing: {key.replace('_', ' ')}",
                          f"TTFT p50 {prefix[key]['ttft_p50_s']} s, {prefix[key]['tokens_per_s']} tokens/s"))
        found.append(("prefix sharing: TTFT p50 speed-up", f"{prefix['ttft_p50_speedup']}x"))
    else:
        found.append(("prefix-sharing benchmark", "did not finish"))
    ceiling = load("ceiling.json")
    if ceiling:
        for name, row in ceiling.items():
            found.append((f"ceiling: {name}", ", ".join(f"{k} {round(v, 1)}" for k, v in row.items()
                                                        if isinstance(v, (int, float)))))
    else:
        found.append(("ceiling benchmark", "did not finish"))
    return found


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pipefleet-gpu")
    table = rows(out)
    width = max(len(what) for what, _ in table)
    print(f"| {'what':<{width}} | figure |\n|{'-' * (width + 2)}|--------|")
    for what, figure in table:
        print(f"| {what:<{width}} | {figure} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
