"use strict";
// The player page of `liveavatar serve`: a job's MP4 plays from /jobs/{id}/live while it is written;
// a live session sends speech (or text to speak) over its WebSocket and plays the MP4 fragments that come
// back through Media Source Extensions. `window.liveavatar` holds what happened, with timings (performance.now()).

const SAMPLE_RATE = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms of speech per WebSocket message
const POLL_MS = 500;
const state = { job: null, session: null };
window.liveavatar = state;

const $ = (id) => document.getElementById(id);

async function errorText(response) {
  try { return `${response.status}: ${(await response.json()).detail}`; } catch { return `${response.status}`; }
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
    socket.send(toPcm16(samples.subarray(position, position + CHUNK_SAMPLES)));
    position += CHUNK_SAMPLES;
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
    socket.send(toPcm16(chunk));
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
  upload.append("size", form.size.value);
  if (form.voice.value) upload.append("voice", form.voice.value);
  const speechFile = $("session-speech").files[0];
  const text = $("session-text").value.trim();
  const samples = speechFile ? await speechFromFile(speechFile) : null;
  $("session-status").textContent = "starting…";
  const response = await fetch("/sessions", { method: "POST", body: upload });
  if (!response.ok) { $("session-status").textContent = `error ${await errorText(response)}`; return; }
  const session = await response.json();
  const record = { id: session.id, blocks: [], startedAt: performance.now(), firstSpeechAt: null, speechSent: 0,
                   firstBlockAt: null, firstPlaybackAt: null, ended: false, error: null, said: [] };
  state.session = record;
  const video = $("session-video");
  firstPlayback(video, record);
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
  socket.onmessage = ({ data }) => {
    if (typeof data !== "string") { player.append(data); return; }
    const message = JSON.parse(data);
    if (message.type === "session") $("session-status").textContent = `session ${message.state}` +
      (message.position ? ` (position ${message.position} in the queue)` : "");
    else if (message.type === "init") player.start(message.mime);
    else if (message.type === "block") {
      if (record.firstBlockAt === null) record.firstBlockAt = performance.now();
      record.blocks.push(message);
      $("session-status").textContent = `block ${message.index}: ${message.speech_samples ? "speaking" : "idle"}, ` +
        `${message.queued_s.toFixed(2)} s of speech waiting`;
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
