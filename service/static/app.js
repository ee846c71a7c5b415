// The page: send a sound to /v1/classify and /v1/explain, draw what comes back.
// Everything the model saw (the log-mel, the feature maps, the CAM) comes from the service's
// graph; the browser only decodes audio for the waveform, play-back and WAV recordings.
"use strict";

const TOP_K = 5;
const MAX_RECORD_S = 10; // a recording stops by itself after this long
const RECORD_RATE = 44100; // recordings are sent as WAV at the model's rate: no resampling
const $ = (id) => document.getElementById(id);

const state = {
  audioUrl: null, // object URL of what is playing
  explanation: null, // the last /v1/explain answer
  window: 0, // the explained window on show
  run: 0, // bumps on each new sound, so late answers for an old one are dropped
};

// --- colours ---------------------------------------------------------------------------------

// A few stops of a dark-to-bright perceptual map (magma-like), interpolated.
const MAGMA = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
  [245, 125, 21], [250, 193, 39], [252, 255, 164]];

function magma(t) {
  const x = Math.min(Math.max(t, 0), 1) * (MAGMA.length - 1);
  const i = Math.min(Math.floor(x), MAGMA.length - 2);
  const f = x - i;
  return MAGMA[i].map((a, c) => Math.round(a + f * (MAGMA[i + 1][c] - a)));
}

// --- encoded maps (see EncodedMap in /docs) ---------------------------------------------------

function decodeMap(m) {
  const bytes = Uint8Array.from(atob(m.data), (ch) => ch.charCodeAt(0));
  return { rows: m.shape[0], cols: m.shape[1], bytes, min: m.min, max: m.max };
}

// The log-mel's colour range: digital silence sits at the dB floor (the map's minimum) and
// would squeeze everything else into a few dark shades, so it is drawn black and the rest
// stretched from its 1st percentile to the top.
function spectrogramColour(m) {
  const { bytes } = decodeMap(m);
  const floor = bytes.reduce((a, b) => Math.min(a, b), 255);
  const rest = bytes.filter((b) => b > floor).sort();
  const lo = rest.length ? rest[Math.floor(0.01 * rest.length)] / 255 : 0;
  return (t) => (t <= floor / 255 ? [0, 0, 4, 255] : opaque((t - lo) / (1 - lo || 1)));
}

// Draw a map into a canvas at its own resolution; row 0 (low frequency) at the bottom.
function drawMap(canvas, m, colour) {
  const { rows, cols, bytes } = decodeMap(m);
  canvas.width = cols;
  canvas.height = rows;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) {
    const y = rows - 1 - r;
    for (let c = 0; c < cols; c++) {
      const [R, G, B, A] = colour(bytes[r * cols + c] / 255);
      const o = (y * cols + c) * 4;
      img.data[o] = R; img.data[o + 1] = G; img.data[o + 2] = B; img.data[o + 3] = A;
    }
  }
  ctx.putImageData(img, 0, 0);
}

const opaque = (t) => [...magma(t), 255];

// The CAM over the spectrogram: positive evidence only, in cyan (apart from the spectrogram's
// warm colours), more opaque where stronger.
function camColour(m) {
  return (t) => {
    const v = m.min + t * (m.max - m.min);
    const rel = m.max > 0 ? Math.max(v, 0) / m.max : 0;
    return [40, 230, 255, Math.round(170 * rel * rel)];
  };
}

// --- HTTP ------------------------------------------------------------------------------------

async function post(path, blob) {
  const headers = { "Content-Type": "application/octet-stream" };
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(`${path}?top_k=${TOP_K}`, { method: "POST", body: blob, headers });
  } catch (e) {
    throw new Error("the service did not answer (is it running?)");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const why = body && body.error ? body.error.message : response.statusText;
    const err = new Error(`${why} (HTTP ${response.status})`);
    err.status = response.status;
    throw err;
  }
  return body;
}

// --- which model answers (the repository's loaded versions, GET /v1/models) ----------------

// The chosen model's route for `action` (classify, explain, stream): "" = the default model,
// "name" = that model's default version, "name/versions/v" = one version.
function modelRoute(action) {
  const choice = $("model").value;
  if (choice) return `v1/models/${choice}/${action}`;
  return action === "classify" ? "v1/classify" : `v1/${action}`;
}

