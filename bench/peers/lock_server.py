"""The server people write by hand: one FastAPI process, one model, a lock around it.

    python -m bench.peers.lock_server --family llm --model DIR --port 8311

A faithful minimal version of the common pattern: load with from_pretrained at start-up, `def`
(not async) routes that FastAPI runs in its thread pool, a threading.Lock so only one request
uses the model at a time, no batching. OpenAI-shaped routes so the same load client drives it:
    llm  POST /v1/chat/completions   (JSON; "stream": true streams with TextIteratorStreamer)
    stt  POST /v1/audio/transcriptions (multipart "file")
    tts  POST /v1/audio/speech       (JSON "input"; answers WAV)
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import uuid

import numpy as np
import soundfile as sf
import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

app = FastAPI()
lock = threading.Lock()
state: dict = {}


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


# -- LLM -----------------------------------------------------------------------------------------
def load_llm(path: str, dtype: str = "auto") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state["tokenizer"] = AutoTokenizer.from_pretrained(path)
    state["model"] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _gen_kwargs(body: dict) -> dict:
    kwargs = {"max_new_tokens": int(body.get("max_tokens") or 64)}
    temperature = body.get("temperature")
    if temperature:
        kwargs.update(do_sample=True, temperature=float(temperature))
    else:
        kwargs["do_sample"] = False
    return kwargs


@app.post("/v1/chat/completions")
def chat(body: dict):
    tok, model = state["tokenizer"], state["model"]
    inputs = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    kwargs = _gen_kwargs(body)
    if body.get("stream"):
        return StreamingResponse(_stream(body, inputs, kwargs), media_type="text/event-stream")
    with lock, torch.inference_mode():
        output = model.generate(**inputs, **kwargs, pad_token_id=tok.pad_token_id)
    new = output[0][inputs["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    prompt_tokens, completion_tokens = int(inputs["input_ids"].shape[1]), int(len(new))
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


def _stream(body: dict, inputs, kwargs):
    """A sync generator: Starlette iterates it in a thread; the lock is held for the whole stream."""
    from transformers import TextIteratorStreamer

    tok, model = state["tokenizer"], state["model"]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    cid = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta: dict, finish=None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "model": body.get("model"),
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    with lock:
        def run():
            with torch.inference_mode():
                model.generate(**inputs, **kwargs, streamer=streamer, pad_token_id=tok.pad_token_id)

        worker = threading.Thread(target=run)
        worker.start()
        yield chunk({"role": "assistant", "content": ""})
        for piece in streamer:
            if piece:
                yield chunk({"content": piece})
        worker.join()
    yield chunk({}, "length")
    yield "data: [DONE]\n\n"


# -- STT -----------------------------------------------------------------------------------------
def load_stt(path: str) -> None:
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    state["processor"] = AutoProcessor.from_pretrained(path)
    state["model"] = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()


@app.post("/v1/audio/transcriptions")
def transcriptions(file: UploadFile = File(...), model: str = Form("whisper-1")):  # noqa: B008 (FastAPI's idiom)
    processor = state["processor"]
    audio, rate = sf.read(io.BytesIO(file.file.read()), dtype="float32")
    target = processor.feature_extractor.sampling_rate
    if rate != target:
        from scipy.signal import resample_poly

        audio = resample_poly(audio, target, rate).astype(np.float32)
    features = processor(audio, sampling_rate=target, return_tensors="pt")
    with lock, torch.inference_mode():
        tokens = state["model"].generate(features.input_features, max_new_tokens=32)
    return {"text": processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()}


# -- TTS -----------------------------------------------------------------------------------------
def load_tts(path: str) -> None:
    from transformers import AutoModelForTextToWaveform, AutoTokenizer

    state["tokenizer"] = AutoTokenizer.from_pretrained(path)
    state["model"] = AutoModelForTextToWaveform.from_pretrained(path).eval()


@app.post("/v1/audio/speech")
def speech(body: dict):
    model = state["model"]
    inputs = state["tokenizer"](text=body["input"], return_tensors="pt")
    with lock, torch.inference_mode():
        torch.manual_seed(0)
        waveform = model(**inputs).waveform[0].numpy()
    buffer = io.BytesIO()
    sf.write(buffer, waveform, int(model.config.sampling_rate), format="WAV", subtype="PCM_16")
    return Response(buffer.getvalue(), media_type="audio/wav")


LOADERS = {"llm": load_llm, "stt": load_stt, "tts": load_tts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(LOADERS), required=True)
    parser.add_argument("--model", required=True, help="a local model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--dtype", default="auto", help="the LLM's weights dtype (from_pretrained's dtype)")
    args = parser.parse_args()
    LOADERS[args.family](args.model, **({"dtype": args.dtype} if args.family == "llm" else {}))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
