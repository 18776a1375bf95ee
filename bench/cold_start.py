"""Section 3: cold start. `serve run` -> first 200 on /health -> every model ready, and for each
family our load time (the replica's own measure, /health load_seconds) against a bare
`from_pretrained` of the same directory in a fresh process (imports excluded on both sides)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .servers import base_env

BARE = r"""
import json, sys, time
import torch, transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTextToWaveform,
    AutoProcessor,
    AutoTokenizer,
)
family, path = sys.argv[1], sys.argv[2]
model_cls = {"llm": AutoModelForCausalLM, "stt": AutoModelForSpeechSeq2Seq, "tts": AutoModelForTextToWaveform}[family]
proc_cls = AutoProcessor if family == "stt" else AutoTokenizer
t0 = time.perf_counter()
proc_cls.from_pretrained(path)
model = model_cls.from_pretrained(path).eval()
if torch.cuda.is_available():
    model.to("cuda")
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

MODEL_OF_FAMILY = {"llm": "tiny-llm", "stt": "tiny-whisper", "tts": "tiny-vits"}


def bare_load_s(family: str, path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", BARE, family, str(path)], env=base_env(), capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def measure(timings: dict, dirs: dict[str, Path]) -> dict:
    models = timings.get("health", {}).get("models", {})
    families = {}
    for family, name in MODEL_OF_FAMILY.items():
        ours = models.get(name, {}).get("load_seconds")
        bare = bare_load_s(family, dirs[family])
        families[family] = {"model": name, "ours_load_s": ours, "bare_from_pretrained_s": bare,
                            "ratio": ours / bare if ours and bare else None}
    return {
        "health_200_s": timings.get("health_200_s"), "all_ready_s": timings.get("all_ready_s"),
        "load_seconds": {n: m.get("load_seconds") for n, m in models.items()},
        "families": families,
    }