async function loadModels() {
  let listing;
  try {
    listing = await (await fetch("v1/models")).json();
  } catch (e) {
    return; // the default model still answers
  }
  const select = $("model");
  const keep = select.value;
  const options = [new Option(`the default model (${listing.default_model})`, "")];
  const names = [...new Set(listing.models.map((m) => m.name))];
  for (const name of names) {
    const versions = listing.models.filter((m) => m.name === name);
    options.push(new Option(`${name} (its default version)`, name));
    for (const m of versions) {
      options.push(new Option(`${name} version ${m.version} (${m.variant})`,
                              `${name}/versions/${m.version}`));
    }
  }
  select.replaceChildren(...options);
  select.value = options.some((o) => o.value === keep) ? keep : "";
}

// --- one sound -------------------------------------------------------------------------------

async function analyse(blob, decoded) {
  const run = ++state.run;
  resetResults();
  setStatus("Classifying…");
  playable(blob);
  drawWaveform(decoded);
  $("explain").hidden = false;
  $("explain-status").textContent = "Explaining…";
  const explained = post(modelRoute("explain"), blob);
  explained.catch(() => {}); // handled below, once the classification is known
  let result;
  try {
    result = await post(modelRoute("classify"), blob);
  } catch (e) {
    if (run !== state.run) return;
    setStatus("");
    $("explain").hidden = true;
    showError(`Could not classify this sound: ${e.message}`);
    return;
  }
  if (run !== state.run) return;
  showClassification(result);
  loadModels(); // versions come and go (the repository swaps them): the list follows
  setStatus(`Classified in ${result.windows} window${result.windows > 1 ? "s" : ""}.`);
  try {
    const explanation = await explained;
    if (run !== state.run) return;
    showExplanation(explanation, result);
  } catch (e) {
    if (run !== state.run) return;
    $("explain-status").textContent = `Explanation unavailable: ${e.message}`;
  }
}

