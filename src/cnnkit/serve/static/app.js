// cnnkit serve's page: choose a model, drop images, see what it predicts. Plain JS, no build step.
"use strict";
const state = { models: [], cards: [] };
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
  "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"];
const colour = (k) => PALETTE[k % PALETTE.length];

function model() { return state.models.find((m) => m.name === $("model").value); }

async function loadModels() {
  const response = await fetch("models", { headers: headers() });
  if (!response.ok) { $("status").textContent = (await response.json()).error; return; }
  state.models = await response.json();
  state.limits = (await (await fetch("health", { headers: headers() })).json()).limits;
  $("model").innerHTML = "";
  for (const m of state.models) $("model").add(new Option(`${m.name} (${m.task})`, m.name));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted) $("model").value = wanted;
  showModel();
}

function showModel() {
  const m = model();
  if (!m) return;
  const classes = (m.classes || []).length ? `, ${m.classes.length} classes` : "";
  $("task").textContent = `${m.task}${classes}, input ${m.imgsz}`;
  $("conf-control").hidden = $("iou-control").hidden = m.task !== "detect";
  $("opacity-control").hidden = m.task !== "segment";
}

const isVideo = (file) => file.type.startsWith("video/") || /\.(mp4|webm|mkv|mov|avi|m4v|mpe?g|wmv)$/i.test(file.name);

function newCard(file, m, body) {
  const card = { file, model: m, el: document.createElement("div") };
  card.el.className = "card";
  card.el.innerHTML = `<h2></h2>${body}<div class="extra"></div>`;
  card.el.querySelector("h2").textContent = file.name;
  $("results").prepend(card.el);
  state.cards.push(card);
  return card;
}

// POST the file as the raw body; the answer's JSON, or null with the server's error shown on the card.
async function ask(card, query) {
  const m = card.model;
  const response = await fetch(`predict/${encodeURIComponent(m.name)}?${query}`, {
    method: "POST", body: card.file,
    headers: headers({ "Content-Type": card.file.type || "application/octet-stream" }),
  });
  const answer = await response.json();
  if (response.ok) return answer;
  card.el.querySelector(".extra").innerHTML = `<p class="error"></p>`;
  card.el.querySelector(".error").textContent = answer.error;
  return null;
}

// Detection asks for the boxes before NMS (the best `most` scored 0.001 up): the confidence and
// IoU sliders filter them here, without asking the model again.
const detectQuery = (m, most) => (m.task === "detect" ? `conf=0.001&iou=1&max_det=${most}` : "");

const iou = (a, b) => {
  const w = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
  const h = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
  const inter = Math.max(0, w) * Math.max(0, h);
  return inter / (a[2] * a[3] + b[2] * b[3] - inter || 1);
};

// Class-aware NMS of COCO boxes ([x, y, w, h]) above `conf`, as the server does it (greedy, best first).
function nms(boxes, conf, threshold) {
  const kept = [];
  for (const b of boxes.filter((b) => b.score >= conf).sort((p, q) => q.score - p.score)) {
    if (!kept.some((k) => k.category_id === b.category_id && iou(k.bbox, b.bbox) > threshold)) kept.push(b);
  }
  return kept;
}

async function predict(file) {
  if (isVideo(file)) return predictVideo(file);
  const m = model();
  const card = newCard(file, m, "<canvas></canvas>");
  try {
    card.bitmap = await createImageBitmap(file);
  } catch (e) {
    card.bitmap = null;
  }
  const answer = await ask(card, detectQuery(m, 1000));
  if (!answer) return;
  card.predictions = answer.predictions;
  if (m.task === "segment") card.mask = await maskImage(answer.predictions[0].mask_png);
  render(card);
}

