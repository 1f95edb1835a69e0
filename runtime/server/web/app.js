// The opens2s-edge page: a Realtime session over WebSocket to this server. Microphone through getUserMedia and an
// AudioWorklet (pcm16 at 24 kHz to the server), the reply played as it streams, its transcript, and how long the
// first audio took. Hands-free uses the server's VAD (speaking over a reply interrupts it); push-to-talk commits the
// buffer when the button is released.
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);

// What the page has seen, for people (the readout) and for tests (window.opens2s).
const view = { connected: false, userTurns: 0, replies: [], playedSamples: 0, errors: [], events: 0 };
window.opens2s = view;

let ws = null;
let ctx = null;
let stream = null;
let player = null;
let mode = "vad";
let talking = false;
let reference = null; // when the user finished (end of speech detected, button released, or message sent)
let current = null; // the reply being streamed

function setStatus(text, cls = "") {
  const el = $("status");
  el.textContent = text;
  el.className = cls;
}

function showError(text) {
  view.errors.push(text);
  const div = document.createElement("div");
  div.textContent = text;
  $("errors").prepend(div);
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "assistant";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("transcript").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function toBase64(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = s < 0 ? s * 32768 : s * 32767;
  }
  const bytes = new Uint8Array(pcm.buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64(data) {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

// Only where the browser would not open a 24 kHz context: linear interpolation to 24 kHz.
function toWireRate(samples, rate) {
  if (rate === RATE) return samples;
  const n = Math.floor((samples.length * RATE) / rate);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const x = (i * rate) / RATE;
    const j = Math.floor(x);
    const f = x - j;
    out[i] = samples[j] * (1 - f) + (samples[Math.min(j + 1, samples.length - 1)] || 0) * f;
  }
  return out;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function sessionUpdate() {
  const vad = { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 };
  const session = {
    type: "realtime",
    audio: {
      input: { format: { type: "audio/pcm", rate: RATE }, turn_detection: mode === "vad" ? vad : null },
      output: { format: { type: "audio/pcm", rate: RATE } },
    },
  };
  const instructions = $("instructions").value.trim();
  if (instructions) session.instructions = instructions;
  send({ type: "session.update", session });
}

function onMic(block) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (mode === "vad" || talking) {
    send({ type: "input_audio_buffer.append", audio: toBase64(toWireRate(block, ctx.sampleRate)) });
  }
}

function interrupt() {
  player.port.postMessage({ type: "clear" });
  if (current && !current.done) send({ type: "response.cancel" });
}

function onEvent(ev) {
  view.events++;
  switch (ev.type) {
    case "session.created":
      setStatus("connected");
      break;
    case "session.updated":
      setStatus(mode === "vad" ? "listening" : "hold the button to talk");
      break;
    case "input_audio_buffer.speech_started":
      player.port.postMessage({ type: "clear" }); // the server cancels its reply; stop playing it here too
      setStatus("hearing you", "speaking");
      break;
    case "input_audio_buffer.speech_stopped":
      reference = performance.now();
      setStatus("thinking");
      break;
    case "conversation.item.added": {
      const item = ev.item;
      if (item.role === "user") {
        view.userTurns++;
        const text = item.content.map((c) => (c.type === "input_text" ? c.text : "(spoken)")).join(" ");
        addTurn("user", text);
      }
      break;
    }
    case "response.created":
      current = {
        id: ev.response.id, transcript: "", status: "in_progress", firstAudioMs: null, audioSamples: 0,
        start: reference ?? performance.now(), el: addTurn("assistant", ""), done: false,
      };
      view.replies.push(current);
      break;
    case "response.output_audio_transcript.delta":
      if (current) {
        current.transcript += ev.delta;
        current.el.querySelector(".text").textContent = current.transcript;
      }
      break;
    case "response.output_audio.delta": {
      const samples = fromBase64(ev.delta);
      const count = samples.length; // read before the buffer is transferred (and detached) to the player
      player.port.postMessage({ type: "push", samples }, [samples.buffer]);
      if (current) {
        current.audioSamples += count;
        if (current.firstAudioMs === null) {
          current.firstAudioMs = performance.now() - current.start;
          $("latency").textContent = `first audio ${current.firstAudioMs.toFixed(0)} ms after you finished`;
        }
        setStatus("speaking");
      }
      break;
    }
    case "response.done": {
      if (!current) break;
      const r = ev.response;
      current.status = r.status;
      current.done = true;
      const item = (r.output || [])[0];
      const said = item && item.content && item.content[0] ? item.content[0].transcript : null;
      if (said !== null && said !== undefined) {
        current.transcript = said;
        current.el.querySelector(".text").textContent = said;
      }
      if (r.status === "cancelled") current.el.classList.add("cancelled");
      const t = ev.timing;
      if (t && current.firstAudioMs !== null) {
        const engine = t.engine_first_audio_ms === null ? "n/a" : `${t.engine_first_audio_ms.toFixed(0)} ms`;
        const rtf = t.rtf === null ? "n/a" : t.rtf.toFixed(2);
        $("latency").textContent = `first audio ${current.firstAudioMs.toFixed(0)} ms after you finished · ` +
          `server: queue ${t.queue_ms.toFixed(0)} ms, engine first audio ${engine}, RTF ${rtf}`;
      }
      reference = null;
      setStatus(mode === "vad" ? "listening" : "hold the button to talk");
      break;
    }
    case "error":
      showError(`${ev.error.code || ev.error.type}: ${ev.error.message}`);
      break;
    default:
      break;
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const key = $("key").value.trim();
  // Browsers cannot send an Authorization header on a WebSocket: the key travels as a subprotocol, as the openai
  // SDKs' browser clients send it.
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?model=opens2s-edge`,
    key ? ["realtime", `openai-insecure-api-key.${key}`] : ["realtime"]);
  ws.onopen = () => {
    view.connected = true;
    sessionUpdate();
    $("say").disabled = false;
    $("talk").disabled = mode !== "ptt";
  };
  ws.onmessage = (e) => onEvent(JSON.parse(e.data));
  ws.onclose = (e) => {
    view.connected = false;
    setStatus(`disconnected${e.reason ? `: ${e.reason}` : ""}`);
    stop();
  };
}

function stop() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  stream = ctx = player = null;
  $("start").disabled = false;
  $("talk").disabled = true;
  $("say").disabled = true;
}

async function start() {
  $("start").disabled = true;
  try {
    ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    await ctx.audioWorklet.addModule("/worklets.js");
    player = new AudioWorkletNode(ctx, "player", { numberOfInputs: 0, outputChannelCount: [1] });
    player.port.onmessage = (e) => { view.playedSamples = e.data.played; };
    player.connect(ctx.destination);
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const source = ctx.createMediaStreamSource(stream);
    const capture = new AudioWorkletNode(ctx, "capture", { outputChannelCount: [1] });
    const mute = ctx.createGain(); // a path to the destination keeps the tap rendered; it plays nothing
    mute.gain.value = 0;
    source.connect(capture);
    capture.connect(mute);
    mute.connect(ctx.destination);
    capture.port.onmessage = (e) => onMic(e.data);
    await ctx.resume();
    connect();
  } catch (err) {
    showError(`microphone or audio: ${err.message || err}`);
    stop();
  }
}

function pressTalk() {
  if (mode !== "ptt" || talking || !ws) return;
  interrupt();
  send({ type: "input_audio_buffer.clear" });
  talking = true;
  $("talk").classList.add("active");
  setStatus("recording", "speaking");
}

function releaseTalk() {
  if (!talking) return;
  talking = false;
  $("talk").classList.remove("active");
  reference = performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
  setStatus("thinking");
}

$("keyform").addEventListener("submit", (e) => e.preventDefault()); // Enter in the key field is not a page load
$("start").addEventListener("click", start);
$("talk").addEventListener("pointerdown", pressTalk);
$("talk").addEventListener("pointerup", releaseTalk);
$("talk").addEventListener("pointerleave", releaseTalk);
document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", () => {
  mode = el.value;
  talking = false;
  $("talk").disabled = mode !== "ptt" || !view.connected;
  sessionUpdate();
}));
$("say").addEventListener("keydown", (e) => {
  const text = $("say").value.trim();
  if (e.key !== "Enter" || !text) return;
  interrupt();
  reference = performance.now();
  send({ type: "conversation.item.create", item: { type: "message", role: "user",
    content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
  $("say").value = "";
});
