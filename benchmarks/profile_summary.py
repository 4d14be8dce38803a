"""Where a profiled worker's time went: a py-spy raw profile summed by thread and by stage.

    python -m benchmarks.profile_summary .pipefleet/profile/small/worker-idle.txt .pipefleet/profile/small/engine-idle.txt

``benchmarks.generation --profile DIR`` records the continuous worker during
one throughput pass twice at once: ``worker-idle.txt`` (``--idle``: every
thread, waiting or not) and ``worker-gil.txt`` (``--gil``: only the thread
holding the GIL, i.e. who keeps the engine's Python loop waiting); then the
engine alone in its own pass the same way (``engine-idle.txt``,
``engine-gil.txt``). Each line of py-spy's raw format is one stack
(``frame;frame;...``) and its sample count. This prints, per profile, each
thread's share of the samples (named by the function its thread runs), the
engine thread's stages, and the functions it was in (the innermost Python
frame of each sample) with their samples per 1,000 generated tokens' worth of
the profile (``--tokens``, default 8,674: one pass of the throughput mix).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: Stage of the engine thread -> a frame that marks it (first match wins, in this order).
ENGINE_STAGES = {
    "fleet sampler (per-request processors)": "FleetSampler",
    "model forward": "LlamaForCausalLM.forward",
    "logits, sampling": "_forward_process_and_sample",
    "schedule + prepare batch tensors": "prepare_next_batch",
    "update requests, build outputs": "update_batch",
}
INNERMOST_SHOWN = 8
"""Innermost Python frames of the engine thread listed per profile."""
PASS_TOKENS = 8674
"""Tokens of one pass of ``benchmarks.generation``'s throughput mix (64 jobs, 16-256 new tokens)."""
IDLE = re.compile(r"(wait|sleep|select|poll|epoll|recv|accept|_wait_for_tstate_lock|get_result \(|Queue\.get)"
                  r" \(", re.IGNORECASE)


def thread_name(frames: list[str]) -> str:
    """The function a stack's thread runs: the frame after the thread bootstrap, else the outermost one."""
    for index, frame in enumerate(frames):
        if frame.startswith(("Thread.run ", "Thread._bootstrap_inner ")) and index + 1 < len(frames):
            following = frames[index + 1]
            if not following.startswith("Thread.run "):
                return following.split(" (")[0]
    for frame in frames:
        if frame.startswith("<module>"):
            return "main thread"
    return frames[0].split(" (")[0] if frames else "?"


def summarize(path: Path, tokens: int = PASS_TOKENS) -> str:
    """The summary of one raw profile, as text."""
    threads: Counter[str] = Counter()
    idle: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [frame for frame in stack.split(";") if not frame.startswith(("thread (", "process "))]
        name = thread_name(frames)
        total += samples
        threads[name] += samples
        if frames and IDLE.search(frames[-1]):
            idle[name] += samples
        if "_run_generation_loop" in stack:
            stage = next((stage for stage, marker in ENGINE_STAGES.items() if marker in stack), "other engine work")
            stages[stage] += samples
            python_frames = [frame for frame in frames if " (" in frame and ".py:" in frame]
            if python_frames:
                innermost[python_frames[-1].split(" (")[0]] += samples
    lines = [f"{path.name}: {total} samples"]
    for name, samples in threads.most_common(10):
        lines.append(f"  {100 * samples / total:5.1f}%  {name}" +
                     (f"  (waiting: {100 * idle[name] / samples:.0f}% of it)" if idle[name] else ""))
    engine = sum(stages.values())
    if engine:
        lines.append(f"  engine thread, {engine} samples:")
        for stage, samples in stages.most_common():
            lines.append(f"    {100 * samples / engine:5.1f}%  {stage}")
        lines.append("  engine thread's innermost Python frames (samples per 1,000 tokens):")
        for function, samples in innermost.most_common(INNERMOST_SHOWN):
            lines.append(f"    {1000 * samples / tokens:7.1f}  {function}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=PASS_TOKENS, help="tokens generated while each was recorded")
    args = parser.parse_args()
    for path in args.profiles:
        print(summarize(path, args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
