// modelfleet playground: plain JavaScript, no build step, no dependency, nothing loaded from elsewhere.
// It calls only this server's public API (the folder above /ui), with the API key typed in the header
// (kept in localStorage) as `Authorization: Bearer`. Errors (OpenAI's {"error": {...}} shape, network
// failures) are shown in the card that made the call, never thrown to the console.
"use strict";

const API_BASE = location.pathname.replace(/\/ui\/?$/, "/"); // the page is <route prefix>/ui
const KEY_STORAGE = "modelfleet.apiKey";

const byId = (id) => document.getElementById(id);
const $ = (root, selector) => root.querySelector(selector);

// --- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, info, text = "", retryAfter = null) {
    super(info && info.message ? info.message : `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status; // null for an error sent inside a stream
    this.info = info; // OpenAI's {message, type, param, code}, when the body had it
    this.text = text;
    this.retryAfter = retryAfter;
  }
}

function authHeaders(headers = {}) {
  const key = byId("api-key").value.trim();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function api(path, init = {}) {
  const response = await fetch(API_BASE + path, { ...init, headers: authHeaders(init.headers) });
  if (!response.ok) {
    const text = await response.text().catch(() => "");
    let info = null;
    try {
      info = JSON.parse(text).error || null;
    } catch (_) {
      // not JSON: the status and text are shown
    }
    throw new ApiError(response.status, info, text, response.headers.get("retry-after"));
  }
  return response;
}

function postJson(path, body, signal) {
  return api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
}

function describe(err) {
  if (err instanceof ApiError) {
    const where = err.status ? `${err.status} ` : "";
    const info = err.info;
    if (!info || !info.message) return `${where}error: ${err.text.slice(0, 300) || "(empty body)"}`;
    let text = `${where}${info.type || "error"}${info.code ? ` (${info.code})` : ""}: ${info.message}`;
    if (info.param) text += ` [param: ${info.param}]`;
    if (err.retryAfter) text += ` (retry in ${err.retryAfter} s)`;
    return text;
  }
  if (err && err.name === "AbortError") return "stopped";
  return `the request failed: ${err && err.message ? err.message : String(err)}`;
}

// The `data:` payloads of a server-sent event stream, as they arrive.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// --- cards: state, errors, notes ----------------------------------------------------------------

function showError(card, err) {
  const box = $(card, ".error");
  box.textContent = err == null ? "" : typeof err === "string" ? err : describe(err);
  box.hidden = err == null;
}

function setMeta(card, text) {
  $(card, ".meta").textContent = text;
}

// Runs one call of a card: data-state is busy, then done or error (tests and styles read it).
async function run(card, work) {
  showError(card, null);
  card.dataset.state = "busy";
  try {
    await work();
    card.dataset.state = "done";
  } catch (err) {
    if (err && err.name === "AbortError") {
      card.dataset.state = "done";
      setMeta(card, "stopped");
    } else {
      showError(card, err);
      card.dataset.state = "error";
    }
  }
}

function chosenModel(select) {
  if (!select.value) throw new Error(`no ${select.dataset.family} model is served (or the model list did not load)`);
  return select.value;
}

const seconds = (start) => `${((performance.now() - start) / 1000).toFixed(1)} s`;

// --- models ----------------------------------------------------------------------------------------

function modelLabel(model) {
  let label = model.id;
  if (model.aliases && model.aliases.length) label += ` (${model.aliases.join(", ")})`;
  if (model.demo) label += " · random weights";
  if (model.state && model.state !== "ready") label += ` · ${model.state}`;
  return label;
}

async function loadModels() {
  const status = byId("models-status");
  const box = byId("models-error");
  box.hidden = true;
  status.textContent = "Loading the model list…";
  try {
    const list = await (await api("v1/models")).json();
    const families = {};
    for (const model of list.data) (families[model.family] = families[model.family] || []).push(model);
    for (const select of document.querySelectorAll("select.model")) {
      const models = families[select.dataset.family] || [];
      const previous = select.value;
      select.replaceChildren(...models.map((model) => new Option(modelLabel(model), model.id)));
      if (models.some((model) => model.id === previous)) select.value = previous;
      if (!models.length) select.add(new Option(`(no ${select.dataset.family} model served)`, ""));
      select.disabled = !models.length;
    }
    status.textContent = `${list.data.length} models: ` + Object.entries(families)
      .map(([family, models]) => `${models.length} ${family}`).join(", ");
  } catch (err) {
    status.textContent = "The model list did not load.";
    box.textContent = describe(err);
    box.hidden = false;
  }
}

// --- chat (LLM, and VLM with an image) ---------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setupChat(card) {
  const log = $(card, ".log");
  const form = $(card, "form");
  const prompt = $(card, ".prompt");
  const stop = $(card, ".stop");
  const send = $(card, ".send");
  const imageInput = $(card, ".image");
  const preview = $(card, ".preview");
  const history = [];
  let controller = null;
  let image = null; // a data: URI, sent with the next message

  function bubble(role, text, imageUrl) {
    const item = document.createElement("div");
    item.className = `msg ${role}`;
    if (imageUrl) {
      const thumb = document.createElement("img");
      thumb.src = imageUrl;
      thumb.alt = "the image sent";
      item.append(thumb);
    }
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    item.append(body);
    log.append(item);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  if (imageInput) {
    imageInput.addEventListener("change", async () => {
      const file = imageInput.files[0];
      try {
        image = file ? await readAsDataUrl(file) : null;
      } catch (err) {
        image = null;
        showError(card, `the image could not be read: ${err}`);
      }
      preview.hidden = !image;
      if (image) preview.src = image;
      else preview.removeAttribute("src");
    });
  }
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  $(card, ".clear").addEventListener("click", () => {
    history.length = 0;
    log.replaceChildren();
    setMeta(card, "");
    showError(card, null);
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    const content = image ? [{ type: "text", text }, { type: "image_url", image_url: { url: image } }] : text;
    const message = { role: "user", content };
    const start = performance.now();
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    await run(card, async () => {
      const body = {
        model: chosenModel($(card, "select.model")),
        messages: [...history, message],
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number($(card, ".max-tokens").value) || undefined,
        temperature: Number($(card, ".temperature").value),
      };
      const asked = bubble("user", text, image).parentElement;
      prompt.value = "";
      const out = bubble("assistant", "");
      out.parentElement.classList.add("streaming");
      let finish = null;
      let usage = null;
      let reply = "";
      // The log shows what the model is sent next: a reply stopped (or failed) after some text stays, with
      // its question, in the history; a call that gave no text leaves neither, and its text is back in the box.
      const remember = () => {
        history.push(message, { role: "assistant", content: reply });
        image = null; // the image went with this message (and stays in the history)
        if (imageInput) {
          imageInput.value = "";
          preview.hidden = true;
        }
      };
      setMeta(card, "waiting for the first token…");
      try {
        for await (const data of sseData(await postJson("v1/chat/completions", body, controller.signal))) {
          if (data === "[DONE]") break;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(null, chunk.error, data);
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            out.textContent = reply;
            log.scrollTop = log.scrollHeight;
            setMeta(card, `streaming… ${seconds(start)}`);
          }
          if (choice && choice.finish_reason) finish = choice.finish_reason;
          if (chunk.usage) usage = chunk.usage;
        }
      } catch (err) {
        if (reply) {
          remember();
        } else {
          asked.remove();
          out.parentElement.remove();
          if (!prompt.value) prompt.value = text;
        }
        throw err;
      } finally {
        out.parentElement.classList.remove("streaming");
      }
      remember();
      const tokens = usage ? `, ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "";
      setMeta(card, `${body.model}: finish_reason ${finish}${tokens}, ${seconds(start)}`);
    });
    controller = null;
    send.disabled = false;
    stop.disabled = true;
  });
}

