// The CoordTok playground: a page over the server's public API only (/v1/models, /v1/encode,
// /v1/decode, /v1/generate, /v1/jobs). Tokens travel as JSON (format=json); reconstructions as
// .npy uint8 frames, drawn on canvases; decoded ranges and generated videos as mp4 or webm.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, tokens: null, tokensText: null, file: null, timer: null, job: null };

// ---------------------------------------------------------------- the API

class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = $("api-key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = response.statusText;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not the server's JSON error */ }
    throw new ApiError(`${response.status}: ${message}`);
  }
  return response;
}

function say(id, text, error = false) {
  const element = $(id);
  element.textContent = text;
  element.classList.toggle("error", error);
}

// A <video> format this browser plays: the server writes H.264 MP4 and VP9 WebM.
function playableFormat() {
  const probe = document.createElement("video");
  return probe.canPlayType('video/mp4; codecs="avc1.42E01E"') ? "mp4" : "webm";
}

// ---------------------------------------------------------------- the model

async function connect() {
  try {
    const info = await (await api("/v1/models")).json();
    state.model = info.models[0];
    state.generator = info.generator;
    const c = state.model.config;
    const generator = info.generator ? `generator ${info.generator.id}` : "no generator (generation is off)";
    const warning = state.model.warning ? ` Warning: ${state.model.warning}.` : "";
    say("model-info", `Model ${state.model.id}: clips of ${c.frames} frames at ${c.width}x${c.height}, ` +
        `${state.model.tokens_per_clip} tokens per clip, on ${state.model.devices.join(", ")}; ${generator}.${warning}`,
        Boolean(state.model.warning));
    $("class-field").hidden = !(info.generator && info.generator.classes > 0);
    $("generate-button").disabled = !info.generator;
  } catch (error) {
    say("model-info", `Cannot reach the API: ${error.message}`, true);
  }
}

// ---------------------------------------------------------------- token files and .npy

// Shape of a nested JSON array.
function shapeOf(array) {
  const shape = [];
  for (let a = array; Array.isArray(a); a = a[0]) shape.push(a.length);
  return shape;
}

// uint8 frames [T, H, W, 3] of a .npy file, as { data, shape }.
function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const offset = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(offset, offset + headerLength));
  if (!header.includes("'|u1'")) throw new Error(`unexpected .npy dtype: ${header}`);
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  return { data: bytes.subarray(offset + headerLength), shape };
}

// ---------------------------------------------------------------- encode and reconstruct

async function encode(event) {
  event.preventDefault();
  const file = $("video-file").files[0];
  if (file) await encodeFile(file);
}

// The sample clip the server ships (OpenCV's tree.avi, a format browsers do not play).
async function encodeSample() {
  try {
    const blob = await (await fetch("/static/sample.avi")).blob();
    $("video-file").value = "";
    await encodeFile(new File([blob], "sample.avi", { type: "video/x-msvideo" }));
  } catch (error) {
    say("encode-status", `Cannot load the sample clip: ${error.message}`, true);
  }
}

async function encodeFile(file) {
  stopPlayer();
  $("encode-result").hidden = true;
  say("encode-status", `Encoding ${file.name}...`);
  try {
    const form = new FormData();
    form.append("file", file);
    const began = performance.now();
    const resize = $("resize").value;
    const response = await api(`/v1/encode?format=json&resize=${resize}`, { method: "POST", body: form });
    state.tokensText = await response.text();
    state.tokens = JSON.parse(state.tokensText);
    Object.assign(state, { file, resize });
    const seconds = (performance.now() - began) / 1000;
    showTokens(state.tokens, file, seconds);
    const clips = state.tokens.xy.length;
    $("clip").replaceChildren(...Array.from({ length: clips }, (_, k) => new Option(`${k + 1} of ${clips}`, k)));
    $("encode-result").hidden = false;
    say("encode-status", `Encoded in ${seconds.toFixed(2)} s. Decoding...`);
    await showClip(0);
  } catch (error) {
    say("encode-status", `Encode failed: ${error.message}`, true);
  }
}