// A short video: the server predicts on its frames (at most the chosen frames per second, and never more
// frames than it takes); the page plays it with the frame's predictions drawn over it as it plays.
async function predictVideo(file) {
  const m = model();
  const card = newCard(file, m, `<div class="stage"><video controls muted playsinline></video><canvas></canvas></div>`);
  const video = card.el.querySelector("video");
  card.video = video;
  video.src = URL.createObjectURL(file);
  const status = card.el.querySelector(".extra");
  const playable = await new Promise((ok) => { video.onloadedmetadata = () => ok(true); video.onerror = () => ok(false); });
  if (!playable) { status.textContent = `${file.name}: this browser cannot play the video`; return; }
  let fps = parseFloat($("fps").value) || 5;
  if (isFinite(video.duration) && video.duration > 0 && state.limits) fps = Math.min(fps, 0.95 * state.limits.max_frames / video.duration);
  status.textContent = `predicting at ${fps.toFixed(2)} frames per second...`;
  const answer = await ask(card, [detectQuery(m, 100), `fps=${fps.toFixed(4)}`].filter(Boolean).join("&"));
  if (!answer) return;
  const clip = answer.videos[0];
  card.frames = clip.frames;
  card.note = clip.note;
  if (m.task === "segment") for (const f of card.frames) f.mask = await maskImage(f.predictions[0].mask_png);
  card.el.dataset.frames = String(card.frames.length);
  const show = () => showFrame(card);
  video.addEventListener("timeupdate", show);
  video.addEventListener("seeked", show);
  const follow = () => { show(); video.requestVideoFrameCallback(follow); };
  if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(follow);
  show();
}

// The predictions of the last sampled frame at or before the video's current time.
function showFrame(card) {
  const t = card.video.currentTime + 1e-3;
  let k = 0;
  while (k + 1 < card.frames.length && card.frames[k + 1].time <= t) k++;
  const frame = card.frames[k];
  card.predictions = frame.predictions;
  card.mask = frame.mask;
  card.el.dataset.frame = String(frame.index);
  render(card);
}

async function maskImage(b64) {
  const image = new Image();
  image.src = "data:image/png;base64," + b64;
  await image.decode();
  const canvas = new OffscreenCanvas(image.width, image.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0);
  return ctx.getImageData(0, 0, image.width, image.height);
}

// The mask's classes in their colours at `alpha` (background clear), to draw over the image or video.
function maskOverlay(mask, alpha) {
  const layer = new ImageData(mask.width, mask.height);
  for (let i = 0; i < mask.width * mask.height; i++) {
    const k = mask.data[4 * i];
    if (k === 0) continue; // background shows the image
    const c = colour(k);
    for (let j = 0; j < 3; j++) layer.data[4 * i + j] = parseInt(c.slice(1 + 2 * j, 3 + 2 * j), 16);
    layer.data[4 * i + 3] = Math.round(255 * alpha);
  }
  const canvas = new OffscreenCanvas(mask.width, mask.height);
  canvas.getContext("2d").putImageData(layer, 0, 0);
  return canvas;
}