function resetResults() {
  showError("");
  state.explanation = null;
  state.window = 0;
  $("result").hidden = true;
  $("explain").hidden = true;
  $("explain-body").hidden = true;
  $("stages").replaceChildren();
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;

// The top-k bars (the upload's answer, and the live window's).
function showPredictions(list, predictions) {
  list.replaceChildren(...predictions.map((p) => {
    const li = document.createElement("li");
    li.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span>' +
      '</span><span class="pct"></span>';
    li.querySelector(".label").textContent = p.label;
    li.querySelector(".fill").style.width = pct(p.probability);
    li.querySelector(".pct").textContent = pct(p.probability);
    li.setAttribute("aria-label", `${p.label}: ${pct(p.probability)}`);
    return li;
  }));
}

function showClassification(r) {
  $("top-label").textContent = r.predictions[0].label;
  showPredictions($("predictions"), r.predictions);
  const m = r.model;
  $("meta").textContent = `${r.duration_s.toFixed(2)} s of ${r.format}, ${r.sample_rate} Hz, ` +
    `${r.channels} channel${r.channels > 1 ? "s" : ""} · model ${m.name} version ${m.version} ` +
    `(${m.variant})`;
  showTimeline(r);
  $("result").hidden = false;
}

function showTimeline(r) {
  const box = $("timeline-box");
  box.hidden = !r.timeline;
  if (!r.timeline) return;
  $("timeline").replaceChildren(...r.timeline.map((w, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = `${w.start_s.toFixed(1)}–${w.end_s.toFixed(1)} s: ${w.label} ` +
      `${Math.round(100 * w.probability)}%`;
    b.setAttribute("aria-pressed", String(i === state.window));
    b.addEventListener("click", () => selectWindow(i));
    return b;
  }));
}

function selectWindow(i) {
  state.window = i;
  $("timeline").querySelectorAll("button").forEach((b, j) =>
    b.setAttribute("aria-pressed", String(j === i)));
  if (state.explanation) drawWindow();
}

// --- the explanation -------------------------------------------------------------------------

function showExplanation(e, classified) {
  state.explanation = e;
  // Start on the window most sure of the top label.
  const tl = classified.timeline, top = classified.predictions[0].index;
  if (tl) {
    const sure = tl.map((w) => (w.index === top ? w.probability : -1));
    selectWindow(Math.min(sure.indexOf(Math.max(...sure)), e.windows.length - 1));
  }
  const m = e.classification.model;
  $("explain-status").textContent = `Computed by ${m.name} (${m.variant}).`;
  $("explain-body").hidden = false;
  drawWindow();
}

function drawWindow() {
  const e = state.explanation;
  const w = e.windows[Math.min(state.window, e.windows.length - 1)];
  $("spectro-title").textContent = e.windows.length > 1 ?
    `Log-mel spectrogram, ${w.start_s.toFixed(1)}–${w.end_s.toFixed(1)} s` :
    "Log-mel spectrogram";
  $("cam-label").textContent = w.cam_label;
  drawMap($("spectrogram"), w.logmel, spectrogramColour(w.logmel));
  // The CAM comes on the log-mel's grid, each last-stage cell already at its receptive field's
  // centre (service/explain.py): the two canvases share one box, so they overlay 1:1. (Stretching
  // the 14-cell grid here put the map half a cell after the event.)
  drawMap($("cam"), w.cam, camColour(w.cam));
  $("stages").replaceChildren(...w.stages.map(stageFigure));
}

function stageFigure(s) {
  const div = document.createElement("div");
  div.className = "stage";
  const h = document.createElement("h4");
  h.textContent = `${s.name} (${s.channels} channels, ${s.mean.shape[0]}×${s.mean.shape[1]})`;
  const maps = document.createElement("div");
  maps.className = "maps";
  const items = [["mean of all channels", s.mean],
    ...s.maps.map((m, i) => [`channel ${s.top_channels[i]}`, m])];
  maps.append(...items.map(([caption, m]) => {
    const fig = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${s.name}: ${caption}`);
    drawMap(canvas, m, opaque);
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.append(canvas, cap);
    return fig;
  }));
  div.append(h, maps);
  return div;
}

// --- audio in the browser: waveform, play-back, recording --------------------------------------

async function decodeAudio(blob) {
  try { // an OfflineAudioContext decodes without a user gesture and resamples to RECORD_RATE
    const ctx = new OfflineAudioContext(1, 1, RECORD_RATE);
    return await ctx.decodeAudioData(await blob.arrayBuffer());
  } catch (e) {
    return null; // the service still gets the bytes and says what it makes of them
  }
}

function drawWaveform(buffer) {
  const canvas = $("waveform");
  const ctx = canvas.getContext("2d");
  canvas.width = canvas.clientWidth || 900;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!buffer) {
    ctx.fillStyle = "#5b6170";
    ctx.fillText("(this browser cannot decode the file to draw it)", 8, 20);
    return;
  }
  const x = buffer.getChannelData(0);
  const W = canvas.width, H = canvas.height, step = Math.max(1, Math.floor(x.length / W));
  ctx.fillStyle = "#3b7bdc";
  for (let px = 0; px < W; px++) {
    let lo = 1, hi = -1;
    for (let i = px * step; i < Math.min((px + 1) * step, x.length); i++) {
      if (x[i] < lo) lo = x[i];
      if (x[i] > hi) hi = x[i];
    }
    if (hi < lo) break;
    ctx.fillRect(px, (1 - hi) * H / 2, 1, Math.max(1, (hi - lo) * H / 2));
  }
}

function playable(blob) {
  if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
  state.audioUrl = URL.createObjectURL(blob);
  $("player").src = state.audioUrl;
}

// The cursor follows play-back over the spectrogram of the window on show.
function followPlayback() {
  const cursor = $("cursor"), e = state.explanation, t = $("player").currentTime;
  const w = e && e.windows[Math.min(state.window, e.windows.length - 1)];
  const frames = w ? w.logmel.shape[1] : 0;
  const span = frames * (e ? e.frame_hop_s : 0);
  const f = w && span ? (t - w.start_s) / span : -1;
  cursor.hidden = !(f >= 0 && f <= 1 && t > 0);
  if (!cursor.hidden) cursor.style.left = `${(100 * f).toFixed(2)}%`;
  requestAnimationFrame(followPlayback);
}

function seekFromWaveform(ev) {
  const player = $("player"), rect = ev.currentTarget.getBoundingClientRect();
  if (player.duration) player.currentTime = player.duration * (ev.clientX - rect.left) / rect.width;
}

// 16-bit PCM mono WAV: what libsndfile on the service reads (it cannot read WebM/Opus).
function encodeWav(buffer) {
  const x = buffer.getChannelData(0), n = x.length, rate = buffer.sampleRate;
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (o, s) => [...s].forEach((ch, i) => view.setUint8(o + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
  view.setUint16(22, 1, true); view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true);
  view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) {
    view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, x[i])) * 0x7fff, true);
  }
  return new Blob([view], { type: "audio/wav" });
}

const recording = { recorder: null, timer: null };

async function toggleRecording() {
  if (recording.recorder) {
    recording.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("Recording needs a browser with microphone access over https or on localhost.");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    showError(`No microphone: ${e.message || e.name}`);
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (ev) => chunks.push(ev.data));
  recorder.addEventListener("stop", () => finishRecording(stream, chunks, recorder.mimeType));
  recording.recorder = recorder;
  recording.timer = setTimeout(() => recorder.state === "recording" && recorder.stop(),
    MAX_RECORD_S * 1000);
  recorder.start();
  showError("");
  $("record").setAttribute("aria-pressed", "true");
  $("record").textContent = "Stop recording";
  setStatus(`Recording… (stops by itself after ${MAX_RECORD_S} s)`);
}

async function finishRecording(stream, chunks, mimeType) {
  clearTimeout(recording.timer);
  recording.recorder = null;
  stream.getTracks().forEach((t) => t.stop());
  $("record").setAttribute("aria-pressed", "false");
  $("record").textContent = "Record from the microphone";
  // Chrome records WebM/Opus; decode it here and send WAV.
  const decoded = await decodeAudio(new Blob(chunks, { type: mimeType }));
  if (!decoded || decoded.length === 0) {
    setStatus("");
    showError("The recording could not be decoded in this browser.");
    return;
  }
  analyse(encodeWav(decoded), decoded);
}

// --- live: microphone -> AudioWorklet -> PCM frames -> WS /v1/stream (docs/streams.md) -------

const LIVE_SEND_S = 0.1; // seconds of audio per WebSocket message
const LIVE_KEEP = 60; // windows kept on the rolling timeline
const live = { ws: null, ctx: null, node: null, stream: null, frames: [], queued: 0 };

// One colour per label, fixed by its index: golden-angle hues stay apart for neighbours.
const labelColour = (index) => `hsl(${(index * 137.508) % 360} 62% 42%)`;

function streamUrl() {
  const url = new URL(modelRoute("stream"), document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// Browsers cannot set headers on a WebSocket: the token travels as a subprotocol,
// "bearer." + base64url (no padding), beside "esc50-stream" (the one the service picks).
function streamProtocols() {
  const token = $("token").value.trim();
  if (!token) return ["esc50-stream"];
  const bytes = new TextEncoder().encode(token);
  const b64 = btoa(String.fromCharCode(...bytes));
  return ["esc50-stream", `bearer.${b64.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`];
}

function toggleLive() {
  if (live.ws) stopLive();
  else startLive();
}

async function startLive() {
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    showError("Listening live needs a browser with microphone access over https or on localhost.");
    return;
  }
  showError("");
  let stream;
  try { // the raw signal: the browser's voice processing would change what the model hears
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
        autoGainControl: false },
    });
  } catch (e) {
    showError(`No microphone: ${e.message || e.name}`);
    return;
  }
  // At the model's rate, so the service does not resample and a window is exactly the
  // samples sent.
  const ctx = new AudioContext({ sampleRate: RECORD_RATE });
  await ctx.audioWorklet.addModule("static/pcm-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm-capture");
  const mute = ctx.createGain();
  mute.gain.value = 0; // pulled by the destination so it runs; nothing is played back
  ctx.createMediaStreamSource(stream).connect(node).connect(mute).connect(ctx.destination);
  const ws = new WebSocket(streamUrl(), streamProtocols());
  Object.assign(live, { ws, ctx, node, stream, frames: [], queued: 0 });
  ws.binaryType = "arraybuffer";
  ws.addEventListener("open", () => ws.send(JSON.stringify({
    sample_rate: ctx.sampleRate, channels: 1, encoding: "pcm_f32le", hop_s: 1, top_k: TOP_K,
  })));
  ws.addEventListener("message", (ev) => liveEvent(JSON.parse(ev.data)));
  ws.addEventListener("close", (ev) => liveClosed(ws, ev));
  node.port.onmessage = (ev) => sendFrames(ws, ev.data, ctx.sampleRate);
  $("live-timeline").replaceChildren();
  $("live-predictions").replaceChildren();
  $("live-label").textContent = "…";
  $("live-model").textContent = "";
  $("live-box").hidden = false;
  $("live").setAttribute("aria-pressed", "true");
  $("live").textContent = "Stop listening";
  $("live-status").textContent = "Connecting…";
}

function sendFrames(ws, samples, rate) {
  live.frames.push(samples);
  live.queued += samples.length;
  if (live.queued < LIVE_SEND_S * rate) return;
  const pcm = new Float32Array(live.queued);
  let at = 0;
  for (const f of live.frames) { pcm.set(f, at); at += f.length; }
  live.frames = [];
  live.queued = 0;
  if (ws.readyState === WebSocket.OPEN) ws.send(pcm.buffer); // little-endian on every CPU
}

function stopAudio() {
  if (live.stream) live.stream.getTracks().forEach((t) => t.stop());
  if (live.node) live.node.port.onmessage = null; // quanta still in flight are dropped
  if (live.ctx) live.ctx.close();
  live.stream = live.ctx = live.node = null;
}

// Stop: the microphone first, then {"type": "end"}; the service answers the last windows
// and closes (liveClosed resets the button).
function stopLive() {
  stopAudio();
  if (live.ws && live.ws.readyState === WebSocket.OPEN) {
    live.ws.send(JSON.stringify({ type: "end" }));
    $("live-status").textContent = "Stopping…";
  } else if (live.ws) {
    live.ws.close();
  }
}

function liveEvent(e) {
  if (e.type === "start") {
    const m = e.model;
    $("live-model").textContent = `Model ${m.name} version ${m.version} (${m.variant}) ` +
      `answering: a ${e.window_s} s window every ${e.hop_s} s.`;
    $("live-status").textContent = `Listening… the first label after ${e.window_s} s.`;
  } else if (e.type === "window") {
    const top = e.predictions[0];
    $("live-label").textContent = top.label;
    $("live-label").style.color = labelColour(top.index);
    showPredictions($("live-predictions"), e.predictions);
    const li = document.createElement("li");
    li.textContent = top.label;
    li.style.background = labelColour(top.index);
    li.title = `${e.start_s.toFixed(1)}–${e.end_s.toFixed(1)} s: ${top.label} ${pct(top.probability)}`;
    const timeline = $("live-timeline");
    timeline.append(li);
    while (timeline.children.length > LIVE_KEEP) timeline.firstElementChild.remove();
    timeline.scrollLeft = timeline.scrollWidth;
    const skipped = e.skipped ? ` (${e.skipped} windows skipped: the service is busy)` : "";
    $("live-status").textContent = `Listening… ${e.end_s.toFixed(0)} s heard${skipped}.`;
  } else if (e.type === "error") {
    showError(`Live stream: ${e.message}`);
  }
}

function liveClosed(ws, ev) {
  if (live.ws !== ws) return;
  stopAudio();
  live.ws = null;
  $("live").setAttribute("aria-pressed", "false");
  $("live").textContent = "Listen live";
  const why = ev.code === 1000 ? "Stopped." : `Stopped (${ev.code}${ev.reason ? `: ${ev.reason}` : ""}).`;
  $("live-status").textContent = ev.code === 1012 ? "The service restarted: start again." : why;
}

// --- wiring ----------------------------------------------------------------------------------

async function fromFile(file) {
  if (!file) return;
  setStatus(`Reading ${file.name}…`);
  analyse(file, await decodeAudio(file));
}

function init() {
  loadModels();
  $("file").addEventListener("change", (ev) => fromFile(ev.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("dragging");
    fromFile(ev.dataTransfer.files[0]);
  });
  $("record").addEventListener("click", toggleRecording);
  $("live").addEventListener("click", toggleLive);
  $("token-form").addEventListener("submit", (ev) => ev.preventDefault());
  $("show-cam").addEventListener("change", (ev) =>
    $("cam").classList.toggle("off", !ev.target.checked));
  $("waveform").addEventListener("click", seekFromWaveform);
  requestAnimationFrame(followPlayback);
}

init();
