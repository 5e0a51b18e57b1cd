// cnnkit serve's runs page: each training run's curves (results.csv), plots, configuration, best weights.
"use strict";
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

const fileUrl = (run, name) => `api/runs/file/${run.path.split("/").map(encodeURIComponent).join("/")}/${name}`;

async function fetchText(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.text();
}

function parseCsv(text) {
  const [head, ...rows] = text.trim().split(/\r?\n/).map((line) => line.split(",")); // csv writes \r\n
  return { head, rows: rows.map((r) => r.map(Number)) };
}

function plot(canvas, table, columns, title) {
  const ctx = canvas.getContext("2d");
  const [w, h, pad] = [canvas.width, canvas.height, 30];
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui";
  ctx.fillStyle = "#1d2430";
  ctx.fillText(title, pad, 14);
  const x = table.head.indexOf("epoch");
  const series = columns.map((c) => ({ name: c, i: table.head.indexOf(c) }));
  const values = series.flatMap((s) => table.rows.map((r) => r[s.i])).filter(Number.isFinite);
  if (!values.length) return 0;
  const [lo, hi] = [Math.min(...values), Math.max(...values)];
  const epochs = table.rows.map((r) => r[x]);
  const [e0, e1] = [Math.min(...epochs), Math.max(...epochs)];
  const px = (e) => pad + ((e - e0) / Math.max(e1 - e0, 1)) * (w - 2 * pad);
  const py = (v) => h - pad + 10 - ((v - lo) / Math.max(hi - lo, 1e-12)) * (h - 2 * pad - 10);
  ctx.strokeStyle = "#9aa4b2";
  ctx.strokeRect(pad, 20, w - 2 * pad, h - pad - 10);
  ctx.fillText(`${e0}`, pad, h - 4);
  ctx.fillText(`epoch ${e1}`, w - pad - 50, h - 4);
  series.forEach((s, k) => {
    ctx.strokeStyle = ctx.fillStyle = COLOURS[k % COLOURS.length];
    ctx.beginPath();
    table.rows.forEach((r, j) => (j ? ctx.lineTo(px(r[x]), py(r[s.i])) : ctx.moveTo(px(r[x]), py(r[s.i]))));
    ctx.stroke();
    for (const r of table.rows) { // each epoch marked: one epoch is a point, not an empty plot
      ctx.beginPath();
      ctx.arc(px(r[x]), py(r[s.i]), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.fillText(s.name, pad + 4 + (k % 3) * 110, 34 + 14 * Math.floor(k / 3));
  });
  return series.length;
}

async function image(run, name) {
  const response = await fetch(fileUrl(run, name), { headers: headers() });
  const img = document.createElement("img");
  img.alt = name;
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
  return img;
}

async function showRun(run) {
  const card = document.createElement("article");
  card.className = "card run";
  card.dataset.path = run.path;
  card.innerHTML = `<h2></h2><p class="muted summary"></p><div class="curves"></div><div class="plots"></div>
    <details><summary>config.yaml</summary><pre class="config"></pre></details><p class="actions"></p>`;
  card.querySelector("h2").textContent = run.path;
  const metrics = run.metrics || {};
  const shown = Object.entries(metrics).filter(([k]) => !/^(train_|lr|time)/.test(k)).slice(0, 6);
  card.querySelector(".summary").textContent = [run.task, run.model, ...shown.map(([k, v]) =>
    `${k} ${typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : v}`)].filter(Boolean).join(" · ");
  $("runs").append(card);
  if (run.files.includes("results.csv")) {
    const table = parseCsv(await fetchText(fileUrl(run, "results.csv")));
    const losses = table.head.filter((c) => c.endsWith("loss") || c.startsWith("train_"));
    const others = table.head.filter((c) => !losses.includes(c) && !["epoch", "lr", "time"].includes(c));
    for (const [columns, title] of [[losses, "losses"], [others, "metrics"]]) {
      const canvas = document.createElement("canvas");
      canvas.width = 360;
      canvas.height = 200;
      canvas.dataset.series = String(plot(canvas, table, columns, title));
      card.querySelector(".curves").append(canvas);
    }
  }
  for (const name of ["confusion_matrix.png", "pr_curve.png", "val_pred.jpg"]) {
    if (run.files.includes(name)) card.querySelector(".plots").append(await image(run, name));
  }
  if (run.files.includes("config.yaml")) {
    card.querySelector(".config").textContent = await fetchText(fileUrl(run, "config.yaml"));
  }
  if (run.best) {
    const button = document.createElement("button");
    button.textContent = run.served_as ? `try it (served as ${run.served_as})` : "try its best weights";
    button.addEventListener("click", async () => {
      const path = run.path.split("/").map(encodeURIComponent).join("/");
      const response = await fetch(`api/runs/try/${path}`, { method: "POST", headers: headers() });
      const answer = await response.json();
      if (response.ok) location.href = `./?model=${encodeURIComponent(answer.model)}`;
      else $("status").textContent = answer.error;
    });
    card.querySelector(".actions").append(button);
  }
}

async function load() {
  $("runs").innerHTML = "";
  const response = await fetch("api/runs", { headers: headers() });
  const answer = await response.json();
  if (!response.ok) { $("status").textContent = answer.error; return; }
  $("status").textContent = `${answer.length} runs`;
  for (const run of answer) await showRun(run);
}

onToken(load);
load();
