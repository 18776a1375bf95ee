"""python -m bench.cpu_turns: two families computing at once on one CPU node (~20 min on 2 cores).

A voice agent's node transcribes while it chats. Here the LLM is the real SmolLM2-135M-Instruct (16
clients, greedy, max_tokens=16) and the STT model has whisper-base's dimensions (512 wide, 6 + 6
layers, 47M parameters; random weights, so every transcription runs to max_new_tokens) with 2
clients of 5 s clips. Each replica computes with torch_threads' default (every core). Per setting,
alternating, `ROUNDS` times: the LLM alone, the STT alone, then both at once, windows of `WINDOW_S`.
The settings (`--settings`; off,wake,time by default): `off` (cpu_turns false), `wake` (turns one
forward each in the order the kernel wakes the waiters: cpu_turns_share_time false), `time` (turns
shared by compute time, the default) and `stt3` (by time, the STT's cpu_turn_weight 3). "node share"
adds each family's req/s together as a fraction of its req/s alone: 1.0 means the node did as much
work as either family alone would have.
Writes bench/runs/cpu_turns{-bfloat16}.{json,md}; bench/CPU_TURNS.md is the curated record.

`--dtype bfloat16` loads both models in bf16 (packed for oneDNN where the CPU multiplies bf16
natively, loading/cpu_kernels.py); `--rounds N` sets how many times the settings alternate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from pathlib import Path

from . import models, report, servers, workloads
from .load import run_load

HERE = Path(__file__).resolve().parent
PORT, ROUNDS, WINDOW_S = 8330, 2, 60.0
LLM_CLIENTS, STT_CLIENTS, AUDIO_S, MAX_TOKENS = 16, 2, 5.0, 16
SETTINGS = {  # name: (cpu_turns, cpu_turns_share_time, the STT's cpu_turn_weight), and how the table names it
    "off": ((False, False, 1.0), "off"),
    "wake": ((True, False, 1.0), "on, wake order"),
    "time": ((True, True, 1.0), "on, by time"),
    "stt3": ((True, True, 3.0), "on, by time, STT weight 3"),
}
DEFAULT_SETTINGS = ["off", "wake", "time"]


def whisper_base_random(root: Path) -> Path:
    """whisper-base's shape with random weights and the tiny Whisper's tokenizer and processor."""
    dest = root / "whisper-base-random"
    if (dest / "model.safetensors").exists():
        return dest
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tiny = models.model_dirs(root)["stt"]
    config = WhisperConfig.from_pretrained(tiny)
    config.update({"d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 2048,
                   "decoder_ffn_dim": 2048, "encoder_attention_heads": 8, "decoder_attention_heads": 8})
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(dest)
    for item in tiny.iterdir():
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            shutil.copy(item, dest / item.name)
    return dest


def config_for(setting: str, llm_dir: Path, stt_dir: Path, dtype: str = "auto") -> dict:
    config = servers.bench_serve_config(PORT, HERE / "runs" / "models", llm_dir)
    args = config["applications"][0]["args"]
    for spec in args["models"]:
        if spec["name"] == "tiny-whisper":
            spec["source"] = str(stt_dir)
            spec.pop("build_tiny", None)
        if spec["name"] in ("tiny-llm", "tiny-whisper"):
            spec["dtype"] = dtype
    (cpu_turns, share_time, stt_weight), _ = SETTINGS[setting]
    for family, options in args["families"].items():
        options["cpu_turns"], options["cpu_turns_share_time"] = cpu_turns, share_time
        options["cpu_turn_weight"] = stt_weight if family == "stt" else 1.0
    return config


def window(url: str, make, clients: int) -> dict:
    row = run_load(url, make, clients, 1_000_000, max_wall_s=WINDOW_S).as_dict()
    return {k: row[k] for k in ("rps", "p50_ms", "requests", "errors", "first_error")}


def one_run(setting: str, llm_dir: Path, stt_dir: Path, run_dir: Path, label: str, dtype: str = "auto") -> dict:
    audio = workloads.wav_bytes(AUDIO_S)
    stt = lambda i: workloads.transcription("tiny-whisper", audio)  # noqa: E731
    with servers.serve_run(config_for(setting, llm_dir, stt_dir, dtype), run_dir, label) as server:
        # every window asks questions the server has not answered (workloads.request_numbers)
        chat = workloads.numbered_chat(server.url, "tiny-llm", MAX_TOKENS)
        run_load(server.url, chat, 2, 6, max_wall_s=60)  # warm-up
        run_load(server.url, stt, 1, 2, max_wall_s=60)
        out = {"setting": setting, "llm_alone": window(server.url, chat, LLM_CLIENTS),
               "stt_alone": window(server.url, stt, STT_CLIENTS)}
        both: dict = {}
        side = threading.Thread(target=lambda: both.__setitem__("stt", window(server.url, stt, STT_CLIENTS)))
        side.start()
        both["llm"] = window(server.url, chat, LLM_CLIENTS)
        side.join()
        out["llm_with_stt"], out["stt_with_llm"] = both["llm"], both["stt"]
    out["node_share"] = (out["llm_with_stt"]["rps"] / out["llm_alone"]["rps"]
                         + out["stt_with_llm"]["rps"] / out["stt_alone"]["rps"])
    return out


def command(result: dict) -> str:
    """The command line that made `result` (its settings read from its runs, in their order)."""
    dtype, settings = result.get("dtype", "auto"), list(dict.fromkeys(run["setting"] for run in result["runs"]))
    rounds = len(result["runs"]) // max(1, len(settings))
    return "python -m bench.cpu_turns" + (f" --dtype {dtype}" if dtype != "auto" else "") + (
        f" --settings {','.join(settings)}" if settings != DEFAULT_SETTINGS else "") + (
        f" --rounds {rounds}" if rounds != ROUNDS else "")


def markdown(result: dict) -> str:
    dtype = result.get("dtype", "auto")
    lines = [
        "# Two families computing at once on one CPU node: `cpu_turns`", "",
        report.run_line(result, command(result)) +
        f"LLM: SmolLM2-135M-Instruct, {LLM_CLIENTS} clients, greedy, max_tokens={MAX_TOKENS}. STT: whisper-base's "
        f"shape with random weights (47M parameters), {STT_CLIENTS} clients of {AUDIO_S:.0f} s clips, "
        f"weights in {dtype if dtype != 'auto' else 'float32'}. Both compute "
        f"on every core (torch_threads' default); closed loop, windows of {WINDOW_S:.0f} s; the runs alternate.", "",
        "| turns | LLM alone req/s | STT alone req/s | LLM beside STT req/s (p50 ms) | "
        "STT beside LLM req/s (p50 ms) | node share | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        errors = sum(run[k]["errors"] for k in ("llm_alone", "stt_alone", "llm_with_stt", "stt_with_llm"))
        lines.append(
            f"| {SETTINGS[run['setting']][1]} | {run['llm_alone']['rps']:.2f} | "
            f"{run['stt_alone']['rps']:.3f} | "
            f"{run['llm_with_stt']['rps']:.2f} ({run['llm_with_stt']['p50_ms']:.0f}) | "
            f"{run['stt_with_llm']['rps']:.3f} ({run['stt_with_llm']['p50_ms']:.0f}) | "
            f"{run['node_share']:.2f} | {errors} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16"], help="both models' weights dtype")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="times the settings alternate")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)}")
    cli = parser.parse_args(argv)
    settings = cli.settings.split(",")
    if unknown := set(settings) - set(SETTINGS):
        parser.error(f"unknown settings {sorted(unknown)}: choose from {', '.join(SETTINGS)}")
    suffix = "" if cli.dtype == "auto" else f"-{cli.dtype}"
    run_dir = HERE / "runs" / f"cpu_turns{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    root = HERE / "runs" / "models"
    llm_dir = models.model_dirs(root, "smollm2-135m")["llm"]
    stt_dir = whisper_base_random(root)
    meta = report.machine_meta()
    runs = []
    for i in range(cli.rounds):
        for setting in settings:
            runs.append(one_run(setting, llm_dir, stt_dir, run_dir, f"r{i}-{setting}", cli.dtype))
            print(json.dumps(runs[-1]), flush=True)
    result = report.stamped(meta, runs=runs, dtype=cli.dtype)
    report.write(result, HERE / "runs" / f"cpu_turns{suffix}.json", HERE / "runs" / f"cpu_turns{suffix}.md",
                 markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