// Metadata values are plain JSON in JSON token files; older servers wrote lists and objects as
// JSON-encoded strings.
const metaValue = (value) => (typeof value === "string" ? JSON.parse(value) : value);

function showTokens(tokens, file, seconds) {
  const meta = tokens.metadata;
  const clips = tokens.xy.length;
  const perClip = ["xy", "yt", "xt"].map((p) => shapeOf(tokens[p]).slice(1));
  const channels = perClip[0][2];
  const count = perClip.reduce((sum, [a, b]) => sum + a * b, 0);
  const facts = {
    "file": `${file.name} (${(file.size / 1024).toFixed(0)} KiB, ${sizeText(metaValue(meta.source_size))} at ${Number(Number(meta.source_fps).toFixed(2))} fps)`,
    "clips": `${clips} of ${meta.frames_per_clip} frames; valid frames ${metaValue(meta.n_frames).join(", ")}`,
    "tokens": `${count * clips} (${count} per clip: xy ${perClip[0].slice(0, 2).join("x")}, ` +
              `yt ${perClip[1].slice(0, 2).join("x")}, xt ${perClip[2].slice(0, 2).join("x")}; ${channels} channels each)`,
    "model": meta.model_id,
    "encode time": `${seconds.toFixed(2)} s (upload included)`,
  };
  $("token-info").replaceChildren(...Object.entries(facts).flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    return [dt, dd];
  }));
}

// The video's frames [start, stop) that clip k reconstructs: from its first frame to the next
// clip's (metadata clip_starts, else consecutive clips of n_frames frames) or its last.
function clipFrames(meta, k) {
  const lengths = metaValue(meta.n_frames);
  const starts = meta.clip_starts === undefined
    ? lengths.map((_, i) => lengths.slice(0, i).reduce((sum, n) => sum + n, 0)) : metaValue(meta.clip_starts);
  return [starts[k], k + 1 < starts.length ? starts[k + 1] : starts[k] + lengths[k]];
}

// "WxH" of an [height, width] pair.
const sizeText = ([height, width]) => `${width}x${height}`;

async function showClip(k) {
  stopPlayer();
  const tokens = state.tokens;
  const meta = tokens.metadata;
  say("psnr", "PSNR: computing...");
  for (const plane of ["xy", "yt", "xt"]) drawPlane($(`plane-${plane}`), tokens[plane][k], plane);
  const [start, stop] = clipFrames(meta, k);
  const frames = stop - start;
  const response = await api(`/v1/decode?format=npy&start=${start}&end=${start + frames}`, {
    method: "POST", body: state.tokensText, headers: { "Content-Type": "application/json" },
  });
  const recon = parseNpy(await response.arrayBuffer());
  const [, height, width] = recon.shape;
  say("encode-status", "Reconstructed. Reading the original frames...");
  let original = null;
  try {
    original = await previewFrames(state.file, state.resize, start, frames, height, width);
  } catch (error) {
    say("psnr", `PSNR: not available (${error.message})`);
  }
  if (original) {
    const db = psnr(original, recon.data);
    say("psnr", `PSNR ${db.toFixed(2)} dB over ${frames} frames (against the frames the server encoded)`);
  }
  say("encode-status", `Clip ${k + 1}: ${frames} frames of ${sizeText([height, width])}.`);
  startPlayer(original, recon.data, frames, height, width, Number(meta.fps) || 25);
}

// The frames [start, start + count) the model was given: the upload decoded and resized by the
// server (/v1/preview, with the encode's query), so that every format the server reads is shown
// and scored, whether or not this browser plays it.
async function previewFrames(file, resize, start, count, height, width) {
  const form = new FormData();
  form.append("file", file);
  const params = new URLSearchParams({ format: "npy", resize, first_frame: start, frames: count });
  const preview = parseNpy(await (await api(`/v1/preview?${params}`, { method: "POST", body: form })).arrayBuffer());
  const [frames, h, w] = preview.shape;
  if (frames !== count || h !== height || w !== width) {
    throw new Error(`the preview is ${frames} frames of ${sizeText([h, w])}, not ${count} of ${sizeText([height, width])}`);
  }
  return preview.data;
}