function render(card) {
  const canvas = card.el.querySelector("canvas");
  const extra = card.el.querySelector(".extra");
  if (!card.predictions || !(card.bitmap || card.video)) return;
  const ctx = canvas.getContext("2d");
  if (card.video) { // a transparent layer over the playing video
    canvas.width = card.video.videoWidth;
    canvas.height = card.video.videoHeight;
  } else {
    canvas.width = card.bitmap.width;
    canvas.height = card.bitmap.height;
    canvas.style.width = `${Math.min(500, Math.max(320, canvas.width))}px`; // small images shown larger
    ctx.drawImage(card.bitmap, 0, 0);
  }
  const names = card.model.classes || [];
  const task = card.model.task;
  ctx.lineWidth = Math.max(1, canvas.width / 250);
  ctx.font = `${Math.max(6, Math.round(canvas.width / 30))}px system-ui`;
  if (task === "classify") {
    extra.innerHTML = `<div class="bars"></div>`;
    for (const t of card.predictions[0].topk) {
      const row = document.createElement("div");
      row.className = "bar";
      row.innerHTML = `<span class="label"></span><span class="track"><span class="fill"></span></span><span class="prob"></span>`;
      row.querySelector(".label").textContent = t.class;
      row.querySelector(".fill").style.width = `${(100 * t.prob).toFixed(1)}%`;
      row.querySelector(".prob").textContent = t.prob.toFixed(3);
      extra.querySelector(".bars").append(row);
    }
  } else if (task === "detect") {
    const conf = parseFloat($("conf").value);
    const shown = nms(card.predictions, conf, parseFloat($("iou").value));
    for (const b of shown) {
      const [x, y, w, h] = b.bbox;
      ctx.strokeStyle = ctx.fillStyle = colour(b.category_id);
      ctx.strokeRect(x, y, w, h);
      const text = `${names[b.category_id] ?? b.category_id} ${b.score.toFixed(2)}`;
      ctx.fillRect(x, Math.max(0, y - parseInt(ctx.font)), ctx.measureText(text).width + 6, parseInt(ctx.font));
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x + 3, Math.max(parseInt(ctx.font) - 2, y - 3));
    }
    extra.innerHTML = `<p class="count"></p>`;
    extra.querySelector(".count").textContent = `${shown.length} boxes with score ≥ ${conf.toFixed(2)}, NMS at IoU ${$("iou").value}`;
    card.el.dataset.boxes = String(shown.length);
  } else if (task === "segment") {
    ctx.drawImage(maskOverlay(card.mask, parseFloat($("opacity").value)), 0, 0);
    const present = new Set();
    for (let i = 0; i < card.mask.width * card.mask.height; i++) present.add(card.mask.data[4 * i]);
    extra.innerHTML = `<div class="legend"></div>`;
    for (const k of [...present].sort((a, b) => a - b)) {
      const item = document.createElement("span");
      item.style.setProperty("--c", k === 0 ? "transparent" : colour(k));
      item.textContent = names[k] ?? String(k);
      extra.querySelector(".legend").append(item);
    }
  } else if (task === "localize") {
    const p = card.predictions[0];
    extra.innerHTML = `<p class="count"></p>`;
    if (p.box) {
      const [x1, y1, x2, y2] = p.box;
      ctx.strokeStyle = colour(names.indexOf(p.class));
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      extra.querySelector(".count").textContent = `${p.class} ${p.class_prob.toFixed(2)} (object ${p.object_prob.toFixed(2)})`;
    } else {
      extra.querySelector(".count").textContent = `no object (${p.object_prob.toFixed(2)})`;
    }
  } else if (task === "landmarks") {
    card.predictions[0].points.forEach(([x, y], k) => {
      ctx.fillStyle = colour(k);
      ctx.beginPath();
      ctx.arc(x, y, Math.max(3, canvas.width / 120), 0, 2 * Math.PI);
      ctx.fill();
      ctx.fillText(String(k), x + 5, y - 5);
    });
    extra.innerHTML = `<p class="count"></p>`;
    extra.querySelector(".count").textContent = `${card.predictions[0].points.length} points`;
  }
  if (card.video) {
    const line = document.createElement("p");
    line.className = "frame muted";
    const k = card.frames.findIndex((f) => f.predictions === card.predictions);
    line.textContent = `frame ${card.el.dataset.frame} (${k + 1} of ${card.frames.length} predicted)${card.note ? "; " + card.note : ""}`;
    extra.append(line);
  }
}

function take(files) {
  $("status").textContent = "";
  for (const file of files) predict(file).catch((e) => { $("status").textContent = String(e); });
}

$("files").addEventListener("change", (e) => {
  take([...e.target.files]);
  e.target.value = ""; // the same file chosen again (another model) is a new change
});
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  take(e.dataTransfer.files);
});
$("model").addEventListener("change", showModel);
for (const id of ["conf", "iou"]) {
  $(id).addEventListener("input", () => {
    $(`${id}-value`).textContent = parseFloat($(id).value).toFixed(2);
    state.cards.forEach(render); // re-filter the boxes already predicted: no new request
  });
}
$("opacity").addEventListener("input", () => state.cards.forEach(render));
onToken(loadModels);
loadModels();