// --- audio: recordings as the browser makes them, streamed WAV headers -------------------------------

// The server decodes what MediaRecorder writes (Chrome and Firefox: WebM/Opus, Safari: MP4/AAC), so a
// recording is sent as it is: a fraction of the bytes of WAV, and no decoding in the page.
const RECORDING_EXTENSIONS = { "audio/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "m4a", "audio/wav": "wav" };

function recordingName(mimeType) {
  return `recording.${RECORDING_EXTENSIONS[(mimeType || "").split(";")[0]] || "webm"}`;
}

// A WAV streamed as it was synthesized says "unknown length" (0xFFFFFFFF) in its header; once the whole
// body is here, write the real sizes so that the <audio> element knows the duration and can seek.
function fixWavSizes(buffer) {
  const view = new DataView(buffer);
  const tag = (offset) => String.fromCharCode(...new Uint8Array(buffer, offset, 4));
  if (buffer.byteLength < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") return buffer;
  view.setUint32(4, buffer.byteLength - 8, true);
  for (let offset = 12; offset + 8 <= buffer.byteLength;) {
    const size = view.getUint32(offset + 4, true);
    if (tag(offset) === "data") {
      view.setUint32(offset + 4, Math.min(size, buffer.byteLength - offset - 8), true);
      break;
    }
    offset += 8 + size + (size % 2);
  }
  return buffer;
}

function playInto(audio, card, buffer, type) {
  if (audio.src) URL.revokeObjectURL(audio.src);
  audio.src = URL.createObjectURL(new Blob([fixWavSizes(buffer)], { type }));
  audio.hidden = false;
  audio.play().catch(() => setMeta(card, `${$(card, ".meta").textContent} (press play to listen)`));
}

// The audio a card will send: recorded from the microphone (as the browser encodes it) or a chosen file.
function setupAudioInput(card, onReady) {
  const recordButton = $(card, ".record");
  const fileInput = $(card, ".audio-file");
  const preview = $(card, ".input-audio");
  const state = { audio: null, recorder: null };

  function use(blob, name) {
    state.audio = { blob, name };
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
    onReady();
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (file) use(file, file.name);
  });
  recordButton.addEventListener("click", async () => {
    showError(card, null);
    if (state.recorder) {
      state.recorder.stop();
      return;
    }
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      showError(card, "this browser gives no microphone here (it needs https or localhost): choose a file instead");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      showError(card, `no microphone: ${err.message || err}`);
      return;
    }
    const chunks = [];
    const recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (event) => event.data.size && chunks.push(event.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      state.recorder = null;
      recordButton.textContent = "Record";
      recordButton.classList.remove("recording");
      use(new Blob(chunks, { type: recorder.mimeType }), recordingName(recorder.mimeType));
      fileInput.value = "";
    };
    state.recorder = recorder;
    recorder.start();
    recordButton.textContent = "Stop";
    recordButton.classList.add("recording");
  });
  return state;
}

