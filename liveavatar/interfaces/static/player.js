"use strict";
// The player page of `liveavatar serve`: a job's MP4 plays from /jobs/{id}/live while it is written;
// a live session sends speech (or text to speak) over its WebSocket and plays the MP4 fragments that come
// back through Media Source Extensions. `window.liveavatar` holds what happened, with timings (performance.now());
// `window.liveavatar.latency()` splits the time from a speech chunk's push to its first frame on screen into parts.

const SAMPLE_RATE = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms of speech per WebSocket message
const POLL_MS = 500;
const state = { job: null, session: null };
window.liveavatar = state;

const $ = (id) => document.getElementById(id);

async function errorText(response) {
  try { return `${response.status}: ${(await response.json()).detail}`; } catch { return `${response.status}`; }
}

const FPS = 25;
const SAMPLES_PER_FRAME = SAMPLE_RATE / FPS;
const FRAMES_KEPT = 3000;  // presented frames remembered for the latency (2 minutes)

// Every frame the video presents, with the time it is expected on screen (requestVideoFrameCallback), or, where the
// browser lacks it, the playback position seen at each animation frame.
function watchFrames(video, record) {
  record.frames = [];
  const keep = (mediaTime, shownAt) => {
    record.frames.push([mediaTime, shownAt]);
    if (record.frames.length > FRAMES_KEPT) record.frames.splice(0, record.frames.length - FRAMES_KEPT);
  };
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const onFrame = (now, meta) => { keep(meta.mediaTime, meta.expectedDisplayTime || now); video.requestVideoFrameCallback(onFrame); };
    video.requestVideoFrameCallback(onFrame);
  } else {
    let last = -1;
    const poll = (now) => { if (video.currentTime !== last) { last = video.currentTime; keep(last, now); } requestAnimationFrame(poll); };
    requestAnimationFrame(poll);
  }
}

// Per block with pushed speech: from the push of its first spoken sample to the frame showing it on screen (ms).
// window, generation, mux: measured by the server (push received -> window taken -> frames ready -> MP4 out);
// transport: the rest until the block's bytes arrived here (upload of the chunk and download of the block);
// buffering: from the bytes to the block's first frame on screen (MSE, decoding, the player's buffer); in_block:
// from there to the frame that shows the sample (where it lies in its block). The parts add up to `total`.
function latencyParts(record) {
  const out = [];
  for (const block of record.blocks) {
    if (!block.latency_ms || block.bytesAt === undefined) continue;
    let first = block.speech_start;  // the first spoken sample: past the silence dropped in front of it, if any
    for (const [start, end] of block.dropped) if (start === first) first = end;
    const push = record.pushes.find(([end]) => end > first);
    if (!push) continue;  // speech this page did not push (a text)
    // The frame that shows that sample, and the block's first frame, as they were shown (the first presented at or
    // after each: a frame the browser skipped counts as shown with the next).
    const frame = Math.floor(block.speech_media_s * FPS + 1e-6);
    const shown = record.frames.find(([mediaTime]) => mediaTime >= frame / FPS - 1e-3);
    const opened = record.frames.find(([mediaTime]) => mediaTime >= block.first_frame / FPS - 1e-3);
    if (!shown || !opened) continue;
    const server = block.latency_ms.window + block.latency_ms.generation + block.latency_ms.mux;
    const parts = {
      window: block.latency_ms.window, generation: block.latency_ms.generation, mux: block.latency_ms.mux,
      transport: block.bytesAt - push[1] - server,
      buffering: opened[1] - block.bytesAt,
      in_block: shown[1] - opened[1],
    };
    out.push({ block: block.index, push_ms: push[1], shown_ms: shown[1], total: shown[1] - push[1], parts });
  }
  return out;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : NaN;
}

function showLatency(record) {
  const rows = latencyParts(record);
  if (!rows.length) return;
  const recent = rows.slice(-10);
  const part = (name) => (median(recent.map((r) => r.parts[name])) / 1000).toFixed(2);
  $("session-latency").textContent = `speech to screen ${(median(recent.map((r) => r.total)) / 1000).toFixed(2)} s ` +
    `(median of ${recent.length}): window ${part("window")}, generation ${part("generation")}, mux ${part("mux")}, ` +
    `transport ${part("transport")}, in block ${part("in_block")}, buffering ${part("buffering")}`;
}

function firstPlayback(video, record) {
  const seen = () => {
    if (video.currentTime > 0 && record.firstPlaybackAt === null) record.firstPlaybackAt = performance.now();
  };
  video.addEventListener("timeupdate", seen);
}

