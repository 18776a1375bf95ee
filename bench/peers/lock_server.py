"""The server people write by hand: one FastAPI process, one model, a lock around it.

    python -m bench.peers.lock_server --family llm --model DIR --port 8311

A faithful minimal version of the common pattern: load with from_pretrained at start-up, `def`
(not async) routes that FastAPI runs in its thread pool, a threading.Lock so only one request
uses the model at a time, no batching. A stream is an async generator that waits its turn on the
event loop (an asyncio.Lock) and runs generate() in a thread of its own under the same threading.Lock,
its text handed to the loop: a sync generator waiting on the lock would hold one of Starlette's 40
pool threads per waiting stream and deadlock past 40 of them. OpenAI-shaped routes so the same load
client drives it:
    llm  POST /v1/chat/completions   (JSON; "stream": true streams text as generate() produces it)
    stt  POST /v1/audio/transcriptions (multipart "file")
    tts  POST /v1/audio/speech       (JSON "input"; answers WAV)
"""

from __future__ import annotations

import argparse
import asyncio
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

from deployments.generation import RowStream

app = FastAPI()
lock = threading.Lock()  # the model's: one request at a time
stream_lock = asyncio.Lock()  # streams queue for `lock` here, on the event loop
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


class _LoopStreamer:
    """generate()'s streamer, called in the generation thread: hands each new token's text to the event
    loop's queue (None at the end), so that the stream waits on the loop, not in a pool thread.

    A token's text goes out as soon as it is whole, as ours and `transformers serve` (tokenizers'
    DecodeStream) stream: deployments.generation.RowStream's incremental decoding, with no stop strings.
    (transformers' TextStreamer would hold text back to the last space, so the first content chunk, the
    time to first token a client measures, would come several tokens late.)"""

    def __init__(self, tok, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.cancelled, self.prompt = loop, queue, False, True
        # no end tokens or limit of its own: generate() stops; a special token's text is skipped
        self.row = RowStream(tok, self._send, [], limit=2**62, end_ids=set())

    def _send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def put(self, value) -> None:
        if self.cancelled:  # the client left: stop generating
            raise _Cancelled()
        if self.prompt:  # generate() passes the prompt first
            self.prompt = False
            return
        for token in value.reshape(-1).tolist():
            self.row.push(token)

    def end(self) -> None:
        self._send(None)


class _Cancelled(Exception):
    pass


async def _stream(body: dict, inputs, kwargs):
    """An async generator on the event loop: streams wait for `stream_lock` without holding a thread (a sync
    generator waiting on a lock holds one of Starlette's 40 pool threads per stream, and past 40 waiting
    streams the one holding the lock gets no thread for its next chunk: a deadlock). The generation runs in
    a thread of its own under `lock`, the lock the plain route takes, so one request uses the model at a time."""
    tok, model = state["tokenizer"], state["model"]
    cid = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta: dict, finish=None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "model": body.get("model"),
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    async with stream_lock:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        streamer = _LoopStreamer(tok, loop, queue)

        def run():
            try:
                with lock, torch.inference_mode():
                    model.generate(**inputs, **kwargs, streamer=streamer, pad_token_id=tok.pad_token_id)
            except _Cancelled:
                pass
            except Exception as exc:  # reported in-band: the 200 is sent
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await queue.get()) is not None:
                if isinstance(piece, Exception):
                    yield "data: " + json.dumps({"error": {"message": f"{type(piece).__name__}: {piece}",
                                                           "type": "internal_error"}}) + "\n\n"
                    break
                yield chunk({"content": piece})
            else:
                yield chunk({}, "length")
        finally:
            streamer.cancelled = True  # a no-op once generate ended; stops it if the client left
            await asyncio.to_thread(worker.join)
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