// --- transcription --------------------------------------------------------------------------------

function setupTranscribe(card) {
  const send = $(card, ".send");
  const input = setupAudioInput(card, () => { send.disabled = false; });
  send.addEventListener("click", () => run(card, async () => {
    const start = performance.now();
    const form = new FormData();
    form.append("file", input.audio.blob, input.audio.name);
    form.append("model", chosenModel($(card, "select.model")));
    form.append("response_format", "json");
    const language = $(card, ".language").value.trim();
    if (language) form.append("language", language);
    $(card, ".output").textContent = "";
    setMeta(card, "transcribing…");
    const result = await (await api("v1/audio/transcriptions", { method: "POST", body: form })).json();
    $(card, ".output").textContent = result.text;
    setMeta(card, `${form.get("model")}: ${seconds(start)}`);
  }));
}

// --- speech -------------------------------------------------------------------------------------------

function setupSpeech(card) {
  const audio = $(card, ".output-audio");
  audio.addEventListener("loadedmetadata", () => {
    setMeta(card, `${$(card, ".meta").textContent}, ${audio.duration.toFixed(2)} s of audio`);
  });
  $(card, "form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(card, async () => {
      const start = performance.now();
      const body = {
        model: chosenModel($(card, "select.model")),
        input: $(card, ".text").value,
        voice: $(card, ".voice").value.trim() || undefined,
        speed: Number($(card, ".speed").value) || 1,
        response_format: "wav",
      };
      setMeta(card, "synthesizing…");
      const buffer = await (await postJson("v1/audio/speech", body)).arrayBuffer();
      setMeta(card, `${body.model}: ${(buffer.byteLength / 1024).toFixed(0)} KiB in ${seconds(start)}`);
      playInto(audio, card, buffer, "audio/wav");
    });
  });
}

// --- the voice round trip ------------------------------------------------------------------------------

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes.buffer;
}

function setupVoice(card) {
  const send = $(card, ".send");
  const input = setupAudioInput(card, () => { send.disabled = false; });
  send.addEventListener("click", () => run(card, async () => {
    const start = performance.now();
    const form = new FormData();
    form.append("file", input.audio.blob, input.audio.name);
    for (const select of card.querySelectorAll("select.model")) form.append(select.dataset.field, chosenModel(select));
    const maxTokens = Number($(card, ".max-tokens").value);
    if (maxTokens) form.append("max_tokens", String(maxTokens));
    form.append("response_format", "wav");
    $(card, ".result").hidden = true;
    setMeta(card, "listening, thinking, speaking…");
    const result = await (await api("v1/audio/chat", { method: "POST", body: form })).json();
    $(card, ".transcript").textContent = result.transcript;
    $(card, ".reply").textContent = result.reply;
    $(card, ".result").hidden = false;
    const models = Object.entries(result.models || {}).map(([step, model]) => `${step} ${model}`).join(", ");
    setMeta(card, `${models}: ${seconds(start)}`);
    playInto($(card, ".output-audio"), card, base64Bytes(result.audio), `audio/${result.audio_format}`);
  }));
}

// --- start ----------------------------------------------------------------------------------------------

function start() {
  const key = byId("api-key");
  try {
    key.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    // storage refused (private mode): the key lives for this page only
  }
  key.addEventListener("change", () => {
    try {
      localStorage.setItem(KEY_STORAGE, key.value.trim());
    } catch (_) {
      // as above
    }
    loadModels();
  });
  byId("refresh-models").addEventListener("click", loadModels);
  setupChat(byId("chat"));
  setupChat(byId("vision"));
  setupTranscribe(byId("transcribe"));
  setupSpeech(byId("speech"));
  setupVoice(byId("voice"));
  loadModels();
}

start();