function psnr(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i] - b[i];
    sum += d * d;
  }
  const mse = sum / a.length;
  return 10 * Math.log10((255 * 255) / Math.max(mse, 1e-10));
}

// One plane [R0][R1][C] of a clip: channels 0-2 as RGB, each scaled to its own min..max.
function drawPlane(canvas, plane, name) {
  const rows = plane.length;
  const cols = plane[0].length;
  const channels = plane[0][0].length;
  const shown = [0, 1, 2].map((c) => Math.min(c, channels - 1));
  const low = shown.map(() => Infinity);
  const high = shown.map(() => -Infinity);
  for (const row of plane) for (const cell of row) shown.forEach((c, j) => {
    low[j] = Math.min(low[j], cell[c]);
    high[j] = Math.max(high[j], cell[c]);
  });
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const image = context.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) {
    for (let q = 0; q < cols; q++) {
      const o = (r * cols + q) * 4;
      shown.forEach((c, j) => {
        const span = high[j] - low[j] || 1;
        image.data[o + j] = Math.round((255 * (plane[r][q][c] - low[j])) / span);
      });
      image.data[o + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
  $(`caption-${name}`).textContent = `${name}: ${rows} rows x ${cols} columns, ${channels} channels`;
}

// ---------------------------------------------------------------- the side-by-side player

const player = { original: null, recon: null, frames: 0, height: 0, width: 0, frame: 0, playing: true, timer: null };

function startPlayer(original, recon, frames, height, width, fps) {
  Object.assign(player, { original, recon, frames, height, width, frame: 0, playing: true });
  for (const id of ["original", "reconstruction"]) {
    $(id).width = width;
    $(id).height = height;
  }
  $("frame").max = frames - 1;
  $("play").textContent = "Pause";
  drawFrame(0);
  player.timer = setInterval(() => {
    if (player.playing) drawFrame((player.frame + 1) % player.frames);
  }, 1000 / Math.min(Math.max(fps, 1), 60));
}

function stopPlayer() {
  clearInterval(player.timer);
  player.timer = null;
}

function drawFrame(i) {
  player.frame = i;
  const size = player.height * player.width;
  const paint = (canvas, frames) => {
    const context = canvas.getContext("2d");
    if (!frames) {
      context.fillStyle = "#333";
      context.fillRect(0, 0, canvas.width, canvas.height);
      return;
    }
    const image = context.createImageData(player.width, player.height);
    for (let p = 0; p < size; p++) {
      image.data.set(frames.subarray((i * size + p) * 3, (i * size + p) * 3 + 3), p * 4);
      image.data[p * 4 + 3] = 255;
    }
    context.putImageData(image, 0, 0);
  };
  paint($("original"), player.original);
  paint($("reconstruction"), player.recon);
  $("frame").value = i;
  $("frame-label").textContent = `frame ${i + 1} of ${player.frames}`;
}

// ---------------------------------------------------------------- decode a frame range

async function decodeRange(event) {
  event.preventDefault();
  const file = $("token-file").files[0];
  if (!file && !state.tokensText) {
    say("decode-status", "Encode a clip first, or choose a token file.", true);
    return;
  }
  const types = { json: "application/json", npz: "application/x-npz", safetensors: "application/vnd.coordtok.tokens+safetensors" };
  const body = file || state.tokensText;
  const type = file ? types[file.name.split(".").pop()] || "application/octet-stream" : types.json;
  const params = new URLSearchParams({ format: playableFormat(), start: $("decode-start").value || "0" });
  if ($("decode-end").value) params.set("end", $("decode-end").value);
  say("decode-status", "Decoding...");
  try {
    const began = performance.now();
    const response = await api(`/v1/decode?${params}`, { method: "POST", body, headers: { "Content-Type": type } });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    $("decoded").src = url;
    $("decoded-download").href = url;
    $("decoded-download").download = `decoded.${params.get("format")}`;
    $("decode-result").hidden = false;
    $("decoded").play().catch(() => {});
    say("decode-status", `Decoded frames ${params.get("start")} to ${params.get("end") || "the end"} in ` +
        `${((performance.now() - began) / 1000).toFixed(2)} s (${(blob.size / 1024).toFixed(0)} KiB ${params.get("format")}).`);
  } catch (error) {
    say("decode-status", `Decode failed: ${error.message}`, true);
  }
}

// ---------------------------------------------------------------- generate

async function generate(event) {
  event.preventDefault();
  const request = {
    num_videos: Number($("num-videos").value),
    steps: Number($("steps").value),
    sampler: $("sampler").value,
    format: playableFormat(),
  };
  if ($("seed").value) request.seed = Number($("seed").value);
  if (!$("class-field").hidden && $("class-label").value) request.class_label = Number($("class-label").value);
  $("generated").replaceChildren();
  try {
    const job = await (await api("/v1/generate", {
      method: "POST", body: JSON.stringify(request), headers: { "Content-Type": "application/json" },
    })).json();
    state.job = job.id;
    $("cancel-button").hidden = false;
    $("job-progress").hidden = false;
    showJob(job);
    clearTimeout(state.timer);
    poll(job.id);
  } catch (error) {
    say("job-status", `Generate failed: ${error.message}`, true);
  }
}

async function poll(id) {
  try {
    const job = await (await api(`/v1/jobs/${id}`)).json();
    showJob(job);
    if (job.status === "queued" || job.status === "running") {
      state.timer = setTimeout(() => poll(id), 500);
      return;
    }
    $("cancel-button").hidden = true;
    if (job.status === "succeeded") await showResults(job);
  } catch (error) {
    say("job-status", `Polling job ${id} failed: ${error.message}`, true);
  }
}

function showJob(job) {
  const p = job.progress;
  $("videos-progress").max = p.videos;
  $("videos-progress").value = p.videos_done;
  $("steps-progress").max = p.steps;
  $("steps-progress").value = p.step;
  let text = `Job ${job.id.slice(0, 8)} (seed ${job.request.seed}): ${job.status}, ${p.videos_done} of ${p.videos} videos done`;
  if (job.status === "running") text += `, step ${p.step} of ${p.steps}`;
  if (job.error) text += `: ${job.error}`;
  say("job-status", text, job.status === "failed");
}

async function showResults(job) {
  const videos = [];
  for (const url of job.results) {
    const blob = await (await api(url)).blob();
    const video = document.createElement("video");
    Object.assign(video, { controls: true, loop: true, muted: true, autoplay: true, playsInline: true });
    video.src = URL.createObjectURL(blob);
    video.className = "generated-video";
    videos.push(video);
  }
  $("generated").replaceChildren(...videos);
  say("job-status", `Job ${job.id.slice(0, 8)} (seed ${job.request.seed}): succeeded, ${videos.length} videos.`);
}

async function cancel() {
  if (!state.job) return;
  try {
    await api(`/v1/jobs/${state.job}`, { method: "DELETE" });
  } catch (error) {
    say("job-status", `Cancel failed: ${error.message}`, true);
  }
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("connect").addEventListener("click", connect);
  $("api-key").addEventListener("change", connect);
  $("encode-form").addEventListener("submit", encode);
  $("try-sample").addEventListener("click", encodeSample);
  $("clip").addEventListener("change", () => showClip(Number($("clip").value)).catch(
    (error) => say("encode-status", `Decode failed: ${error.message}`, true)));
  $("play").addEventListener("click", () => {
    player.playing = !player.playing;
    $("play").textContent = player.playing ? "Pause" : "Play";
  });
  $("frame").addEventListener("input", () => {
    player.playing = false;
    $("play").textContent = "Play";
    drawFrame(Number($("frame").value));
  });
  $("decode-form").addEventListener("submit", decodeRange);
  $("generate-form").addEventListener("submit", generate);
  $("cancel-button").addEventListener("click", cancel);
  connect();
});
