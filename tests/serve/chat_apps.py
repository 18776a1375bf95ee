"""The demo's chat models alone (LLM, VLM and their LoRA adapters) as one app: the chat-feature test
modules deploy this instead of the whole demo (no Whisper or VITS replicas to start)."""

from __future__ import annotations

from serve_testutil import App, demo_args, run_app

CHAT_FAMILIES = ("llm", "vlm")


def chat_only_args(models_dir) -> dict:
    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    args["models"] = [m for m in args["models"] if m.get("build_tiny", "").split("-")[0] in CHAT_FAMILIES]
    args["families"] = {family: options for family, options in args["families"].items() if family in CHAT_FAMILIES}
    args["families"]["llm"]["autoscaling"] = None  # one replica: /health's counters see every request
    # Each token's text as it comes, so that streamed deltas (content around tool calls, logprobs)
    # do not depend on whether this machine makes them within one 50 ms chunk; the chunking itself is
    # tested in tests/deployments/test_stream_interval.py.
    args["families"]["llm"]["stream_interval_ms"] = 0
    return args


def start_chat_app(serve_url: str, models_dir, name: str) -> App:
    app = run_app(serve_url, name, chat_only_args(models_dir), session_app=True)
    app.wait_for(lambda h: h["status"] == "ok", timeout=120)
    return app
