"use strict";
// The viewer page of a live session (/sessions/{id}/view): plays the session's video from the newest block on,
// filling the page, with no controls, as a Browser Source in OBS or in any window; any number of viewers.
// It starts by itself with sound where the browser allows it (OBS's Browser Source does; Chromium's default
// policy does not without a click), else muted with a "Sound on" button. ?muted=1 always starts muted.
// `window.liveavatarViewer` holds what happened (for tests).

const POLL_MS = 250;
const FRAMES_KEPT = 3000;
const sessionId = location.pathname.split("/").filter(Boolean)[1];
const video = document.getElementById("view");
const unmute = document.getElementById("unmute");
const state = { id: sessionId, mime: null, bytes: 0, ended: false, error: null, muted: null, frames: [], started: null };
window.liveavatarViewer = state;

function keepFrames() {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onFrame = (now, meta) => {
    state.frames.push([meta.mediaTime, meta.expectedDisplayTime || now]);
    if (state.frames.length > FRAMES_KEPT) state.frames.splice(0, state.frames.length - FRAMES_KEPT);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function start() {
  // Sound first; where autoplay with sound is not allowed, muted (always allowed) and a button to turn it on.
  video.muted = new URLSearchParams(location.search).get("muted") === "1";
  try {
    await video.play();
  } catch (e) {
    video.muted = true;
    unmute.hidden = false;
    await video.play().catch(() => {});
  }
  state.muted = video.muted;
}

unmute.onclick = () => { video.muted = false; state.muted = false; unmute.hidden = true; video.play().catch(() => {}); };

async function waitForVideo() {
  // The session's MIME type is known once its first block is out.
  while (true) {
    const response = await fetch(`/sessions/${sessionId}`);
    if (!response.ok) throw new Error(`no session ${sessionId}`);
    const view = await response.json();
    if (view.mime) return view.mime;
    if (["done", "failed", "cancelled"].includes(view.state)) throw new Error(`the session has ended (${view.state})`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function run() {
  state.mime = await waitForVideo();
  const source = new MediaSource();
  video.src = URL.createObjectURL(source);
  await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
  const buffer = source.addSourceBuffer(state.mime);
  const pending = [];
  let done = false;
  const pump = () => {
    if (buffer.updating) return;
    if (pending.length) buffer.appendBuffer(pending.shift());
    else if (done && source.readyState === "open") source.endOfStream();
  };
  buffer.addEventListener("updateend", () => {
    // A late viewer's video starts at the newest block, not at 0: start playing where it begins.
    if (state.started === null && buffer.buffered.length) {
      state.started = buffer.buffered.start(0);
      if (video.currentTime < state.started) video.currentTime = state.started;
      start();
    }
    pump();
  });
  keepFrames();
  const response = await fetch(`/sessions/${sessionId}/video`);
  if (!response.ok) throw new Error(`the session's video: ${response.status}`);
  const reader = response.body.getReader();
  while (true) {
    const { value, done: end } = await reader.read();
    if (end) break;
    state.bytes += value.length;
    pending.push(value);
    pump();
  }
  done = true;
  state.ended = true;
  pump();
}

run().catch((e) => { state.error = String(e.message || e); });