// ---------------------------------------------------------------- jobs
$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  if (!form.get("num_clip")) form.delete("num_clip");
  // Speech or a text to speak: the one not given is left out of the request.
  if (!form.get("text").trim()) form.delete("text");
  if (!form.get("voice")) form.delete("voice");
  if (!form.get("audio") || !form.get("audio").name) form.delete("audio");
  $("job-status").textContent = "uploading…";
  $("job-download").hidden = true;
  const response = await fetch("/jobs", { method: "POST", body: form });
  if (!response.ok) { $("job-status").textContent = `error ${await errorText(response)}`; return; }
  const job = await response.json();
  const record = { id: job.id, state: job.state, submittedAt: performance.now(), firstPlaybackAt: null, view: job };
  state.job = record;
  const video = $("job-video");
  firstPlayback(video, record);
  video.src = job.links.live;
  video.play().catch(() => {});
  $("job-cancel").disabled = false;
  $("job-cancel").onclick = () => fetch(`/jobs/${job.id}/cancel`, { method: "POST" });
  while (true) {
    const view = await (await fetch(job.links.self)).json();
    record.view = view;
    record.state = view.state;
    const p = view.progress;
    $("job-status").textContent = view.state === "queued" ? `queued (position ${view.position})`
      : p ? `${view.state}: block ${p.blocks_done}/${p.blocks_total}, frame ${p.frames_done}/${p.frames_total}, ${p.elapsed_s.toFixed(1)} s`
      : view.state;
    if (["done", "failed", "cancelled"].includes(view.state)) break;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
  record.finishedAt = performance.now();
  $("job-cancel").disabled = true;
  if (record.state === "failed") $("job-status").textContent = `failed: ${record.view.error}`;
  if (record.state === "done") {
    $("job-download").href = job.links.video;
    $("job-download").hidden = false;
  }
});

// ---------------------------------------------------------------- live sessions
class MsePlayer {
  // Appends the session's MP4 bytes (init segment, then fragments) to a SourceBuffer, in order.
  constructor(video) {
    this.video = video;
    this.pending = [];
    this.buffer = null;
    this.ended = false;
  }
  start(mime) {
    this.source = new MediaSource();
    this.video.src = URL.createObjectURL(this.source);
    this.source.addEventListener("sourceopen", () => {
      this.buffer = this.source.addSourceBuffer(mime);
      this.buffer.addEventListener("updateend", () => this.pump());
      this.pump();
    }, { once: true });
    this.video.play().catch(() => {});
  }
  append(data) { this.pending.push(data); this.pump(); }
  finish() { this.ended = true; this.pump(); }
  pump() {
    if (!this.buffer || this.buffer.updating) return;
    if (this.pending.length) this.buffer.appendBuffer(this.pending.shift());
    else if (this.ended && this.source.readyState === "open") this.source.endOfStream();
  }
}

function toPcm16(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
  return pcm.buffer;
}

async function speechFromFile(file) {
  // Decoded and resampled to 16 kHz by the browser, then averaged to mono.
  const context = new AudioContext({ sampleRate: SAMPLE_RATE });
  const decoded = await context.decodeAudioData(await file.arrayBuffer());
  context.close();
  const mono = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const channel = decoded.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
  }
  return mono;
}

function streamFile(samples, socket, record) {
  // One chunk every 100 ms: the pace a microphone would deliver it.
  let position = 0;
  const timer = setInterval(() => {
    if (socket.readyState !== WebSocket.OPEN || position >= samples.length) { clearInterval(timer); return; }
    if (record.firstSpeechAt === null) record.firstSpeechAt = performance.now();
    const chunk = samples.subarray(position, position + CHUNK_SAMPLES);
    const pcm = toPcm16(chunk);
    record.pushes.push([position + chunk.length, performance.now()]);  // taken before it leaves
    socket.send(pcm);
    position += chunk.length;
    record.speechSent = position;
  }, 1000 * CHUNK_SAMPLES / SAMPLE_RATE);
  return () => clearInterval(timer);
}

async function streamMicrophone(socket, record) {
  const media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  const context = new AudioContext({ sampleRate: SAMPLE_RATE });
  await context.audioWorklet.addModule("/static/pcm-capture.js");
  const capture = new AudioWorkletNode(context, "pcm-capture");
  let pending = [];
  let count = 0;
  capture.port.onmessage = ({ data }) => {
    pending.push(data);
    count += data.length;
    if (count < CHUNK_SAMPLES || socket.readyState !== WebSocket.OPEN) return;
    const chunk = new Float32Array(count);
    let at = 0;
    for (const part of pending) { chunk.set(part, at); at += part.length; }
    pending = []; count = 0;
    if (record.firstSpeechAt === null) record.firstSpeechAt = performance.now();
    const pcm = toPcm16(chunk);
    record.pushes.push([record.speechSent + chunk.length, performance.now()]);
    socket.send(pcm);
    record.speechSent += chunk.length;
  };
  context.createMediaStreamSource(media).connect(capture);
  return () => { media.getTracks().forEach((t) => t.stop()); context.close(); };
}

