// omniseg serve: the page. Plain JavaScript, no build step; everything comes from this server.
"use strict";

const TASK_KEY = { semantic: "semantic", panoptic: "panoptic", instance: "instances" };
const state = {
  model: null,        // GET /v1/model
  files: [],          // picked images
  current: -1,        // index into files
  result: null,       // POST /v1/predict answer for the current file
  show: null,         // the view shown: "semantic" | "panoptic" | "instances"
  ids: null,          // Int32Array of segment ids of the shown view (display size)
  segments: new Map(),// id -> segment of the shown view
  hidden: new Set(),  // classes toggled off in the legend
  image: null,        // ImageBitmap of the current input
  rendered: 0,        // bumped after each drawing (tests wait on it)
};
window.omniseg = state;

const $ = (id) => document.getElementById(id);

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// -- model ------------------------------------------------------------------------------------
async function loadModel() {
  state.model = await api("/v1/model");
  $("model-name").textContent = `${state.model.model} · ${state.model.classes.length} classes · ${state.model.weights}`;
  const box = $("tasks");
  for (const task of state.model.tasks) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" name="task" value="${task}" ${state.model.default_tasks.includes(task) ? "checked" : ""}> ${task}`;
    box.appendChild(label);
  }
  box.addEventListener("change", () => { if (state.current >= 0) predict(); });
  $("layers-section").hidden = !state.model.layers;
}

function chosenTasks() {
  return [...document.querySelectorAll('input[name="task"]:checked')].map((el) => el.value);
}

// -- images -----------------------------------------------------------------------------------
function addFiles(fileList) {
  const start = state.files.length;
  for (const file of fileList) {
    if (!file.type.startsWith("image/") && !/\.(png|jpe?g|bmp|tiff?|webp)$/i.test(file.name)) continue;
    state.files.push(file);
    const thumb = document.createElement("img");
    thumb.src = URL.createObjectURL(file);
    thumb.title = file.name;
    const index = state.files.length - 1;
    thumb.addEventListener("click", () => select(index));
    $("thumbs").appendChild(thumb);
  }
  if (state.files.length > start) select(start);
}

async function select(index) {
  state.current = index;
  [...$("thumbs").children].forEach((el, i) => el.classList.toggle("current", i === index));
  await predict();
}

async function predict() {
  const file = state.files[state.current];
  const tasks = chosenTasks();
  if (!file) return;
  if (!tasks.length) { setStatus("Choose at least one task.", true); return; }
  setStatus(`Segmenting ${file.name}…`);
  const form = new FormData();
  form.append("image", file, file.name);
  const query = new URLSearchParams({ tasks: tasks.join(","), view: "true" });
  try {
    const started = performance.now();
    const [result, image] = await Promise.all([
      api(`/v1/predict?${query}`, { method: "POST", body: form }),
      createImageBitmap(file, { imageOrientation: "from-image" }),
    ]);
    if (state.files[state.current] !== file) return; // another image was picked meanwhile
    state.result = result;
    state.image = image;
    const shown = ["panoptic", "instances", "semantic"].filter((t) => result[t] !== undefined);
    const filled = shown.filter((t) => result.view[t].segments.length > 0);
    if (!filled.includes(state.show)) state.show = filled[0] || shown[0];
    buildShowChoices(shown);
    await showView();
    setStatus(`${file.name}: ${result.width}×${result.height}, ${Math.round(performance.now() - started)} ms`);
    for (const id of ["dl-overlay", "dl-semantic", "dl-panoptic", "dl-instances"]) $(id).disabled = true;
    $("dl-overlay").disabled = false;
    $("dl-semantic").disabled = !(result.semantic && result.semantic.format === "png");
    $("dl-panoptic").disabled = !result.panoptic;
    $("dl-instances").disabled = !result.instances;
    $("layers-button").disabled = false;
    $("layers").innerHTML = "";
  } catch (error) {
    setStatus(`${file.name}: ${error.message}`, true);
  }
}