$("session-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const upload = new FormData();
  upload.append("image", form.image.files[0]);
  upload.append("prompt", form.prompt.value);
  if (form.realtime.checked || form.size.value.trim().toLowerCase() === "auto") upload.append("realtime", "true");
  else upload.append("size", form.size.value);
  if (form.voice.value) upload.append("voice", form.voice.value);
  const speechFile = $("session-speech").files[0];
  const text = $("session-text").value.trim();
  const samples = speechFile ? await speechFromFile(speechFile) : null;
  $("session-status").textContent = "starting…";
  const response = await fetch("/sessions", { method: "POST", body: upload });
  if (!response.ok) { $("session-status").textContent = `error ${await errorText(response)}`; return; }
  const session = await response.json();
  const record = { id: session.id, blocks: [], startedAt: performance.now(), firstSpeechAt: null, speechSent: 0,
                   firstBlockAt: null, firstPlaybackAt: null, ended: false, error: null, said: [], pushes: [],
                   notes: [], messages: [], lag: null, view: session };
  state.session = record;
  state.latency = () => latencyParts(record);
  const video = $("session-video");
  firstPlayback(video, record);
  watchFrames(video, record);
  $("session-view").href = session.links.view;
  $("session-view").hidden = false;
  $("session-notes").textContent = "";
  let awaitingBytes = null;  // the block whose MP4 bytes come next
  const player = new MsePlayer(video);
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${session.links.ws}`);
  socket.binaryType = "arraybuffer";
  let stopSpeech = () => {};
  // Text is sent as JSON; the server synthesises it sentence by sentence into the session's speech.
  const say = (words) => {
    if (record.firstSpeechAt === null) record.firstSpeechAt = performance.now();
    socket.send(JSON.stringify({ type: "text", text: words }));
  };
  socket.onopen = async () => {
    $("session-say").disabled = false;
    $("session-say").onclick = () => { if ($("session-text").value.trim()) say($("session-text").value); };
    if (samples) stopSpeech = streamFile(samples, socket, record);
    else if (text) say(text);
    else stopSpeech = await streamMicrophone(socket, record);
  };
  const note = (text) => { record.notes.push(text); $("session-notes").textContent = record.notes.slice(-4).join("\n"); };
  socket.onmessage = ({ data }) => {
    if (typeof data !== "string") {
      if (awaitingBytes) {
        awaitingBytes.bytesAt = performance.now();
        // Where playback stood when the block arrived (what the buffering part waits for).
        const b = video.buffered;
        awaitingBytes.playback = { time: video.currentTime, buffered_end: b.length ? b.end(b.length - 1) : 0,
                                   ready: video.readyState, paused: video.paused };
        awaitingBytes = null;
      }
      player.append(data);
      return;
    }
    const message = JSON.parse(data);
    if (message.type === "session") $("session-status").textContent = `session ${message.state}` +
      (message.position ? ` (position ${message.position} in the queue)` : "");
    else if (message.type === "init") player.start(message.mime);
    else if (message.type === "block") {
      message.receivedAt = performance.now();
      if (record.firstBlockAt === null) record.firstBlockAt = message.receivedAt;
      record.blocks.push(message);
      awaitingBytes = message;
      record.lag = message.lag_s;
      $("session-status").textContent = `block ${message.index} (${message.size}, ${message.sample_steps} steps): ` +
        `${message.speech_samples ? "speaking" : "idle"}, ${message.queued_s.toFixed(2)} s of speech waiting`;
      $("session-lag").textContent = `lag ${message.lag_s.toFixed(2)} s` + (message.lag_s > 2 ? " (behind: catching up)" : "");
      showLatency(record);
    } else if (["realtime", "downgrade", "step_down", "catch_up"].includes(message.type)) {
      record.messages.push(message);
      note(message.type === "catch_up" ? `catching up: ${message.dropped_s.toFixed(2)} s of pauses dropped (lag ${message.lag_s.toFixed(2)} s)`
        : message.type === "step_down" ? `stepped down to ${message.to.size}, ${message.to.sample_steps} steps: ${message.reason}`
        : message.size ? `${message.type === "realtime" ? "real time" : "downgraded"}: ${message.size} at ${message.sample_steps} steps. ${message.reason}`
        : message.reason);
    } else if (message.type === "end") {
      record.ended = true;
      record.error = message.error;
      player.finish();
      $("session-status").textContent = message.error ? `ended: ${message.error}` : "ended";
    } else if (message.type === "speech") record.said.push(message);  // a sentence of text queued to be spoken
    else if (message.type === "error") $("session-status").textContent = message.detail;
  };
  socket.onclose = () => { stopSpeech(); $("session-stop").disabled = true; $("session-say").disabled = true; };
  $("session-stop").disabled = false;
  $("session-stop").onclick = () => socket.send(JSON.stringify({ type: "close" }));
});

// ---------------------------------------------------------------- what this machine keeps up with
fetch("/capabilities").then((r) => r.json()).then((caps) => {
  state.capabilities = caps;
  const rt = caps.realtime;
  $("capabilities").textContent = rt.size
    ? `Real time here (${caps.needed_fps} FPS needed): ${rt.size} at ${rt.sample_steps} steps, ${rt.fps} FPS` +
      (rt.keeps_up ? "" : " (does not keep up)") + `; measured: ` +
      caps.speeds.map((r) => `${r.size}/${r.sample_steps} ${r.fps.toFixed(1)}`).join(", ")
    : `Real time: nothing measured yet (${rt.reason})`;
}).catch(() => {});