function buildShowChoices(shown) {
  const box = $("show-task");
  box.innerHTML = "";
  for (const task of shown) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="radio" name="show" value="${task}" ${task === state.show ? "checked" : ""}> ${task}`;
    label.querySelector("input").addEventListener("change", () => { state.show = task; showView(); });
    box.appendChild(label);
  }
}

// -- drawing ----------------------------------------------------------------------------------
function decodePng(base64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the result image could not be decoded"));
    img.src = `data:image/png;base64,${base64}`;
  });
}

async function showView() {
  const view = state.result.view;
  const part = view[state.show];
  const { width, height } = view.display;
  const img = await decodePng(part.png);
  const scratch = document.createElement("canvas");
  scratch.width = width; scratch.height = height;
  const ctx = scratch.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  const rgb = ctx.getImageData(0, 0, width, height).data;
  state.ids = new Int32Array(width * height);
  for (let i = 0; i < state.ids.length; i++) state.ids[i] = rgb[4 * i] + 256 * rgb[4 * i + 1] + 65536 * rgb[4 * i + 2];
  state.segments = new Map(part.segments.map((s) => [s.id, s]));
  buildLegend(part.segments);
  draw();
}

function draw() {
  const { width, height } = state.result.view.display;
  for (const id of ["input-canvas", "result-canvas"]) {
    const canvas = $(id);
    canvas.width = width; canvas.height = height;
    canvas.getContext("2d").drawImage(state.image, 0, 0, width, height);
  }
  const ctx = $("result-canvas").getContext("2d");
  const pixels = ctx.getImageData(0, 0, width, height);
  const data = pixels.data;
  const alpha = Number($("opacity").value) / 100;
  const colors = new Map();
  for (const [id, s] of state.segments) {
    if (state.hidden.has(s.class)) continue;
    // instances of one class get slightly different shades, so neighbours stay apart
    const shade = state.show === "semantic" ? 1 : 0.75 + 0.25 * ((id * 2654435761) % 97) / 97;
    colors.set(id, s.color.map((c) => Math.min(255, c * shade)));
  }
  for (let i = 0; i < state.ids.length; i++) {
    const color = colors.get(state.ids[i]);
    if (!color) continue;
    const o = 4 * i;
    data[o] = data[o] * (1 - alpha) + color[0] * alpha;
    data[o + 1] = data[o + 1] * (1 - alpha) + color[1] * alpha;
    data[o + 2] = data[o + 2] * (1 - alpha) + color[2] * alpha;
  }
  ctx.putImageData(pixels, 0, 0);
  $("result-caption").textContent = `${state.show} · ${state.segments.size} segments` +
    (width !== state.result.width ? ` · shown at ${width}×${height}, computed at ${state.result.width}×${state.result.height}` : "");
  state.rendered += 1;
  $("result-canvas").dataset.rendered = String(state.rendered);
}

function buildLegend(segments) {
  const byClass = new Map();
  for (const s of segments) {
    const entry = byClass.get(s.class) || { ...s, count: 0, area: 0 };
    entry.count += 1; entry.area += s.area;
    byClass.set(s.class, entry);
  }
  const list = $("legend-list");
  list.innerHTML = "";
  for (const entry of [...byClass.values()].sort((a, b) => b.area - a.area)) {
    const li = document.createElement("li");
    li.dataset.class = entry.class;
    li.innerHTML = `<input type="checkbox" ${state.hidden.has(entry.class) ? "" : "checked"}>` +
      `<span class="swatch" style="background: rgb(${entry.color.join(",")})"></span>` +
      `<span class="name"></span><span class="count">${entry.count > 1 ? `${entry.count} × ` : ""}${entry.area} px</span>`;
    li.querySelector(".name").textContent = entry.name;
    li.querySelector("input").addEventListener("change", (event) => {
      if (event.target.checked) state.hidden.delete(entry.class); else state.hidden.add(entry.class);
      draw();
    });
    list.appendChild(li);
  }
}

// -- hover ------------------------------------------------------------------------------------
function segmentAt(canvas, clientX, clientY) {
  const box = canvas.getBoundingClientRect();
  const x = Math.floor((clientX - box.left) / box.width * canvas.width);
  const y = Math.floor((clientY - box.top) / box.height * canvas.height);
  if (!state.ids || x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return null;
  const segment = state.segments.get(state.ids[y * canvas.width + x]);
  return segment && !state.hidden.has(segment.class) ? segment : null;
}

/** Where segment `id` is, in page coordinates of the result canvas (for tests and scripts). */
state.locate = (id) => {
  const canvas = $("result-canvas");
  const box = canvas.getBoundingClientRect();
  for (let i = 0; i < state.ids.length; i++) {
    if (state.ids[i] === id) {
      const x = i % canvas.width, y = Math.floor(i / canvas.width);
      return { x: box.left + (x + 0.5) / canvas.width * box.width, y: box.top + (y + 0.5) / canvas.height * box.height };
    }
  }
  return null;
};

function onHover(event) {
  const tip = $("tooltip");
  const segment = segmentAt(event.currentTarget, event.clientX, event.clientY);
  if (!segment) { tip.hidden = true; return; }
  const score = segment.score === null ? "" : ` · score ${segment.score.toFixed(2)}`;
  tip.textContent = `${segment.name}${score} · ${segment.area} px`;
  tip.style.left = `${event.clientX + 12}px`;
  tip.style.top = `${event.clientY + 12}px`;
  tip.hidden = false;
}

// -- downloads --------------------------------------------------------------------------------
function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function pngBlob(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function stem() {
  return state.files[state.current].name.replace(/\.[^.]+$/, "");
}

function jsonBlob(value) {
  return new Blob([JSON.stringify(value, null, 1)], { type: "application/json" });
}

// -- layers -----------------------------------------------------------------------------------
async function showLayers() {
  const file = state.files[state.current];
  const form = new FormData();
  form.append("image", file, file.name);
  setStatus(`Decoder layers of ${file.name}…`);
  try {
    const layers = await api("/v1/layers", { method: "POST", body: form });
    const grid = $("layers");
    grid.innerHTML = "";
    grid.style.gridTemplateColumns = `9em repeat(${layers.sets}, 1fr)`;
    for (const row of layers.queries) {
      const label = document.createElement("div");
      label.className = "row-label";
      label.textContent = `query ${row.query}: ${row.name} (${row.score.toFixed(2)})`;
      grid.appendChild(label);
      for (const [i, png] of row.masks.entries()) {
        const canvas = document.createElement("canvas");
        canvas.width = layers.width; canvas.height = layers.height;
        canvas.title = `prediction set ${i}`;
        grid.appendChild(canvas);
        const ctx = canvas.getContext("2d");
        ctx.drawImage(state.image, 0, 0, layers.width, layers.height);
        const mask = await decodePng(png);
        const scratch = document.createElement("canvas");
        scratch.width = layers.width; scratch.height = layers.height;
        const sctx = scratch.getContext("2d");
        sctx.drawImage(mask, 0, 0);
        const m = sctx.getImageData(0, 0, layers.width, layers.height).data;
        const pixels = ctx.getImageData(0, 0, layers.width, layers.height);
        for (let p = 0; p < m.length; p += 4) {
          const inside = m[p] > 127;
          for (let c = 0; c < 3; c++) {
            pixels.data[p + c] = inside ? pixels.data[p + c] * 0.5 + row.color[c] * 0.5 : pixels.data[p + c] * 0.35;
          }
        }
        ctx.putImageData(pixels, 0, 0);
      }
    }
    setStatus(`${file.name}: ${layers.queries.length} queries over ${layers.sets} prediction sets`);
  } catch (error) {
    setStatus(`layers: ${error.message}`, true);
  }
}

// -- wiring -----------------------------------------------------------------------------------
function wire() {
  $("file-input").addEventListener("change", (e) => addFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
  $("opacity").addEventListener("input", () => { if (state.result) draw(); });
  $("side-by-side").addEventListener("change", (e) => $("views").classList.toggle("side-by-side", e.target.checked));
  for (const id of ["result-canvas", "input-canvas"]) {
    $(id).addEventListener("mousemove", onHover);
    $(id).addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  }
  $("dl-overlay").addEventListener("click", () => $("result-canvas").toBlob((b) => save(b, `${stem()}_${state.show}.png`)));
  $("dl-semantic").addEventListener("click", () => save(pngBlob(state.result.semantic.png), `${stem()}_semantic.png`));
  $("dl-panoptic").addEventListener("click", () => {
    save(pngBlob(state.result.panoptic.png), `${stem()}_panoptic.png`);
    save(jsonBlob({ file_name: `${stem()}_panoptic.png`, segments_info: state.result.panoptic.segments_info }),
      `${stem()}_panoptic.json`);
  });
  $("dl-instances").addEventListener("click", () => save(jsonBlob(state.result.instances), `${stem()}_instances.json`));
  $("layers-button").addEventListener("click", showLayers);
}

wire();
loadModel().catch((error) => setStatus(`Could not load the model: ${error.message}`, true));
